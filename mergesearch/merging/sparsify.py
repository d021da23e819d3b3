"""Sparsification of task vectors: the masks behind TIES, DARE, breadcrumbs and DELLA.

Each function takes one task vector and returns it masked (and, with ``rescale``,
rescaled to keep its L1 norm, as mergekit 0.1.5 does). Random masks compare a uniform
tensor from ``MergeInputs.uniform`` with the keep probability, so they are reproducible.

A task vector is the same for every candidate of a search, so what depends on it alone,
the magnitude ranks of its entries, can be computed once per worker (`magnitude_ranks`,
`row_rank_fraction`) and passed in: selection then costs a comparison per entry instead
of a selection or a sort.

Beside each mask, how many entries it keeps (``*_kept``): the rules the methods declare in
their `Sparsity`, which the cost evaluator reads; and DELLA's rule for its knobs
(`della_in_range`), which recipe checks and the search space read.
"""

from __future__ import annotations

import torch


def rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7,
             inplace: bool = False) -> torch.Tensor:
    """``tensor * mask``, times the ratio of L1 norms before and after with ``rescale``;
    written into ``tensor`` itself with ``inplace`` (its caller owns it)."""
    before = tensor.abs().sum() if rescale else None
    masked = tensor.mul_(mask) if inplace else tensor * mask
    if not rescale:
        return masked
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked.mul_(before / after)


def _count(mask: torch.Tensor) -> int:
    return int(torch.count_nonzero(mask))  # ~10x faster than summing booleans


