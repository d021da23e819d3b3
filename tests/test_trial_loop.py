"""The trial loop's accounting: duplicates cost no budget and appear once on the front,
the ETA after a resume, a dead co-driver's trials taken over, and what `status` says about
trials no driver will finish; the loop itself on in-process workers (`SerialPool`, no Ray).
Real Optuna storage (SQLite), real Ray where a search runs on actors."""

from __future__ import annotations

import csv
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from mergesearch.cli import app
from mergesearch.config import parse_config
from mergesearch.evaluators.base import Evaluator
from mergesearch.search import Runner, RunRef, SerialPool, front_rows, pareto_front
from mergesearch.search import runner as runner_module
from mergesearch.search.front import front_csv, scored_trials
from mergesearch.search.runner import MAX_DUPLICATES_IN_A_ROW, Progress
from mergesearch.search.study import (
    DRIVER_PREFIX,
    STALE_AFTER_S,
    Driver,
    counted,
    create_or_load,
    recover_orphans,
)


def config_data(families, tmp_path: Path, sources=("s0", "s1"), **overrides) -> dict:
    """A study over the tiny llama family with a cheap objective, its run in tmp."""
    f = families["llama"]
    data = {"models": {"base": f["base"], "sources": {s: f[s] for s in sources}},
            "objectives": [{"name": "c", "evaluator": "cost"}],
            "study": {"name": "loop", "run_dir": str(tmp_path / "run")},
            "budget": {"n_trials": 6}, "workers": {"count": 1, "cpus_per_worker": 1}}
    data.update(overrides)
    return data


def config_for(families, tmp_path: Path, sources=("s0", "s1"), **overrides):
    return parse_config(config_data(families, tmp_path, sources, **overrides))


class SlowEvaluator(Evaluator):
    """The mean of the merged weights, a second per candidate: as slow as a small
    benchmark, so that a driver holds running trials when it is killed, and one driver
    alone cannot use the whole budget up while the other is still starting."""

    def setup(self, model, tokenizer, engine=None) -> None:
        self.param = next(model.parameters())

    def measure(self, recipe):
        time.sleep(1.0)
        return float(self.param.detach().float().mean()), {}


