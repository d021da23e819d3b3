"""The merge-method registry: each method's function, knobs, defaults and valid ranges.

A method is a pure function ``fn(x: MergeInputs, **params) -> Tensor`` over one tensor.
Its knobs are declared once here, beside it, and so is how it sparsifies the task vectors
(`Sparsity`); recipe validation, the search space and the cost evaluator read them from the
registry, so nothing restates them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import torch

from mergesearch.registry import Registry

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One knob of a method.

    ``per_model`` knobs (weight, density, ...) take one value per source model; the others
    are global. ``valid`` is the closed range a value must lie in; ``search`` the range a
    search explores by default (None: not searched unless the user asks). ``type=int``
    knobs take whole numbers (searched as integers). ``layers`` marks a count of layers:
    its ``search`` range is then a fraction of the model's layer count, and a value may not
    exceed that count.
    """

    name: str
    default: Any = REQUIRED
    per_model: bool = False
    type: type = float
    valid: tuple[float, float] = (-math.inf, math.inf)
    search: tuple[float, float] | None = None
    layers: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any) -> str | None:
        """None if ``value`` is acceptable, else what is wrong with it."""
        if self.type is bool:
            return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {value!r}"
        if self.type is int and not float(value).is_integer():
            return f"expected a whole number, got {value!r}"
        lo, hi = self.valid
        if not (lo <= value <= hi) or math.isnan(value):
            return f"{value!r} is outside its valid range [{lo}, {hi}]"
        return None


