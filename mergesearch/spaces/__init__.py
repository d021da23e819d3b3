"""Search spaces: the config's `space` as Optuna distributions; a trial as a Recipe."""

from mergesearch.spaces.space import SearchSpace, check_space

__all__ = ["SearchSpace", "check_space"]
