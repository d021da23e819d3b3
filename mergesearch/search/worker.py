"""The worker: resident weights, a live model and set-up evaluators; recipes in, scores out.

`CandidateWorker` is a plain class, so the same code scores candidates in-process
(`mergesearch eval`, export checks, tests, `SerialPool`) and inside a Ray actor
(`RayPool`). Any failure of one candidate (an exception, NaN, out of memory) is returned
as data with its reason, in a `CandidateResult`; the worker stays usable.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergesearch.config import Config, parse_config
from mergesearch.errors import ConfigError
from mergesearch.evaluators import Evaluator, adopt_evaluators, build_evaluators
from mergesearch.merging.build import open_live
from mergesearch.merging.engine import default_device
from mergesearch.merging.fisher_info import load_fisher
from mergesearch.merging.references import resolve_reference
from mergesearch.merging.residency import resolve_budgets
from mergesearch.quiet import quiet_libraries
from mergesearch.recipe import Recipe


@dataclass
class CandidateResult:
    """What scoring one candidate gave: per objective its value, standard error (None where
    the evaluator gives none) and the fraction of its examples scored; the metrics and
    timings recorded on the trial; the examples scored; and, for a failed candidate, why
    (its values then hold the objectives scored before the failure, if any)."""

    worker: str | None = None
    node: str | None = None
    values: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float | None] = field(default_factory=dict)
    fraction: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    examples: int = 0
    error: str | None = None


def resolve_models(config: Config) -> tuple[str, dict[str, str]]:
    """The base and source models as folders or hub ids (see `resolve_reference`)."""
    models = config.models
    return (resolve_reference(models.base, config.root),
            {alias: resolve_reference(ref, config.root) for alias, ref in models.sources.items()})


class CandidateWorker:
    """Holds the base, the task vectors, the live model and the evaluators."""

    def __init__(self, snapshot: dict[str, Any], base: str, sources: dict[str, str],
                 heldout: bool = False, device: str | None = None, threads: int | None = None,
                 fisher: dict[str, str] | None = None,
                 evaluators: dict[str, type[Evaluator]] | None = None):
        from transformers import AutoTokenizer

        started = time.perf_counter()
        adopt_evaluators(evaluators or {})  # those the driver registered by name
        data = dict(snapshot)
        root = Path(data.pop("root", "."))
        self.config = parse_config(data, source="config snapshot", root=root)
        if threads:
            torch.set_num_threads(threads)
        w = self.config.workers
        trust = self.config.models.trust_remote_code
        devices = worker_devices(w.gpus_per_worker, device)
        # A fractional gpus_per_worker shares the GPU: plan on that share of its memory; and
        # on the share of the host's that the node's other workers leave.
        share = node_share(w.cpus_per_worker, w.gpus_per_worker)
        budgets = [resolve_budgets(d, gib_bytes(w.device_memory_gb), gib_bytes(w.host_memory_gb),
                                   gpu_share=min(1.0, w.gpus_per_worker or 1.0), host_share=share)
                   for d in devices]
        with quiet_libraries():  # loading bars, lm-eval's task indexing and set-up logs
            self.engine, self.model = open_live(
                base, sources.values(), device=devices[0], dtype=self.config.models.dtype,
                trust_remote_code=trust, cache_bytes=gib_bytes(w.cache_gb),
                device_budget=[b[0] for b in budgets], host_budget=budgets[0][1], devices=devices)
            if fisher:
                self.load_fisher(fisher)
            self.tokenizer = AutoTokenizer.from_pretrained(self.engine.base.path, trust_remote_code=trust)
            objectives = self.config.heldout if heldout else self.config.objectives
            self.evaluators = build_evaluators(self.config, objectives)
            for ev in self.evaluators:
                ev.setup(self.model, self.tokenizer, self.engine)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.node = _ray_node_id()
        self.setup_seconds = time.perf_counter() - started

    def load_fisher(self, files: dict[str, str]) -> None:
        """Attach each model's cached Fisher information (model -> file), for `fisher`."""
        self.engine.attach_fisher({m: load_fisher(f, self.engine.device) for m, f in files.items()})

    def info(self) -> dict[str, Any]:
        return {"worker": self.name, "device": ",".join(str(d) for d in self.engine.devices),
                "setup_s": round(self.setup_seconds, 3),
                "resident_mb": round(self.engine.resident_bytes() / 2**20, 1),
                "residency": self.engine.plan.describe()}

    def evaluate(self, recipe_json: str | None, fraction: float = 1.0,
                 skip: tuple[str, ...] = ()) -> CandidateResult:
        """Merge ``recipe_json`` into the live model (None: score the base as is) and
        score every objective but those in ``skip``, on ``fraction`` of their examples
        where the evaluator can score a subset. Never raises for a candidate's failure."""
        result = CandidateResult(worker=self.name, node=self.node)
        recipe = Recipe.model_validate_json(recipe_json) if recipe_json else None
        start = time.perf_counter()
        try:
            if recipe is None:
                self.engine.restore_base(self.model)
            else:
                self.engine.merge_into(self.model, recipe)
            for d in self.engine.devices:  # a sharded model's merge ends on every GPU
                if d.type == "cuda":
                    torch.cuda.synchronize(d)
        except Exception as e:  # noqa: BLE001 - e.g. CUDA out of memory
            if isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            result.error = f"merge: {e.__class__.__name__}: {e}"
            return result
        result.timings["merge_s"] = time.perf_counter() - start
        for ev in self.evaluators:
            if ev.objective.name in skip:
                continue
            score = ev.score(recipe, fraction)
            result.timings[f"{score.objective}_s"] = score.seconds
            result.metrics.update({f"{score.objective}/{k}": v for k, v in score.metrics.items()})
            result.examples += score.examples
            if not score.ok:
                result.error = score.error
                return result
            result.values[score.objective] = score.value
            result.stderr[score.objective] = score.stderr
            result.fraction[score.objective] = score.fraction
        return result


