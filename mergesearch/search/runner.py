"""The driver: asynchronous ask/tell over a pool of workers.

Every worker is kept busy: each holds one candidate running and one queued, so it starts
the next as soon as it finishes, while the driver tells the result and asks a new trial;
a slow candidate never idles the rest. Each trial carries
its recipe, scores, timings, worker and error. A dead worker is replaced and its trial
retried a bounded number of times; an identical recipe is never evaluated twice, and its
trial costs nothing of the budget. A dead co-driver's trials are taken over while the
study runs.

`Runner.run` reads as its steps: `_prepare` (everything a user can get wrong, before any
worker starts), the pool (Ray actors by default, `SerialPool` in-process), `_open_study`,
the `_TrialLoop`, and the shut-down. The loop sees the workers only through `WorkerPool`.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from mergesearch.config import Config, parse_config
from mergesearch.evaluators import check_objectives
from mergesearch.merging import Checkpoint, check_compatible
from mergesearch.merging.build import check_fits
from mergesearch.merging.checkpoint import check_custom_code
from mergesearch.recipe import Recipe
from mergesearch.search.calibration import fisher_files, uses_fisher
from mergesearch.search.cluster import start_ray
from mergesearch.search.front import REFERENCES_ATTR, pareto_front
from mergesearch.search.pool import RayPool, WorkerDied, WorkerPool
from mergesearch.search.samplers import build_sampler, check_sampler, needs_flat_space
from mergesearch.search.study import (
    Driver,
    check_storage,
    counted,
    create_or_load,
    is_duplicate,
    recover_orphans,
)
from mergesearch.search.worker import CandidateResult, device_budget, resolve_models
from mergesearch.spaces import SearchSpace
from mergesearch.spaces.warm_start import enqueue_warm_start

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

# Makes the workers for a run: (config, base, sources) -> a started pool.
PoolFactory = Callable[[Config, str, dict[str, str]], WorkerPool]


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
    submitted: float = 0.0
    fraction: float = 1.0  # of each objective's examples this pass scores
    low: CandidateResult | None = None  # the first pass's result, once promoted to the full set


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

    def promote(self, result: CandidateResult) -> bool:
        """Whether a first-pass result goes on to the full set: unless a full-fidelity
        point dominates its scores moved ``margin`` standard errors towards better."""
        fractions = result.fraction
        if all(f >= 1 for f in fractions.values()):
            return False  # nothing was scored on a subset: this is the full score
        optimistic = []
        for o, sign in zip(self.objectives, self.sign):
            se = result.stderr.get(o)
            if se is None and fractions[o] < 1:
                return True  # no error bar: it cannot be ruled out
            optimistic.append(sign * result.values[o] + self.margin * (se or 0.0))
        if not self._full:
            return True
        front, point = np.array(self._full), np.array(optimistic)
        return not ((front >= point).all(1) & (front > point).any(1)).any()


class Runner:
    """Runs (or continues) the search a config describes. ``pool`` makes the workers
    (default: Ray actors on a Ray started or joined here; `SerialPool` scores in-process)."""

    def __init__(self, config: Config, on_progress: Callable[[Progress], None] | None = None,
                 setup_timeout_s: float = 600.0, pool: PoolFactory | None = None):
        self.config = config
        self.on_progress = on_progress or (lambda p: None)
        self.setup_timeout_s = setup_timeout_s
        self.make_pool: PoolFactory = pool or self._ray_pool
        self.fisher: dict[str, str] | None = None  # model -> Fisher cache file, for `fisher`

    def run(self) -> optuna.Study:
        space = self._prepare()
        self.pool = self.make_pool(self.config, self.base, self.sources)
        try:
            self._show_residency()
            self._load_fisher()
            study, driver = self._open_study(space)
            try:
                self._search(study, space, driver)
            finally:
                driver.stop()
        finally:
            self.pool.close()
        return study

    def _prepare(self) -> SearchSpace:
        """Refuse everything a user can get wrong before any worker starts: the config as
        the workers will read it (a value set after loading included), the models, the
        space and the storage. The tasks and metrics are checked by the workers' set-up."""
        parse_config(self.config.snapshot(), source="config", root=self.config.root)
        check_objectives(self.config)  # evaluators' options; unset directions filled in
        check_sampler(self.config)
        self.base, self.sources = resolve_models(self.config)
        base = Checkpoint.open(self.base)
        check_custom_code(base, self.config.models.trust_remote_code)
        sources = [Checkpoint.open(p) for p in self.sources.values()]
        check_compatible(base, sources)
        check_fits(base, sources, self.config.models.dtype, device_budget(self.config))
        space = SearchSpace(self.config.space, self.base, self.sources, base.num_layers,
                            seed=self.config.seed, flat=needs_flat_space(self.config))
        self.storage = check_storage(self.config)  # opened once: create_or_load reuses it
        return space

    def _show_residency(self) -> None:
        """One line per worker: where its inputs live, as its set-up planned (`residency`)."""
        for i, info in enumerate(self.pool.info):
            if "residency" in info:
                print(f"worker {i}: {info['residency']}", file=sys.stderr, flush=True)

    def _ray_pool(self, config: Config, base: str, sources: dict[str, str]) -> RayPool:
        start_ray(config)
        return RayPool(config, base, sources, setup_timeout_s=self.setup_timeout_s)

    def _load_fisher(self) -> None:
        """Computed once, here, after the workers' set-up has checked the tasks."""
        if uses_fisher(self.config):
            files = fisher_files(self.config, [self.base, *self.sources.values()])
            self.fisher = {m: str(f) for m, f in files.items()}
            self.pool.load_fisher(self.fisher)

    def _open_study(self, space: SearchSpace) -> tuple[optuna.Study, Driver]:
        """The study, created or continued, with a dead driver's trials re-queued, this
        process registered as a driver, the sampler, the warm start (on a new study) and
        the reference scores."""
        study = self.study = create_or_load(self.config, self.storage)
        recover_orphans(study)
        driver = Driver(study)
        # A resumed sampler is seeded past the trials it has seen, and a driver joining
        # others past theirs, so that it does not replay proposals already made.
        study.sampler = build_sampler(self.config, offset=len(study.trials) + 7919 * driver.rank())
        # A study with trials (enqueued ones included) has had its warm start; of drivers
        # starting a new study together, the first enqueues it.
        if self.config.sampler.warm_start and not study.trials and driver.rank() == 0:
            enqueue_warm_start(study, space, limit=self.config.budget.n_trials)
        if REFERENCES_ATTR not in study.user_attrs:
            study.set_user_attr(REFERENCES_ATTR, self._score_references())
        return study, driver

    def _search(self, study: optuna.Study, space: SearchSpace, driver: Driver) -> None:
        stop = threading.Event()  # set by the first Ctrl-C
        loop = _TrialLoop(self.config, study, space, driver, self.pool, stop, self.on_progress)
        try:
            with _sigint_sets(stop):
                loop.run()
            if stop.is_set():
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            # Leave the study consistent: this driver's running trials (in flight, waiting
            # on a duplicate, or half-asked) are failed and re-queued, as a resume treats
            # a dead driver's, so they are evaluated again and counted once.
            driver.stop()
            recover_orphans(study, reason="Ctrl-C")
            raise

    def _score_references(self) -> dict[str, dict[str, float]]:
        """Scores of the base and of each source alone: the plot's landmarks and the
        hypervolume's reference point."""
        jobs: dict[str, Recipe | None] = {"base": None}
        for alias, path in self.sources.items():
            jobs[alias] = Recipe(method="passthrough", models=[{"model": path}])
        handles = {name: self.pool.submit(i % self.pool.size, recipe)
                   for i, (name, recipe) in enumerate(jobs.items())}
        scores = {}
        for name, handle in handles.items():
            try:
                result = self.pool.result(handle)
            except WorkerDied:  # the pool replaced the worker; the landmark is skipped
                continue
            if not result.error:
                scores[name] = result.values
        return scores


