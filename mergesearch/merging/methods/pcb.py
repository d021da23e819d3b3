"""PCB-merging: Parameter Competition Balancing (Du et al., 2024, arXiv:2410.02396).

Each entry of each task vector gets a balancing score from its competition within its
own task (intra) and with the other tasks (inter); the entries of low score are dropped
and the rest are averaged, weighted by their scores. As the authors' code
(duguodong7/pcb-merging, ``pcb-merging.py``; FusionBench ships no PCB) does it, for
task vectors tau_i (i = 1..n) of d entries:

    a_i     = |tau_i| clipped to its [c, 1 - c] quantiles      (outliers; c = ``clip``)
    intra_i = exp(n * norm(a_i)^2)
    inter_i = tanh(tau_i * sum_j tau_j)
    s_i     = intra_i * inter_i
    beta_i  = norm(max(s_i, q_i)), q_i = the (1 - density_i) quantile of s_i   (drop)
    merged  = base + lambda * sum_i w_i sign(tau_i) a_i beta_i / max(sum_i beta_i, 1e-12)

``norm`` is min-max normalisation over the entries of one task vector. The paper writes
the intra and inter scores with a softmax; its code uses exp and tanh, and the softmax's
denominator is a constant per task that the final min-max normalisation removes, so the
two agree. Quantiles are sorted entries at index int(d * r) (int(d * (1 - c)) - 1 for the
top clip), as in the authors' code; with 0 < c * d < 1 that clips the single largest
entry to the second largest. The authors' per-model ``lams`` are ``weight`` here.

Differences from the authors' code: it flattens the whole model into one vector; here
the scores, quantiles and normalisations are taken per tensor, like every other method in
this package (so small tensors, e.g. norms, have their own quantiles). Where min-max has
nothing to normalise (all entries equal) it gives 0 instead of NaN, and density may
differ per model.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mergesearch.merging.methods.common import DENSITY, LAMBDA, WEIGHT
from mergesearch.merging.registry import MergeInputs, Param, Sparsity, merge_method
from mergesearch.merging.sparsify import kth_smallest

PCB_WEIGHT = replace(WEIGHT, default=1.0, search=(0.8, 1.3))  # the authors' search range
PCB_DENSITY = replace(DENSITY, default=0.1, search=(0.05, 1.0))  # their pcb_ratio: 0.05-0.2
CLIP = Param("clip", default=1e-4, valid=(0.0, 0.5))  # the authors' min/max_ratio


def _sorted_at(row: torch.Tensor, index: int) -> torch.Tensor:
    """The entry at ``index`` of the ascending sort of a flat tensor."""
    return kth_smallest(row, index + 1)[0]


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min) per row; 0 where a row has a single value."""
    lo = x.min(dim=1, keepdim=True).values
    span = x.max(dim=1, keepdim=True).values - lo
    return (x - lo) / torch.where(span > 0, span, torch.ones_like(span))


def pcb_kept(density: float, n: int) -> int:
    """Entries of a task vector of ``n`` that keep a non-zero beta: those ranked above the
    cut; the cut entry itself becomes the minimum, which min-max sends to 0."""
    cut = int(n * (1 - density))
    return 0 if cut >= n else n - cut - 1


@merge_method("pcb", [PCB_WEIGHT, PCB_DENSITY, LAMBDA, CLIP], base="required",
              reference="https://arxiv.org/abs/2410.02396", mergekit=False,
              sparsity=Sparsity("pcb", "density", pcb_kept))
def pcb(x: MergeInputs, *, weight: list[float], density: list[float], clip: float,
        **knobs) -> torch.Tensor:
    n = x.models.shape[0]
    tv = x.deltas.reshape(n, -1)
    d = tv.shape[1]
    inter = torch.tanh(tv * tv.sum(dim=0))
    mag = tv.abs()
    if clip > 0:
        for i in range(n):
            lo, hi = _sorted_at(mag[i], int(d * clip)), _sorted_at(mag[i], int(d * (1 - clip) - 1))
            mag[i].clamp_(lo, hi)
    score = torch.exp(n * _minmax(mag).square_()).mul_(inter)
    for i in range(n):
        cut = int(d * (1 - density[i]))
        if cut >= d:  # density 0: drop everything
            score[i].zero_()
            continue
        score[i].clamp_(min=_sorted_at(score[i], cut))
    beta = _minmax(score)
    w = torch.tensor(weight, dtype=tv.dtype, device=tv.device).unsqueeze(1)
    merged = (tv.sign() * mag * beta * w).sum(dim=0) / beta.sum(dim=0).clamp(min=1e-12)
    return x.base + knobs["lambda"] * merged.reshape(x.base.shape)
