"""Faults injected for real: another process holding the study's SQLite lock, a full disk
and a refused permission while exporting, candidates that run out of memory or score
infinity, and a worker killed as the out-of-memory killer kills."""

from __future__ import annotations

import ctypes
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_merge_cli import MERGESEARCH, disk_full_at, ties_recipe
from typer.testing import CliRunner

from mergesearch.cli import app
from mergesearch.config import parse_config
from mergesearch.merging.mergekit import from_mergekit
from mergesearch.recipe import Recipe
from mergesearch.search import CandidateWorker, Runner, RunRef
from mergesearch.search.export import export_trial
from mergesearch.search.study import Driver, counted, create_or_load, recover_orphans

PYTHON_SQLITE_DEFAULT_TIMEOUT_S = 5.0  # what sqlite3.connect waits for a lock unless told


def config_for(families, tmp_path: Path, **overrides):
    """A study over the tiny llama family, with a cheap objective and its run in tmp."""
    f = families["llama"]
    data = {"models": {"base": f["base"], "sources": {"s0": f["s0"], "s1": f["s1"]}},
            "objectives": [{"name": "c", "evaluator": "cost"}],
            "study": {"name": "faults", "run_dir": str(tmp_path / "run")},
            "budget": {"n_trials": 6}, "workers": {"count": 1, "cpus_per_worker": 1}}
    data.update(overrides)
    return parse_config(data)


def recipe_of(families, weight: float) -> dict:
    f = families["llama"]
    return {"method": "task_arithmetic", "base_model": f["base"],
            "models": [{"model": f["s0"], "parameters": {"weight": weight}},
                       {"model": f["s1"], "parameters": {"weight": 1 - weight}}]}


def tell_trials(study: optuna.Study, families, weights) -> None:
    """What a driver does per candidate: ask, record the recipe, tell its score."""
    for w in weights:
        trial = study.ask()
        trial.set_user_attr("recipe", recipe_of(families, w))
        study.tell(trial, w)


def completed(study: optuna.Study) -> dict[int, list[float]]:
    return {t.number: t.values for t in study.trials if t.state == TrialState.COMPLETE}


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- storage locked by another writer -----------------------------------------------------

HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
conn.execute("UPDATE studies SET study_name = study_name")  # a write in progress
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
print(time.time(), flush=True)
"""


def test_study_writes_wait_for_another_process_holding_the_sqlite_lock(families, tmp_path):
    """Another process (a backup, optuna-dashboard, a second driver) holds the study's
    write lock for longer than sqlite3 waits by default: resuming the study waits for it,
    then reaches its budget with every earlier trial kept."""
    config = config_for(families, tmp_path)
    tell_trials(create_or_load(config), families, [0.1, 0.2, 0.3])
    before = completed(RunRef.from_args(str(config.run_dir)).load())
    hold_s = PYTHON_SQLITE_DEFAULT_TIMEOUT_S + 1.5
    locker = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(config.run_dir / "study.db"), str(hold_s)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        study = create_or_load(config)  # as `resume` opens it
        recover_orphans(study)
        Driver(study)  # its heartbeat is the first write: it waits for the lock
        written = time.time()
        tell_trials(study, families, [0.4, 0.5, 0.6])
    finally:
        released = float(locker.communicate(timeout=30)[0].strip())
    assert locker.returncode == 0
    assert written >= released  # it waited for the other writer instead of failing
    study = RunRef.from_args(str(config.run_dir)).load()
    assert sum(counted(t) for t in study.trials) == config.budget.n_trials
    assert {n: v for n, v in completed(study).items() if n in before} == before


def test_a_reader_holding_a_snapshot_does_not_block_study_writes(families, tmp_path):
    """`status` or a dashboard reading the study mid-transaction (SQLite in WAL mode) does
    not hold up the driver's writes, and keeps reading the snapshot it started with."""
    config = config_for(families, tmp_path)
    study = create_or_load(config)
    tell_trials(study, families, [0.1])
    reader = sqlite3.connect(config.run_dir / "study.db", isolation_level=None)
    try:
        reader.execute("BEGIN")
        seen = reader.execute("SELECT count(*) FROM trials").fetchone()[0]
        writer = threading.Thread(target=tell_trials, args=(study, families, [0.2, 0.3]))
        start = time.perf_counter()
        writer.start()
        writer.join(timeout=10)
        took = time.perf_counter() - start
        still_seen = reader.execute("SELECT count(*) FROM trials").fetchone()[0]
        reader.execute("COMMIT")  # lets a writer that was blocked finish, whatever happened
        writer.join()
        now_seen = reader.execute("SELECT count(*) FROM trials").fetchone()[0]
    finally:
        reader.close()
    assert took < 2.0  # the writes did not wait for the reader to finish
    assert (seen, still_seen, now_seen) == (1, 1, 3)


