"""Linear: a weighted average of the inputs (Model Soups, arXiv:2203.05482)."""

from __future__ import annotations

import torch

from mergesearch.merging.methods.common import WEIGHT, normalize
from mergesearch.merging.registry import MergeInputs, merge_method


@merge_method("linear", [WEIGHT, normalize(True)], base="none",
              reference="https://arxiv.org/abs/2203.05482")
def linear(x: MergeInputs, *, weight: list[float], normalize: bool) -> torch.Tensor:
    """sum_i w_i * m_i, divided by sum_i w_i when ``normalize``."""
    w = torch.tensor(weight, dtype=x.models.dtype, device=x.models.device)
    out = torch.tensordot(w, x.models, dims=1)
    return out / w.sum() if normalize else out
