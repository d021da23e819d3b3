"""Where a worker keeps the inputs of its merges: a residency plan, and the storage behind it.

The engine merges from every tensor of a base and its sources, stacked per tensor (row 0
the base, row i the i-th source). `plan_residency` decides, row by row, where each lives:

* ``device``: resident on the compute device, read in place;
* ``host``: in host memory (pinned when the device is a GPU), copied to the device when its
  tensor is merged; on a CPU the host is the device, and such a row is read in place;
* ``mmap``: in the checkpoints' safetensors files, read by byte range when its tensor is
  merged. The OS page cache holds the files (shared by every worker of the node and given
  back under pressure), not the worker, whose memory stays within its budget.

The device budget holds the live model, the engine's work buffers and, as soon as any row
is not on the device, two staging buffers of the largest stack: the next tensor is copied
into one (on a side stream and a reader thread) while this one is merged from the other.
On a GPU, reading files also takes two pinned host buffers from the host budget. What is
left of the device budget goes to what the engine keeps across candidates (`KeptTensors`).

Priority for the fast tiers (a greedy first fit): the base rows first, since every
candidate reads them (the restore of the base, every method with a base, LiNeS); then the
source rows; within each, the largest tensors first: per byte held they save as much
copying as small ones, in fewer, longer copies that reach the copy bandwidth.

The merge reads the same values in the same dtype whatever the tier, so its result is
bit-identical across plans.

A worker whose live model is sharded over several GPUs (`placement`) keeps one plan and one
store per GPU, over the tensors placed there, each within that GPU's budget; the host
budget is shared out between them (`plan_shards`), and the plans read as one
(`ShardedPlan`, `ShardedStore`).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Union

import psutil
import torch

from mergesearch.errors import ConfigError
from mergesearch.merging.checkpoint import TensorLocation

TIERS = ("device", "host", "mmap")
GiB = 2**30
# Of the free device memory, the share a worker plans on by default: the CUDA context, the
# allocator's fragmentation and an evaluator's activations take the rest.
DEVICE_SHARE = 0.9
# Of the host memory available at start, the share a worker plans on by default: the
# evaluators, tokenizers and Python itself take the rest.
HOST_SHARE = 0.8
# Stacks in flight while streaming: the one being merged and the next, being copied.
STAGING_SLOTS = 2
PAGE = 4096  # host memory is registered with CUDA in whole pages

# A row's bytes: in a file (read on demand), or a tensor already in memory (.bin files).
RowSource = Union[TensorLocation, torch.Tensor]


@dataclass(frozen=True)
class StackSpec:
    """One tensor's stack: the shape of a row, the stack's dtype and its number of rows."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    rows: int

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


def stack_specs(models: list[Mapping[str, RowSource]]) -> dict[str, StackSpec]:
    """Each tensor's stack over ``models`` (the base first), in the base's order; rows of
    different dtypes stack in their promoted dtype, as `torch.stack` would."""
    specs = {}
    for name, first in models[0].items():
        dtype = first.dtype
        for m in models[1:]:
            dtype = torch.promote_types(dtype, m[name].dtype)
        specs[name] = StackSpec(tuple(first.shape), dtype, len(models))
    return specs


def live_model_bytes(base: Mapping[str, RowSource], dtype: str | None = None) -> int:
    """The live model's weights: the base's tensors, in ``dtype`` (None: as stored)."""
    cast = getattr(torch, dtype.removeprefix("torch."), None) if dtype else None
    cast = cast if isinstance(cast, torch.dtype) else None  # "auto": as stored
    return sum(math.prod(t.shape) * (cast or t.dtype).itemsize for t in base.values())


def work_bytes(specs: Mapping[str, StackSpec]) -> int:
    """The engine's float32 work buffers, sized by the largest tensor: a copy of each input
    and of each task vector, the base, the result and two blocks of `_combine`."""
    if not specs:
        return 0
    largest = max(math.prod(s.shape) for s in specs.values())
    rows = max(s.rows for s in specs.values())
    return (2 * rows + 4) * largest * 4


def staging_bytes(specs: Mapping[str, StackSpec]) -> int:
    """Two staging buffers of the largest stack (double buffering)."""
    return STAGING_SLOTS * max((s.nbytes for s in specs.values()), default=0)


