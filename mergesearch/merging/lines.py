"""LiNeS: a linear layer schedule on the merged task vector (arXiv:2410.17146).

"Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging" (Wang et al.,
2024) scales the merged task vector of block l of L by

    lambda(l) = alpha + beta * l / (L - 1)        l = 0 .. L-1

so shallow layers stay close to the base and deep layers take more of the task vectors.
Tensors outside the blocks (embeddings, final norm, head) take ``alpha``, as in the
authors' code (wang-kee/LiNeS, ``LiNeS_scaling``: ``layer_scalings_dict.get(k, alpha)``).

Here it is a recipe-level schedule, not a method: the engine applies it to any method's
result that has a base, ``merged' = base + lambda(l) * (merged - base)``, after the
method's own ``lambda`` (the authors apply LiNeS instead of a global scaling factor:
leave the method's ``lambda`` at 1 for their formula). ``alpha = 1, beta = 0`` is the
method itself, bit for bit (the engine skips a scale of exactly 1).
"""

from __future__ import annotations

import torch

from mergesearch.merging.architecture import layer_t
from mergesearch.merging.registry import Param

ALPHA = Param("alpha", default=1.0, valid=(0.0, 10.0), search=(0.2, 1.0))
BETA = Param("beta", default=0.0, valid=(-10.0, 10.0), search=(0.0, 1.0))
LINES_PARAMS = (ALPHA, BETA)


def lines_scale(alpha: float, beta: float, layer: int | None, num_layers: int) -> float:
    """lambda(l) = alpha + beta * l / (L - 1); alpha outside the blocks."""
    return alpha + beta * layer_t(layer, num_layers) if layer is not None else alpha


def apply_lines(merged: torch.Tensor, base: torch.Tensor, scale: float) -> torch.Tensor:
    """base + scale * (merged - base), in a new tensor; ``merged`` itself when scale is 1."""
    if scale == 1:
        return merged
    return torch.sub(merged, base).mul_(scale).add_(base)
