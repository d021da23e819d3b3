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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from mergesearch.errors import CheckpointError, RecipeError
from mergesearch.merging.architecture import layer_index, layer_t
from mergesearch.merging.checkpoint import Checkpoint, check_compatible, check_custom_code
from mergesearch.merging.lines import apply_lines, lines_scale
from mergesearch.merging.placement import Placement, is_tied, place
from mergesearch.merging.registry import MergeInputs, MergeMethod
from mergesearch.merging.residency import (
    ResidencyPlan,
    ShardedStore,
    StackSpec,
    StackStore,
    StackView,
    plan_residency,
    plan_shards,
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


@dataclass
class Shard:
    """What an engine holds on one of its devices: the stacks placed there (their plan and
    store), work buffers sized by its largest tensor, what it keeps across candidates and
    its copy of the models' mean Fisher information."""

    device: torch.device
    store: StackStore
    largest: int  # entries of its largest tensor
    random_cache: KeptTensors | None = None
    derived_cache: KeptTensors | None = None
    work: dict[str, torch.Tensor] = field(default_factory=dict)
    fisher_mean: torch.Tensor | None = None


class MergeEngine:
    """Resident weights of a base model and its sources, ready to merge any recipe.

    On one device (``device``), or sharded over several (``devices``, each with its budget
    in ``device_budget``), as a live model sharded by whole layers is (`placement`): each
    tensor is then merged on the device that holds its parameter, from a residency plan and
    store per device, and the host budget is shared out between the devices' plans
    (`residency.plan_shards`). ``device`` is the first device either way.
    """

    def __init__(self, base: str, sources: list[str], device: str | torch.device | None = None,
                 cache: bool | None = None, cache_bytes: int | None = None,
                 device_budget: int | Sequence[int | None] | None = None, host_budget: int | None = None,
                 live_bytes: int | Mapping[str, int] = 0,
                 devices: Sequence[str | torch.device] | None = None):
        if devices:
            self.devices = [torch.device(d) for d in devices]
        else:
            self.devices = [torch.device(device) if device is not None else default_device()]
        self.device = self.devices[0]
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
        mmap_ok = all(c.locations is not None for c in [self.base, *self.sources])
        self.placement: Placement | None = None
        if len(self.devices) == 1:
            budget = device_budget[0] if isinstance(device_budget, Sequence) else device_budget
            plans = [plan_residency(specs, *resolve_budgets(self.device, budget, host_budget),
                                    live_bytes=_total(live_bytes), device_type=self.device.type,
                                    mmap_ok=mmap_ok)]
        else:
            plans = self._plan_shards(specs, device_budget, host_budget, live_bytes, mmap_ok)
        stores = [StackStore(plan, held, d) for plan, d in zip(plans, self.devices)]
        del held
        self.store = stores[0] if len(stores) == 1 else ShardedStore(stores)
        self.plan = self.store.plan
        self.names = list(specs)
        self.shapes = {name: torch.Size(spec.shape) for name, spec in specs.items()}
        self.stacks = StackView(self.store)  # complete stacks by name, for inspection
        self.layers = {name: layer_index(name) for name in self.names}
        self.shards = [Shard(d, st, max((math.prod(sp.shape) for sp in st.plan.specs.values()), default=0))
                       for d, st in zip(self.devices, stores)]
        self._shard_of = {name: shard for shard in self.shards for name in shard.store.plan.specs}
        self._keep(specs, cache, cache_bytes)
        self.fisher: dict[str, torch.Tensor] = {}  # name -> (rows, *shape), see attach_fisher
        self.fisher_mean: torch.Tensor | None = None  # on the first device

    def _plan_shards(self, specs: dict[str, StackSpec], device_budget: int | Sequence[int | None] | None,
                     host_budget: int | None, live_bytes: int | Mapping[str, int],
                     mmap_ok: bool) -> list[ResidencyPlan]:
        """The tensors placed on the devices by whole layers (`placement`), and one
        residency plan per device over those placed there, within its own budget; the host
        budget is shared out between them (`plan_shards`)."""
        given = list(device_budget) if isinstance(device_budget, Sequence) else [device_budget] * len(self.devices)
        # CPU "devices" (tests) share one memory: by default, each an equal part of it.
        split = [1 if d.type != "cpu" or b is not None else len(self.devices) for d, b in zip(self.devices, given)]
        budgets = [resolve_budgets(d, b, host_budget)[0] // k for d, b, k in zip(self.devices, given, split)]
        # On a CPU the host is the device: what the devices' budgets take is not left to it.
        host = resolve_budgets(self.device, sum(budgets), host_budget)[1]
        if not isinstance(live_bytes, Mapping):  # a total: spread as the base's tensors weigh
            rows = sum(s.row_bytes for s in specs.values()) or 1
            live_bytes = {n: live_bytes * s.row_bytes // rows for n, s in specs.items()}
        self.placement = place(specs, live_bytes, [str(d) for d in self.devices], budgets,
                               is_tied(self.base.config, specs))
        per_device = [{n: specs[n] for n in self.placement.names(i)} for i in range(len(self.devices))]
        return plan_shards(per_device, budgets, host, self.placement.live,
                           [d.type for d in self.devices], mmap_ok=mmap_ok)

    def _keep(self, specs: dict[str, StackSpec], cache: bool | None, cache_bytes: int | None) -> None:
        """Set up what each device keeps across candidates."""
        # Kept after first use where computing them is slow (CPU), recomputed where it is
        # cheap (GPU): DARE/DELLA's uniform numbers, which depend only on (seed, tensor,
        # source), and the magnitude ranks of each task vector's entries, which depend on
        # nothing a candidate changes (4 bytes an entry and source, each), within
        # ``cache_bytes`` together (by default twice the weights, at most 40% of the memory
        # available now), and never past what the residency plan leaves of the device budget.
        # Sharded, each device keeps what its own tensors derive, within its share of
        # ``cache_bytes`` (as its share of the inputs) and of its own plan's spare memory.
        cache = cache if cache is not None else self.device.type == "cpu"
        if not cache:
            return
        weights = sum(spec.nbytes for spec in specs.values())
        if cache_bytes is None:
            cache_bytes = min(2 * weights, int(0.4 * psutil.virtual_memory().available))
        for shard in self.shards:
            plan = shard.store.plan
            share = cache_bytes * sum(sp.nbytes for sp in plan.specs.values()) // max(weights, 1)
            shard.random_cache = KeptTensors(min(share if len(self.shards) > 1 else cache_bytes,
                                                 plan.spare_device()))
            shard.derived_cache = shard.random_cache.share()

    @property
    def random_cache(self) -> KeptTensors | None:
        """The uniform numbers kept across candidates (on a sharded engine, the first
        device's; each device keeps its own tensors')."""
        return self.shards[0].random_cache

    @property
    def derived_cache(self) -> KeptTensors | None:
        """What the task vectors derive, kept across candidates (the first device's)."""
        return self.shards[0].derived_cache

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
            stack = torch.zeros((spec.rows, *spec.shape), dtype=dtype, device=self._shard_of[name].device)
            for r, f in rows.items():
                if name not in f:
                    raise CheckpointError(f"{self.models[r]}: its Fisher information has no tensor {name}")
                stack[r].copy_(f[name])
            self.fisher[name] = stack
            total += stack.flatten(1).sum(1, dtype=torch.float64).cpu()
            count += stack[0].numel()
        self.fisher_mean = (total / max(count, 1)).to(torch.float32).to(self.device)
        for shard in self.shards:  # each device reads its own copy
            shard.fisher_mean = self.fisher_mean.to(shard.device)

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
        """Yield (name, merged float32 tensor) for every tensor of the model, on the device
        that holds it (device by device on a sharded engine)."""
        for name, tensor in self._merged(recipe):
            work = self._shard_of[name].work.values()
            if any(tensor.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() for b in work):
                tensor = tensor.clone()  # a view of a work buffer would be overwritten next
            yield name, tensor

    def _merged(self, recipe: Recipe, into: dict[str, torch.Tensor] | None = None,
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """As `merged_tensors`, but a tensor may live in a work buffer that the next one
        overwrites: for callers that copy each tensor away at once. A tensor that a weighted
        sum can write straight into its parameter in ``into`` is written there and yielded
        as that parameter."""
        method = self.check(recipe)
        base_name, inputs = method_inputs(method, recipe)
        base_row = self.row(base_name) if base_name else None
        c = _Candidate(recipe, method, inputs, base_row, [self.row(s.model) for s in inputs])
        for shard in self.shards:
            if shard.random_cache and next(iter(shard.random_cache))[0] != recipe.seed:
                shard.random_cache.clear()  # keep the numbers of one seed only
        needed = [*c.rows, *([base_row] if base_row is not None else [])]
        with torch.no_grad():
            # One stack at a time, on its device: the next is staged while this one is
            # merged when it is not resident (see `residency`).
            for name, stack in self.store.sweep(self.names, needed):
                yield name, self._merge_tensor(c, name, stack, (into or {}).get(name))

    def _merge_tensor(self, c: _Candidate, name: str, stack: torch.Tensor,
                      into: torch.Tensor | None) -> torch.Tensor:
        """One tensor of candidate ``c`` from its ``stack``, on the stack's device."""
        shard, layer, recipe = self._shard_of[name], self.layers[name], c.recipe
        params = resolve_params(c.method, recipe, c.inputs, name, layer_t(layer, self.num_layers))
        scale = None if recipe.lines is None else lines_scale(
            recipe.lines.alpha, recipe.lines.beta, layer, self.num_layers)
        if c.method.combination is not None and c.exact:
            return self._combine(stack, c.base_row, c.rows, *c.method.combination(**params),
                                 lines=scale, into=into, shard=shard)
        shape = stack.shape[1:]
        dtype = compute_dtype(recipe, stack.dtype)
        # Inputs are copied (and cast) into work buffers of the compute dtype that live as
        # long as the engine: large fresh allocations cost page faults.
        models = self._buffer("models", len(c.rows), shape, dtype, shard)
        for j, r in enumerate(c.rows):
            models[j].copy_(stack[r])
        base = None
        if c.base_row is not None:
            base = self._buffer("base", 1, shape, dtype, shard)[0].copy_(stack[c.base_row])
        # What is kept across candidates was derived from float32 task vectors.
        x = MergeInputs(name=name, base=base, models=models, seed=recipe.seed,
                        workspace=self._buffer("deltas", len(c.rows), shape, dtype, shard),
                        random_cache=shard.random_cache, layer=layer, num_layers=self.num_layers,
                        derived_cache=shard.derived_cache if c.exact else None,
                        rows=tuple(c.rows), base_row=c.base_row)
        if "fisher" in c.method.needs:
            x.fisher = self._buffer("fisher", len(c.rows), shape, shard=shard)
            for j, r in enumerate(c.rows):
                x.fisher[j].copy_(self.fisher[name][r])
            x.fisher_mean = shard.fisher_mean[c.rows]
        out = c.method.fn(x, **params)
        if scale is not None:  # validation saw to it that there is a base
            out = apply_lines(out, base, scale)
        return out

    def _combine(self, stack: torch.Tensor, base_row: int | None, rows: list[int], base_coef: float,
                 coefs: list[float], lines: float | None = None,
                 into: torch.Tensor | None = None, shard: Shard | None = None) -> torch.Tensor:
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
        shard = shard or self.shards[0]
        flat = stack.view(stack.shape[0], -1)
        n = flat.shape[1]
        block = min(n, COMBINE_BLOCK if shard.device.type == "cpu" else COMBINE_BLOCK_GPU)
        out = self._buffer("combined", 1, stack.shape[1:], shard=shard)[0].view(-1) if into is None else None
        acc, row = self._blocks(block, shard)
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

    def _blocks(self, size: int, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
        """Two float32 buffers of at least ``size`` entries on ``shard``'s device: a block's
        sum and one input row."""
        acc = shard.work.get("block")
        if acc is None or acc.numel() < 2 * size:
            acc = shard.work["block"] = torch.empty(2 * size, dtype=torch.float32, device=shard.device)
        return acc[:size], acc[size:2 * size]

    def _buffer(self, key: str, rows: int, shape: torch.Size, dtype: torch.dtype = torch.float32,
                shard: Shard | None = None) -> torch.Tensor:
        """A view of shape (rows, *shape) into a reusable buffer of ``dtype`` on ``shard``'s
        device (the first device's by default), sized by its largest tensor."""
        shard = shard or self.shards[0]
        need = rows * math.prod(shape)
        if dtype != torch.float32:
            key = f"{key}.{dtype}"
        buf = shard.work.get(key)
        if buf is None or buf.numel() < need:
            buf = torch.empty(max(need, rows * shard.largest), dtype=dtype, device=shard.device)
            shard.work[key] = buf
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
        kept = [*self.fisher.values()]
        for shard in self.shards:
            kept += [*(shard.random_cache or {}).values(), *(shard.derived_cache or {}).values()]
        return self.store.resident_bytes() + sum(t.numel() * t.element_size() for t in kept)


@dataclass
class _Candidate:
    """A recipe being merged: its method, inputs and their rows in the engine's stacks."""

    recipe: Recipe
    method: MergeMethod
    inputs: list[SourceModel]
    base_row: int | None
    rows: list[int]

    @property
    def exact(self) -> bool:
        """Whether it computes in float32, where the fast paths apply."""
        return self.recipe.compute_dtype is None


def _total(live_bytes: int | Mapping[str, int]) -> int:
    return sum(live_bytes.values()) if isinstance(live_bytes, Mapping) else live_bytes


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
