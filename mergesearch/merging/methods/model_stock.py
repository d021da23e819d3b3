"""Model Stock (arXiv:2403.19522): interpolate between the base and the average of the
fine-tuned models by a ratio derived from the angle between their task vectors."""

from __future__ import annotations

import torch

from mergesearch.merging.registry import MergeInputs, Param, merge_method


@merge_method("model_stock", [Param("filter_wise", default=False, type=bool)],
              base="required", min_sources=2, reference="https://arxiv.org/abs/2403.19522")
def model_stock(x: MergeInputs, *, filter_wise: bool) -> torch.Tensor:
    """t = N cos / (1 + (N-1) cos) with cos the mean pairwise cosine of the task vectors;
    result = t * mean(models) + (1 - t) * base. Where the denominator vanishes, the base."""
    base, models = x.base, x.models
    n = models.shape[0]
    if not filter_wise and models.dtype == torch.float32:
        # Every pairwise dot product from one Gram matrix (one pass over the task vectors,
        # in BLAS) instead of a product and a sum per pair.
        offsets = x.deltas.reshape(n, -1)
        gram = offsets @ offsets.T
        norms = gram.diagonal().sqrt()
        i, j = torch.triu_indices(n, n, offset=1, device=gram.device)
        cos = (gram[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1).mean()
        denom = 1 + (n - 1) * cos
        t = 0.0 if denom.abs() < 1e-6 else float(n * cos / denom)
        return offsets.sum(dim=0).mul_(t / n).reshape(base.shape).add_(base)
    # Filter-wise: one angle per row (a 1-D tensor is one row). Also the whole tensor as one
    # row in 16-bit arithmetic, where only mergekit's order of operations rounds as it does.
    if not filter_wise:
        b, ms = base.reshape(1, -1), models.reshape(n, 1, -1)
    else:
        b = base.unsqueeze(0) if base.dim() == 1 else base
        ms = models.unsqueeze(1) if base.dim() == 1 else models
    offsets = ms - b
    norms = torch.linalg.vector_norm(offsets, dim=-1)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    n * cos / torch.where(singular, torch.ones_like(denom), denom))
    average = sum(ms.unbind(0)) / n
    return (t * average + (1 - t) * b).reshape(base.shape)
