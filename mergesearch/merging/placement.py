"""Which of a worker's devices holds each tensor, when the live model is sharded over several.

A worker given several GPUs (``workers.gpus_per_worker`` above 1) shards its live model
over them by whole units: the tensors before the first layer (embeddings), each decoder
layer, and the tensors after the last (final norm, lm_head). Units keep the model's order,
in contiguous blocks, balanced so that each device's share of the bytes placed on it (the
live tensors and their input stacks) is proportional to its budget. The embeddings go with
the first device, the final norm and lm_head with the last, except an lm_head tied to the
embeddings: that is one weight, kept with the embeddings on the first device (the last
hidden states move there for the logits) rather than copied.

The engine then merges each tensor on the device that holds its parameter: one residency
plan, store and set of work buffers per device, over the tensors placed there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mergesearch.errors import ConfigError
from mergesearch.merging.architecture import POST_WEIGHTS, layer_index
from mergesearch.merging.residency import StackSpec, gb, work_bytes

# The output projections that a tied checkpoint leaves out (it reuses the embeddings).
HEAD_MODULES = ("lm_head", "embed_out")


def is_head(name: str) -> bool:
    """Whether ``name`` (a tensor or module) is the lm_head's."""
    return any(name == m or name.startswith(m + ".") for m in HEAD_MODULES)


def is_tied(config: Mapping, names: Iterable[str]) -> bool:
    """Whether the lm_head is the embeddings' weight: the config says so, or the checkpoint
    has no lm_head tensor."""
    return bool(config.get("tie_word_embeddings", False)) or not any(is_head(n) for n in names)


def module_of(name: str) -> str:
    """The module a tensor is placed with: its decoder layer (``model.layers.3``), else the
    module holding it (``model.embed_tokens``)."""
    layer = layer_index(name)
    parts = name.split(".")
    if layer is not None:
        at = parts.index(str(layer))  # the layer's number is the first part that spells it
        return ".".join(parts[:at + 1])
    return ".".join(parts[:-1])


def units(names: Sequence[str], tied: bool) -> list[list[str]]:
    """The tensors in placement units, in model order: before the first layer (with a tied
    lm_head), each layer, after the last. Empty units are left out."""
    pre, post, layers = [], [], {}
    for name in names:
        layer = layer_index(name)
        if layer is not None:
            layers.setdefault(layer, []).append(name)
        elif is_head(name):
            (pre if tied else post).append(name)
        elif name in POST_WEIGHTS:
            post.append(name)
        else:
            pre.append(name)
    return [u for u in (pre, *(layers[i] for i in sorted(layers)), post) if u]


def split_units(sizes: Sequence[int], budgets: Sequence[int], first_pinned: bool = True,
                last_pinned: bool = True) -> list[int]:
    """The device of each unit of ``sizes`` bytes, in order: device d takes the units whose
    middle byte falls in its share of the total, proportional to ``budgets[d]``; the first
    unit is pinned to the first device and the last to the last where asked."""
    total, room = sum(sizes), sum(budgets)
    ends, acc = [], 0
    for b in budgets:  # where each device's share of the bytes ends
        acc += b
        ends.append(total * acc / room if room else total)
    out, before = [], 0
    for size in sizes:
        middle = before + size / 2
        out.append(next((d for d, end in enumerate(ends) if middle < end), len(budgets) - 1))
        before += size
    if out and first_pinned:
        out[0] = 0
    if out and last_pinned:
        out[-1] = len(budgets) - 1
    return out


@dataclass
class Placement:
    """Where each tensor lives: ``tensors`` maps a name to its device's index in
    ``devices``, ``modules`` a live-model module to it; ``live`` and ``work`` are each
    device's live-model and work-buffer bytes."""

    devices: list[str]
    tensors: dict[str, int]
    modules: dict[str, int]
    live: list[int]
    work: list[int]

    def names(self, device: int) -> list[str]:
        """The tensors placed on ``device`` (an index), in the checkpoint's order."""
        return [n for n, d in self.tensors.items() if d == device]

    def device_map(self, live_keys: Iterable[str] = ()) -> dict[str, str]:
        """The module -> device map of the live model (accelerate's ``device_map``),
        covering also ``live_keys`` (its state dict) that no checkpoint tensor names: a tied
        lm_head, buffers. Such a key goes with its layer, else to the first device."""
        modules = dict(self.modules)
        for key in live_keys:
            if any(key == m or key.startswith(m + ".") for m in modules):
                continue
            module = module_of(key) or key  # never "", which would stand for the whole model
            layer = layer_index(key)
            # A tied lm_head is the embeddings' weight, on the first device (`place`).
            modules[module] = self._layer_device(layer) if layer is not None else 0
        return {m: self.devices[d] for m, d in modules.items()}

    def _layer_device(self, layer: int) -> int:
        return next((d for n, d in self.tensors.items() if layer_index(n) == layer), 0)


def place(specs: Mapping[str, StackSpec], live: Mapping[str, int], devices: Sequence[str],
          budgets: Sequence[int], tied: bool) -> Placement:
    """Place the checkpoint's tensors (``specs``: each one's input stack, the base's order;
    ``live``: each one's bytes in the live model) on ``devices`` within ``budgets`` (bytes
    each), as the module's docstring says. Refuses, with the numbers, a placement whose
    live model and work buffers do not fit every device."""
    groups = units(list(specs), tied)
    pre = bool(groups) and layer_index(groups[0][0]) is None
    post = len(groups) > int(pre) and layer_index(groups[-1][0]) is None
    sizes = [sum(live.get(n, 0) + specs[n].nbytes for n in u) for u in groups]
    unit_devices = split_units(sizes, budgets, first_pinned=pre, last_pinned=post)
    tensors = {n: d for u, d in zip(groups, unit_devices) for n in u}
    tensors = {n: tensors[n] for n in specs}  # the checkpoint's order
    modules = {module_of(n): d for n, d in tensors.items()}
    per_device = [{n: specs[n] for n, d in tensors.items() if d == i} for i in range(len(devices))]
    placed = Placement(list(devices), tensors, modules,
                       [sum(live.get(n, 0) for n in s) for s in per_device],
                       [work_bytes(s) for s in per_device])
    check_placement_fits(placed, budgets)
    return placed


def check_placement_fits(placed: Placement, budgets: Sequence[int]) -> None:
    """Refuse a placement where a device cannot hold its live tensors and work buffers."""
    needs = [live + work for live, work in zip(placed.live, placed.work)]
    if all(need <= budget for need, budget in zip(needs, budgets)):
        return
    each = ", ".join(f"{dev} needs {gb(need)} of its {gb(budget)}"
                     for dev, need, budget in zip(placed.devices, needs, budgets))
    raise ConfigError(
        f"workers.device_memory_gb, workers.gpus_per_worker: the live model ({gb(sum(placed.live))}) "
        f"and the merge's work buffers ({gb(sum(placed.work))}) need {gb(sum(needs))} over the "
        f"worker's {len(budgets)} devices, which may use {gb(sum(budgets))}; placed by whole "
        f"layers: {each}")
