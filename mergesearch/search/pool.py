"""Where candidates are scored: a pool of `CandidateWorker`s behind one small interface.

The trial loop submits a candidate to a worker's slot, waits for any result, and reads it;
it never sees Ray. `RayPool` runs the workers as Ray actors (the search); `SerialPool`
holds them in this process and scores a candidate when its result is waited for (tests,
and anywhere Ray is not wanted). A worker that dies takes its candidates with it: reading
one of them raises `WorkerDied`, and the pool has replaced the worker by then, so the
caller may submit again to the same slot.
"""

from __future__ import annotations

import itertools
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mergesearch.config import Config
from mergesearch.errors import StudyError
from mergesearch.evaluators import registered_evaluators
from mergesearch.recipe import Recipe
from mergesearch.search.cluster import worker_env
from mergesearch.search.worker import CandidateResult, CandidateWorker, ray_worker_class


class WorkerDied(Exception):
    """The worker holding a candidate died (killed, out of memory, node lost). ``cause``
    says why, as far as is known; ``running`` whether this candidate was the one it was
    running (a candidate queued behind it never ran, and is not to blame)."""

    def __init__(self, cause: str, running: bool = True):
        super().__init__(cause)
        self.cause, self.running = cause, running


class WorkerPool(ABC):
    """What the trial loop needs of its workers. ``size`` workers, numbered from 0; a
    worker runs what is submitted to it in submission order."""

    size: int
    info: list[dict[str, Any]] = []  # each worker's `CandidateWorker.info` at start, where known

    @abstractmethod
    def load_fisher(self, files: dict[str, str]) -> None:
        """Give every worker (and any replacement) each model's Fisher file."""

    @abstractmethod
    def submit(self, worker: int, recipe: Recipe | None, fraction: float = 1.0,
               skip: Sequence[str] = ()) -> Any:
        """Queue ``recipe`` (None: the base as is) on ``worker``, to be scored on
        ``fraction`` of the examples of every objective but those in ``skip``; a handle
        for `wait` and `result`."""

    @abstractmethod
    def wait(self, handles: Sequence[Any], timeout: float) -> list[Any]:
        """Those of ``handles`` whose result is ready, waiting up to ``timeout`` seconds
        for at least one."""

    @abstractmethod
    def result(self, handle: Any) -> CandidateResult:
        """The handle's result (waiting for it), once; `WorkerDied` if its worker died."""

    @abstractmethod
    def replace(self, worker: int) -> None:
        """Start a fresh worker in the place of ``worker``."""

    @abstractmethod
    def close(self) -> None:
        """Stop every worker; the pool is not used again."""


# ---- in this process ----------------------------------------------------------------------


@dataclass(eq=False)  # a handle is hashed by identity
class _SerialCall:
    worker: int
    recipe_json: str | None
    fraction: float
    skip: tuple[str, ...]
    result: CandidateResult | None = field(default=None, repr=False)


class SerialPool(WorkerPool):
    """``count`` (by default the config's workers.count) `CandidateWorker`s in this process,
    on ``device`` (by default CUDA when visible). Nothing runs until a result is waited
    for: `wait` scores the oldest handle it is given. Its workers never die."""

    def __init__(self, config: Config, base: str, sources: dict[str, str], count: int | None = None,
                 fisher: dict[str, str] | None = None, device: str | None = None):
        snapshot = config.snapshot()
        self.workers = [CandidateWorker(snapshot, base, sources, fisher=fisher, device=device)
                        for _ in range(count or config.workers.count)]
        self.size = len(self.workers)
        self.info = [w.info() for w in self.workers]

    def load_fisher(self, files: dict[str, str]) -> None:
        for w in self.workers:
            w.load_fisher(files)

    def submit(self, worker: int, recipe: Recipe | None, fraction: float = 1.0,
               skip: Sequence[str] = ()) -> _SerialCall:
        return _SerialCall(worker, recipe.model_dump_json() if recipe else None, fraction, tuple(skip))

    def wait(self, handles: Sequence[_SerialCall], timeout: float) -> list[_SerialCall]:
        if not handles:
            return []
        self._run(handles[0])  # handles come in submission order (the loop's dict keeps it)
        return [handles[0]]

    def result(self, handle: _SerialCall) -> CandidateResult:
        return self._run(handle)

    def _run(self, call: _SerialCall) -> CandidateResult:
        if call.result is None:
            call.result = self.workers[call.worker].evaluate(call.recipe_json, call.fraction, call.skip)
        return call.result

    def replace(self, worker: int) -> None:
        pass  # an in-process worker does not die: a candidate's failure is data

    def close(self) -> None:
        self.workers.clear()  # the weights and live models go with them


# ---- Ray actors ---------------------------------------------------------------------------


