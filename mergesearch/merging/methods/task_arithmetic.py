"""Task-vector methods: task arithmetic, TIES, DARE, breadcrumbs and DELLA.

All share one shape (mergekit's "generalized task arithmetic"): sparsify each task vector,
scale it by its weight, optionally keep only entries that agree with the elected sign,
sum, optionally divide by the sum of the weights that contributed, scale by lambda, and
add to the base.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mergesearch.merging import sparsify
from mergesearch.merging.methods.common import (
    DENSITY,
    INT8_MASK,
    LAMBDA,
    WEIGHT,
    normalize,
    rescale,
)
from mergesearch.merging.registry import MergeInputs, Param, merge_method

GAMMA = Param("gamma", default=0.01, per_model=True, valid=(0.0, 1.0), search=(0.0, 0.1))
EPSILON = Param("epsilon", default=0.15, per_model=True, valid=(0.0, 1.0), search=(0.01, 0.2))


def sign_consensus(deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """TIES sign election: True where an entry agrees with the elected sign.

    ``sum`` elects the sign of the summed (weighted) deltas, ``count`` the sign held by
    more sources; zero counts as positive, as in mergekit.
    """
    votes = deltas.sum(dim=0) if method == "sum" else (deltas > 0).sum(0) - (deltas < 0).sum(0)
    # sign(d) == majority, without materialising float signs; zeros agree with nothing
    return torch.where(votes >= 0, deltas > 0, deltas < 0)


def generalized_task_arithmetic(
    x: MergeInputs,
    *,
    weight: list[float],
    consensus: bool,
    normalize: bool,
    lambda_: float,
    sparsifier=None,
) -> torch.Tensor:
    deltas = x.deltas  # a fresh tensor: updated in place to spare memory passes
    if sparsifier is not None:
        for i in range(deltas.shape[0]):
            deltas[i] = sparsifier(i, deltas[i])
    w = torch.tensor(weight, dtype=deltas.dtype, device=deltas.device)
    w = w.reshape(-1, *([1] * (deltas.dim() - 1)))
    deltas.mul_(w)
    if consensus:
        mask = sign_consensus(deltas)
        mixed = deltas.mul_(mask).sum(dim=0)
        if normalize:  # the disjoint mean: divide by the weights that agree
            divisor = torch.zeros_like(mixed)
            for i, wi in enumerate(weight):
                divisor.add_(mask[i], alpha=wi)
            divisor[divisor == 0] = 1
            mixed.div_(divisor)
    else:
        mixed = deltas.sum(dim=0)
        if normalize:
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
            mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(x.base)


def _register(name, *, consensus, kind, default_normalize, default_rescale, reference):
    params = [WEIGHT, DENSITY, LAMBDA, INT8_MASK, normalize(default_normalize), rescale(default_rescale)]
    if kind == "outliers":
        params.append(GAMMA)
    if kind == "della":
        params.append(EPSILON)
    if kind is None:
        # Accepted (mergekit accepts it) but unused without sparsification: not searched.
        params[1] = replace(DENSITY, search=None)

    def method(x: MergeInputs, *, weight, density=None, gamma=None, epsilon=None,
               normalize, rescale, int8_mask, **knobs) -> torch.Tensor:
        def sparsifier(i: int, delta: torch.Tensor) -> torch.Tensor:
            if kind == "magnitude":
                return sparsify.magnitude(delta, density[i], rescale)
            if kind == "random":
                return sparsify.bernoulli(delta, density[i], x.uniform(i), rescale)
            if kind == "outliers":
                return sparsify.magnitude_outliers(delta, density[i], gamma[i], rescale)
            return sparsify.della_magprune(delta, density[i], epsilon[i], x.uniform(i), rescale)

        # int8_mask only changes the dtype mergekit holds the sign mask in; the result
        # is identical, so it is accepted and ignored.
        return generalized_task_arithmetic(
            x, weight=weight, consensus=consensus, normalize=normalize,
            lambda_=knobs["lambda"], sparsifier=sparsifier if kind else None,
        )

    method.__name__ = name
    method.__doc__ = f"{name}: generalized task arithmetic ({reference})."
    merge_method(name, params, base="required", random=kind in ("random", "della"),
                 reference=reference)(method)


_register("task_arithmetic", consensus=False, kind=None, default_normalize=False,
          default_rescale=False, reference="https://arxiv.org/abs/2212.04089")
_register("ties", consensus=True, kind="magnitude", default_normalize=True,
          default_rescale=False, reference="https://arxiv.org/abs/2306.01708")
_register("dare_ties", consensus=True, kind="random", default_normalize=False,
          default_rescale=True, reference="https://arxiv.org/abs/2311.03099")
_register("dare_linear", consensus=False, kind="random", default_normalize=False,
          default_rescale=True, reference="https://arxiv.org/abs/2311.03099")
_register("breadcrumbs", consensus=False, kind="outliers", default_normalize=False,
          default_rescale=False, reference="https://arxiv.org/abs/2312.06795")
_register("breadcrumbs_ties", consensus=True, kind="outliers", default_normalize=False,
          default_rescale=False, reference="https://arxiv.org/abs/2312.06795")
_register("della", consensus=True, kind="della", default_normalize=True,
          default_rescale=True, reference="https://arxiv.org/abs/2406.11617")
_register("della_linear", consensus=False, kind="della", default_normalize=False,
          default_rescale=True, reference="https://arxiv.org/abs/2406.11617")
