"""Faults injected for real: the driver SIGKILLed at random moments, again and again, and
two drivers sharing one study (on SQLite and on a real PostgreSQL server: `.ci/run` starts
one and sets MERGESEARCH_TEST_POSTGRES); another process holding the study's SQLite lock;
a full disk and a refused permission while exporting; candidates that run out of memory or
score infinity, and a worker killed as the out-of-memory killer kills."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from support.cli import MERGESEARCH, MERGESEARCH_MODULE, disk_full_at
from support.recipes import ties_recipe
from support.studies import config_for, load_study, write_config
from typer.testing import CliRunner

from mergesearch.cli import app
from mergesearch.merging.mergekit import from_mergekit
from mergesearch.recipe import Recipe
from mergesearch.search import CandidateWorker, Runner, RunRef
from mergesearch.search.export import export_trial
from mergesearch.search.study import Driver, counted, create_or_load, recover_orphans

POSTGRES = os.environ.get("MERGESEARCH_TEST_POSTGRES")
KILLS = {"sqlite": 5, "postgresql": 5}  # 10 SIGKILLs across the suite
PYTHON_SQLITE_DEFAULT_TIMEOUT_S = 5.0  # what sqlite3.connect waits for a lock unless told


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


def evaluated_hashes(study) -> list[str]:
    return [t.user_attrs["recipe_hash"] for t in study.trials
            if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs
            and "duplicate_of_hash" not in t.user_attrs]


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- the driver killed, and drivers sharing one study -------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request):
    if request.param == "postgresql" and not POSTGRES:
        pytest.skip("MERGESEARCH_TEST_POSTGRES is not set (.ci/run starts a server and sets it)")
    return request.param, (POSTGRES if request.param == "postgresql" else None)


def small_config(tmp_path, storage_url, n_trials, workers=1, **overrides):
    study = {"name": f"faults-{uuid.uuid4().hex[:8]}", "run_dir": str(tmp_path / "run")}
    if storage_url:
        study["storage"] = storage_url
    return write_config(tmp_path, n_trials=n_trials, study=study,
                        workers={"count": workers, "cpus_per_worker": 1}, **overrides)


@pytest.mark.e2e
def test_driver_killed_at_random_moments_loses_nothing(tmp_path, demo_experts, storage):
    kind, url = storage
    budget, rng = 10, random.Random(kind)
    path = small_config(tmp_path, url, budget)
    run = tmp_path / "run"
    command = [*MERGESEARCH_MODULE, "run", str(path)]
    kept: dict[int, list[float]] = {}
    for _ in range(KILLS[kind]):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(rng.uniform(2.0, 11.0))  # before Ray is up, during set-up, mid-trial
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
        if (run / "run.json").exists():
            now = completed(load_study(run))
            assert {n: now[n] for n in kept} == kept  # nothing completed is lost or changed
            kept = now
            command = [*MERGESEARCH_MODULE, "resume", str(run)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400,
                            start_new_session=True)  # `run` again if no kill came late enough
    assert result.returncode == 0, result.stderr[-2000:]
    study = load_study(run)
    final = completed(study)
    assert {n: final[n] for n in kept} == kept
    assert sum(counted(t) for t in study.trials) == budget
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    hashes = evaluated_hashes(study)
    assert len(hashes) == len(set(hashes))  # no recipe evaluated twice


OPENER = """
import sys
from mergesearch.search.study import open_storage
print("ready", flush=True)
for url in sys.stdin:
    try:
        open_storage(url.strip())
        print("ok", flush=True)
    except Exception as e:
        print(e, flush=True)
"""


def fresh_database(tmp_path, storage, round_: int) -> str:
    """A database no driver has opened yet: a new SQLite file, or a new PostgreSQL schema."""
    kind, url = storage
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/fresh{round_}.db"
    import sqlalchemy

    schema = f"fresh_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    engine.dispose()
    return f"{url}?options=-csearch_path%3D{schema}"


@pytest.mark.e2e
def test_drivers_opening_a_new_database_at_the_same_moment_all_succeed(tmp_path, storage):
    openers = [subprocess.Popen([sys.executable, "-c", OPENER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        for proc in openers:
            assert proc.stdout.readline().strip() == "ready"
        for round_ in range(3):  # each round: four processes create one schema together
            url = fresh_database(tmp_path, storage, round_)
            for proc in openers:
                proc.stdin.write(url + "\n")
                proc.stdin.flush()
            assert [proc.stdout.readline().strip() for proc in openers] == ["ok"] * 4
    finally:
        for proc in openers:
            proc.stdin.close()
            proc.wait(timeout=60)


@pytest.mark.e2e
def test_two_drivers_sharing_a_study_split_the_budget_and_evaluate_each_trial_once(
        tmp_path, demo_experts, storage):
    _, url = storage
    budget = 16
    # Candidates long enough (all 150 test examples) that neither driver can finish the
    # budget while the other is still starting its worker.
    objectives = [{"name": s, "tasks": [f"demo_{s}"], "metric": "acc,none"} for s in ("add", "sort")]
    path = small_config(tmp_path, url, budget, objectives=objectives)
    run = tmp_path / "run"
    drivers = [subprocess.Popen([*MERGESEARCH_MODULE, "run", str(path)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
               for _ in range(2)]  # at the same moment: both create or load the study
    for proc in drivers:
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-2000:]
    study = load_study(run)
    assert sum(counted(t) for t in study.trials) == budget
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    drivers = {t.user_attrs["driver"] for t in study.trials if t.state == TrialState.COMPLETE}
    assert len(drivers) == 2  # both did work
    assert not [t for t in study.trials if "retry_of" in t.user_attrs]  # none taken from the other
    hashes = evaluated_hashes(study)
    assert len(hashes) == len(set(hashes))


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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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
    assert first.error is None
    assert failed.error.startswith("m: MemoryError: Unable to allocate") and failed.values == {}
    assert again.error is None and again.values == first.values


# ---- an evaluator registered by name in the driver ------------------------------------------


def test_an_evaluator_registered_by_name_in_the_driver_scores_on_ray_workers(families, tmp_path, ray_session):
    from fault_evaluators import FaultyEvaluator

    from mergesearch.evaluators import EVALUATORS, register_evaluator

    if "driver_registered" not in EVALUATORS:
        register_evaluator("driver_registered", FaultyEvaluator)  # the workers' imports never do
    config = config_for(families, tmp_path, objectives=[
        {"name": "m", "evaluator": "driver_registered", "direction": "maximize"}],
        space={"methods": ["task_arithmetic"]}, sampler={"name": "random", "seed": 3},
        budget={"n_trials": 2}, workers={"count": 1, "cpus_per_worker": 1, "max_retries": 0})
    trials = Runner(config).run().trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all(t.values == [t.user_attrs["scores"]["m"]] and abs(t.values[0]) < 1 for t in trials)
