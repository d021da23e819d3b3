"""Linear: a weighted average of the inputs (Model Soups, arXiv:2203.05482)."""

from __future__ import annotations

import math

import torch

from mergesearch.merging.methods.common import WEIGHT, normalize
from mergesearch.merging.registry import MergeInputs, merge_method


def _coefficients(*, weight: list[float], normalize: bool) -> tuple[float, list[float]]:
    total = sum(weight) if normalize else 1.0
    return 0.0, [w / total if total else math.nan for w in weight]  # as fn: 0/0 is NaN


@merge_method("linear", [WEIGHT, normalize(True)], base="none",
              reference="https://arxiv.org/abs/2203.05482", combination=_coefficients)
def linear(x: MergeInputs, *, weight: list[float], normalize: bool) -> torch.Tensor:
    """sum_i w_i * m_i, divided by sum_i w_i when ``normalize``; in float32 whatever the
    inputs' dtype (as mergekit sums 16-bit inputs)."""
    models = x.models.float()
    w = torch.tensor(weight, dtype=models.dtype, device=models.device)
    out = torch.tensordot(w, models, dims=1)
    return out / w.sum() if normalize else out
