"""Layer swapping (Bandarkar et al., 2024, arXiv:2410.01335, "Layer Swapping for Zero-Shot
Cross-Lingual Transfer in Large Language Models").

Of two experts fine-tuned from one base, the *outer* one (the paper's language expert)
gives the bottom ``n_bottom`` and the top ``n_top`` layers, the *inner* one (the task
expert) the layers between; ``outer`` says which of the two inputs is the outer one (0:
the first listed). ``transition`` layers past each outer block blend the two linearly, so
the outer share falls from 1 to 0 over them:

    w(l) = max(ramp(l - (n_bottom - 1)), ramp((L - n_top) - l))     (a block of 0 layers: 0)
    ramp(d) = 1 for d <= 0,  1 - d / (transition + 1) for 1 <= d <= transition,  0 beyond
    layer l = w(l) * outer + (1 - w(l)) * inner

One transition layer is the plain average of the two; the transition layers come out of
the middle, so ``n_bottom`` and ``n_top`` count only the layers taken whole. Tensors
outside the layers go with the block next to them, as the paper swaps the embeddings
with the bottom layers: the embeddings take layer 0's blend, the final norm and the head
the last layer's. No base model is read.
"""

from __future__ import annotations

import re

import torch

from mergesearch.merging.registry import MergeInputs, Param, merge_method

N_BOTTOM = Param("n_bottom", type=int, valid=(0, 10_000), search=(0.0, 0.5), layers=True)
N_TOP = Param("n_top", type=int, valid=(0, 10_000), search=(0.0, 0.5), layers=True)
TRANSITION = Param("transition", default=0, type=int, valid=(0, 10_000), search=(0.0, 0.25),
                   layers=True)
OUTER = Param("outer", default=0, type=int, valid=(0, 1), search=(0, 1))

# Names of the tensors before the first layer (the rest outside the layers come after it):
# Llama/Mistral/Qwen/Gemma/Phi, GPT-2, GPT-NeoX.
_INPUT_SIDE = re.compile(r"(^|\.)(embed_tokens|wte|wpe|embed_in)\.")


def outer_share(layer: int, num_layers: int, n_bottom: int, n_top: int, transition: int) -> float:
    """w(l): how much of layer ``layer`` the outer expert gives."""
    def ramp(d: int) -> float:
        if d <= 0:
            return 1.0
        return 1 - d / (transition + 1) if d <= transition else 0.0

    bottom = ramp(layer - (n_bottom - 1)) if n_bottom > 0 else 0.0
    top = ramp(num_layers - n_top - layer) if n_top > 0 else 0.0
    return max(bottom, top)


@merge_method("layer_swap", [N_BOTTOM, N_TOP, TRANSITION, OUTER], base="none",
              min_sources=2, max_sources=2, reference="https://arxiv.org/abs/2410.01335",
              mergekit=False)
def layer_swap(x: MergeInputs, *, n_bottom: int, n_top: int, transition: int,
               outer: int) -> torch.Tensor:
    layer = x.layer
    if layer is None:
        layer = 0 if _INPUT_SIDE.search(x.name) else x.num_layers - 1
    w = outer_share(layer, x.num_layers, round(n_bottom), round(n_top), round(transition))
    o = round(outer)
    if w == 1:
        return x.models[o]
    if w == 0:
        return x.models[1 - o]
    return torch.lerp(x.models[1 - o], x.models[o], w)
