"""Calling a registered merge method on literal tensors, as the hand-computed cases do."""

from __future__ import annotations

import torch

from mergesearch.merging.registry import MergeInputs, get_method


def run(method: str, base, models, **params) -> torch.Tensor:
    """Call a registered method on literal tensors, with its defaults for unset knobs."""
    m = get_method(method)
    defaults = {p.name: p.default for p in m.params if not p.required}
    n = len(models)
    kwargs = {k: ([v] * n if m.param(k).per_model and not isinstance(v, list) else v)
              for k, v in {**defaults, **params}.items()}
    x = MergeInputs("model.layers.0.mlp.up_proj.weight",
                    None if base is None else torch.tensor(base, dtype=torch.float32),
                    torch.tensor(models, dtype=torch.float32), seed=7)
    return m.fn(x, **kwargs)


def close(a: torch.Tensor, b) -> bool:
    """``a`` equals the literal ``b`` to float32 rounding."""
    return torch.allclose(a, torch.tensor(b, dtype=torch.float32), atol=1e-6)
