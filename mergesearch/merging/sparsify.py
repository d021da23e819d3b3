"""Sparsification of task vectors: the masks behind TIES, DARE, breadcrumbs and DELLA.

Each function takes one task vector and returns it masked (and, with ``rescale``,
rescaled to keep its L1 norm, as mergekit 0.1.5 does). Random masks compare a uniform
tensor from ``MergeInputs.uniform`` with the keep probability, so they are reproducible.
"""

from __future__ import annotations

import torch


def rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude(tensor: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (at least one)."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[torch.topk(tensor.abs().reshape(-1), k, sorted=False).indices] = 1
    return rescaled(tensor, mask.reshape_as(tensor), rescale)


def magnitude_outliers(
    tensor: torch.Tensor, density: float, gamma: float, rescale: bool = False
) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` fraction of largest entries, then the smallest,
    keeping ``density`` of them (the outlier cut shrinks if needed to keep the density)."""
    if density >= 1:
        return tensor
    n = tensor.numel()
    target = int(density * n)
    n_bottom = max(0, n - target - int(gamma * n))
    order = torch.sort(tensor.abs().reshape(-1)).indices
    mask = torch.zeros(n, dtype=tensor.dtype, device=tensor.device)
    mask[order[n_bottom : n_bottom + target]] = 1
    return rescaled(tensor, mask.reshape_as(tensor), rescale)


def bernoulli(
    tensor: torch.Tensor, density: float, uniform: torch.Tensor, rescale: bool = False
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``."""
    if density >= 1:
        return tensor
    return rescaled(tensor, (uniform < density).to(tensor.dtype), rescale)


def della_magprune(
    tensor: torch.Tensor, density: float, epsilon: float, uniform: torch.Tensor,
    rescale: bool = False,
) -> torch.Tensor:
    """DELLA: keep probabilities rise linearly with each entry's magnitude rank within its
    row, from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest)."""
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("epsilon must keep density +/- epsilon inside (0, 1)")
    rows = tensor if tensor.dim() >= 2 else tensor.unsqueeze(0)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = (uniform.reshape(rows.shape) < probs).to(tensor.dtype)
    return rescaled(rows, mask, rescale).reshape(tensor.shape)
