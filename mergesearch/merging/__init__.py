"""Merging: methods as pure tensor functions, checkpoints, the in-place engine, output."""

from mergesearch.merging.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_compatible,
    layer_index,
)
from mergesearch.merging.engine import TaskVectors, load_live_model, resolve_params
from mergesearch.merging.output import save_model
from mergesearch.merging.registry import (
    MergeInputs,
    MergeMethod,
    Param,
    all_methods,
    get_method,
    merge_method,
)
from mergesearch.merging.validate import validate_recipe

__all__ = [
    "Checkpoint", "CheckpointError", "MergeInputs", "MergeMethod", "Param", "TaskVectors",
    "all_methods", "check_compatible", "get_method", "layer_index", "load_live_model",
    "merge_method", "resolve_params", "save_model", "validate_recipe",
]
