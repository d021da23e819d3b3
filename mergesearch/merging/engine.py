"""The in-place merge engine.

`MergeEngine` loads a base and its fine-tuned sources once, stacked per tensor in their
stored dtype (row 0 is the base, row i the i-th source), and keeps each row where a
residency plan puts it within the worker's memory budgets (`residency`): on the device
(CUDA when present), in host memory, or in the checkpoints' files; a candidate reads one
stack at a time on the device, the next staged while this one is merged. Task vectors
are formed per tensor in float32 when a candidate is built, so residency costs what the
checkpoints cost and a candidate reads each input once. `merge_into` writes every merged
tensor straight into a live model's parameter; no second copy of the model is made.

Two things make a candidate cheaper than a fresh merge. Methods whose result is a weighted
sum of the inputs (linear, task arithmetic, with or without LiNeS) declare their
coefficients, and the engine sums the resident rows block by block, in cache, straight
into the parameter (`_combine`) instead of passing over whole float32 copies. On CPU,
what depends on a task vector alone and not on a candidate's knobs (the magnitude ranks
of its entries, DELLA's rank fractions, DARE's uniform numbers for one seed) is computed
on first use and kept within a memory budget, so TIES, breadcrumbs and DELLA select
entries by comparing ranks instead of sorting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch

from mergesearch.errors import CheckpointError, RecipeError
from mergesearch.merging.architecture import layer_index, layer_t
from mergesearch.merging.checkpoint import Checkpoint, check_compatible, check_custom_code
from mergesearch.merging.lines import apply_lines, lines_scale
from mergesearch.merging.registry import MergeInputs, MergeMethod
from mergesearch.merging.residency import (
    StackStore,
    StackView,
    plan_residency,
    resolve_budgets,
    stack_specs,
)
from mergesearch.merging.validate import method_inputs, validate_recipe
from mergesearch.recipe import Recipe, SourceModel

# Entries per block in `MergeEngine._combine` on CPU: a float32 block stays in cache (the
# fastest of 2**14, 2**16 and 2**18 on a 2-core Xeon, where it beats summing into a bfloat16
# output with `torch.sum`).
COMBINE_BLOCK = 1 << 18
# On a GPU a block is only there to bound the buffers (128 MiB each): launches are cheap.
COMBINE_BLOCK_GPU = 1 << 25


class KeptTensors(dict):
    """Tensors kept across candidates within a byte budget that several of these share.
    Past the budget a new tensor is simply not kept: a candidate sweeps every tensor in
    the same order, so evicting old ones would trade each hit for a miss."""

    def __init__(self, budget: int, _used: list[int] | None = None):
        super().__init__()
        self.budget, self._used = budget, _used if _used is not None else [0]

    def share(self) -> KeptTensors:
        """An empty cache drawing on the same budget."""
        return KeptTensors(self.budget, self._used)

    @property
    def used(self) -> int:
        return self._used[0]

    def __setitem__(self, key, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if key not in self and self._used[0] + size <= self.budget:
            super().__setitem__(key, value)
            self._used[0] += size

    def clear(self) -> None:
        self._used[0] -= sum(v.numel() * v.element_size() for v in self.values())
        super().clear()


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else the CPU: the one place the device is chosen.
    ``CUDA_VISIBLE_DEVICES=""`` (a Ray worker given no GPU) makes no GPU visible."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MergeEngine:
    """Resident weights of a base model and its sources, ready to merge any recipe."""

    def __init__(self, base: str, sources: list[str], device: str | torch.device | None = None,
                 cache: bool | None = None, cache_bytes: int | None = None,
                 device_budget: int | None = None, host_budget: int | None = None,
                 live_bytes: int = 0):
        self.device = torch.device(device) if device is not None else default_device()
        self.base = Checkpoint.open(base)
        self.sources = [Checkpoint.open(s) for s in sources]
        check_compatible(self.base, self.sources)
        self.num_layers = self.base.num_layers
        self.models = [base, *sources]
        self._rows = {}
        for row, ckpt in enumerate([self.base, *self.sources]):
            self._rows[ckpt.name] = row
            self._rows.setdefault(str(ckpt.path.resolve()), row)

        # Each checkpoint's tensors where they lie in its files (safetensors), else loaded
        # whole (.bin); placed row by row as the residency plan says (`residency`).
        held = [c.locations or c.load_tensors() for c in [self.base, *self.sources]]
        specs = stack_specs(held)
        self.plan = plan_residency(specs, *resolve_budgets(self.device, device_budget, host_budget),
                                   live_bytes=live_bytes, device_type=self.device.type,
                                   mmap_ok=all(c.locations is not None for c in [self.base, *self.sources]))
        self.store = StackStore(self.plan, held, self.device)
        del held
        self.names = list(specs)
        self.shapes = {name: torch.Size(spec.shape) for name, spec in specs.items()}
        self.stacks = StackView(self.store)  # complete stacks by name, for inspection
        self.layers = {name: layer_index(name) for name in self.names}
        self._work: dict[str, torch.Tensor] = {}
        # Kept after first use where computing them is slow (CPU), recomputed where it is
        # cheap (GPU): DARE/DELLA's uniform numbers, which depend only on (seed, tensor,
        # source), and the magnitude ranks of each task vector's entries, which depend on
        # nothing a candidate changes (4 bytes an entry and source, each), within
        # ``cache_bytes`` together (by default twice the weights, at most 40% of the memory
        # available now), and never past what the residency plan leaves of the device budget.
        cache = cache if cache is not None else self.device.type == "cpu"
        if cache_bytes is None:
            weights = sum(spec.nbytes for spec in specs.values())
            cache_bytes = min(2 * weights, int(0.4 * psutil.virtual_memory().available))
        cache_bytes = min(cache_bytes, self.plan.spare_device())
        self.random_cache: KeptTensors | None = KeptTensors(cache_bytes) if cache else None
        self.derived_cache: KeptTensors | None = self.random_cache.share() if cache else None
        self.fisher: dict[str, torch.Tensor] = {}  # name -> (rows, *shape), see attach_fisher
        self.fisher_mean: torch.Tensor | None = None

    def attach_fisher(self, per_model: dict[str, dict[str, torch.Tensor]]) -> None:
        """Give the Fisher-weighted methods each model's diagonal Fisher information
        (model -> tensor name -> Fisher, as `mergesearch.merging.fisher_info` computes it).
        Models without one get zeros: they count through the methods' floor alone."""
        rows = {self.row(m): f for m, f in per_model.items()}
        total = torch.zeros(len(self.models), dtype=torch.float64)
        count = 0
        for name in self.names:
            # Kept in bfloat16 beside 16-bit weights (float32's range, so no small Fisher
            # value underflows; a weighting needs no more digits), else in float32.
            spec = self.plan.specs[name]
            dtype = torch.bfloat16 if spec.dtype.itemsize <= 2 else torch.float32
            stack = torch.zeros((spec.rows, *spec.shape), dtype=dtype, device=self.device)
            for r, f in rows.items():
                if name not in f:
                    raise CheckpointError(f"{self.models[r]}: its Fisher information has no tensor {name}")
                stack[r].copy_(f[name])
            self.fisher[name] = stack
            total += stack.flatten(1).sum(1, dtype=torch.float64).cpu()
            count += stack[0].numel()
        self.fisher_mean = (total / max(count, 1)).to(torch.float32).to(self.device)

    # ---- recipes ----------------------------------------------------------------------

    def row(self, model: str) -> int:
        row = self._rows.get(model)
        if row is None:
            path = Path(model).expanduser()
            row = self._rows.get(str(path.resolve())) if path.exists() else None
        if row is None:
            raise RecipeError(f"models: {model} is not among the loaded models ({', '.join(self.models)})")
        return row

    def check(self, recipe: Recipe) -> MergeMethod:
        method = validate_recipe(recipe, self.num_layers)
        if "fisher" in method.needs and not self.fisher:
            raise RecipeError(f"method: {method.name} needs each model's Fisher information, computed "
                              "on calibration data; merge it through a study (mergesearch export "
                              "--model) or attach it with MergeEngine.attach_fisher")
        for m in [recipe.base_model, *recipe.source_names()]:
            if m is not None:
                self.row(m)
        return method

    def merged_tensors(self, recipe: Recipe) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, merged float32 tensor) for every tensor of the model."""
        for name, tensor in self._merged(recipe):
            if any(tensor.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                   for b in self._work.values()):
                tensor = tensor.clone()  # a view of a work buffer would be overwritten next
            yield name, tensor

    def _merged(self, recipe: Recipe, into: dict[str, torch.Tensor] | None = None,
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """As `merged_tensors`, but a tensor may live in a work buffer that the next one
        overwrites: for callers that copy each tensor away at once. A tensor that a weighted
        sum can write straight into its parameter in ``into`` is written there and yielded
        as that parameter."""
        method = self.check(recipe)
        exact = recipe.compute_dtype is None  # float32: the fast paths below apply
        base_name, inputs = method_inputs(method, recipe)
        base_row = self.row(base_name) if base_name else None
        rows = [self.row(s.model) for s in inputs]
        if self.random_cache and next(iter(self.random_cache))[0] != recipe.seed:
            self.random_cache.clear()  # keep the numbers of one seed only
        needed = [*rows, *([base_row] if base_row is not None else [])]
        with torch.no_grad():
            # One stack at a time, on the device: the next is staged while this one is
            # merged when it is not resident (see `residency`).
            for name, stack in self.store.sweep(self.names, needed):
                layer = self.layers[name]
                params = resolve_params(method, recipe, inputs, name, layer_t(layer, self.num_layers))
                scale = None if recipe.lines is None else lines_scale(
                    recipe.lines.alpha, recipe.lines.beta, layer, self.num_layers)
                if method.combination is not None and exact:
                    yield name, self._combine(stack, base_row, rows, *method.combination(**params),
                                              lines=scale, into=(into or {}).get(name))
                    continue
                shape = stack.shape[1:]
                dtype = compute_dtype(recipe, stack.dtype)
                # Inputs are copied (and cast) into work buffers of the compute dtype that
                # live as long as the engine: large fresh allocations cost page faults.
                models = self._buffer("models", len(rows), shape, dtype)
                for j, r in enumerate(rows):
                    models[j].copy_(stack[r])
                base = None
                if base_row is not None:
                    base = self._buffer("base", 1, shape, dtype)[0].copy_(stack[base_row])
                # What is kept across candidates was derived from float32 task vectors.
                x = MergeInputs(name=name, base=base, models=models, seed=recipe.seed,
                                workspace=self._buffer("deltas", len(rows), shape, dtype),
                                random_cache=self.random_cache, layer=layer,
                                num_layers=self.num_layers,
                                derived_cache=self.derived_cache if exact else None,
                                rows=tuple(rows), base_row=base_row)
                if "fisher" in method.needs:
                    x.fisher = self._buffer("fisher", len(rows), shape)
                    for j, r in enumerate(rows):
                        x.fisher[j].copy_(self.fisher[name][r])
                    x.fisher_mean = self.fisher_mean[rows]
                out = method.fn(x, **params)
                if scale is not None:  # validation saw to it that there is a base
                    out = apply_lines(out, base, scale)
                yield name, out

    def _combine(self, stack: torch.Tensor, base_row: int | None, rows: list[int], base_coef: float,
                 coefs: list[float], lines: float | None = None,
                 into: torch.Tensor | None = None) -> torch.Tensor:
        """A method's result that is a weighted sum of its inputs, straight from the resident
        weights: each block of entries is upcast, weighted and summed in float32 while it is
        in cache, then written to ``into`` (a live parameter, any dtype) or to the returned
        float32 tensor; no whole-tensor float32 copies of the inputs are made."""
        terms: dict[int, float] = {}
        for r, c in [*([(base_row, base_coef)] if base_row is not None else []), *zip(rows, coefs)]:
            terms[r] = terms.get(r, 0.0) + c
        if lines is not None and lines != 1:  # base + s * (merged - base); sum(coefs) is 1
            terms = {r: c * lines for r, c in terms.items()}
            terms[base_row] += 1 - lines
        flat = stack.view(stack.shape[0], -1)
        n = flat.shape[1]
        block = min(n, COMBINE_BLOCK if self.device.type == "cpu" else COMBINE_BLOCK_GPU)
        out = self._buffer("combined", 1, stack.shape[1:])[0].view(-1) if into is None else None
        acc, row = self._blocks(block)
        for start in range(0, n, block):
            stop = min(n, start + block)
            a = out[start:stop] if into is None else acc[:stop - start]
            for k, (r, c) in enumerate(terms.items()):
                if k == 0:
                    a.copy_(flat[r, start:stop]).mul_(c)
                else:  # upcast first: float32-only kernels beat mixed-dtype ones on CPU
                    a.add_(row[:stop - start].copy_(flat[r, start:stop]), alpha=c)
            if into is not None:
                into.view(-1)[start:stop].copy_(a)
        return into if into is not None else out.view(stack.shape[1:])

    def _blocks(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two float32 buffers of at least ``size`` entries: a block's sum and one input row."""
        acc = self._work.get("block")
        if acc is None or acc.numel() < 2 * size:
            acc = self._work["block"] = torch.empty(2 * size, dtype=torch.float32, device=self.device)
        return acc[:size], acc[size:2 * size]

    def _buffer(self, key: str, rows: int, shape: torch.Size,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A view of shape (rows, *shape) into a reusable buffer of ``dtype``."""
        need = rows * math.prod(shape)
        if dtype != torch.float32:
            key = f"{key}.{dtype}"
        buf = self._work.get(key)
        if buf is None or buf.numel() < need:
            largest = max(math.prod(s) for s in self.shapes.values())
            buf = torch.empty(max(need, rows * largest), dtype=dtype, device=self.device)
            self._work[key] = buf
        return buf[:need].view(rows, *shape)

    def merge_into(self, model: torch.nn.Module, recipe: Recipe,
                   progress: Callable[[int, int], Any] | None = None) -> None:
        """Write the recipe's merged weights into ``model``'s parameters, in place."""
        params = self._bind(model)
        total = len(self.names)
        for i, (name, tensor) in enumerate(self._merged(recipe, into=params)):
            target = params.get(name)
            if target is not None and target is not tensor:
                target.copy_(tensor)
            if progress:
                progress(i + 1, total)

    def restore_base(self, model: torch.nn.Module) -> None:
        """Put the base weights back into ``model``."""
        params = self._bind(model)
        with torch.no_grad():
            for name, stack in self.store.sweep([n for n in self.names if n in params], [0]):
                params[name].copy_(stack[0])

    def _bind(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Map tensor names to the model's parameters; tied copies are written once."""
        cached = getattr(model, "_mergesearch_params", None)
        if cached is not None:
            return cached
        live = dict(model.named_parameters())  # tied parameters appear once
        every = dict(model.named_parameters(remove_duplicate=False))
        params = {}
        for name in self.names:
            p = live.get(name)
            if p is None and name not in every:
                raise CheckpointError(f"{self.base.name}: tensor {name} has no parameter in the live model")
            if p is not None:
                if tuple(p.shape) != tuple(self.shapes[name]):
                    raise CheckpointError(f"live model: parameter {name} has shape {list(p.shape)}")
                params[name] = p.data
        model._mergesearch_params = params
        return params

    def resident_bytes(self) -> int:
        """Weights held in memory (staging buffers included), Fisher information and the
        tensors cached across candidates."""
        kept = [*self.fisher.values(),
                *(self.random_cache or {}).values(), *(self.derived_cache or {}).values()]
        return self.store.resident_bytes() + sum(t.numel() * t.element_size() for t in kept)


def compute_dtype(recipe: Recipe, stored: torch.dtype) -> torch.dtype:
    """The dtype a recipe's merge computes in, for a tensor stored in ``stored``."""
    if recipe.compute_dtype is None:
        return torch.float32
    if recipe.compute_dtype == "auto":
        return stored
    return getattr(torch, recipe.compute_dtype.removeprefix("torch."))


def resolve_params(method: MergeMethod, recipe: Recipe, inputs: list[SourceModel],
                   tensor_name: str, t: float) -> dict[str, Any]:
    """Each knob's value for one tensor: per-model knobs from the model's own parameters,
    then the recipe's, then the registry default; filters and gradients resolved."""

    def value(param, source=None):
        v = recipe.setting(param.name, tensor_name, t, source)
        if v is not None:
            return v
        if param.required:
            raise RecipeError(f"{param.name}: no value for tensor {tensor_name}")
        return param.default

    out: dict[str, Any] = {p.name: value(p) for p in method.global_params}
    for p in method.per_model_params:
        out[p.name] = [value(p, s) for s in inputs]
    return out


def load_live_model(model: str | Path, device: str | torch.device | None = None, dtype: str | None = None,
                    trust_remote_code: bool = False) -> torch.nn.Module:
    """The model the candidates are written into: the base, loaded once, in eval mode, on
    ``device`` (by default `default_device`). Custom modelling code from the folder runs
    only with ``trust_remote_code``."""
    from transformers import AutoModelForCausalLM

    check_custom_code(Checkpoint.open(str(model)), trust_remote_code)
    live = AutoModelForCausalLM.from_pretrained(
        model, dtype=getattr(torch, dtype.removeprefix("torch.")) if dtype else "auto",
        trust_remote_code=trust_remote_code).to(device if device is not None else default_device())
    return live.eval()
