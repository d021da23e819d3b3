"""Building a merged model, the one way every command does it: open the resident weights
and the live model once (`open_live`), then merge a recipe into the live model and write
it out atomically (`write_merged`). `mergesearch merge`, `mergesearch export --save-model`
and the search's workers share these, so a saved model is the model that was scored."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from mergesearch.errors import CheckpointError
from mergesearch.merging.checkpoint import Checkpoint
from mergesearch.merging.engine import MergeEngine, load_live_model
from mergesearch.merging.output import save_model
from mergesearch.merging.placement import is_head, is_tied, place
from mergesearch.merging.residency import check_device_fits, live_model_bytes, stack_specs
from mergesearch.recipe import Recipe


def open_live(base: str, sources: Iterable[str], device: str | torch.device | None = None,
              dtype: str | None = None, trust_remote_code: bool = False,
              cache_bytes: int | None = None, device_budget: int | Sequence[int | None] | None = None,
              host_budget: int | None = None,
              devices: Sequence[str | torch.device] | None = None) -> tuple[MergeEngine, torch.nn.Module]:
    """The engine holding ``base`` and ``sources`` on ``device`` (by default
    `default_device`: CUDA when visible), placed within ``device_budget`` and
    ``host_budget`` bytes (None: from the free memory; see `residency`), and the live model,
    the base loaded once in ``dtype`` (None: as stored), that candidates are written into.
    With several ``devices`` (``device_budget`` then one budget each, or one for all) the
    live model is sharded over them by whole layers (`placement`), each tensor merged on
    its parameter's device; two CPU "devices" run the same path, for tests."""
    engine = MergeEngine(base, list(sources), device=device, cache_bytes=cache_bytes,
                         device_budget=device_budget, host_budget=host_budget,
                         live_bytes=live_tensor_bytes(Checkpoint.open(base), dtype), devices=devices)
    if len(engine.devices) == 1:
        return engine, load_live_model(engine.base.path, engine.device, dtype, trust_remote_code=trust_remote_code)
    model = load_live_model(engine.base.path, "cpu", dtype, trust_remote_code=trust_remote_code)
    return engine, dispatch_live(engine, model)


def dispatch_live(engine: MergeEngine, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (on the CPU) dispatched over the engine's devices as its placement says,
    with accelerate's hooks moving the activations from one device to the next; its
    first parameter, so lm-eval's and the evaluators' inputs, on the first device."""
    from accelerate import dispatch_model

    keys = [*(n for n, _ in model.named_parameters(remove_duplicate=False)),
            *(n for n, _ in model.named_buffers(remove_duplicate=False))]
    device_map = engine.placement.device_map(keys)
    # Hooks even where every "device" is the CPU (tests), so that the same path runs.
    model = dispatch_model(model, device_map=device_map, main_device=str(engine.device), force_hooks=True)
    params = dict(model.named_parameters())
    for name, d in engine.placement.tensors.items():
        p = params.get(name)
        if p is not None and p.device != engine.devices[d]:
            raise CheckpointError(f"live model: parameter {name} is on {p.device}, its merge on "
                                  f"{engine.devices[d]}: the device map does not follow the placement")
    return model


def check_fits(base: Checkpoint, sources: list[Checkpoint], dtype: str | None,
               device_budget: int | Sequence[int] | None) -> None:
    """Refuse, before any worker starts, a device budget that cannot hold the live model
    and the merge's work buffers (the worker checks its own plan again at set-up); with a
    budget per device (a live model sharded over several), the model placed over them.
    Nothing is checked without a budget, or for ``.bin`` checkpoints (read only whole)."""
    held = [c.locations for c in [base, *sources]]
    if device_budget is None or any(h is None for h in held):
        return
    specs = stack_specs(held)
    if isinstance(device_budget, Sequence):
        names = [f"device {i}" for i in range(len(device_budget))]
        place(specs, live_tensor_bytes(base, dtype), names, device_budget, is_tied(base.config, specs))
        return
    check_device_fits(specs, live_bytes(base, dtype), device_budget)


def live_bytes(base: Checkpoint, dtype: str | None = None) -> int:
    """The live model's weights on its device: the base's tensors in ``dtype``, else in
    the dtype its config names, else as stored (what `load_live_model` loads)."""
    return sum(live_tensor_bytes(base, dtype).values())


def live_tensor_bytes(base: Checkpoint, dtype: str | None = None) -> dict[str, int]:
    """As `live_bytes`, per tensor; a tied lm_head is the embeddings' weight, counted once."""
    config = base.config
    dtype = dtype or config.get("dtype") or config.get("torch_dtype")
    tensors = base.locations or base.load_tensors()
    tied = is_tied(config, tensors)
    return {n: 0 if tied and is_head(n) else live_model_bytes({n: t}, dtype if isinstance(dtype, str) else None)
            for n, t in tensors.items()}


def write_merged(engine: MergeEngine, model: torch.nn.Module, recipe: Recipe, out: str | Path,
                 card: str | None = None,
                 progress: Callable[[int, int], Any] | None = None) -> Path:
    """Merge ``recipe`` into ``model`` and save it to ``out`` atomically, with the base's
    tokenizer (or the recipe's tokenizer source), the recipe and ``card`` beside it.
    ``progress(i, n)`` is called as each of the n tensors is merged; the write follows the
    n-th call."""
    engine.merge_into(model, recipe, progress=progress)
    return save_model(model, out, tokenizer_from=engine.base.path, recipe=recipe, card=card)