@dataclass
class MergeInputs:
    """What a method sees for one tensor: float32 tensors on the engine's device.

    ``models`` stacks the inputs along dim 0: the non-base sources, in recipe order (for
    methods without a base role, every input). ``deltas`` are the task vectors, computed
    once into a tensor of their own that the method may modify in place. ``base`` and
    ``models`` are the engine's buffers (or views of resident weights): read them only.
    """

    name: str
    base: torch.Tensor | None
    models: torch.Tensor
    seed: int = 0
    workspace: torch.Tensor | None = field(default=None, repr=False)  # where deltas may go
    random_cache: dict | None = field(default=None, repr=False)  # see `uniform`
    # Tensors derived from one task vector alone (not from the recipe's knobs), kept by the
    # engine across candidates where that beats recomputing them (see `derived`); keyed by
    # the engine rows of the base and of each input.
    derived_cache: dict | None = field(default=None, repr=False)
    rows: tuple[int, ...] | None = None
    base_row: int | None = None
    layer: int | None = None  # the transformer block of this tensor (None: embeddings, head)
    num_layers: int = 1  # blocks in the model
    # Side inputs, present when the method declares it `needs` them: each input's diagonal
    # Fisher information (stacked like ``models``) and its mean over the whole model.
    fisher: torch.Tensor | None = field(default=None, repr=False)
    fisher_mean: torch.Tensor | None = field(default=None, repr=False)

    @cached_property
    def deltas(self) -> torch.Tensor:
        if self.base is None:
            raise ValueError(f"{self.name}: this method needs a base model")
        if self.workspace is None:
            return self.models - self.base
        return torch.sub(self.models, self.base, out=self.workspace)

    def derived(self, kind: str, i: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """``compute()``, a tensor that depends on input i's task vector alone (say, the
        magnitude ranks of its entries), computed once per engine and reused by every later
        candidate; None where the engine keeps no such cache (a GPU, where the methods'
        cheap-to-recompute path is faster than reading a cached copy)."""
        if self.derived_cache is None or self.rows is None:
            return None
        key = (kind, self.name, self.base_row, self.rows[i])
        value = self.derived_cache.get(key)
        if value is None:
            value = self.derived_cache[key] = compute()
        return value

    def uniform(self, stream: int, shape: torch.Size | None = None) -> torch.Tensor:
        """Uniform [0, 1) numbers, identical on every device and in any tensor order.

        Counter-based: element i of stream s of tensor `name` under `seed` is
        hash(hash(i) ^ key(seed, name, s)) / 2**32 (24 bits kept), so CPU and GPU give the
        same bits and no generator state is shared between tensors. With a
        ``random_cache`` the numbers are computed once per engine and reused.
        """
        shape = self.models.shape[1:] if shape is None else shape
        cache_key = (self.seed, self.name, stream, tuple(shape))
        if self.random_cache is not None and cache_key in self.random_cache:
            return self.random_cache[cache_key]
        digest = hashlib.blake2b(f"{self.seed}\0{self.name}\0{stream}".encode(), digest_size=4)
        key = int.from_bytes(digest.digest(), "little")
        key -= (key >> 31) << 32  # the same 32 bits, as a signed int32
        n = math.prod(shape)
        out = torch.empty(n, dtype=torch.float32, device=self.models.device)
        chunk = 1 << 18  # int32 lanes, cache-sized chunks: ~4x faster than one big pass
        for start in range(0, n, chunk):
            x = torch.arange(start, min(n, start + chunk), dtype=torch.int32, device=out.device)
            _lowbias32_(x)
            x ^= key
            _lowbias32_(x)
            x = (x >> 8) & 0xFFFFFF  # 24 random bits: exact in float32
            torch.mul(x, 2.0**-24, out=out[start:start + chunk])
        out = out.reshape(shape)
        if self.random_cache is not None:
            self.random_cache[cache_key] = out
        return out


def _lowbias32_(x: torch.Tensor) -> torch.Tensor:
    # Wellons' "lowbias32" integer hash, in place, on int32 lanes. Products wrap modulo
    # 2**32 on every backend; arithmetic right shifts are masked to make them logical.
    x ^= (x >> 16) & 0xFFFF
    x *= 0x21F0AAAD
    x ^= (x >> 15) & 0x1FFFF
    x *= 0x735A2D97
    x ^= (x >> 15) & 0x1FFFF
    return x


@dataclass(frozen=True)
class Sparsity:
    """How a method sparsifies each task vector, declared once beside its knobs: what
    reads it (the cost evaluator, recipe checks, the search space) asks here, not by name.

    ``kind``: ``none`` (every entry kept), ``magnitude`` (top-k by magnitude, TIES),
    ``outliers`` (breadcrumbs: the largest dropped, then the smallest), ``random`` (DARE's
    Bernoulli drop), ``della`` (DELLA's drop, with keep probabilities ranked by magnitude),
    ``pcb`` (PCB's balancing scores), ``variance`` (SCE: where the task vectors vary most).
    ``knob`` names the knob giving the fraction to keep (per model or global) and
    ``kept(fraction, n)`` how many of a tensor's ``n`` entries one task vector keeps at it:
    exact for deterministic masks, the expected count for random ones.
    """

    kind: str = "none"
    knob: str | None = None
    kept: Callable[[float, int], float] | None = None

    def kept_entries(self, fraction: float | None, n: int) -> float:
        """Entries of one task vector of ``n`` entries kept at the knob's value."""
        if self.kept is None or fraction is None:
            return float(n)
        return float(self.kept(fraction, n))


NO_SPARSITY = Sparsity()


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    base: Literal["required", "optional", "none"]
    min_sources: int = 1
    max_sources: int | None = None
    random: bool = False
    reference: str = ""
    mergekit: bool = True
    doc: str = field(default="", repr=False)
    needs: tuple[str, ...] = ()  # side inputs besides the weights, e.g. ("fisher",)
    # For a method whose result is a weighted sum of its inputs: the knobs -> (the base's
    # coefficient, each input's). The engine then sums the resident weights directly
    # (`MergeEngine._combine`); ``fn`` stays the reference it is tested against.
    combination: Callable[..., tuple[float, list[float]]] | None = None
    sparsity: Sparsity = NO_SPARSITY  # how it sparsifies each task vector

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def per_model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)


METHODS: Registry[MergeMethod] = Registry("merge method")


def merge_method(
    name: str,
    params: list[Param] | tuple[Param, ...] = (),
    *,
    base: Literal["required", "optional", "none"] = "required",
    min_sources: int = 1,
    max_sources: int | None = None,
    random: bool = False,
    reference: str = "",
    mergekit: bool = True,
    needs: tuple[str, ...] = (),
    combination: Callable[..., tuple[float, list[float]]] | None = None,
    sparsity: Sparsity = NO_SPARSITY,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register ``fn`` under ``name`` with its knobs (and, for a method that drops entries
    of the task vectors, its `Sparsity`)."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if sparsity.knob is not None and sparsity.knob not in {p.name for p in params}:
            raise ValueError(f"merge method {name!r}: its sparsity reads no knob {sparsity.knob!r}")
        METHODS.register(name, MergeMethod(
            name, fn, tuple(params), base, min_sources, max_sources, random, reference,
            mergekit, (fn.__doc__ or "").strip(), tuple(needs), combination, sparsity,
        ))
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``; KeyError naming the known ones."""
    return METHODS.get(name)


def all_methods() -> dict[str, MergeMethod]:
    return {name: METHODS.get(name) for name in METHODS}