def dead_driver_id() -> str:
    """The id a driver on this host had, whose process has exited since."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}:deadbeef"


def leave_running(study: optuna.Study, driver_id: str, n: int) -> list[int]:
    """What a driver SIGKILLed mid-trial leaves: a fresh heartbeat and RUNNING trials."""
    study.set_user_attr(DRIVER_PREFIX + driver_id, time.time())
    numbers = []
    for _ in range(n):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        trial.set_user_attr("driver", driver_id)
        numbers.append(trial.number)
    return numbers


def status_of(run: Path) -> str:
    result = CliRunner().invoke(app, ["status", str(run)])
    assert result.exit_code == 0, result.output
    return result.stdout


# ---- the ETA ------------------------------------------------------------------------------


def test_eta_after_a_resume_counts_only_the_trials_this_run_did():
    # 10 trials were counted before the resume; this run did 2 more in 10 s
    progress = Progress(total=20, done=12, done_at_start=10, started=time.time() - 10.0)
    assert progress.eta_s() == pytest.approx(10.0 / 2 * 8, abs=0.5)


def test_eta_is_unknown_until_this_run_has_done_a_trial():
    progress = Progress(total=20, done=10, done_at_start=10, started=time.time() - 30.0)
    assert progress.eta_s() is None


# ---- duplicates on the front --------------------------------------------------------------


@pytest.fixture
def study_with_a_duplicate(families, tmp_path):
    """Three trials: recipes a and b, then a again, told a's scores as a duplicate (the
    cost objective is minimised: a is the best)."""
    config = config_for(families, tmp_path)
    study = create_or_load(config)
    for h, value, extra in [("a", 0.2, {}), ("b", 0.5, {}), ("a", 0.2, {"duplicate_of_hash": "a"})]:
        trial = study.ask()
        trial.set_user_attr("recipe", {"method": "passthrough"})
        trial.set_user_attr("recipe_hash", h)
        for k, v in extra.items():
            trial.set_user_attr(k, v)
        study.tell(trial, value)
    return config, study


def test_duplicate_trial_is_kept_for_the_sampler_but_not_counted(study_with_a_duplicate):
    _, study = study_with_a_duplicate
    dup = study.trials[2]
    assert (dup.state, dup.values) == (TrialState.COMPLETE, [0.2])
    assert [counted(t) for t in study.trials] == [True, True, False]


def test_front_lists_each_recipe_once_as_its_first_trial(study_with_a_duplicate):
    _, study = study_with_a_duplicate
    assert [t.number for t in pareto_front(study)] == [0]
    assert [(r["trial"], r["recipe_hash"]) for r in front_rows(study)] == [(0, "a")]
    rows = list(csv.DictReader(io.StringIO(front_csv(study))))
    assert [(r["trial"], r["recipe_hash"]) for r in rows] == [("0", "a")]


def test_plot_and_hypervolume_take_each_recipe_once(study_with_a_duplicate):
    _, study = study_with_a_duplicate
    assert [t.number for t in scored_trials(study)] == [0, 1]


def test_status_counts_duplicates_apart_and_shows_the_front_once(study_with_a_duplicate):
    config, _ = study_with_a_duplicate
    text = status_of(config.run_dir)
    assert "2/6 trials counted; complete 3 (1 duplicates of a recipe already scored, not counted)" in text
    assert "front: 1 trials" in text


def test_status_draws_the_hypervolume_over_the_trials_scored(study_with_a_duplicate):
    config, _ = study_with_a_duplicate
    # minimised cost, reference 0.5 (the worst trial): a (0.2) covers 0.3 at once, b adds nothing
    assert "hypervolume by trials scored: ██ (reached within the first 1 of 2 scored)" in status_of(config.run_dir)


# ---- a dead driver's trials ---------------------------------------------------------------


def test_recovery_fails_and_requeues_a_dead_co_drivers_trials_only(families, tmp_path):
    study = create_or_load(config_for(families, tmp_path))
    me = Driver(study)
    mine = leave_running(study, me.id, 1)
    theirs = leave_running(study, dead_driver_id(), 2)
    assert recover_orphans(study, keep_driver=me.id) == theirs
    states = {t.number: t.state for t in study.trials}
    assert [states[n] for n in mine + theirs] == [TrialState.RUNNING, TrialState.FAIL, TrialState.FAIL]
    retries = [t.user_attrs["retry_of"] for t in study.trials if t.state == TrialState.WAITING]
    assert retries == theirs


def test_recovery_never_fails_this_drivers_own_trials_even_with_a_stale_heartbeat(families, tmp_path):
    study = create_or_load(config_for(families, tmp_path))
    me = Driver(study)
    mine = leave_running(study, me.id, 1)
    study.set_user_attr(DRIVER_PREFIX + me.id, time.time() - 2 * STALE_AFTER_S)  # a long stall
    assert recover_orphans(study, keep_driver=me.id) == []
    assert study.trials[mine[0]].state == TrialState.RUNNING


def test_trial_not_yet_claimed_by_its_driver_is_left_alone_while_fresh(families, tmp_path):
    study = create_or_load(config_for(families, tmp_path))
    study.ask()  # a driver asks, then names itself on the trial: in between it has no driver
    assert recover_orphans(study) == []
    assert study.trials[0].state == TrialState.RUNNING


# ---- status -------------------------------------------------------------------------------


def test_status_says_running_trials_have_no_live_driver(families, tmp_path):
    config = config_for(families, tmp_path)
    study = create_or_load(config)
    leave_running(study, dead_driver_id(), 4)
    text = status_of(config.run_dir)
    assert "0/6 trials counted; running 4 (no live driver: left by a dead driver; `resume` re-runs them)" in text


def test_status_tells_running_trials_of_a_live_driver_from_a_dead_drivers(families, tmp_path):
    config = config_for(families, tmp_path)
    study = create_or_load(config)
    leave_running(study, Driver(study).id, 1)
    leave_running(study, dead_driver_id(), 2)
    text = status_of(config.run_dir)
    assert "running 3 (2 with no live driver: left by a dead driver; `resume` re-runs them)" in text


def test_status_gives_the_reason_of_trials_failed_and_requeued_when_their_driver_died(families, tmp_path):
    config = config_for(families, tmp_path)
    study = create_or_load(config)
    leave_running(study, dead_driver_id(), 4)
    recover_orphans(study)  # as `resume` does
    for _ in range(3):  # the resumed driver re-runs three of them so far
        trial = study.ask()
        study.tell(trial, 0.5)
    text = status_of(config.run_dir)
    assert "3/6 trials counted; complete 3, fail 4, waiting 1" in text
    assert "failed x3: interrupted: its driver died (re-queued, re-run)" in text
    assert "failed x1: interrupted: its driver died (re-queued, not re-run yet)" in text


# ---- the loop on in-process workers (no Ray) ---------------------------------------------


@pytest.fixture
def no_ray(monkeypatch) -> None:
    """A serial search never starts Ray."""

    def tripwire(config) -> None:
        raise AssertionError("Ray was started by a search on a SerialPool")

    monkeypatch.setattr(runner_module, "start_ray", tripwire)


def serial_run(config, seen: list[Progress] | None = None) -> optuna.Study:
    return Runner(config, on_progress=(seen.append if seen is not None else None), pool=SerialPool).run()


def test_serial_search_ends_exactly_on_the_budget(families, tmp_path, no_ray):
    """Two slots per worker keep two candidates in flight, yet no trial is asked past the
    budget and none is left running."""
    config = config_for(families, tmp_path, budget={"n_trials": 5}, sampler={"name": "random", "seed": 1},
                        space={"methods": ["linear", "task_arithmetic"]})
    seen: list[Progress] = []
    study = serial_run(config, seen)
    assert sum(counted(t) for t in study.trials) == 5
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert all(t.state == TrialState.COMPLETE and t.user_attrs["attempts"] == 1 for t in study.trials)
    assert (seen[-1].done, seen[-1].in_flight, seen[-1].failed) == (5, 0, 0)
    assert set(study.user_attrs["mergesearch.references"]) == {"base", "s0", "s1"}


def test_serial_duplicates_are_told_their_first_trials_scores_and_cost_no_budget(families, tmp_path, no_ray):
    config = config_for(families, tmp_path, sources=("s0", "s1", "s2"), budget={"n_trials": 3},
                        space={"methods": ["passthrough"]}, sampler={"name": "random", "seed": 0})
    study = serial_run(config)
    evaluated = [t for t in study.trials if counted(t)]
    duplicates = [t for t in study.trials if {"duplicate_of_hash", "duplicate_of"} & set(t.user_attrs)]
    assert len(evaluated) == 3 and len({t.user_attrs["recipe_hash"] for t in evaluated}) == 3
    assert duplicates and not any(counted(t) for t in duplicates)
    first = {t.user_attrs["recipe_hash"]: t for t in evaluated}
    for dup in duplicates:
        original = first[dup.user_attrs["recipe_hash"]]
        assert (dup.state, dup.values) == (TrialState.COMPLETE, original.values)
        assert dup.user_attrs.get("duplicate_of", original.number) == original.number


def test_serial_sampler_stuck_on_two_recipes_stops_and_says_why(families, tmp_path, no_ray):
    config = config_for(families, tmp_path, budget={"n_trials": 4}, space={"methods": ["passthrough"]},
                        sampler={"name": "random", "seed": 0})
    seen: list[Progress] = []
    study = serial_run(config, seen)
    assert sum(counted(t) for t in study.trials) == 2
    assert seen[-1].note.startswith(f"stopped early: the sampler proposed {MAX_DUPLICATES_IN_A_ROW} recipes")


def test_serial_failing_candidate_fails_alone(families, tmp_path, no_ray):
    """An evaluator that raises on `ties` candidates: those trials fail with the reason,
    count against the budget, and every other candidate is scored."""
    config = config_for(families, tmp_path, budget={"n_trials": 8}, sampler={"name": "random", "seed": 0},
                        space={"methods": ["ties", "task_arithmetic"]},
                        objectives=[{"name": "flaky", "evaluator": "flaky_evaluator:FlakyEvaluator",
                                     "direction": "maximize"}])
    study = serial_run(config)
    by_method: dict[str, set] = {}
    for t in study.trials:
        if counted(t):
            by_method.setdefault(t.user_attrs["recipe"]["method"], set()).add(t.state)
    assert by_method == {"ties": {TrialState.FAIL}, "task_arithmetic": {TrialState.COMPLETE}}
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert all("RuntimeError: ties is not allowed here" in t.user_attrs["error"] for t in failed)
    assert sum(counted(t) for t in study.trials) == 8


def test_serial_resume_continues_to_a_raised_budget(families, tmp_path, no_ray):
    config = config_for(families, tmp_path, budget={"n_trials": 2}, sampler={"name": "random", "seed": 0})
    serial_run(config)
    config.budget.n_trials = 4
    seen: list[Progress] = []
    study = serial_run(config, seen)
    assert sum(counted(t) for t in study.trials) == 4
    assert (seen[-1].done_at_start, seen[-1].done) == (2, 4)


def test_a_budget_raised_on_resume_is_the_one_status_shows(families, tmp_path, no_ray):
    config = config_for(families, tmp_path, budget={"n_trials": 2}, sampler={"name": "random", "seed": 0})
    serial_run(config)
    config.budget.n_trials = 4
    serial_run(config)
    assert "4/4 trials counted" in status_of(config.run_dir)


# ---- the search, on real Ray workers -------------------------------------------------------


def test_duplicate_recipes_do_not_use_the_budget(families, tmp_path, ray_session):
    """Three recipes only (passthrough of one of three sources): the random sampler
    proposes some twice, yet three distinct recipes are evaluated and counted."""
    config = config_for(families, tmp_path, sources=("s0", "s1", "s2"), budget={"n_trials": 3},
                        space={"methods": ["passthrough"]}, sampler={"name": "random", "seed": 0})
    study = Runner(config).run()
    trials = study.trials
    duplicates = [t for t in trials if {"duplicate_of_hash", "duplicate_of"} & set(t.user_attrs)]
    assert duplicates  # the sampler did propose a recipe again
    assert sum(counted(t) for t in trials) == 3
    evaluated = [t.user_attrs["recipe_hash"] for t in trials if counted(t)]
    assert len(set(evaluated)) == 3
    assert sorted(r["recipe_hash"] for r in front_rows(study)) == sorted(evaluated)  # each once
    assert all(t.state == TrialState.COMPLETE and t.values == [1.0] for t in duplicates)  # told the scores


def test_sampler_stuck_on_a_space_of_two_recipes_stops_and_says_why(families, tmp_path, ray_session):
    config = config_for(families, tmp_path, budget={"n_trials": 4}, space={"methods": ["passthrough"]},
                        sampler={"name": "random", "seed": 0})
    seen: list[Progress] = []
    study = Runner(config, on_progress=seen.append).run()
    trials = study.trials
    assert sum(counted(t) for t in trials) == 2  # all there is
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert seen[-1].note == (f"stopped early: the sampler proposed {MAX_DUPLICATES_IN_A_ROW} recipes in a "
                             "row that were scored or in flight already; the space seems to hold no other "
                             "recipe (2 distinct recipes)")
    assert seen[-1].done == 2 and seen[-1].duplicates == len(trials) - 2


def driver_pid(trial) -> int | None:
    """The process id in a trial's driver id (host:pid:nonce)."""
    driver = trial.user_attrs.get("driver")
    return int(driver.split(":")[1]) if driver else None


