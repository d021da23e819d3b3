"""The driver: asynchronous ask/tell over a pool of Ray workers.

Every worker is kept busy: each holds one candidate running and one queued, so it starts
the next as soon as it finishes, while the driver tells the result and asks a new trial;
a slow candidate never idles the rest. Each trial carries
its recipe, scores, timings, worker and error. A dead worker is replaced and its trial
retried a bounded number of times; an identical recipe is never evaluated twice.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from mergesearch.config import Config
from mergesearch.errors import StudyError
from mergesearch.recipe import Recipe
from mergesearch.search.cluster import start_ray, worker_env
from mergesearch.search.fisher import fisher_files, uses_fisher
from mergesearch.search.front import REFERENCES_ATTR
from mergesearch.search.samplers import build_sampler, needs_flat_space
from mergesearch.search.study import Driver, counted, create_or_load, recover_orphans
from mergesearch.search.worker import ray_worker_class, resolve_models

# Candidates held per worker: one running and one queued behind it, which hides the
# driver's ask/tell/storage time from the workers.
SLOTS_PER_WORKER = 2
# The front shown in the progress line is recomputed at most this often (it reads every
# trial), and never taking more than a tenth of the driver's time.
FRONT_EVERY_S = 1.0

@dataclass
class Progress:
    """What the progress display shows; updated by the runner after each event."""

    total: int | None
    done: int = 0
    failed: int = 0
    in_flight: int = 0
    front_size: int = 0
    best: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def eta_s(self) -> float | None:
        if not self.total or not self.done:
            return None
        return (time.time() - self.started) / self.done * max(0, self.total - self.done)


@dataclass
class _InFlight:
    trial: optuna.trial.Trial
    recipe: Recipe
    worker: int
    attempts: int = 1
    actor: Any = None
    submitted: float = 0.0
    fraction: float = 1.0  # of each objective's examples this pass scores
    seq: int = 0  # submission order (an actor runs its calls in this order)
    low: dict | None = None  # the first pass's result, once promoted to the full set


class Scored:
    """The recipes scored so far, by any driver sharing the study: their values by recipe
    hash, which were scored on a subset of the examples only, and whether a first-pass
    score could still enter the front (multi-fidelity)."""

    def __init__(self, config: Config):
        self.objectives = [o.name for o in config.objectives]
        self.sign = np.array([1.0 if o.direction == "maximize" else -1.0 for o in config.objectives])
        self.first_fraction = config.fidelity.fraction if config.fidelity.enabled else 1.0
        self.margin = config.fidelity.margin
        self.values: dict[str, dict[str, float]] = {}
        self.partial: dict[str, float] = {}  # hash -> fidelity < 1
        self._full: list[np.ndarray] = []  # full-fidelity points, as maximisation

    def add(self, h: str, values: dict[str, float], fidelity: float = 1.0) -> None:
        if h in self.values and h not in self.partial:
            return  # already known at full fidelity
        self.values[h] = values
        if fidelity < 1:
            self.partial[h] = fidelity
        else:
            self.partial.pop(h, None)
            self._full.append(self.sign * np.array([values[o] for o in self.objectives]))

    def add_trial(self, t: optuna.trial.FrozenTrial) -> None:
        if t.state == TrialState.COMPLETE and "recipe_hash" in t.user_attrs:
            self.add(t.user_attrs["recipe_hash"], dict(zip(self.objectives, t.values)),
                     t.user_attrs.get("fidelity", 1.0))

    def fidelity(self, h: str) -> dict[str, float]:
        return {"fidelity": self.partial[h]} if h in self.partial else {}

    def promote(self, result: dict) -> bool:
        """Whether a first-pass result goes on to the full set: unless a full-fidelity
        point dominates its scores moved ``margin`` standard errors towards better."""
        fractions = result["fraction"]
        if all(f >= 1 for f in fractions.values()):
            return False  # nothing was scored on a subset: this is the full score
        optimistic = []
        for o, sign in zip(self.objectives, self.sign):
            se = result["stderr"].get(o)
            if se is None and fractions[o] < 1:
                return True  # no error bar: it cannot be ruled out
            optimistic.append(sign * result["values"][o] + self.margin * (se or 0.0))
        if not self._full:
            return True
        front, point = np.array(self._full), np.array(optimistic)
        return not ((front >= point).all(1) & (front > point).any(1)).any()


class Runner:
    def __init__(self, config: Config, on_progress: Callable[[Progress], None] | None = None,
                 setup_timeout_s: float = 600.0):
        self.config = config
        self.on_progress = on_progress or (lambda p: None)
        self.setup_timeout_s = setup_timeout_s
        self.objectives = [o.name for o in config.objectives]
        self.fisher: dict[str, str] | None = None  # model -> Fisher cache file, for `fisher`
        self._front_due = 0.0  # when the progress line's front is next recomputed
        self._submissions = itertools.count()

    # ---- workers ----------------------------------------------------------------------

    def _spawn(self, index: int):
        w = self.config.workers
        env = worker_env()
        if not w.gpus_per_worker:  # else Ray lets a GPU-less actor see every GPU
            env["CUDA_VISIBLE_DEVICES"] = ""
        actor = ray_worker_class().options(
            num_cpus=w.cpus_per_worker, num_gpus=w.gpus_per_worker,
            runtime_env={"env_vars": env}, name=None,
        ).remote(self.config.snapshot(), self.base, self.sources,
                 threads=max(1, int(w.cpus_per_worker)), fisher=self.fisher)
        return actor

    def _start_workers(self) -> None:
        import ray

        w = self.config.workers
        available = ray.cluster_resources()
        if w.count * w.gpus_per_worker > available.get("GPU", 0) + 1e-9:
            raise StudyError(
                f"workers: {w.count} workers x {w.gpus_per_worker} GPUs requested, the Ray cluster "
                f"has {available.get('GPU', 0):g} GPUs")
        self.workers = [self._spawn(i) for i in range(w.count)]
        try:
            self.worker_info = ray.get([a.info.remote() for a in self.workers],
                                       timeout=self.setup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise StudyError(
                f"workers: not started within {self.setup_timeout_s:g} s; the Ray cluster offers "
                f"{ {k: v for k, v in available.items() if k in ('CPU', 'GPU')} }") from None
        except ray.exceptions.RayActorError as e:
            raise StudyError(f"workers: set-up failed: {_actor_cause(e)}") from None

    # ---- the loop ---------------------------------------------------------------------

    def run(self) -> optuna.Study:
        import ray

        from mergesearch.merging import Checkpoint, check_compatible
        from mergesearch.merging.checkpoint import check_custom_code
        from mergesearch.spaces import SearchSpace

        # Everything a user can get wrong is refused before the study is touched: the
        # models and the space here, the tasks and metrics by the workers' set-up.
        self.base, self.sources = resolve_models(self.config)
        base = Checkpoint.open(self.base)
        check_custom_code(base, self.config.models.trust_remote_code)
        check_compatible(base, [Checkpoint.open(p) for p in self.sources.values()])
        space = SearchSpace(self.config.space, self.base, self.sources, base.num_layers,
                            seed=self.config.seed, flat=needs_flat_space(self.config))
        start_ray(self.config)
        self._start_workers()
        try:
            if uses_fisher(self.config):  # computed once, here, after the tasks were checked
                files = fisher_files(self.config, [self.base, *self.sources.values()])
                self.fisher = {m: str(f) for m, f in files.items()}
                ray.get([a.load_fisher.remote(self.fisher) for a in self.workers])
            study = create_or_load(self.config)
        except BaseException:
            for a in self.workers:
                ray.kill(a, no_restart=True)
            raise
        self.study = study
        recover_orphans(study)
        driver = Driver(study)
        # A resumed sampler is seeded past the trials it has seen, and a driver joining
        # others past theirs, so that it does not replay proposals already made.
        study.sampler = build_sampler(self.config, offset=len(study.trials) + 7919 * driver.rank())
        if REFERENCES_ATTR not in study.user_attrs:
            study.set_user_attr(REFERENCES_ATTR, self._score_references())

        budget, deadline = self.config.budget.n_trials, None
        if self.config.budget.timeout:
            deadline = time.time() + self.config.budget.timeout
        trials = study.get_trials(deepcopy=False)
        scored = Scored(self.config)
        for t in trials:
            scored.add_trial(t)
        done = sum(counted(t) for t in trials)
        used = done  # trials counted or running, as the storage last showed
        progress = Progress(total=budget, done=done, failed=sum(
            t.state == TrialState.FAIL and counted(t) for t in trials))
        progress.started = time.time()
        in_flight: dict[Any, _InFlight] = {}
        waiting_on: dict[str, list[optuna.trial.Trial]] = {}  # hash -> duplicate trials
        idle = list(range(len(self.workers))) * SLOTS_PER_WORKER  # free slots, by worker
        ran_on_dead: dict[int, tuple[Any, int]] = {}  # dead actor -> (it, the submission it ran)

        def budget_left() -> bool:
            if deadline is not None and time.time() >= deadline:
                return False
            waiting = sum(len(w) for w in waiting_on.values())
            return budget is None or max(used, done + len(in_flight) + waiting) < budget

        def fits_budget(trial: optuna.trial.Trial) -> bool:
            """One read of the storage per trial asked, as other drivers may share the
            study: whether the trials numbered before this one leave room for it (drivers
            that ask at the same moment agree on which of theirs is one too many), and
            other drivers' results, so that no recipe is scored twice."""
            nonlocal used
            ahead = 0
            for t in study.get_trials(deepcopy=False):
                scored.add_trial(t)
                ahead += t.number < trial.number and (counted(t) or t.state == TrialState.RUNNING)
            used = ahead + 1
            return budget is None or ahead < budget

        def finish(trial, values: dict[str, float] | None, attrs: dict[str, Any]) -> None:
            nonlocal done
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
            if values is None:
                study.tell(trial, state=TrialState.FAIL)
                progress.failed += 1
            else:
                study.tell(trial, [values[o] for o in self.objectives])
            done += 1
            progress.done = done

        stop = threading.Event()  # set by the first Ctrl-C
        try:
            with _sigint_sets(stop):
                while not stop.is_set():
                    driver.beat()
                    while idle and budget_left() and not stop.is_set():
                        trial = study.ask()
                        trial.set_user_attr("driver", driver.id)
                        if not fits_budget(trial):
                            trial.set_user_attr("over_budget", True)  # another driver took its place
                            study.tell(trial, state=TrialState.FAIL)
                            break
                        recipe = space.sample(trial)
                        h = recipe.hash()
                        trial.set_user_attr("recipe", recipe.model_dump(mode="json"))
                        trial.set_user_attr("recipe_hash", h)
                        if h in scored.values:
                            finish(trial, scored.values[h], {"duplicate_of_hash": h, **scored.fidelity(h)})
                            continue
                        if any(f.recipe.hash() == h for f in in_flight.values()):
                            waiting_on.setdefault(h, []).append(trial)
                            continue
                        wi = idle.pop()
                        self._submit(in_flight, _InFlight(trial, recipe, wi, fraction=scored.first_fraction))
                    progress.in_flight = len(in_flight)
                    self.on_progress(progress)
                    if not in_flight:
                        break
                    ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                    for ref in ready:
                        if stop.is_set():  # a result cut short by Ctrl-C is not recorded
                            break
                        job = in_flight.pop(ref)
                        try:
                            result = ray.get(ref)
                        except ray.exceptions.RayActorError as e:
                            # The worker died (killed, OOM-killed, node lost): replace it and
                            # retry this trial on the new one, a bounded number of times.
                            if self.workers[job.worker] is job.actor:  # not yet replaced
                                self.workers[job.worker] = self._spawn(job.worker)
                            # An actor runs its calls in order: of the candidates it held,
                            # only the first submitted was running. The one queued behind
                            # it never ran, and goes to the new worker without a charge.
                            if id(job.actor) not in ran_on_dead:  # the handle is kept: ids stay unique
                                ran_on_dead[id(job.actor)] = (job.actor, min(
                                    [job.seq, *(j.seq for j in in_flight.values() if j.actor is job.actor)]))
                            running = job.seq == ran_on_dead[id(job.actor)][1]
                            if not running or job.attempts <= self.config.workers.max_retries:
                                job.attempts += running
                                self._submit(in_flight, job)
                                continue
                            times = "time" if job.attempts == 1 else "times"
                            result = {"error": f"worker died {job.attempts} {times}: {_actor_cause(e)}",
                                      "values": {}, "metrics": {}, "timings": {}, "worker": None}
                        if job.fraction < 1 and not result.get("error") and scored.promote(result):
                            job.low, job.fraction = result, 1.0  # the full set, same slot
                            self._submit(in_flight, job)
                            continue
                        idle.append(job.worker)
                        self._record(job, result, finish, scored, waiting_on)
                        self._update_front(study, progress)
                self._update_front(study, progress, force=True)
                self.on_progress(progress)
            if stop.is_set():
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            # Leave the study consistent: this driver's running trials (in flight, waiting
            # on a duplicate, or half-asked) are failed and re-queued, as a resume treats
            # a dead driver's, so they are evaluated again and counted once.
            driver.stop()
            recover_orphans(study, reason="Ctrl-C")
            raise
        finally:
            driver.stop()
            for a in self.workers:
                ray.kill(a, no_restart=True)
        return study

    def _score_references(self) -> dict[str, dict[str, float]]:
        """Scores of the base and of each source alone: the plot's landmarks and the
        hypervolume's reference point."""
        import ray

        jobs = {"base": None}
        for alias, path in self.sources.items():
            jobs[alias] = Recipe(method="passthrough", models=[{"model": path}]).model_dump_json()
        refs = {name: self.workers[i % len(self.workers)].evaluate.remote(rj)
                for i, (name, rj) in enumerate(jobs.items())}
        scores = {}
        for name, ref in refs.items():
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError:  # replaced; the landmark is skipped
                i = next(i for i, n in enumerate(refs) if n == name) % len(self.workers)
                self.workers[i] = self._spawn(i)
                continue
            if not result.get("error"):
                scores[name] = result["values"]
        return scores

    def _submit(self, in_flight: dict, job: _InFlight) -> None:
        job.seq = next(self._submissions)
        job.submitted = time.time()
        job.actor = self.workers[job.worker]
        # A second, full-fidelity pass skips the objectives the first pass scored in full.
        skip = tuple(o for o, f in (job.low or {}).get("fraction", {}).items() if f >= 1)
        ref = job.actor.evaluate.remote(job.recipe.model_dump_json(), job.fraction, skip)
        in_flight[ref] = job

    def _record(self, job: _InFlight, result: dict, finish, scored: Scored, waiting_on) -> None:
        first = job.low or {}  # a promoted candidate's first pass
        timings = {**{f"first_{k}": v for k, v in first.get("timings", {}).items()},
                   **result.get("timings", {})}
        attrs = {
            "worker": result.get("worker"),
            "node": result.get("node"),
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "metrics": {**first.get("metrics", {}), **result.get("metrics", {})},
            "examples": first.get("examples", 0) + result.get("examples", 0),
            "attempts": job.attempts,
            "wall_s": round(time.time() - job.submitted, 4),
        }
        h = job.recipe.hash()
        if result.get("error"):
            attrs["error"] = result["error"]
            finish(job.trial, None, attrs)
            values = None
        else:
            values = {**first.get("values", {}), **result["values"]}
            fidelity = min({**first.get("fraction", {}), **result.get("fraction", {})}.values(), default=1.0)
            attrs["scores"] = values
            if first:
                attrs["first_scores"] = first["values"]
            if first or fidelity < 1:
                attrs["fidelity"] = fidelity
            finish(job.trial, values, attrs)
            scored.add(h, values, fidelity)
        for dup in waiting_on.pop(h, []):
            extra = {"duplicate_of": job.trial.number, **scored.fidelity(h)}
            if values is None:
                extra["error"] = f"duplicate of failed trial {job.trial.number}"
            finish(dup, values, extra)

    def _update_front(self, study: optuna.Study, progress: Progress, force: bool = False) -> None:
        from mergesearch.search.front import pareto_front

        now = time.perf_counter()
        if not force and now < self._front_due:
            return
        front = pareto_front(study)
        took = time.perf_counter() - now
        self._front_due = now + max(FRONT_EVERY_S, 10 * took)
        progress.front_size = len(front)
        best = {}
        for i, o in enumerate(self.config.objectives):
            vals = [t.values[i] for t in front]
            if vals:
                best[o.name] = max(vals) if o.direction == "maximize" else min(vals)
        progress.best = best


@contextlib.contextmanager
def _sigint_sets(stop: threading.Event):
    """Within the block, the first Ctrl-C only sets `stop`: the loop then winds down at a
    point where no storage write is half done. A second Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(signum, frame):
        stop.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _actor_cause(e: Exception) -> str:
    cause = getattr(e, "cause", None) or e
    lines = [ln for ln in str(cause).splitlines() if ln.strip()]
    # Ray prefixes the remote traceback; the last line carries the original error.
    last = lines[-1].strip() if lines else e.__class__.__name__
    # Our own errors need no class name: they say which field or file is wrong.
    return re.sub(r"^mergesearch\.errors\.\w+: ", "", last)
