"""Which tensor belongs where in a transformer: the one place that knows the names.

mergekit's `architecture/` plays this part there. Supported: the Llama family (Llama,
Mistral, Qwen2/3, Gemma, Phi-3), GPT-2 and GPT-NeoX, and generic ``blocks.N.`` /
``layer.N.`` names. A tensor is either in a transformer block (its layer index), before
the blocks (embeddings) or after them (final norm, lm_head); relative depth follows
mergekit, and the attention / MLP filters are the substrings a parameter condition uses.
"""

from __future__ import annotations

import re

# `model.layers.N.` (Llama, Mistral, Qwen2/3, Gemma, Phi-3), `transformer.h.N.` (GPT-2),
# `gpt_neox.layers.N.`, `model.decoder.layers.N.`, and `blocks.N.` / `layer.N.` generically.
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
# config.json keys giving the number of blocks
NUM_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# The tensors before the first block and after the last, named as in mergekit's
# definitions of the supported architectures.
PRE_WEIGHTS = ("model.embed_tokens.weight", "transformer.wte.weight", "transformer.wpe.weight",
               "gpt_neox.embed_in.weight")
POST_WEIGHTS = ("lm_head.weight", "lm_head.bias", "model.norm.weight", "model.norm.bias",
                "model.final_layernorm.weight", "model.final_layernorm.bias",
                "transformer.ln_f.weight", "transformer.ln_f.bias",
                "gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias",
                "embed_out.weight")

# Parameter-condition filters: ``attn`` matches Llama-family ``self_attn`` and GPT-2
# ``attn``, ``.attention.`` GPT-NeoX (``post_attention_layernorm`` matches neither);
# ``mlp`` matches the MLPs of all three.
ATTN_FILTERS = ("attn", ".attention.")
MLP_FILTERS = ("mlp",)


def layer_index(tensor_name: str) -> int | None:
    """The transformer block a tensor belongs to, or None for embeddings, final norm and
    lm_head (which mergekit plans at t = 0)."""
    m = _LAYER.search(tensor_name)
    return int(m.group(1)) if m else None


def layer_t(layer: int | None, num_layers: int) -> float:
    """Relative depth as mergekit computes it: layer i of L at i/(L-1); non-layer tensors at 0."""
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0
