"""Consensus merging with TALL masks (Wang et al., 2024, arXiv:2405.07813, "Localizing Task
Information for Improved Model Merging and Compression").

A task-vector method (task arithmetic or TIES) first gives the multi-task vector
tau_MTL. Each task t then marks the entries where it matters, its TALL mask

    m_t = |tau_t| > lambda_t * |tau_MTL - tau_t|          (``mask_lambda``, per model)

(strict, as in the authors' code, nik-dim/tall_masks, and FusionBench's
``tall_mask/utils.py``: |theta_0 - theta_t| > lambda * |theta_MTL - theta_t|); entries
active in fewer than ``k`` tasks are dropped from the multi-task vector:

    merged = base + lambda * [sum_t m_t >= k] * tau_MTL

``k = 2`` removes both "catastrophic" (no task) and "selfish" (one task) weights, ``k = 1``
only the catastrophic ones, ``k = 0`` nothing (the plain method); k above the number of
tasks gives the base. tau_t is the raw task vector; tau_MTL is the plain method's merged
task vector with its weights and densities, before its ``lambda`` (the authors' scaling
factor comes last). For TIES the authors build the masks from the disjoint mean and merge
with the disjoint sum; here one vector serves both, and ``normalize`` picks which.
"""

from __future__ import annotations

import torch

from mergesearch.merging.methods import task_arithmetic  # noqa: F401  (the inner methods)
from mergesearch.merging.registry import METHODS, MergeInputs, Param, merge_method

MASK_LAMBDA = Param("mask_lambda", default=0.4, per_model=True, valid=(0.0, 10.0),
                    search=(0.2, 0.6))  # the authors pick each task's from 0.2 .. 0.6
K = Param("k", default=2, type=int, valid=(0, 1000), search=(1, 2))


def _register(name: str, inner_name: str) -> None:
    inner = METHODS.get(inner_name)

    def method(x: MergeInputs, *, mask_lambda: list[float], k: int, **knobs) -> torch.Tensor:
        lam = knobs.pop("lambda")
        merged = inner.fn(x, **knobs, **{"lambda": 1.0})  # base + tau_MTL
        base, models = x.base, x.models
        active = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
        for t in range(models.shape[0]):
            own = (models[t] - base).abs_()
            active += own > (merged - models[t]).abs_().mul_(mask_lambda[t])
        keep = active >= round(k)
        return merged.sub_(base).mul_(keep).mul_(lam).add_(base)

    method.__name__ = name
    method.__doc__ = f"{name}: {inner_name} with a consensus of TALL masks (arXiv:2405.07813)."
    params = [*inner.params, MASK_LAMBDA, K]
    # The inner method's sparsity: what it keeps is an upper bound, as the TALL masks then
    # drop entries according to the task vectors themselves.
    merge_method(name, params, base="required", min_sources=inner.min_sources,
                 random=inner.random, reference="https://arxiv.org/abs/2405.07813",
                 mergekit=False, sparsity=inner.sparsity)(method)


_register("consensus_ta", "task_arithmetic")
_register("consensus_ties", "ties")