def resolve_budgets(device: torch.device, device_bytes: int | None = None,
                    host_bytes: int | None = None, gpu_share: float = 1.0,
                    host_share: float = 1.0) -> tuple[int, int]:
    """The (device, host) bytes a worker plans on: those given, else shares of the memory
    free now; a worker given ``gpu_share`` of a GPU (fractional ``gpus_per_worker``) plans
    on at most that share of its memory, which the other workers on it share, and one
    given ``host_share`` of its node (`node_share`) on that share of the host's. On a CPU
    the device is the host: without a device budget, the host budget covers everything and
    the host tier is empty (it would be the same memory)."""
    available = int(HOST_SHARE * host_share * psutil.virtual_memory().available)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        free = min(free, int(gpu_share * total))
        return (device_bytes if device_bytes is not None else int(DEVICE_SHARE * free),
                host_bytes if host_bytes is not None else available)
    if device_bytes is None:
        return (host_bytes if host_bytes is not None else available), 0
    return device_bytes, host_bytes if host_bytes is not None else max(0, available - device_bytes)


def gb(n: int) -> str:
    """Bytes for a person: 1.50 GiB, 12.0 MiB, 3.0 KiB, 16 B."""
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n} B"


@dataclass
class ResidencyPlan:
    """A tier per row of every stack, with what the device and host budgets also hold."""

    tiers: dict[str, tuple[str, ...]]
    specs: dict[str, StackSpec]
    device_budget: int
    host_budget: int
    live_bytes: int = 0
    work_bytes: int = 0
    staging_bytes: int = 0  # on the device
    host_staging_bytes: int = 0  # pinned, for file reads on a GPU

    def bytes(self, tier: str) -> int:
        """The input bytes kept on ``tier``."""
        return sum(self.specs[n].row_bytes for n, ts in self.tiers.items() for t in ts if t == tier)

    def device_used(self) -> int:
        return self.live_bytes + self.work_bytes + self.staging_bytes + self.bytes("device")

    def spare_device(self) -> int:
        """What is left of the device budget: for what is kept across candidates."""
        return max(0, self.device_budget - self.device_used())

    def describe(self) -> str:
        """One line: the input bytes per tier, what else the device holds, the budgets."""
        return (f"residency device {gb(self.bytes('device'))} · host {gb(self.bytes('host'))} · "
                f"mmap {gb(self.bytes('mmap'))} (besides live model {gb(self.live_bytes)}, work "
                f"{gb(self.work_bytes + self.staging_bytes + self.host_staging_bytes)}; budget device "
                f"{gb(self.device_budget)}, host {gb(self.host_budget)})")


def minimum_device_bytes(specs: Mapping[str, StackSpec], live_bytes: int) -> int:
    """The least a worker's device needs: the live model and the work buffers."""
    return live_bytes + work_bytes(specs)


def check_device_fits(specs: Mapping[str, StackSpec], live_bytes: int, budget: int) -> None:
    """Refuse a device budget that cannot hold the live model and the work buffers, with
    the numbers."""
    need = minimum_device_bytes(specs, live_bytes)
    if need > budget:
        raise ConfigError(
            f"workers.device_memory_gb: the live model ({gb(live_bytes)}) and the merge's work "
            f"buffers ({gb(need - live_bytes)}) need {gb(need)} on each worker's device, which "
            f"may use {gb(budget)} (workers.device_memory_gb; on a CPU without it, "
            "workers.host_memory_gb; else a share of the free memory)")


def plan_residency(specs: dict[str, StackSpec], device_budget: int, host_budget: int,
                   live_bytes: int = 0, device_type: str = "cpu", mmap_ok: bool = True) -> ResidencyPlan:
    """Place every row of every stack (see the module's docstring for the priority).
    ``mmap_ok``: whether the rows can be read from files (safetensors checkpoints only).
    A plan that cannot fit at all raises `ConfigError` with the numbers."""
    check_device_fits(specs, live_bytes, device_budget)
    plan = ResidencyPlan({n: ("device",) * s.rows for n, s in specs.items()}, specs,
                         device_budget, host_budget, live_bytes, work_bytes(specs))
    if plan.device_used() <= device_budget:
        return plan  # everything resident: nothing is staged
    plan.staging_bytes = staging_bytes(specs)
    room = device_budget - plan.live_bytes - plan.work_bytes - plan.staging_bytes
    if room < 0:
        raise ConfigError(
            f"workers.device_memory_gb: streaming the inputs needs {gb(device_budget - room)} on "
            f"each worker's device (live model {gb(live_bytes)}, work and staging buffers "
            f"{gb(plan.work_bytes + plan.staging_bytes)}); it may use {gb(device_budget)}")
    order = sorted(((n, r) for n, s in specs.items() for r in range(s.rows)),
                   key=lambda u: (u[1] != 0, -specs[u[0]].row_bytes))
    tiers = {n: ["mmap"] * s.rows for n, s in specs.items()}
    left = _first_fit(order, specs, room, tiers, "device")
    if device_type != "cpu" and sum(specs[n].row_bytes for n, _ in left) > host_budget:
        plan.host_staging_bytes = staging_bytes(specs)  # pinned buffers for reading files
    left = _first_fit(left, specs, host_budget - plan.host_staging_bytes, tiers, "host")
    if left and not mmap_ok:
        raise ConfigError(
            f"workers.host_memory_gb: {gb(sum(specs[n].row_bytes for n, _ in left))} of the inputs fit "
            f"neither the device ({gb(device_budget)}) nor the host ({gb(host_budget)}) budget, and "
            "only safetensors checkpoints can be read from their files on demand")
    if plan.host_staging_bytes > host_budget:
        raise ConfigError(
            f"workers.host_memory_gb: reading the inputs from their files needs {gb(plan.host_staging_bytes)} "
            f"of pinned host memory; the worker may use {gb(host_budget)}")
    plan.tiers = {n: tuple(ts) for n, ts in tiers.items()}
    return plan


