"""Built-in merge methods. Each module registers its methods with `merge_method`."""

from mergesearch.merging.methods import (  # noqa: F401
    consensus,
    fisher,
    layer_swap,
    linear,
    model_stock,
    passthrough,
    pcb,
    sce,
    slerp,
    task_arithmetic,
)
