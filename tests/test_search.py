"""The search end to end: real demo experts, real lm-eval, real Optuna storage, real Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState
from support.cli import MERGESEARCH_MODULE
from support.studies import load_study, write_config
from typer.testing import CliRunner

from mergesearch.cli import app
from mergesearch.config import load_config
from mergesearch.recipe import Recipe
from mergesearch.search import CandidateWorker, Runner, choose, pareto_front
from mergesearch.search.front import REFERENCES_ATTR
from mergesearch.search.study import counted

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, demo_experts, ray_session):
    tmp = tmp_path_factory.mktemp("search")
    config = load_config(write_config(tmp, n_trials=8))
    study = Runner(config).run()
    return config, study


def test_search_runs_its_budget_of_trials_on_real_workers(finished_run):
    config, study = finished_run
    trials = study.get_trials(deepcopy=False)
    assert sum(counted(t) for t in trials) == 8
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= 6
    workers = {t.user_attrs["worker"] for t in complete}
    assert len(workers) == 2  # both workers were kept busy


def test_each_trial_carries_recipe_scores_timings_and_worker(finished_run):
    _, study = finished_run
    t = next(t for t in study.trials if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs)
    assert t.user_attrs["recipe"]["method"] in {"task_arithmetic", "ties", "dare_ties", "della_linear"}
    assert set(t.user_attrs["scores"]) == {"add", "sort"}
    assert t.values == [t.user_attrs["scores"]["add"], t.user_attrs["scores"]["sort"]]
    assert t.user_attrs["timings"]["merge_s"] > 0
    assert t.user_attrs["timings"]["add_s"] > 0


def test_study_stores_config_snapshot_and_reference_scores(finished_run):
    config, study = finished_run
    assert study.user_attrs["mergesearch.config"]["objectives"][0]["name"] == "add"
    refs = study.user_attrs[REFERENCES_ATTR]
    assert set(refs) == {"base", "add", "reverse", "sort"}
    # the addition expert is better at addition than the base
    assert refs["add"]["add"] > refs["base"]["add"]


def test_exported_model_scores_what_its_trial_recorded(finished_run, tmp_path):
    config, study = finished_run
    trial = choose(study, best="add")
    out = tmp_path / "export"
    result = subprocess.run([*MERGESEARCH_MODULE, "export", str(config.run_dir), "--best", "add", "--out", str(out),
                             "--save-model"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "recipe.json").read_text())["method"] == trial.user_attrs["recipe"]["method"]
    assert "merge_method:" in (out / "mergekit.yaml").read_text()
    worker = CandidateWorker(config.snapshot(), str(out / "model"), {})
    scores = worker.evaluate(None)
    assert scores.error is None
    assert scores.values == trial.user_attrs["scores"]


def test_export_balanced_writes_the_front_point_keeping_most_of_every_sources_gain(finished_run, tmp_path):
    config, study = finished_run
    trial = choose(study, balanced=True)
    out = tmp_path / "balanced"
    result = subprocess.run([*MERGESEARCH_MODULE, "export", str(config.run_dir), "--balanced", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"trial {trial.number} (" in result.stdout
    assert Recipe.from_dict(json.loads((out / "recipe.json").read_text())).hash() == trial.user_attrs["recipe_hash"]


def test_front_table_csv_and_plot(finished_run, tmp_path):
    config, study = finished_run
    front = pareto_front(study)
    png, csv = tmp_path / "front.png", tmp_path / "front.csv"
    result = subprocess.run([*MERGESEARCH_MODULE, "front", str(config.run_dir), "--csv", str(csv), "--plot", str(png)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = csv.read_text().strip().splitlines()
    assert rows[0].startswith("trial,add,sort,balance,method")
    assert len(rows) == 1 + len(front)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_status_reports_progress_and_best(finished_run):
    config, _ = finished_run
    result = subprocess.run([*MERGESEARCH_MODULE, "status", str(config.run_dir)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "8/8 trials counted" in result.stdout
    assert "add" in result.stdout and "sort" in result.stdout


def test_status_names_the_most_balanced_front_point(finished_run):
    config, study = finished_run
    trial = choose(study, balanced=True)
    result = CliRunner().invoke(app, ["status", str(config.run_dir)])
    assert result.exit_code == 0, result.output
    assert f"most balanced: trial {trial.number}, keeping at least" in result.stdout


def test_failed_candidates_fail_alone_with_their_reason(tmp_path, demo_experts, ray_session):
    """An evaluator that raises for one method, yields NaN and -inf for two others, and
    runs out of memory for a fourth: those trials fail with their reasons, the others
    complete on the same workers, and the study reaches its budget."""
    path = write_config(tmp_path, n_trials=14, objectives=[
        {"name": "flaky", "evaluator": "flaky_evaluator:FlakyEvaluator", "direction": "maximize"},
    ], sampler={"name": "random", "seed": 3},
        space={"methods": ["task_arithmetic", "ties", "dare_ties", "della_linear", "linear"]})
    study = Runner(load_config(path)).run()
    trials = [t for t in study.trials if counted(t)]
    assert len(trials) == 14
    errors = {t.user_attrs["recipe"]["method"]: t.user_attrs.get("error") for t in trials
              if t.state == TrialState.FAIL}
    assert set(errors) == {"ties", "dare_ties", "della_linear", "linear"}
    assert "RuntimeError: ties is not allowed here" in errors["ties"]
    assert "flaky: score is nan" in errors["dare_ties"]
    assert "flaky: score is -inf" in errors["della_linear"]
    assert "allocate memory" in errors["linear"]
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    assert completed and {t.user_attrs["recipe"]["method"] for t in completed} == {"task_arithmetic"}


def test_dead_worker_is_replaced_and_its_trial_retried(tmp_path, demo_experts, ray_session):
    marker = tmp_path / "died-once"
    path = write_config(tmp_path, n_trials=4, objectives=[
        {"name": "crash", "evaluator": "flaky_evaluator:CrashOnceEvaluator", "direction": "maximize"},
    ], sampler={"name": "random", "seed": 0})
    os.environ["MERGESEARCH_TEST_MARKER"] = str(marker)
    try:
        study = Runner(load_config(path)).run()
    finally:
        del os.environ["MERGESEARCH_TEST_MARKER"]
    assert marker.exists()  # a worker process really exited mid-trial
    trials = [t for t in study.trials if counted(t)]
    assert len(trials) == 4
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert max(t.user_attrs["attempts"] for t in trials) == 2


def wait_for_completed(run: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        time.sleep(1)
        if (run / "run.json").exists():
            if sum(t.state == TrialState.COMPLETE for t in load_study(run).trials) >= n:
                return
    pytest.fail("the search made no progress")


def test_resume_after_sigkill_keeps_completed_trials_and_reaches_budget(tmp_path, demo_experts):
    path = write_config(tmp_path, n_trials=10)
    run = tmp_path / "run"
    proc = subprocess.Popen([*MERGESEARCH_MODULE, "run", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_completed(run, 3, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    study = load_study(run)
    before = {t.number: t.values for t in study.trials if t.state == TrialState.COMPLETE}
    assert len(before) >= 3
    result = subprocess.run([*MERGESEARCH_MODULE, "resume", str(run)], capture_output=True, text=True, timeout=400,
                            start_new_session=True)
    assert result.returncode == 0, result.stderr[-2000:]
    study = load_study(run)
    after = {t.number: t.values for t in study.trials if t.state == TrialState.COMPLETE}
    assert {n: after[n] for n in before} == before  # completed work intact
    assert sum(counted(t) for t in study.trials) == 10
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    evaluated = [t.user_attrs["recipe_hash"] for t in study.trials
                 if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs
                 and "duplicate_of_hash" not in t.user_attrs]
    assert len(evaluated) == len(set(evaluated))  # no recipe evaluated twice


def test_ctrl_c_leaves_the_study_consistent_and_resumable(tmp_path, demo_experts):
    # a budget that outlasts the signal: a candidate of the demo takes ~0.1 s
    path = write_config(tmp_path, n_trials=30)
    run = tmp_path / "run"
    proc = subprocess.Popen([*MERGESEARCH_MODULE, "run", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_completed(run, 2, proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-2000:]
    assert "mergesearch resume" in stderr and "Traceback" not in stderr
    study = load_study(run)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    done_before = sum(counted(t) for t in study.trials)
    assert done_before < 30
    result = subprocess.run([*MERGESEARCH_MODULE, "resume", str(run)], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sum(counted(t) for t in load_study(run).trials) == 30


def test_joins_an_existing_multi_node_ray_cluster(tmp_path, demo_experts):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                          "object_store_memory": 100 * 2**20})
    cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    try:
        path = write_config(tmp_path, n_trials=3, workers={"count": 2, "cpus_per_worker": 1,
                                                            "address": cluster.address})
        result = subprocess.run([*MERGESEARCH_MODULE, "run", str(path)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        study = load_study(tmp_path / "run")
        assert sum(counted(t) for t in study.trials) == 3
        nodes = {t.user_attrs.get("node") for t in study.trials if t.user_attrs.get("node")}
        assert len(nodes) == 2  # one worker on each node
    finally:
        cluster.shutdown()