def _first_fit(units: list[tuple[str, int]], specs: Mapping[str, StackSpec], room: int,
               tiers: dict[str, list[str]], tier: str) -> list[tuple[str, int]]:
    """Put on ``tier`` each unit, in order, that still fits in ``room``; the rest returned."""
    left = []
    for name, row in units:
        size = specs[name].row_bytes
        if size <= room:
            tiers[name][row] = tier
            room -= size
        else:
            left.append((name, row))
    return left


class StackStore:
    """Every stack, kept as a plan says. `sweep` hands the stacks to the compute device in
    turn; a stack whose rows are not all where the device reads them is assembled in a
    staging buffer, the next one while this one is used."""

    def __init__(self, plan: ResidencyPlan, models: list[Mapping[str, RowSource]], device: torch.device):
        self.plan, self.device = plan, device
        self.cuda = device.type == "cuda"
        # Where the device reads in place: its own memory, and on a CPU the host too.
        self._in_place = {"device"} if self.cuda else {"device", "host"}
        self.whole: dict[str, torch.Tensor] = {}  # stacks read in place
        self.apart: dict[tuple[str, int], torch.Tensor] = {}  # rows in memory, of other stacks
        self.files: dict[tuple[str, int], TensorLocation] = {}  # rows read on demand
        self._host_blocks: list[torch.Tensor] = []  # host memory held, pinned on a GPU
        for name in plan.specs:
            self._load(name, [m[name] for m in models])
        streamed = [s.nbytes for n, s in plan.specs.items() if n not in self.whole]
        biggest = max(streamed, default=0)
        self._staging = [torch.empty(biggest, dtype=torch.uint8, device=device)
                         for _ in range(STAGING_SLOTS if streamed else 0)]
        self._pinned = [self._host(biggest) for _ in range(STAGING_SLOTS if self.cuda and self.files else 0)]
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="mergesearch-stage") if streamed else None
        self._side = torch.cuda.Stream(device) if self.cuda and streamed else None

    def _load(self, name: str, rows: list[RowSource]) -> None:
        spec, tiers = self.plan.specs[name], self.plan.tiers[name]
        if set(tiers) <= self._in_place:
            stack = torch.empty((spec.rows, *spec.shape), dtype=spec.dtype, device=self.device)
            for r, src in enumerate(rows):
                _read(src, stack[r])
            self.whole[name] = stack
            return
        for r, (tier, src) in enumerate(zip(tiers, rows)):
            if tier == "mmap":
                self.files[(name, r)] = src
                continue
            if tier == "device":
                row = torch.empty(spec.shape, dtype=spec.dtype, device=self.device)
            else:
                row = self._host(spec.row_bytes).view(spec.dtype).view(spec.shape)
            self.apart[(name, r)] = _read(src, row)

    def _host(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of host memory, page-locked on a GPU, held as long as the store."""
        block = pinned_empty(nbytes) if self.cuda else torch.empty(nbytes, dtype=torch.uint8)
        self._host_blocks.append(block)
        return block

    def sweep(self, names: Iterable[str], rows: Iterable[int]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, stack on the device) for each of ``names`` in order, with ``rows`` filled
        (the others may hold anything). A stack is valid until the next is asked for."""
        names, rows = list(names), sorted(set(rows))
        pending: Future | torch.Tensor | None = None
        try:
            for i, name in enumerate(names):
                if pending is None:
                    pending = self._start(name, rows, i % STAGING_SLOTS)
                stack = pending.result() if isinstance(pending, Future) else pending
                pending = self._start(names[i + 1], rows, (i + 1) % STAGING_SLOTS) if i + 1 < len(names) else None
                yield name, stack
        finally:  # a sweep left early: the copy under way must end before a slot is reused
            if isinstance(pending, Future):
                with contextlib.suppress(Exception):
                    pending.result()

    def _start(self, name: str, rows: list[int], slot: int) -> Future | torch.Tensor:
        """The stack itself where it is read in place, else a future of its staged copy in
        ``slot`` (whose previous stack, two back, the device has finished with)."""
        if name in self.whole:
            return self.whole[name]
        ready = None
        if self.cuda:  # the side stream waits for the kernels that read this slot last
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))  # this store's GPU, not the current one
        return self._reader.submit(self._stage, name, rows, slot, ready)

    def _stage(self, name: str, rows: list[int], slot: int, ready: torch.cuda.Event | None) -> torch.Tensor:
        spec = self.plan.specs[name]
        stack = self._staging[slot][:spec.nbytes].view(spec.dtype).view(spec.rows, *spec.shape)
        pinned = self._pinned[slot] if self._pinned else None
        with torch.cuda.stream(self._side) if self._side is not None else contextlib.nullcontext():
            if ready is not None:
                self._side.wait_event(ready)
            for r in rows:
                self._copy_row(name, r, stack[r], pinned, r * spec.row_bytes)
            if self._side is not None:
                self._side.synchronize()  # the pinned buffer is free, the stack complete
        return stack

    def _copy_row(self, name: str, r: int, out: torch.Tensor, pinned: torch.Tensor | None,
                  at: int) -> None:
        """Row ``r`` of ``name`` into ``out`` (on the device), through ``pinned[at:]`` when
        it is read from a file onto a GPU."""
        row = self.apart.get((name, r))
        if row is not None:
            out.copy_(row, non_blocking=True)
            return
        loc = self.files[(name, r)]
        if pinned is None:
            _read(loc, out)
            return
        buf = pinned[at:at + loc.nbytes].view(loc.dtype).view(loc.shape)
        out.copy_(loc.read_into(buf), non_blocking=True)

    def full(self, name: str) -> torch.Tensor:
        """A complete stack: the resident one, or a fresh copy (slow; for inspection)."""
        if name in self.whole:
            return self.whole[name]
        spec = self.plan.specs[name]
        stack = torch.empty((spec.rows, *spec.shape), dtype=spec.dtype, device=self.device)
        for r in range(spec.rows):
            self._copy_row(name, r, stack[r], None, 0)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return stack

    def resident_bytes(self) -> int:
        """Memory held: the stacks and rows kept in memory and the staging buffers."""
        on_device = [row for (n, r), row in self.apart.items() if self.plan.tiers[n][r] == "device"]
        held = [*self.whole.values(), *on_device, *self._host_blocks, *self._staging]
        return sum(t.numel() * t.element_size() for t in held)


