"""Built-in merge methods. Each module registers its methods with `merge_method`."""

from mergesearch.merging.methods import (  # noqa: F401
    linear,
    model_stock,
    passthrough,
    sce,
    slerp,
    task_arithmetic,
)