@pytest.mark.e2e
def test_surviving_driver_takes_over_a_killed_co_drivers_trials_and_ends_on_the_budget(families, tmp_path):
    """Two drivers share a SQLite study; one is SIGKILLed with trials running. The other
    fails and re-queues them while it runs (not at a later start-up), re-runs them, and
    ends with exactly the budget counted."""
    budget = 20
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_data(
        families, tmp_path, budget={"n_trials": budget}, sampler={"name": "random", "seed": 0},
        objectives=[{"name": "m", "evaluator": "test_trial_loop:SlowEvaluator", "direction": "maximize"}])))
    run = tmp_path / "run"
    # a heartbeat every second: the survivor looks for dead co-drivers that often
    env = {**os.environ, "MERGESEARCH_HEARTBEAT_S": "1", "MERGESEARCH_STALE_AFTER_S": "20"}
    command = [sys.executable, "-m", "mergesearch.cli", "run", str(path)]
    victim = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, env=env)
    survivor = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env=env)
    try:
        deadline = time.time() + 300
        while True:  # kill the victim mid-trial, once the survivor is past its start-up
            assert time.time() < deadline and victim.poll() is None and survivor.poll() is None
            time.sleep(0.2)
            if not (run / "run.json").exists():
                continue
            trials = RunRef.from_args(str(run)).load().trials
            if any(driver_pid(t) == victim.pid and t.state == TrialState.RUNNING for t in trials) \
                    and any(driver_pid(t) == survivor.pid for t in trials):
                break
    finally:
        os.killpg(victim.pid, signal.SIGKILL)  # the driver and the Ray it started
        victim.wait()  # reaped: its pid is gone
    _, err = survivor.communicate(timeout=400)
    assert survivor.returncode == 0, err[-2000:]
    study = RunRef.from_args(str(run)).load()
    assert sum(counted(t) for t in study.trials) == budget
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    taken = [t for t in study.trials if driver_pid(t) == victim.pid and t.user_attrs.get("requeued")]
    assert taken and {t.user_attrs["error"] for t in taken} == {"interrupted: its driver died"}
    reruns = {t.user_attrs["retry_of"]: t for t in study.trials if "retry_of" in t.user_attrs}
    assert all(reruns[t.number].state.is_finished() and driver_pid(reruns[t.number]) == survivor.pid
               for t in taken if t.params)
