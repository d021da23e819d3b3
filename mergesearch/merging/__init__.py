"""Merging: methods as pure tensor functions, checkpoints, the in-place engine, output.

The registry is imported first and the built-in methods next, so that importing any part
of `mergesearch.merging` registers every method.
"""

from mergesearch.merging.registry import (  # isort: skip
    MergeInputs,
    MergeMethod,
    Param,
    all_methods,
    get_method,
    merge_method,
)
from mergesearch.merging import methods  # noqa: F401  # isort: skip  (registers the built-ins)
from mergesearch.errors import CheckpointError
from mergesearch.merging.architecture import layer_index
from mergesearch.merging.checkpoint import Checkpoint, check_compatible
from mergesearch.merging.engine import MergeEngine, load_live_model, resolve_params
from mergesearch.merging.output import save_model
from mergesearch.merging.validate import validate_recipe

__all__ = [
    "Checkpoint", "CheckpointError", "MergeEngine", "MergeInputs", "MergeMethod", "Param",
    "all_methods", "check_compatible", "get_method", "layer_index", "load_live_model",
    "merge_method", "resolve_params", "save_model", "validate_recipe",
]