def gib_bytes(gib: float | None) -> int | None:
    """A config's GiB as bytes (None stays None: the default applies)."""
    return None if gib is None else int(gib * 2**30)


def device_budget(config: Config) -> int | list[int] | None:
    """The device bytes each worker may use where the config says so: device_memory_gb,
    or on a CPU worker host_memory_gb (its device is the host); else None (free memory).
    A worker sharding its live model over several GPUs has that budget on each: a list."""
    w = config.workers
    if w.device_memory_gb is not None:
        if w.gpus_per_worker > 1:
            return [gib_bytes(w.device_memory_gb)] * int(w.gpus_per_worker)
        return gib_bytes(w.device_memory_gb)
    return None if w.gpus_per_worker else gib_bytes(w.host_memory_gb)


def worker_devices(gpus_per_worker: float, device: str | None = None) -> list[torch.device]:
    """The devices a worker computes on: ``device`` where given; else, for
    ``gpus_per_worker`` above 1 with CUDA present, the first that many visible GPUs (Ray
    makes a worker's own GPUs the visible ones), over which its live model is sharded;
    else `default_device`. Fewer visible GPUs than asked is refused."""
    if device is not None:
        return [torch.device(device)]
    if gpus_per_worker <= 1 or not torch.cuda.is_available():
        return [default_device()]
    wanted, visible = int(gpus_per_worker), torch.cuda.device_count()
    if visible < wanted:
        raise ConfigError(
            f"workers.gpus_per_worker: {wanted} GPUs asked for each worker, {visible} visible to it "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return [torch.device(f"cuda:{i}") for i in range(wanted)]


def node_share(cpus: float, gpus: float) -> float:
    """The share of its node's host memory a worker plans on: in a Ray actor, its share of
    the node's CPUs or of its GPUs, whichever is larger (Ray places no more such workers on
    the node than that allows, and each would otherwise plan on all of it); 1 elsewhere."""
    try:
        import ray
    except ImportError:  # pragma: no cover
        return 1.0
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return 1.0
    node = ray.get_runtime_context().get_node_id()
    held = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == node), {})
    shares = [cpus / held["CPU"] if held.get("CPU") else 0.0,
              gpus / held["GPU"] if gpus and held.get("GPU") else 0.0]
    return min(1.0, max(shares)) or 1.0


def _ray_node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except ImportError:  # pragma: no cover
        return None


def ray_worker_class():
    """`CandidateWorker` as a Ray actor class (imported lazily: Ray is heavy)."""
    import ray

    return ray.remote(max_restarts=0, max_task_retries=0)(CandidateWorker)
