"""Fisher-weighted averaging (Matena & Raffel, "Merging Models with Fisher-Weighted
Averaging", arXiv:2111.09832).

Each entry is averaged with weights λ_i·F_i, the diagonal Fisher information of model i
at that entry: θ* = Σ_i λ_i F_i θ_i / Σ_i λ_i F_i. An entry a model is sure about pulls
the average towards that model's value. The Fisher of each model is computed once on
calibration data (`mergesearch.merging.fisher_info`) and handed to the method as a side input,
so a candidate costs what a weighted average costs.
"""

from __future__ import annotations

import torch

from mergesearch.merging.methods.common import WEIGHT
from mergesearch.merging.registry import MergeInputs, Param, merge_method

FISHER_PARAMS = [
    WEIGHT,
    # Added to every Fisher value (the paper's epsilon; FusionBench's minimal_fisher_weight):
    # entries no model has information about fall back to the λ-weighted average.
    Param("fisher_floor", default=1e-6, valid=(0.0, 1.0)),
    # Divide each model's Fisher by its mean over the whole model first, so a model whose
    # gradients are larger overall does not win every entry (FusionBench's
    # normalize_fisher_weight, with the mean in place of the norm).
    Param("normalize_fisher", default=False, type=bool),
]


@merge_method("fisher", FISHER_PARAMS, base="none", mergekit=False, needs=("fisher",),
              reference="https://arxiv.org/abs/2111.09832")
def fisher(x: MergeInputs, *, weight: list[float], fisher_floor: float,
           normalize_fisher: bool) -> torch.Tensor:
    """sum_i w_i (F_i + floor) m_i / sum_i w_i (F_i + floor)."""
    if not any(w > 0 for w in weight):
        raise ValueError(f"{x.name}: fisher needs a positive weight for at least one model")
    shape = (-1,) + (1,) * (x.models.dim() - 1)
    w = torch.tensor(weight, dtype=torch.float32, device=x.models.device).view(shape)
    f = x.fisher
    if normalize_fisher:
        f = f / x.fisher_mean.clamp_min(torch.finfo(torch.float32).tiny).view(shape)
    wf = (f + fisher_floor).mul_(w)
    return (wf * x.models).sum(0).div_(wf.sum(0))