def pinned_empty(nbytes: int) -> torch.Tensor:
    """``nbytes`` of page-locked host memory (uint8), exactly: torch's pinned allocator
    rounds every block up to a power of two, which would take up to twice the host
    budget, so plain memory is registered with CUDA instead (and unregistered when the
    returned tensor is freed: keep it, not only views of it). Torch's pinned allocation
    where registering fails."""
    size = -(-nbytes // PAGE) * PAGE
    raw = torch.empty(size + PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % PAGE
    block = raw[start:start + nbytes]
    try:
        cudart = torch.cuda.cudart()
        ptr = block.data_ptr()
        # Portable: pinned for every GPU's context, as a sharded worker's GPUs all read it.
        torch.cuda.check_error(cudart.cudaHostRegister(ptr, size, 1))  # cudaHostRegisterPortable
    except Exception:  # noqa: BLE001 - no runtime binding, or registering refused
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    weakref.finalize(block, cudart.cudaHostUnregister, ptr)
    return block


def _read(src: RowSource, out: torch.Tensor) -> torch.Tensor:
    """One row into ``out`` (any device, the stack's dtype): straight from the file where
    it can, else through a CPU tensor of the file's dtype (cast on copy, as a stack is)."""
    if isinstance(src, torch.Tensor):
        return out.copy_(src)
    if out.device.type == "cpu" and out.dtype == src.dtype and out.is_contiguous():
        return src.read_into(out)
    return out.copy_(src.read_into(torch.empty(src.shape, dtype=src.dtype)))


class StackView(Mapping):
    """The stacks by name, each a complete (rows, *shape) tensor: `MergeEngine.stacks`, for
    inspection; a stack not read in place is assembled afresh on each access."""

    def __init__(self, store: StackStore):
        self.store = store

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.store.plan.specs:
            raise KeyError(name)
        return self.store.full(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.store.plan.specs)

    def __len__(self) -> int:
        return len(self.store.plan.specs)


# ---- a worker whose live model is sharded over several devices ------------------------------


def plan_shards(specs: list[dict[str, StackSpec]], device_budgets: list[int], host_budget: int,
                live_bytes: list[int], device_types: list[str], mmap_ok: bool = True) -> list[ResidencyPlan]:
    """One plan per device, over the stacks placed on it (``specs[d]``), within its own
    budget. The host budget is shared out in proportion to what each device cannot keep
    itself (what a plan without host memory would read from the files), so that a device
    holding all its inputs takes none of it."""
    overflow = [plan_residency(s, b, 0, live, t).bytes("mmap")
                for s, b, live, t in zip(specs, device_budgets, live_bytes, device_types)]
    total = sum(overflow)
    hosts = [host_budget * o // total if total else host_budget // len(specs) for o in overflow]
    return [plan_residency(s, b, h, live, t, mmap_ok=mmap_ok)
            for s, b, h, live, t in zip(specs, device_budgets, hosts, live_bytes, device_types)]


@dataclass
class ShardedPlan:
    """The plans of a sharded worker, one per device, read as one: the bytes of every tier
    and budget summed over the devices; `describe` gives them per device."""

    plans: list[ResidencyPlan]
    devices: list[torch.device]

    @property
    def specs(self) -> dict[str, StackSpec]:
        return {n: s for p in self.plans for n, s in p.specs.items()}

    @property
    def tiers(self) -> dict[str, tuple[str, ...]]:
        return {n: t for p in self.plans for n, t in p.tiers.items()}

    def _sum(self, field: str) -> int:
        return sum(getattr(p, field) for p in self.plans)

    live_bytes = property(lambda self: self._sum("live_bytes"))
    work_bytes = property(lambda self: self._sum("work_bytes"))
    staging_bytes = property(lambda self: self._sum("staging_bytes"))
    host_staging_bytes = property(lambda self: self._sum("host_staging_bytes"))
    device_budget = property(lambda self: self._sum("device_budget"))
    host_budget = property(lambda self: self._sum("host_budget"))

    def bytes(self, tier: str) -> int:
        """The input bytes kept on ``tier``, over every device."""
        return sum(p.bytes(tier) for p in self.plans)

    def device_used(self) -> int:
        return sum(p.device_used() for p in self.plans)

    def spare_device(self) -> int:
        """What is left of the device budgets, over every device."""
        return sum(p.spare_device() for p in self.plans)

    def describe(self) -> str:
        """One line: each device's plan as `ResidencyPlan.describe` gives it."""
        each = " | ".join(f"{label}: {p.describe().removeprefix('residency ')}"
                          for label, p in zip(device_labels(self.devices), self.plans))
        return f"residency over {len(self.plans)} devices: {each}"


def device_labels(devices: list[torch.device]) -> list[str]:
    """Names for ``devices``: ``cuda:0``; numbered where a name repeats (``cpu#1``)."""
    names = [str(d) for d in devices]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


class ShardedStore:
    """The stores of a sharded worker, one per device, read as one: `sweep` goes through
    them device by device, each streaming its own stacks."""

    def __init__(self, stores: list[StackStore]):
        self.stores = stores
        self.plan = ShardedPlan([s.plan for s in stores], [s.device for s in stores])
        self._where = {name: s for s in stores for name in s.plan.specs}

    def sweep(self, names: Iterable[str], rows: Iterable[int]) -> Iterator[tuple[str, torch.Tensor]]:
        """As `StackStore.sweep`, one device's stacks after the other's (each device's in
        the order of ``names``); a stack lies on its tensor's device."""
        names, rows = list(names), list(rows)
        for store in self.stores:
            yield from store.sweep([n for n in names if self._where[n] is store], rows)

    def full(self, name: str) -> torch.Tensor:
        return self._where[name].full(name)

    def resident_bytes(self) -> int:
        return sum(s.resident_bytes() for s in self.stores)