# ---- disk full or permission denied while exporting -------------------------------------


@pytest.fixture
def exported(families, tmp_path):
    """A run with two trials; the first exported with its model, as a user keeps it."""
    config = config_for(families, tmp_path)
    study = create_or_load(config)
    tell_trials(study, families, [0.3, 0.7])
    out = tmp_path / "export"
    export_trial(config, study.trials[0], out, save_model=True)
    return config.run_dir, out, files_under(out)


def export_command(run: Path, out: Path, trial: int) -> list[str]:
    return [MERGESEARCH, "export", str(run), "--trial", str(trial), "--out", str(out), "--save-model"]


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_disk_full_while_exporting_keeps_the_previous_export_and_prints_one_error(exported):
    run, out, previous = exported
    weights = len(previous["model/model.safetensors"])
    result = subprocess.run(export_command(run, out, 1), capture_output=True, text=True, timeout=300,
                            preexec_fn=disk_full_at(weights // 2))
    assert result.returncode == 2
    assert one_error_line(result) == f"error: --out: cannot write {out} (File too large); " \
                                     "the previous export is unchanged"
    assert files_under(out) == previous
    assert sorted(p.name for p in out.iterdir()) == ["mergekit.yaml", "model", "recipe.json"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["export", "run"]  # no temporary folders


def without_file_permission_override():
    """For a child process: root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so that
    file modes bind it as they bind any user (a read-only folder refuses its writes)."""
    def preexec():
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP; takes effect at exec
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    return preexec


def run_without_permission_override(command: list[str]) -> subprocess.CompletedProcess:
    """``command`` as a process that file modes bind (root drops its override first)."""
    preexec = without_file_permission_override() if os.geteuid() == 0 else None
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=preexec)
    except subprocess.SubprocessError as e:  # no CAP_SETPCAP here: it cannot be simulated
        pytest.skip(f"cannot drop CAP_DAC_OVERRIDE: {e}")


def test_permission_denied_while_exporting_keeps_the_previous_export(exported):
    run, out, previous = exported
    out.chmod(0o555)
    try:
        result = run_without_permission_override(export_command(run, out, 1))
    finally:
        out.chmod(0o755)
    assert result.returncode == 2
    assert one_error_line(result) == f"error: --out: cannot write {out} (Permission denied); " \
                                     "the previous export is unchanged"
    assert files_under(out) == previous
    assert sorted(p.name for p in out.iterdir()) == ["mergekit.yaml", "model", "recipe.json"]


def test_export_below_a_regular_file_is_refused_naming_the_path(exported, tmp_path):
    run, _, _ = exported
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    target = blocker / "export"
    result = CliRunner().invoke(app, ["export", str(run), "--trial", "1", "--out", str(target)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: --out: cannot write {target} (Not a directory)"
    assert blocker.read_text() == "a file, not a folder"


# ---- candidates that run out of memory, score infinity, or get their worker killed ---------


@pytest.fixture(scope="module")
def faulty_run(families, tmp_path_factory, ray_session):
    """Five candidates on one worker, no retries (random sampler, seed 151): `linear`,
    whose worker is SIGKILLed as by the OOM killer, and `task_arithmetic` queued on the
    same worker behind it; then `ties`, which runs out of memory, `task_arithmetic`, and
    `dare_ties`, which scores +inf."""
    config = config_for(families, tmp_path_factory.mktemp("faulty"), objectives=[
        {"name": "m", "evaluator": "fault_evaluators:FaultyEvaluator", "direction": "maximize"}],
        space={"methods": ["task_arithmetic", "ties", "dare_ties", "linear"]},
        sampler={"name": "random", "seed": 151}, budget={"n_trials": 5},
        workers={"count": 1, "cpus_per_worker": 1, "max_retries": 0})
    study = Runner(config).run()
    trials = study.trials
    assert [t.user_attrs["recipe"]["method"] for t in trials] == [
        "linear", "task_arithmetic", "ties", "task_arithmetic", "dare_ties"]
    return trials


def test_candidate_that_runs_out_of_memory_fails_with_the_allocation_error(faulty_run):
    oom = faulty_run[2]
    assert oom.state == TrialState.FAIL
    assert oom.user_attrs["error"].startswith("m: MemoryError: Unable to allocate 1.00 EiB")


def test_infinite_score_fails_its_trial_naming_the_objective(faulty_run):
    inf = faulty_run[4]
    assert (inf.state, inf.user_attrs["error"]) == (TrialState.FAIL, "m: score is inf")


def test_worker_that_ran_out_of_memory_goes_on_scoring_candidates(faulty_run):
    oom, after = faulty_run[2], faulty_run[3]
    assert after.state == TrialState.COMPLETE
    assert after.values == [after.user_attrs["scores"]["m"]] and abs(after.values[0]) < 1
    assert after.user_attrs["worker"] == oom.user_attrs["worker"]  # the same process, not replaced
    assert after.user_attrs["attempts"] == 1


def test_candidate_whose_worker_is_killed_for_memory_fails_with_the_reason(faulty_run):
    killed = faulty_run[0]
    assert killed.state == TrialState.FAIL
    assert killed.user_attrs["error"].startswith(
        "worker died 1 time: The actor is dead because its worker process has died")
    assert "OOM killer" in killed.user_attrs["error"]  # Ray names the likely cause


def test_search_goes_on_after_a_worker_is_killed(faulty_run):
    later = faulty_run[2:]
    assert len({t.user_attrs["worker"] for t in later}) == 1 and later[0].user_attrs["worker"]
    assert later[1].state == TrialState.COMPLETE


def test_study_reaches_its_budget_despite_failed_candidates(faulty_run):
    assert sum(counted(t) for t in faulty_run) == 5
    assert not [t for t in faulty_run if t.state == TrialState.RUNNING]


def test_candidate_queued_behind_a_killed_one_is_not_failed_with_it(faulty_run):
    queued = faulty_run[1]
    assert (queued.state, queued.user_attrs.get("error")) == (TrialState.COMPLETE, None)


def test_worker_scores_the_next_candidate_as_before_after_running_out_of_memory(families, tmp_path):
    config = config_for(families, tmp_path, objectives=[
        {"name": "m", "evaluator": "fault_evaluators:FaultyEvaluator", "direction": "maximize"}])
    f = families["llama"]
    worker = CandidateWorker(config.snapshot(), f["base"], {"s0": f["s0"], "s1": f["s1"]}, device="cpu")
    good = Recipe.from_dict(recipe_of(families, 0.3)).model_dump_json()
    oom = from_mergekit(ties_recipe(f)).model_dump_json()
    first = worker.evaluate(good)
    failed = worker.evaluate(oom)
    again = worker.evaluate(good)
    assert first["error"] is None
    assert failed["error"].startswith("m: MemoryError: Unable to allocate") and failed["values"] == {}
    assert again["error"] is None and again["values"] == first["values"]
