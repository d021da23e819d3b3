"""Spherical interpolation: SLERP (base and one model), NuSLERP and Multi-SLERP."""

from __future__ import annotations

import torch

from mergesearch.merging.methods.common import WEIGHT
from mergesearch.merging.registry import MergeInputs, Param, merge_method


def slerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
               eps: float = 1e-8) -> torch.Tensor:
    """Interpolate along the great circle between the flattened tensors; fall back to
    linear interpolation when they are (anti)parallel, |cos| > ``dot_threshold``."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    if a.numel() == 0:
        return ((1 - t) * v0 + t * v1)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = torch.where(na > eps, na, 1)
    nb = torch.where(nb > eps, nb, 1)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = torch.acos(dot)
    s = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / s) * v0 + (torch.sin(t * theta) / s) * v1


@merge_method("slerp", [Param("t", valid=(0.0, 1.0), search=(0.0, 1.0))], base="required",
              min_sources=1, max_sources=1, reference="https://en.wikipedia.org/wiki/Slerp")
def slerp(x: MergeInputs, *, t: float) -> torch.Tensor:
    """t = 0 gives the base, t = 1 the other model; in float32 whatever the inputs' dtype
    (as mergekit interpolates 16-bit inputs)."""
    return slerp_pair(t, x.base.float(), x.models[0].float())


def nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1,
                 eps: float = 1e-8, flatten: bool = False) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / torch.norm(v, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = (unit(v0) * unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


@merge_method("nuslerp", [WEIGHT, Param("nuslerp_row_wise", default=False, type=bool),
                          Param("nuslerp_flatten", default=True, type=bool)],
              base="optional", min_sources=2, max_sources=2)
def nuslerp(x: MergeInputs, *, weight: list[float], nuslerp_row_wise: bool,
            nuslerp_flatten: bool) -> torch.Tensor:
    """SLERP of two models (or their task vectors when a base is given) at
    t = w1 / (w0 + w1), row- or column-wise or over the flattened tensor."""
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    dim = 0 if nuslerp_row_wise else -1
    if x.base is None:
        return nuslerp_pair(t, x.models[0], x.models[1], dim=dim, flatten=nuslerp_flatten)
    d = x.deltas
    return x.base + nuslerp_pair(t, d[0], d[1], dim=dim, flatten=nuslerp_flatten)


@merge_method("multislerp", [WEIGHT, Param("normalize_weights", default=True, type=bool),
                             Param("eps", default=1e-8, valid=(0.0, 1.0))],
              base="optional", min_sources=1,
              reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea")
def multislerp(x: MergeInputs, *, weight: list[float], normalize_weights: bool,
               eps: float) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere: project onto the tangent space at the
    weighted mean direction, average there, map back, rescale to the weighted mean norm."""
    if x.models.shape[0] == 1:
        return x.models[0]
    vecs = x.models if x.base is None else x.deltas
    flat = vecs.reshape(vecs.shape[0], -1)
    w = torch.tensor(weight, dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if vecs.shape[0] != 2:
            raise ValueError(f"{x.name}: the weighted directions cancel out; change the weights")
        out = vecs[0] * w[0] + vecs[1] * w[1]
    else:
        mean = mean / mean_norm
        tangent = units - (units * mean).sum(-1, keepdim=True) * mean
        step = (tangent * w.view(-1, 1)).sum(0)
        step_norm = torch.norm(step) + eps
        out = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
        out = (out * (norms.squeeze(-1) * w).sum()).view(vecs.shape[1:])
    return out if x.base is None else out + x.base
