"""Passthrough: one input, optionally scaled."""

from __future__ import annotations

import torch

from mergesearch.merging.registry import MergeInputs, Param, merge_method


@merge_method("passthrough", [Param("scale", default=None, per_model=True)], base="none",
              max_sources=1)
def passthrough(x: MergeInputs, *, scale: list[float | None]) -> torch.Tensor:
    """The single input, times ``scale`` when one is given."""
    return x.models[0] if scale[0] is None else x.models[0] * scale[0]
