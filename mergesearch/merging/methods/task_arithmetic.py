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
from mergesearch.merging.registry import NO_SPARSITY, MergeInputs, Param, Sparsity, merge_method

GAMMA = Param("gamma", default=0.01, per_model=True, valid=(0.0, 1.0), search=(0.0, 0.1))
EPSILON = Param("epsilon", default=0.15, per_model=True, valid=(0.0, 1.0), search=(0.01, 0.2))

# What each kind of sparsifier below keeps of a task vector, at its ``density``.
SPARSITY = {
    None: NO_SPARSITY,  # density accepted (as mergekit does) and unused
    "magnitude": Sparsity("magnitude", "density", sparsify.magnitude_kept),
    "random": Sparsity("random", "density", sparsify.bernoulli_kept),
    "outliers": Sparsity("outliers", "density", sparsify.outliers_kept),
    "della": Sparsity("della", "density", sparsify.della_kept),
}


def sign_consensus(deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """TIES sign election: True where an entry agrees with the elected sign.

    ``sum`` elects the sign of the summed (weighted) deltas, ``count`` the sign held by
    more sources; zero counts as positive, as in mergekit.
    """
    votes = deltas.sum(dim=0) if method == "sum" else (deltas > 0).sum(0) - (deltas < 0).sum(0)
    # sign(d) == majority, without materialising float signs; zeros agree with nothing
    return torch.where(votes >= 0, deltas > 0, deltas < 0)


def elected_sign(deltas: torch.Tensor) -> torch.Tensor:
    """TIES's sign election by sum, as +1.0 / -1.0 per entry (zero votes elect +1, as in
    mergekit; only entries whose deltas are all zero can sum to -0.0, and for those the
    elected sign changes nothing)."""
    votes = deltas.sum(dim=0)
    return torch.ones_like(votes).copysign_(votes)


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
            out = sparsifier(i, deltas[i])
            if out.data_ptr() != deltas[i].data_ptr():  # a sparsifier that made a new tensor
                deltas[i] = out
    w = torch.tensor(weight, dtype=deltas.dtype, device=deltas.device)
    deltas.mul_(w.reshape(-1, *([1] * (deltas.dim() - 1))))
    if consensus:
        # TIES's disjoint merge in float arithmetic alone (mixed bool/float kernels are
        # several times slower on CPU): with s the elected sign, an entry agrees where
        # d*s > 0, so s * sum(relu(d*s)) sums the agreeing entries, exactly.
        sign = elected_sign(deltas)
        agreeing = deltas.mul_(sign).relu_()
        mixed = agreeing.sum(dim=0)
        if normalize:  # the disjoint mean: divide by the weights that agree
            divisor = torch.tensordot(w, agreeing.sign_(), dims=1)
            divisor[divisor == 0] = 1
            mixed.div_(divisor)
        mixed.mul_(sign)
    else:
        mixed = deltas.sum(dim=0)
        # From the knobs (no read-back from the device), or as the weights' sum in 16-bit
        # arithmetic, which rounds each weight first.
        total = sum(weight) if w.dtype == torch.float32 else float(w.sum())
        if normalize and abs(total) >= 1e-8:
            mixed.div_(total)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(x.base)


def task_arithmetic_coefficients(*, weight: list[float], normalize: bool, **knobs) -> tuple[float, list[float]]:
    """base + lambda * sum_i w_i (m_i - base) / D as coefficients of base and the m_i."""
    total = sum(weight)
    divisor = total if normalize and abs(total) >= 1e-8 else 1.0
    coefs = [knobs["lambda"] * w / divisor for w in weight]
    return 1.0 - sum(coefs), coefs


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
            # ``delta`` is a row of the method's own deltas: masked in place
            if kind == "random":
                return sparsify.bernoulli(delta, density[i], x.uniform(i), rescale, inplace=True)
            if density[i] >= 1:
                return delta
            if kind == "della":
                fraction = x.derived("della_rank", i, lambda: sparsify.row_rank_fraction(delta))
                return sparsify.della_magprune(delta, density[i], epsilon[i], x.uniform(i),
                                               rescale, fraction, inplace=True)
            ranks = x.derived("magnitude_rank", i, lambda: sparsify.magnitude_ranks(delta))
            if kind == "magnitude":
                return sparsify.magnitude(delta, density[i], rescale, ranks, inplace=True)
            return sparsify.magnitude_outliers(delta, density[i], gamma[i], rescale, ranks,
                                               inplace=True)

        # int8_mask only changes the dtype mergekit holds the sign mask in; the result
        # is identical, so it is accepted and ignored.
        return generalized_task_arithmetic(
            x, weight=weight, consensus=consensus, normalize=normalize,
            lambda_=knobs["lambda"], sparsifier=sparsifier if kind else None,
        )

    method.__name__ = name
    method.__doc__ = f"{name}: generalized task arithmetic ({reference})."
    merge_method(name, params, base="required", random=kind in ("random", "della"),
                 reference=reference, sparsity=SPARSITY[kind],
                 combination=task_arithmetic_coefficients if kind is None else None)(method)


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
