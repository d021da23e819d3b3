"""The errors a user can fix: the CLI prints their one-line message and exits with 2."""

from mergesearch.config import ConfigError
from mergesearch.recipe import RecipeError


class StudyError(ValueError):
    """A study or storage that cannot be used (unreachable, missing, mismatched)."""


class EvaluatorError(ValueError):
    """An objective that cannot be set up (unknown task or metric, missing dataset)."""


class ArgumentError(ValueError):
    """A command-line argument or option that cannot be used (it names the option)."""


def _checkpoint_error():
    from mergesearch.merging.checkpoint import CheckpointError

    return CheckpointError


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, RecipeError, StudyError, EvaluatorError, ArgumentError, _checkpoint_error(),
)