@dataclass(eq=False)
class _RayCall:
    worker: int
    actor: Any
    seq: int  # submission order: an actor runs its calls in this order


class RayPool(WorkerPool):
    """``config.workers.count`` Ray actors on the running Ray (see `start_ray`), started
    and checked here: a set-up error (a task, a metric) is raised as a `StudyError`."""

    def __init__(self, config: Config, base: str, sources: dict[str, str], setup_timeout_s: float = 600.0):
        self.config, self.base, self.sources = config, base, sources
        self.fisher: dict[str, str] | None = None
        self._seq = itertools.count()
        self._pending: dict[Any, _RayCall] = {}  # submitted, result not yet read
        # dead actor's id -> (the actor, kept so that ids stay unique; the call it was running)
        self._ran_on_dead: dict[int, tuple[Any, int]] = {}
        self.workers: list[Any] = []
        self.info = self._start_workers(setup_timeout_s)
        self.size = len(self.workers)

    def _spawn(self, index: int):
        w = self.config.workers
        env = worker_env()
        if not w.gpus_per_worker:  # else Ray lets a GPU-less actor see every GPU
            env["CUDA_VISIBLE_DEVICES"] = ""
        return ray_worker_class().options(
            num_cpus=w.cpus_per_worker, num_gpus=w.gpus_per_worker,
            runtime_env={"env_vars": env}, name=None,
        ).remote(self.config.snapshot(), self.base, self.sources,
                 threads=max(1, int(w.cpus_per_worker)), fisher=self.fisher,
                 evaluators=registered_evaluators(self.config))

    def _start_workers(self, timeout_s: float) -> list[dict[str, Any]]:
        import ray

        w = self.config.workers
        available = ray.cluster_resources()
        if w.count * w.gpus_per_worker > available.get("GPU", 0) + 1e-9:
            raise StudyError(
                f"workers: {w.count} workers x {w.gpus_per_worker} GPUs requested, the Ray cluster "
                f"has {available.get('GPU', 0):g} GPUs")
        self.workers = [self._spawn(i) for i in range(w.count)]
        try:
            return ray.get([a.info.remote() for a in self.workers], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise StudyError(
                f"workers: not started within {timeout_s:g} s; the Ray cluster offers "
                f"{ {k: v for k, v in available.items() if k in ('CPU', 'GPU')} }") from None
        except ray.exceptions.RayActorError as e:
            self.close()
            raise StudyError(f"workers: set-up failed: {actor_cause(e)}") from None

    def load_fisher(self, files: dict[str, str]) -> None:
        import ray

        self.fisher = files  # replacements load it as they start
        ray.get([a.load_fisher.remote(files) for a in self.workers])

    def submit(self, worker: int, recipe: Recipe | None, fraction: float = 1.0,
               skip: Sequence[str] = ()) -> Any:
        actor = self.workers[worker]
        ref = actor.evaluate.remote(recipe.model_dump_json() if recipe else None, fraction, tuple(skip))
        self._pending[ref] = _RayCall(worker, actor, next(self._seq))
        return ref

    def wait(self, handles: Sequence[Any], timeout: float) -> list[Any]:
        import ray

        ready, _ = ray.wait(list(handles), num_returns=1, timeout=timeout)
        return ready

    def result(self, handle: Any) -> CandidateResult:
        import ray

        call = self._pending.pop(handle)
        try:
            return ray.get(handle)
        except ray.exceptions.RayActorError as e:
            if self.workers[call.worker] is call.actor:  # not yet replaced
                self.replace(call.worker)
            raise WorkerDied(actor_cause(e), running=self._was_running(call)) from None

    def _was_running(self, call: _RayCall) -> bool:
        """An actor runs its calls in order: of those it held when it died, only the first
        submitted was running; the ones queued behind it never ran."""
        key = id(call.actor)
        if key not in self._ran_on_dead:  # its first call read: the others are still pending
            held = [call.seq, *(c.seq for c in self._pending.values() if c.actor is call.actor)]
            self._ran_on_dead[key] = (call.actor, min(held))
        return call.seq == self._ran_on_dead[key][1]

    def replace(self, worker: int) -> None:
        self.workers[worker] = self._spawn(worker)

    def close(self) -> None:
        import ray

        for a in self.workers:
            ray.kill(a, no_restart=True)


def actor_cause(e: Exception) -> str:
    """Why a Ray actor died or failed to start, in one line: the remote error's last line,
    without the class path of our own errors (their message names the field or file)."""
    cause = getattr(e, "cause", None) or e
    lines = [ln for ln in str(cause).splitlines() if ln.strip()]
    # Ray prefixes the remote traceback; the last line carries the original error.
    last = lines[-1].strip() if lines else e.__class__.__name__
    return re.sub(r"^mergesearch(\.\w+)+: ", "", last)