def kth_smallest(values: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The k-th smallest (1-based) of a flat tensor, exactly, and how many entries are
    strictly smaller than it, in a few linear passes.

    A strided sample brackets the answer; only the entries inside the bracket are
    selected over. Falls back to `kthvalue` when the bracket misses (rare)."""
    n = values.numel()
    if n > 1 << 16:
        step = n // (1 << 14)
        sample = values[::step].sort().values
        q = k / n * (sample.numel() - 1)
        margin = 2 * (sample.numel() ** 0.5) + 2  # >= 4 sd of a sample quantile's rank
        lo = sample[max(0, int(q - margin))]
        hi = sample[min(sample.numel() - 1, int(q + margin) + 1)]
        at_least_lo = values >= lo
        below = n - _count(at_least_lo)
        inside = values[at_least_lo & (values <= hi)]
        if below < k <= below + inside.numel():
            kth = torch.kthvalue(inside, k - below).values
            return kth, below + _count(inside < kth)
    kth = torch.kthvalue(values, k).values
    return kth, _count(values < kth)


def magnitude_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Each entry's 0-based rank by magnitude in ascending order (among equal magnitudes the
    earlier entry comes first, as in `select_range`), int32, in the shape of ``tensor``."""
    flat = tensor.abs().reshape(-1)
    if flat.dtype == torch.float32:
        # Non-negative floats order as their bit patterns do, and integer sorts are radix
        # sorts on CPU: ~3x faster than sorting the floats, the same (stable) order.
        flat = flat.view(torch.int32)
    order = flat.sort(stable=True).indices
    ranks = torch.empty(flat.shape, dtype=torch.int32, device=flat.device)
    ranks[order] = torch.arange(flat.numel(), dtype=torch.int32, device=flat.device)
    return ranks.reshape(tensor.shape)


def _ranked_range(ranks: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    if start <= 0:
        return ranks < stop
    return (ranks >= start) & (ranks < stop)


def select_range(values: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Boolean mask of the entries ranked start..stop-1 in ascending order (exactly
    stop - start of them; among equal values, the earlier ones come first)."""
    n = values.numel()
    if stop >= n:
        return _rank_at_least(values, start) if start > 0 else torch.ones_like(values, dtype=torch.bool)
    mask = ~_rank_at_least(values, stop)
    if start > 0:
        mask &= _rank_at_least(values, start)
    return mask


def _rank_at_least(values: torch.Tensor, r: int) -> torch.Tensor:
    """Mask of the entries whose ascending rank is >= r (ties broken by position)."""
    thr, n_less = kth_smallest(values, r + 1)
    mask = values >= thr
    # of the entries equal to thr, those at rank >= r are all but the first r - n_less
    # (none to drop unless thr is tied, so the common case is the one pass above)
    skip = r - n_less
    if skip > 0:  # common in bf16 checkpoints: few distinct values
        mask[torch.nonzero(values == thr).squeeze(1)[:skip]] = False
    return mask


def _sixteen_bit(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.float16, torch.bfloat16)


def _magnitude_order(tensor: torch.Tensor, descending: bool) -> torch.Tensor:
    """Entries by magnitude as mergekit 0.1.5 orders them: torch's (unstable) sort, of the
    magnitudes upcast on CPU. In 16-bit arithmetic many entries tie at a density's cut, and
    only this order keeps the ones mergekit keeps."""
    w = tensor.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    return torch.sort(w, descending=descending).indices


def _by_order(indices: torch.Tensor, n: int) -> torch.Tensor:
    keep = torch.zeros(n, dtype=torch.bool, device=indices.device)
    keep[indices] = True
    return keep


def magnitude(tensor: torch.Tensor, density: float, rescale: bool = False,
              ranks: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (at least one).
    ``ranks``: `magnitude_ranks` of ``tensor``, where the caller keeps them."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    n = tensor.numel()
    k = max(1, int(density * n))
    if ranks is not None:
        return rescaled(tensor, ranks >= n - k, rescale, inplace=inplace)
    if _sixteen_bit(tensor):
        keep = _by_order(_magnitude_order(tensor, descending=True)[:k], n)
        return rescaled(tensor, keep.reshape(tensor.shape), rescale, inplace=inplace)
    keep = select_range(tensor.abs().reshape(-1), n - k, n)
    return rescaled(tensor, keep.reshape(tensor.shape), rescale, inplace=inplace)


def magnitude_kept(density: float, n: int) -> int:
    """Entries `magnitude` keeps of ``n``: the top int(density * n), at least one."""
    if density >= 1:
        return n
    return 0 if density <= 0 or n == 0 else max(1, int(density * n))


def magnitude_outliers(
    tensor: torch.Tensor, density: float, gamma: float, rescale: bool = False,
    ranks: torch.Tensor | None = None, inplace: bool = False,
) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` fraction of largest entries, then the smallest,
    keeping ``density`` of them (the outlier cut shrinks if needed to keep the density).
    ``ranks`` as in `magnitude`."""
    if density >= 1:
        return tensor
    n = tensor.numel()
    target = int(density * n)
    n_bottom = max(0, n - target - int(gamma * n))
    if target == 0:
        return rescaled(tensor, torch.zeros_like(tensor), rescale, inplace=inplace)
    if ranks is not None:
        keep = _ranked_range(ranks, n_bottom, n_bottom + target)
    elif _sixteen_bit(tensor):
        order = _magnitude_order(tensor, descending=False)
        keep = _by_order(order[n_bottom:n_bottom + target], n).reshape(tensor.shape)
    else:
        keep = select_range(tensor.abs().reshape(-1), n_bottom, n_bottom + target).reshape(tensor.shape)
    return rescaled(tensor, keep, rescale, inplace=inplace)


def outliers_kept(density: float, n: int) -> int:
    """Entries `magnitude_outliers` keeps of ``n``: int(density * n), whatever ``gamma``."""
    return n if density >= 1 else max(0, int(density * n))


def bernoulli(
    tensor: torch.Tensor, density: float, uniform: torch.Tensor, rescale: bool = False,
    inplace: bool = False,
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``."""
    if density >= 1:
        return tensor
    return rescaled(tensor, uniform < density, rescale, inplace=inplace)


def bernoulli_kept(density: float, n: int) -> float:
    """Entries `bernoulli` keeps of ``n``, in expectation."""
    return float(n) if density >= 1 else max(0.0, density) * n


def row_rank_fraction(tensor: torch.Tensor) -> torch.Tensor:
    """DELLA's normalised magnitude rank of each entry within its row: 0 for a row's
    smallest, 1 for its largest (float32, rows as `della_magprune` sees them)."""
    rows = tensor if tensor.dim() >= 2 else tensor.unsqueeze(0)
    order = rows.abs().argsort(dim=1)
    ranks = torch.empty_like(order)  # the inverse permutation: argsort of argsort, one sort
    ranks.scatter_(1, order, torch.arange(1, order.shape[1] + 1, device=order.device).expand_as(order))
    ranks = ranks.to(torch.float32)
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    return ((ranks - lo) / (hi - lo)).clamp(0, 1)


def della_magprune(
    tensor: torch.Tensor, density: float, epsilon: float, uniform: torch.Tensor,
    rescale: bool = False, rank_fraction: torch.Tensor | None = None, inplace: bool = False,
) -> torch.Tensor:
    """DELLA: keep probabilities rise linearly with each entry's magnitude rank within its
    row, from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest).
    ``rank_fraction``: `row_rank_fraction` of ``tensor``, where the caller keeps it."""
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    if not della_in_range(density, epsilon):
        raise ValueError("epsilon must keep density +/- epsilon inside (0, 1)")
    rows = tensor if tensor.dim() >= 2 else tensor.unsqueeze(0)
    rank_norm = row_rank_fraction(tensor) if rank_fraction is None else rank_fraction
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = uniform.reshape(rows.shape) < probs
    return rescaled(rows, mask, rescale, inplace=inplace).reshape(tensor.shape)


def della_max_epsilon(density: float) -> float:
    """DELLA's rule: keep probabilities density +/- epsilon must lie inside (0, 1), so a
    density below 1 allows any epsilon below min(density, 1 - density) (exclusive)."""
    return min(density, 1 - density)


def della_density_range(epsilon: float) -> tuple[float, float]:
    """The open interval of densities below 1 that `della_max_epsilon` allows ``epsilon`` in."""
    return epsilon, 1 - epsilon


def della_in_range(density: float, epsilon: float) -> bool:
    """Whether DELLA's knobs obey its rule (`della_max_epsilon`); density 1 keeps all."""
    return density >= 1 or epsilon < della_max_epsilon(density)


def della_kept(density: float, n: int) -> float:
    """Entries `della_magprune` keeps of ``n``, in expectation: the keep probabilities rise
    linearly over evenly spaced ranks, so their mean is ``density``, whatever ``epsilon``."""
    if density >= 1:
        return float(n)
    return 0.0 if density <= 0 else density * n
