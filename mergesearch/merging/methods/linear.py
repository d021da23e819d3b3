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
    """sum_i w_i * m_i, divided by sum_i w_i when ``normalize``."""
    w = torch.tensor(weight, dtype=x.models.dtype, device=x.models.device)
    out = torch.tensordot(w, x.models, dims=1)
    return out / w.sum() if normalize else out