class FrontTracker:
    """The front's size and best values for the progress line, recomputed at most every
    `FRONT_EVERY_S` and never taking more than a tenth of the driver's time."""

    def __init__(self, config: Config):
        self.objectives = config.objectives
        self._due = 0.0  # when the front is next recomputed

    def update(self, study: optuna.Study, progress: Progress, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now < self._due:
            return
        front = pareto_front(study)
        self._due = now + max(FRONT_EVERY_S, 10 * (time.perf_counter() - now))
        progress.front_size = len(front)
        best = {}
        for i, o in enumerate(self.objectives):
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

    def __init__(self, config: Config, study: optuna.Study, space: SearchSpace, driver: Driver,
                 pool: WorkerPool, stop: threading.Event,
                 on_progress: Callable[[Progress], None] = lambda p: None):
        self.study, self.space, self.driver, self.pool, self.stop = study, space, driver, pool, stop
        self.on_progress = on_progress
        self.objectives = [o.name for o in config.objectives]
        self.max_retries = config.workers.max_retries
        self.budget = config.budget.n_trials
        self.deadline = time.time() + config.budget.timeout if config.budget.timeout else None
        trials = study.get_trials(deepcopy=False)
        self.scored = Scored(config)
        for t in trials:
            self.scored.add_trial(t)
        self.done = self.used = sum(counted(t) for t in trials)
        self.progress = Progress(total=self.budget, done=self.done, done_at_start=self.done, failed=sum(
            t.state == TrialState.FAIL and counted(t) for t in trials))
        self.front = FrontTracker(config)
        self.others_running = 0  # running trials of other drivers, as the storage last showed
        self.duplicates_in_a_row = 0
        self.in_flight: dict[Any, _InFlight] = {}  # pool handle -> its trial, in submission order
        self.waiting_on: dict[str, list[optuna.trial.Trial]] = {}  # hash -> duplicate trials
        self.idle = list(range(pool.size)) * SLOTS_PER_WORKER  # free slots, by worker

    def run(self) -> None:
        while not self.stop.is_set():
            if self.driver.beat():
                self.refresh()
            self.fill()
            self.progress.in_flight = len(self.in_flight)
            self.on_progress(self.progress)
            if not self.in_flight:
                if not self.wait_for_others():
                    break
                continue
            for handle in self.pool.wait(list(self.in_flight), timeout=1.0):
                if self.stop.is_set():  # a result cut short by Ctrl-C is not recorded
                    break
                self.collect(handle)
                self.front.update(self.study, self.progress)
        self.front.update(self.study, self.progress, force=True)
        self.on_progress(self.progress)

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
            self.submit(_InFlight(trial, recipe, self.idle.pop(), fraction=scored.first_fraction))

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
            self.study.tell(trial, [values[o] for o in self.objectives])
        self.done += counts
        self.progress.done = self.done

    def submit(self, job: _InFlight) -> None:
        job.submitted = time.time()
        # A second, full-fidelity pass skips the objectives the first pass scored in full.
        skip = tuple(o for o, f in (job.low.fraction if job.low else {}).items() if f >= 1)
        self.in_flight[self.pool.submit(job.worker, job.recipe, job.fraction, skip)] = job

    def collect(self, handle) -> None:
        """Record one result; a dead worker's candidate is retried on its replacement,
        and a promising first-pass score is scored again on the full set."""
        job = self.in_flight.pop(handle)
        try:
            result = self.pool.result(handle)
        except WorkerDied as e:
            # The worker died (killed, OOM-killed, node lost) and was replaced: retry this
            # trial on the new one, a bounded number of times. A candidate queued behind
            # the one running never ran, and goes to the new worker without a charge.
            if not e.running or job.attempts <= self.max_retries:
                job.attempts += e.running
                self.submit(job)
                return
            times = "time" if job.attempts == 1 else "times"
            result = CandidateResult(error=f"worker died {job.attempts} {times}: {e.cause}")
        if job.fraction < 1 and not result.error and self.scored.promote(result):
            job.low, job.fraction = result, 1.0  # the full set, same slot
            self.submit(job)
            return
        self.idle.append(job.worker)
        self.record(job, result)

    def record(self, job: _InFlight, result: CandidateResult) -> None:
        """Tell the trial its scores (or its failure), and its duplicates the same."""
        attrs = _trial_attrs(job, result)
        h = job.recipe.hash()
        if result.error:
            attrs["error"] = result.error
            self.finish(job.trial, None, attrs)
            values = None
        else:
            first = job.low or CandidateResult()  # a promoted candidate's first pass
            values = {**first.values, **result.values}
            fidelity = min({**first.fraction, **result.fraction}.values(), default=1.0)
            attrs["scores"] = values
            if job.low:
                attrs["first_scores"] = first.values
            if job.low or fidelity < 1:
                attrs["fidelity"] = fidelity
            self.finish(job.trial, values, attrs)
            self.scored.add(h, values, fidelity)
        for dup in self.waiting_on.pop(h, []):
            extra = {"duplicate_of": job.trial.number, **self.scored.fidelity(h)}
            if values is None:
                extra["error"] = f"duplicate of failed trial {job.trial.number}"
            self.finish(dup, values, extra, counts=False)


def _trial_attrs(job: _InFlight, result: CandidateResult) -> dict[str, Any]:
    """What a trial records of where and how it ran, both passes of a promoted one summed."""
    first = job.low or CandidateResult()
    timings = {**{f"first_{k}": v for k, v in first.timings.items()}, **result.timings}
    return {
        "worker": result.worker,
        "node": result.node,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "metrics": {**first.metrics, **result.metrics},
        "examples": first.examples + result.examples,
        "attempts": job.attempts,
        "wall_s": round(time.time() - job.submitted, 4),
    }


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
