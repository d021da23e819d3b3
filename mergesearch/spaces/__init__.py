"""Search spaces: the config's `space` as Optuna distributions; a trial as a Recipe."""

from mergesearch.spaces.knobs import check_space
from mergesearch.spaces.space import SearchSpace

__all__ = ["SearchSpace", "check_space"]
