"""Faults injected for real: the driver SIGKILLed at random moments, again and again, and
two drivers sharing one study; on SQLite and on a real PostgreSQL server (`.ci/run`
starts one and sets MERGESEARCH_TEST_POSTGRES)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import uuid

import pytest
from optuna.trial import TrialState
from test_search import MERGESEARCH, load_study, write_config

from mergesearch.search.study import counted

POSTGRES = os.environ.get("MERGESEARCH_TEST_POSTGRES")
KILLS = {"sqlite": 5, "postgresql": 5}  # 10 SIGKILLs across the suite


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request):
    if request.param == "postgresql" and not POSTGRES:
        pytest.skip("MERGESEARCH_TEST_POSTGRES is not set (.ci/run starts a server and sets it)")
    return request.param, (POSTGRES if request.param == "postgresql" else None)


def small_config(tmp_path, storage_url, n_trials, workers=1):
    study = {"name": f"faults-{uuid.uuid4().hex[:8]}", "run_dir": str(tmp_path / "run")}
    if storage_url:
        study["storage"] = storage_url
    return write_config(tmp_path, n_trials=n_trials, study=study,
                        workers={"count": workers, "cpus_per_worker": 1})


def completed(study) -> dict[int, list[float]]:
    return {t.number: t.values for t in study.trials if t.state == TrialState.COMPLETE}


def evaluated_hashes(study) -> list[str]:
    return [t.user_attrs["recipe_hash"] for t in study.trials
            if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs
            and "duplicate_of_hash" not in t.user_attrs]


def test_driver_killed_at_random_moments_loses_nothing(tmp_path, demo_experts, storage):
    kind, url = storage
    budget, rng = 10, random.Random(kind)
    path = small_config(tmp_path, url, budget)
    run = tmp_path / "run"
    command = [*MERGESEARCH, "run", str(path)]
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
            command = [*MERGESEARCH, "resume", str(run)]
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


def test_drivers_opening_a_new_database_at_the_same_moment_all_succeed(tmp_path, storage):
    openers = [subprocess.Popen([MERGESEARCH[0], "-c", OPENER], stdin=subprocess.PIPE,
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


def test_two_drivers_sharing_a_study_split_the_budget_and_evaluate_each_trial_once(
        tmp_path, demo_experts, storage):
    _, url = storage
    budget = 16
    path = small_config(tmp_path, url, budget)
    run = tmp_path / "run"
    drivers = [subprocess.Popen([*MERGESEARCH, "run", str(path)], stdout=subprocess.DEVNULL,
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

