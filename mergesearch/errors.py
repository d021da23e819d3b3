"""The errors a user can fix. A leaf: it imports nothing of the package.

Every one of them is a `UserError`: its message names the field, file or option that is
wrong and what was expected, and the CLI prints it on one line and exits with code 2.
"""


class UserError(ValueError):
    """Base of every error a user can fix; the CLI catches this one class."""


class ConfigError(UserError):
    """A config that cannot be used; the message names the file and the field."""


class RecipeError(UserError):
    """A recipe that cannot be used; the message names the field or file."""


class CheckpointError(UserError):
    """A model folder that cannot be used (missing, unreadable, incompatible)."""


class StudyError(UserError):
    """A study or storage that cannot be used (unreachable, missing, mismatched)."""


class EvaluatorError(UserError):
    """An objective that cannot be set up (unknown task or metric, missing dataset)."""


class ArgumentError(UserError):
    """A command-line argument or option that cannot be used (it names the option)."""
