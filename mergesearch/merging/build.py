"""Building a merged model, the one way every command does it: open the resident weights
and the live model once (`open_live`), then merge a recipe into the live model and write
it out atomically (`write_merged`). `mergesearch merge`, `mergesearch export --save-model`
and the search's workers share these, so a saved model is the model that was scored."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from mergesearch.merging.checkpoint import Checkpoint
from mergesearch.merging.engine import MergeEngine, load_live_model
from mergesearch.merging.output import save_model
from mergesearch.merging.residency import check_device_fits, live_model_bytes, stack_specs
from mergesearch.recipe import Recipe


def open_live(base: str, sources: Iterable[str], device: str | torch.device | None = None,
              dtype: str | None = None, trust_remote_code: bool = False,
              cache_bytes: int | None = None, device_budget: int | None = None,
              host_budget: int | None = None) -> tuple[MergeEngine, torch.nn.Module]:
    """The engine holding ``base`` and ``sources`` on ``device`` (by default
    `default_device`: CUDA when visible), placed within ``device_budget`` and
    ``host_budget`` bytes (None: from the free memory; see `residency`), and the live model,
    the base loaded once in ``dtype`` (None: as stored), that candidates are written into."""
    engine = MergeEngine(base, list(sources), device=device, cache_bytes=cache_bytes,
                         device_budget=device_budget, host_budget=host_budget,
                         live_bytes=live_bytes(Checkpoint.open(base), dtype))
    model = load_live_model(engine.base.path, engine.device, dtype, trust_remote_code=trust_remote_code)
    return engine, model


def check_fits(base: Checkpoint, sources: list[Checkpoint], dtype: str | None,
               device_budget: int | None) -> None:
    """Refuse, before any worker starts, a device budget that cannot hold the live model
    and the merge's work buffers (the worker checks its own plan again at set-up).
    Nothing is checked without a budget, or for ``.bin`` checkpoints (read only whole)."""
    held = [c.locations for c in [base, *sources]]
    if device_budget is None or any(h is None for h in held):
        return
    check_device_fits(stack_specs(held), live_bytes(base, dtype), device_budget)


def live_bytes(base: Checkpoint, dtype: str | None = None) -> int:
    """The live model's weights on its device: the base's tensors in ``dtype``, else in
    the dtype its config names, else as stored (what `load_live_model` loads)."""
    config = base.config
    dtype = dtype or config.get("dtype") or config.get("torch_dtype")
    return live_model_bytes(base.locations or base.load_tensors(), dtype if isinstance(dtype, str) else None)


def write_merged(engine: MergeEngine, model: torch.nn.Module, recipe: Recipe, out: str | Path,
                 card: str | None = None,
                 progress: Callable[[int, int], Any] | None = None) -> Path:
    """Merge ``recipe`` into ``model`` and save it to ``out`` atomically, with the base's
    tokenizer (or the recipe's tokenizer source), the recipe and ``card`` beside it.
    ``progress(i, n)`` is called as each of the n tensors is merged; the write follows the
    n-th call."""
    engine.merge_into(model, recipe, progress=progress)
    return save_model(model, out, tokenizer_from=engine.base.path, recipe=recipe, card=card)
