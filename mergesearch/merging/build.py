"""Building a merged model, the one way every command does it: open the resident weights
and the live model once (`open_live`), then merge a recipe into the live model and write
it out atomically (`write_merged`). `mergesearch merge`, `mergesearch export --save-model`
and the search's workers share these, so a saved model is the model that was scored."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from mergesearch.merging.engine import MergeEngine, load_live_model
from mergesearch.merging.output import save_model
from mergesearch.recipe import Recipe


def open_live(base: str, sources: Iterable[str], device: str | torch.device | None = None,
              dtype: str | None = None, trust_remote_code: bool = False,
              cache_bytes: int | None = None) -> tuple[MergeEngine, torch.nn.Module]:
    """The engine holding ``base`` and ``sources`` resident on ``device`` (by default
    `default_device`: CUDA when visible) and the live model, the base loaded once in
    ``dtype`` (None: as stored), that candidates are written into."""
    engine = MergeEngine(base, list(sources), device=device, cache_bytes=cache_bytes)
    model = load_live_model(engine.base.path, engine.device, dtype, trust_remote_code=trust_remote_code)
    return engine, model


def write_merged(engine: MergeEngine, model: torch.nn.Module, recipe: Recipe, out: str | Path,
                 card: str | None = None,
                 progress: Callable[[int, int], Any] | None = None) -> Path:
    """Merge ``recipe`` into ``model`` and save it to ``out`` atomically, with the base's
    tokenizer (or the recipe's tokenizer source), the recipe and ``card`` beside it.
    ``progress(i, n)`` is called as each of the n tensors is merged; the write follows the
    n-th call."""
    engine.merge_into(model, recipe, progress=progress)
    return save_model(model, out, tokenizer_from=engine.base.path, recipe=recipe, card=card)
