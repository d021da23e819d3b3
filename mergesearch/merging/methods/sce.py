"""SCE (arXiv:2408.07990): select the entries where the task vectors vary most, weight
each task vector by its mean squared magnitude, erase minority signs, average."""

from __future__ import annotations

import torch

from mergesearch.merging.methods.common import INT8_MASK
from mergesearch.merging.methods.task_arithmetic import sign_consensus
from mergesearch.merging.registry import MergeInputs, Param, Sparsity, merge_method

SELECT_TOPK = Param("select_topk", default=1.0, valid=(0.0, 1.0), search=(0.1, 1.0))


def _select_mask(tvs: torch.Tensor, fraction: float) -> torch.Tensor:
    if fraction <= 0:
        return torch.zeros_like(tvs[0])
    if fraction >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var).item() * fraction)
    mask = torch.zeros_like(var)
    if k:
        mask.view(-1)[torch.topk(var.abs().reshape(-1), k).indices] = 1
    return mask


def sce_kept(fraction: float, n: int) -> int:
    """Entries `_select_mask` keeps of ``n``: int(fraction * n) where every entry varies
    between the task vectors (the count of those that do is known only from the weights)."""
    if fraction >= 1:
        return n
    return 0 if fraction <= 0 else int(n * fraction)


@merge_method("sce", [INT8_MASK, SELECT_TOPK], base="required",
              reference="https://arxiv.org/abs/2408.07990",
              sparsity=Sparsity("variance", "select_topk", sce_kept))
def sce(x: MergeInputs, *, select_topk: float, int8_mask: bool) -> torch.Tensor:
    tvs = x.deltas
    if select_topk < 1:
        tvs = tvs * _select_mask(tvs, select_topk)
    erase = sign_consensus(tvs).to(tvs.dtype)
    energy = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = energy.sum().item()
    w = torch.full_like(energy, 1 / energy.numel()) if abs(total) < 1e-6 else energy / total
    w = w.reshape(-1, *([1] * (tvs.dim() - 1))) * erase
    return x.base + (tvs * w).sum(dim=0) / w.sum(dim=0).clamp(min=1e-6)
