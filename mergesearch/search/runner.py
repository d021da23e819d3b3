"""The driver: asynchronous ask/tell over a pool of Ray workers.

Every worker is kept busy: each holds one candidate running and one queued, so it starts
the next as soon as it finishes, while the driver tells the result and asks a new trial;
a slow candidate never idles the rest. Each trial carries
its recipe, scores, timings, worker and error. A dead worker is replaced and its trial
retried a bounded number of times; an identical recipe is never evaluated twice, and its
trial costs nothing of the budget. A dead co-driver's trials are taken over while the
study runs.
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
from mergesearch.search.calibration import fisher_files, uses_fisher
from mergesearch.search.cluster import start_ray, worker_env
from mergesearch.search.front import REFERENCES_ATTR
from mergesearch.search.samplers import build_sampler, needs_flat_space
from mergesearch.search.study import Driver, counted, create_or_load, is_duplicate, recover_orphans
from mergesearch.search.worker import ray_worker_class, resolve_models

# Candidates held per worker: one running and one queued behind it, which hides the
# driver's ask/tell/storage time from the workers.
SLOTS_PER_WORKER = 2
# The front shown in the progress line is recomputed at most this often (it reads every
# trial), and never taking more than a tenth of the driver's time.
FRONT_EVERY_S = 1.0
# A sampler that proposes only recipes already scored or in flight this many times in a
# row has (nearly) exhausted a small discrete space: the driver stops asking rather than
# spin forever, since duplicates do not use the budget. The chance that a random sampler
# misses the last new recipe of a space of 20 this many times running is 0.6%.
MAX_DUPLICATES_IN_A_ROW = 100


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
    done_at_start: int = 0  # counted before this run started (a resume, other drivers)
    duplicates: int = 0  # proposals of a recipe already scored: told its scores, not counted
    note: str = ""  # why the search stopped before its budget, when it did

    def eta_s(self) -> float | None:
        """Seconds left at the pace of this run: trials done before it (a resumed study)
        took no time of it."""
        done_here = self.done - self.done_at_start
        if not self.total or done_here <= 0:
            return None
        return (time.time() - self.started) / done_here * max(0, self.total - self.done)


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

        from mergesearch.config import parse_config
        from mergesearch.merging import Checkpoint, check_compatible
        from mergesearch.merging.checkpoint import check_custom_code
        from mergesearch.search.study import check_storage
        from mergesearch.spaces import SearchSpace

        # Everything a user can get wrong is refused before the study is touched: the
        # config as the workers will read it (a value set after loading included), the
        # models, the space and the storage here, before Ray starts; the tasks and
        # metrics by the workers' set-up.
        parse_config(self.config.snapshot(), source="config", root=self.config.root)
        self.base, self.sources = resolve_models(self.config)
        base = Checkpoint.open(self.base)
        check_custom_code(base, self.config.models.trust_remote_code)
        check_compatible(base, [Checkpoint.open(p) for p in self.sources.values()])
        space = SearchSpace(self.config.space, self.base, self.sources, base.num_layers,
                            seed=self.config.seed, flat=needs_flat_space(self.config))
        check_storage(self.config)
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

        stop = threading.Event()  # set by the first Ctrl-C
        try:
            with _sigint_sets(stop):
                _TrialLoop(self, study, space, driver, stop).run()
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
            finish(dup, values, extra, counts=False)

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


class _TrialLoop:
    """Asks trials while the budget allows, keeps every worker slot busy, records results.

    The budget is shared with any other driver of the study: ``done`` counts what was
    counted when this driver started plus what it finished since, ``used`` what the
    storage last showed as counted or running. A duplicate recipe is told its first
    trial's scores and costs no trial of the budget. Dead co-drivers' trials are taken
    over with each heartbeat; with nothing left in flight, the driver ends only once no
    other driver holds a running trial, so the drivers together end on exactly the budget
    whichever of them dies."""

    def __init__(self, runner: Runner, study: optuna.Study, space, driver: Driver, stop: threading.Event):
        self.runner, self.study, self.space, self.driver, self.stop = runner, study, space, driver, stop
        budget = runner.config.budget
        self.budget = budget.n_trials
        self.deadline = time.time() + budget.timeout if budget.timeout else None
        trials = study.get_trials(deepcopy=False)
        self.scored = Scored(runner.config)
        for t in trials:
            self.scored.add_trial(t)
        self.done = self.used = sum(counted(t) for t in trials)
        self.progress = Progress(total=self.budget, done=self.done, done_at_start=self.done, failed=sum(
            t.state == TrialState.FAIL and counted(t) for t in trials))
        self.others_running = 0  # running trials of other drivers, as the storage last showed
        self.duplicates_in_a_row = 0
        self.in_flight: dict[Any, _InFlight] = {}
        self.waiting_on: dict[str, list[optuna.trial.Trial]] = {}  # hash -> duplicate trials
        self.idle = list(range(len(runner.workers))) * SLOTS_PER_WORKER  # free slots, by worker
        self.ran_on_dead: dict[int, tuple[Any, int]] = {}  # dead actor -> (it, the submission it ran)

    def run(self) -> None:
        import ray

        while not self.stop.is_set():
            if self.driver.beat():
                self.refresh()
            self.fill()
            self.progress.in_flight = len(self.in_flight)
            self.runner.on_progress(self.progress)
            if not self.in_flight:
                if not self.wait_for_others():
                    break
                continue
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=1.0)
            for ref in ready:
                if self.stop.is_set():  # a result cut short by Ctrl-C is not recorded
                    break
                self.collect(ref)
                self.runner._update_front(self.study, self.progress)
        self.runner._update_front(self.study, self.progress, force=True)
        self.runner.on_progress(self.progress)

    # ---- the budget -------------------------------------------------------------------

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    def budget_left(self) -> bool:
        if self.out_of_time() or self.progress.note:
            return False
        return self.budget is None or max(self.used, self.done + len(self.in_flight)) < self.budget

    def refresh(self) -> None:
        """Take over dead drivers' running trials (failed, re-queued: this driver picks them
        up), then read how much of the budget is used and what others still run."""
        recover_orphans(self.study, keep_driver=self.driver.id)
        self.used = self.others_running = 0
        for t in self.study.get_trials(deepcopy=False):
            self.scored.add_trial(t)
            self.used += uses_budget(t)
            self.others_running += t.state == TrialState.RUNNING and t.user_attrs.get("driver") != self.driver.id

    def wait_for_others(self) -> bool:
        """With nothing in flight: whether to go on. A co-driver's running trials may yet
        fail and be re-queued, or its driver die: the budget is known only once they end."""
        if self.progress.note or self.out_of_time() or self.budget is None:
            return False
        self.driver.beat(force=True)  # fresh: a stall of ours never looks like death
        self.refresh()
        if self.budget_left():
            return True
        if not self.others_running:
            return False
        self.stop.wait(1.0)
        return True

    def fits_budget(self, trial: optuna.trial.Trial) -> bool:
        """One read of the storage per trial asked, as other drivers may share the
        study: whether the trials numbered before this one leave room for it (drivers
        that ask at the same moment agree on which of theirs is one too many), and
        other drivers' results, so that no recipe is scored twice."""
        ahead = 0
        for t in self.study.get_trials(deepcopy=False):
            self.scored.add_trial(t)
            ahead += t.number < trial.number and uses_budget(t)
        self.used = ahead + 1
        return self.budget is None or ahead < self.budget

    # ---- trials -----------------------------------------------------------------------

    def fill(self) -> None:
        """Ask trials for the free worker slots while the budget allows."""
        study, scored = self.study, self.scored
        while self.idle and self.budget_left() and not self.stop.is_set():
            trial = study.ask()
            trial.set_user_attr("driver", self.driver.id)
            if not self.fits_budget(trial):
                trial.set_user_attr("over_budget", True)  # another driver took its place
                study.tell(trial, state=TrialState.FAIL)
                return
            recipe = self.space.sample(trial)
            h = recipe.hash()
            trial.set_user_attr("recipe", recipe.model_dump(mode="json"))
            trial.set_user_attr("recipe_hash", h)
            if h in scored.values or any(f.recipe.hash() == h for f in self.in_flight.values()):
                self.duplicate(trial, h)
                continue
            self.duplicates_in_a_row = 0
            self.runner._submit(self.in_flight, _InFlight(trial, recipe, self.idle.pop(),
                                                          fraction=scored.first_fraction))

    def duplicate(self, trial: optuna.trial.Trial, h: str) -> None:
        """A recipe already scored (told its scores now) or in flight (told them when they
        come): the trial is kept for the sampler to learn from, and costs no budget."""
        trial.set_user_attr("duplicate_of_hash", h)  # marked at once: no driver counts it
        self.used -= 1  # as fits_budget counted it
        self.progress.duplicates += 1
        self.duplicates_in_a_row += 1
        if self.duplicates_in_a_row >= MAX_DUPLICATES_IN_A_ROW:
            known = set(self.scored.values) | {f.recipe.hash() for f in self.in_flight.values()}
            self.progress.note = (
                f"stopped early: the sampler proposed {self.duplicates_in_a_row} recipes in a row "
                f"that were scored or in flight already; the space seems to hold no other recipe "
                f"({len(known)} distinct recipes)")
        if h in self.scored.values:
            self.finish(trial, self.scored.values[h], self.scored.fidelity(h), counts=False)
        else:
            self.waiting_on.setdefault(h, []).append(trial)

    def finish(self, trial, values: dict[str, float] | None, attrs: dict[str, Any],
               counts: bool = True) -> None:
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        if values is None:
            self.study.tell(trial, state=TrialState.FAIL)
            self.progress.failed += counts
        else:
            self.study.tell(trial, [values[o] for o in self.runner.objectives])
        self.done += counts
        self.progress.done = self.done

    def collect(self, ref) -> None:
        """Record one result; a dead worker's candidate is retried on its replacement,
        and a promising first-pass score is scored again on the full set."""
        import ray

        runner, job = self.runner, self.in_flight.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            # The worker died (killed, OOM-killed, node lost): replace it and
            # retry this trial on the new one, a bounded number of times.
            if runner.workers[job.worker] is job.actor:  # not yet replaced
                runner.workers[job.worker] = runner._spawn(job.worker)
            # An actor runs its calls in order: of the candidates it held,
            # only the first submitted was running. The one queued behind
            # it never ran, and goes to the new worker without a charge.
            if id(job.actor) not in self.ran_on_dead:  # the handle is kept: ids stay unique
                self.ran_on_dead[id(job.actor)] = (job.actor, min(
                    [job.seq, *(j.seq for j in self.in_flight.values() if j.actor is job.actor)]))
            running = job.seq == self.ran_on_dead[id(job.actor)][1]
            if not running or job.attempts <= runner.config.workers.max_retries:
                job.attempts += running
                runner._submit(self.in_flight, job)
                return
            times = "time" if job.attempts == 1 else "times"
            result = {"error": f"worker died {job.attempts} {times}: {_actor_cause(e)}",
                      "values": {}, "metrics": {}, "timings": {}, "worker": None}
        if job.fraction < 1 and not result.get("error") and self.scored.promote(result):
            job.low, job.fraction = result, 1.0  # the full set, same slot
            runner._submit(self.in_flight, job)
            return
        self.idle.append(job.worker)
        runner._record(job, result, self.finish, self.scored, self.waiting_on)


def uses_budget(trial: optuna.trial.FrozenTrial) -> bool:
    """Counted, or running and to be counted once it ends (a duplicate never is)."""
    return counted(trial) or (trial.state == TrialState.RUNNING and not is_duplicate(trial))


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
    return re.sub(r"^mergesearch(\.\w+)+: ", "", last)
