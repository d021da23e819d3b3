"""Security, end to end: what a local Ray exposes, storage passwords kept out of output and
files, custom model or tokenizer code run only with `models.trust_remote_code`, and
code-executing lm-eval tasks only with `lm_eval.allow_unsafe_code`.
(Pickled weights: test_checkpoint.py and tests/bad_inputs.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from support.cli import MERGESEARCH, one_error
from support.models import custom_code_model, custom_tokenizer_model
from support.recipes import ties_recipe, write
from support.studies import ROOT, TASKS
from typer.testing import CliRunner

from mergesearch.cli import app
from mergesearch.config import parse_config
from mergesearch.errors import EvaluatorError
from mergesearch.evaluators import build_evaluators
from mergesearch.merging import CheckpointError, load_live_model
from mergesearch.search import Runner, RunRef
from mergesearch.search.study import CONFIG_ATTR, create_or_load, write_run_file

PASSWORD = "s3cret"
POSTGRES = os.environ.get("MERGESEARCH_TEST_POSTGRES")


def cost_config(families, tmp_path: Path, base: str | None = None, **extra) -> dict:
    f = families["llama"]
    return {"models": {"base": base or f["base"], "sources": {"s0": f["s0"], "s1": f["s1"]}},
            "objectives": [{"name": "c", "evaluator": "cost"}],
            "study": {"name": "sec", "run_dir": str(tmp_path / "run")},
            "budget": {"n_trials": 2}, "workers": {"count": 1}, **extra}


def config_file(data: dict, tmp_path: Path) -> Path:
    """``data`` as ``tmp_path/config.yaml``."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---- (a) what a local Ray exposes --------------------------------------------------------


def test_ray_dashboard_host_defaults_to_localhost(families, tmp_path):
    config = parse_config(cost_config(families, tmp_path))
    assert config.workers.dashboard_host == "127.0.0.1"
    assert config.snapshot()["workers"]["dashboard_host"] == "127.0.0.1"  # what workers and resume see


@pytest.mark.e2e
def test_local_ray_binds_its_dashboard_to_localhost_and_serves_no_ui():
    script = """
import json, psutil, ray
from mergesearch.config import parse_config
from mergesearch.search.cluster import start_ray
start_ray(parse_config({"models": {"base": "b", "sources": {"x": "x"}},
                        "objectives": [{"name": "c", "evaluator": "cost"}]}))
ours = {p.pid for p in psutil.Process().children(recursive=True)}
ports = sorted({c.laddr.port for c in psutil.net_connections("inet")
                if c.status == psutil.CONN_LISTEN and c.pid in ours})
hosts = [a for p in psutil.Process().children(recursive=True) if any("dashboard/dashboard.py" in a for a in p.cmdline())
         for a in p.cmdline() if a.startswith("--host=")]
print(json.dumps({"ports": ports, "hosts": hosts}))
ray.shutdown()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["ports"] and 8265 not in found["ports"]  # Ray is up; no UI on the dashboard's port
    assert found["hosts"] and set(found["hosts"]) == {"--host=127.0.0.1"}  # Ray's dashboard process


SUBMIT_JOB = """
import json, socket, sys, time, urllib.error, urllib.request
import ray
from ray._private.parameter import RayParams
from mergesearch.config import parse_config

# Ray's job agent takes the fixed port 52365, or none if another Ray on this machine (the
# suite's own) holds it: this one gets a free port instead, all else as start_ray asks.
with socket.socket() as s:
    s.bind(("", 0))
    free_port = s.getsockname()[1]
ray_params_init = RayParams.__init__
def init_with_free_agent_port(self, *args, **kwargs):
    kwargs["dashboard_agent_listen_port"] = free_port
    ray_params_init(self, *args, **kwargs)
RayParams.__init__ = init_with_free_agent_port
from mergesearch.search.cluster import start_ray
start_ray(parse_config({"models": {"base": "b", "sources": {"x": "x"}},
                        "objectives": [{"name": "c", "evaluator": "cost"}]}))
node = ray.nodes()[0]
answers = {}
assert node["DashboardAgentListenPort"] == free_port, node
for host in (node["NodeManagerAddress"], "127.0.0.1"):
    job = json.dumps({"entrypoint": "touch " + sys.argv[1], "submission_id": "probe-" + str(len(answers))})
    request = urllib.request.Request(f"http://{host}:{node['DashboardAgentListenPort']}/api/job_agent/jobs/",
                                     data=job.encode(), headers={"Content-Type": "application/json"})
    try:
        answers[host] = urllib.request.urlopen(request, timeout=10).status
    except urllib.error.HTTPError as e:
        answers[host] = e.code
time.sleep(1)  # a job that was accepted would have started by now
print(json.dumps(answers))
ray.shutdown()
"""


@pytest.mark.e2e
def test_local_ray_refuses_job_submission_without_the_cluster_token(tmp_path):
    """Ray's job API (remote code execution by design) listens on the node's address, not
    only on localhost: the Ray the runner starts must refuse jobs that carry no token."""
    marker = tmp_path / "job-ran"
    result = subprocess.run([sys.executable, "-c", SUBMIT_JOB, str(marker)], capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(answers) == 2 and set(answers.values()) == {401}  # on the node's address and on localhost
    assert not marker.exists()


# ---- (b) storage passwords ---------------------------------------------------------------


def test_snapshot_stores_the_storage_password_masked(monkeypatch):
    monkeypatch.setenv("PG_PASSWORD", "s3cret")
    for storage in ("postgresql://ms:s3cret@db.internal/ms", "postgresql://ms:${PG_PASSWORD}@db.internal/ms"):
        config = parse_config({"models": {"base": "b", "sources": {"x": "x"}},
                               "objectives": [{"name": "c", "evaluator": "cost"}],
                               "study": {"storage": storage}})
        assert config.storage_url == "postgresql://ms:s3cret@db.internal/ms"
        assert config.snapshot()["study"]["storage"] == "postgresql://ms:***@db.internal/ms"


def test_password_given_as_a_url_query_parameter_is_masked_in_the_snapshot(families, tmp_path):
    config = parse_config(cost_config(families, tmp_path, study={
        "name": "sec", "storage": f"postgresql+psycopg2://ms@db.internal/ms?sslmode=require&password={PASSWORD}"}))
    stored = config.snapshot()["study"]["storage"]
    assert stored == "postgresql+psycopg2://ms@db.internal/ms?sslmode=require&password=***"


@pytest.mark.e2e
def test_unreachable_storage_error_masks_the_password(tmp_path):
    url = "postgresql://ms:s3cret@127.0.0.1:1/ms"
    result = subprocess.run([MERGESEARCH, "status", "--storage", url, "--study", "x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "postgresql://ms:***@127.0.0.1:1/ms" in result.stderr
    assert "s3cret" not in result.stdout + result.stderr


def test_password_given_as_a_url_query_parameter_is_never_shown(tmp_path):
    storage = f"postgresql://ms@127.0.0.1:1/ms?password={PASSWORD}"
    result = CliRunner().invoke(app, ["status", "--storage", storage, "--study", "sec"])
    error = one_error(result)
    assert error.startswith("error: study.storage: cannot open postgresql://ms@127.0.0.1:1/ms?password=*** (")
    assert PASSWORD not in result.stdout + result.stderr


def test_run_against_unreachable_postgres_never_shows_the_password(families, tmp_path, ray_session):
    storage = f"postgresql://ms:{PASSWORD}@127.0.0.1:1/ms"
    path = config_file(cost_config(families, tmp_path, study={
        "name": "sec", "run_dir": str(tmp_path / "run"), "storage": storage}), tmp_path)
    result = CliRunner().invoke(app, ["run", str(path)])
    error = one_error(result)
    assert error.startswith("error: study.storage: cannot open postgresql://ms:***@127.0.0.1:1/ms (")
    assert PASSWORD not in result.stdout + result.stderr
    run = tmp_path / "run"
    assert not run.exists() or all(PASSWORD.encode() not in p.read_bytes() for p in run.rglob("*") if p.is_file())


def test_run_file_keeps_the_password_variable_never_its_value(families, tmp_path, monkeypatch):
    monkeypatch.setenv("MS_TEST_DB_PASSWORD", PASSWORD)
    config = parse_config(cost_config(families, tmp_path, study={
        "name": "sec", "run_dir": str(tmp_path / "run"),
        "storage": "postgresql://ms:${MS_TEST_DB_PASSWORD}@db.internal/ms"}))
    write_run_file(config)
    text = (tmp_path / "run" / "run.json").read_text()
    assert json.loads(text)["storage"] == "postgresql://ms:${MS_TEST_DB_PASSWORD}@db.internal/ms"
    assert PASSWORD not in text


def test_resume_reads_the_password_from_the_environment_again(families, tmp_path, monkeypatch):
    monkeypatch.setenv("MS_TEST_DB_PASSWORD", PASSWORD)
    config = parse_config(cost_config(families, tmp_path, study={
        "name": "sec", "run_dir": str(tmp_path / "run"),
        "storage": "postgresql://ms:${MS_TEST_DB_PASSWORD}@db.internal/ms"}))
    write_run_file(config)
    monkeypatch.setenv("MS_TEST_DB_PASSWORD", "rotated")
    assert RunRef.from_args(str(tmp_path / "run")).storage == "postgresql://ms:rotated@db.internal/ms"


@pytest.mark.e2e
@pytest.mark.skipif(not POSTGRES, reason="MERGESEARCH_TEST_POSTGRES is not set (.ci/run starts a server)")
def test_password_from_the_environment_is_never_written_or_shown(tmp_path, demo_experts):
    """A real study on PostgreSQL with the password given as ${VAR}: run.json keeps the
    reference, the study's snapshot the mask, and `status` shows neither."""
    prefix, _, rest = POSTGRES.partition("://")
    user_password, _, host = rest.partition("@")
    user, _, password = user_password.partition(":")
    env = {**os.environ, "MS_TEST_PASSWORD": password}
    name = f"safety-{os.getpid()}"
    config = parse_config({"models": {"base": str(demo_experts["base"]), "sources": {"add": str(demo_experts["add"])}},
                           "objectives": [{"name": "c", "evaluator": "cost"}],
                           "study": {"name": name, "run_dir": str(tmp_path / "run"),
                                     "storage": f"{prefix}://{user}:${{MS_TEST_PASSWORD}}@{host}"}})
    os.environ["MS_TEST_PASSWORD"] = password
    try:
        study = create_or_load(config)
        run_file = (tmp_path / "run" / "run.json").read_text()
        assert "${MS_TEST_PASSWORD}" in run_file and f":{password}@" not in run_file
        assert json.loads(json.dumps(study.user_attrs))["mergesearch.config"]["study"]["storage"] == \
            f"{prefix}://{user}:***@{host}"
        assert RunRef.from_args(str(tmp_path / "run")).load().study_name == name  # resumable
        status = subprocess.run([MERGESEARCH, "status", str(tmp_path / "run")], capture_output=True,
                                text=True, timeout=120, env=env)
        assert status.returncode == 0, status.stderr
        assert f":{password}@" not in status.stdout + status.stderr
    finally:
        del os.environ["MS_TEST_PASSWORD"]


@pytest.mark.skipif(not POSTGRES, reason="MERGESEARCH_TEST_POSTGRES is not set (.ci/run starts a server)")
def test_study_on_postgres_keeps_a_query_string_password_out_of_its_snapshot_and_status(families, tmp_path):
    prefix, _, rest = POSTGRES.partition("://")
    user_password, _, host_db = rest.partition("@")
    user, _, password = user_password.partition(":")
    storage = f"{prefix}://{user}@{host_db}?password={password}"
    config = parse_config(cost_config(families, tmp_path, study={
        "name": f"sec-{uuid.uuid4().hex[:8]}", "run_dir": str(tmp_path / "run"), "storage": storage}))
    study = create_or_load(config)
    stored = RunRef.from_args(str(tmp_path / "run")).load().user_attrs[CONFIG_ATTR]
    assert stored["study"]["storage"] == f"{prefix}://{user}@{host_db}?password=***"
    assert study.study_name == config.study.name
    result = CliRunner().invoke(app, ["status", str(tmp_path / "run")])
    assert result.exit_code == 0, result.stderr
    assert f"password={password}" not in result.stdout + result.stderr


# ---- (c) custom model and tokenizer code -------------------------------------------------


def test_custom_model_code_runs_only_with_trust_remote_code(families, tmp_path):
    """The marker the other tests look for is real: trusting the folder runs its code."""
    folder, marker = custom_code_model(families, tmp_path, "custom_llama")
    with pytest.raises(CheckpointError, match="set models.trust_remote_code: true"):
        load_live_model(folder, torch.device("cpu"))
    assert not marker.exists()
    model = load_live_model(folder, torch.device("cpu"), trust_remote_code=True)
    assert type(model).__name__ == "CustomForCausalLM"
    assert marker.read_text() == "custom code ran"


def test_known_architecture_is_built_by_transformers_and_the_folders_code_never_runs(families, tmp_path):
    import torch

    folder, marker = custom_code_model(families, tmp_path, "llama")
    model = load_live_model(folder, torch.device("cpu"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


@pytest.mark.e2e
def test_model_whose_architecture_is_custom_code_is_refused_without_the_flag(families, tmp_path):
    folder, marker = custom_code_model(families, tmp_path, "custom_llama")
    recipe = write(ties_recipe(families["llama"], base_model=str(folder)), tmp_path)
    result = subprocess.run([MERGESEARCH, "merge", str(recipe), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "config.json auto_map" in errors[0] and "models.trust_remote_code: true" in errors[0]
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_eval_of_a_model_folder_with_custom_code_is_refused_naming_the_flag(families, tmp_path):
    folder, marker = custom_code_model(families, tmp_path, "custom_llama")
    config = config_file(cost_config(families, tmp_path), tmp_path)
    error = one_error(CliRunner().invoke(app, ["eval", str(config), "--model", str(folder)]))
    assert error == (f"error: {folder}: its architecture ('custom_llama') is defined by Python code in the "
                     "model folder (config.json auto_map); set models.trust_remote_code: true to run it")
    assert not marker.exists()


def test_search_refuses_custom_code_before_touching_the_study(families, tmp_path):
    folder, marker = custom_code_model(families, tmp_path, "custom_llama")
    config = parse_config({"models": {"base": str(folder), "sources": {"s0": families["llama"]["s0"]}},
                           "objectives": [{"name": "c", "evaluator": "cost"}],
                           "study": {"run_dir": str(tmp_path / "run")}})
    with pytest.raises(CheckpointError, match="models.trust_remote_code: true"):
        Runner(config).run()
    assert not marker.exists() and not (tmp_path / "run").exists()


def merge(tmp_path: Path, base: str, source: str):
    recipe = {"merge_method": "task_arithmetic", "base_model": base,
              "models": [{"model": source, "parameters": {"weight": 0.5}}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return CliRunner().invoke(app, ["merge", str(path), "--out", str(tmp_path / "out"), "--device", "cpu"])


def test_base_with_custom_tokenizer_code_is_refused_naming_the_flag(families, tmp_path):
    folder, marker = custom_tokenizer_model(families, tmp_path, "base")
    result = merge(tmp_path, str(folder), families["llama"]["s0"])
    error = one_error(result)
    assert error == (f"error: {folder}: its tokenizer (tokenization_custom.CustomTokenizer) is defined by "
                     "Python code in the model folder (tokenizer_config.json auto_map); set "
                     "models.trust_remote_code: true to run it")
    assert "[y/N]" not in result.stdout + result.stderr  # transformers never asked instead
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_search_refuses_a_base_with_custom_tokenizer_code_before_touching_the_study(families, tmp_path):
    folder, marker = custom_tokenizer_model(families, tmp_path, "base")
    config = parse_config(cost_config(families, tmp_path, base=str(folder)))
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json auto_map\); set models.trust_remote_code"):
        Runner(config).run()
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_source_with_custom_tokenizer_code_is_merged_without_running_it(families, tmp_path):
    """Only a source's weights and vocabulary are read: its tokenizer code never runs, and
    no interactive prompt asks whether to run it."""
    folder, marker = custom_tokenizer_model(families, tmp_path, "s0")
    result = merge(tmp_path, families["llama"]["base"], str(folder))
    assert result.exit_code == 0, result.stderr
    assert "[y/N]" not in result.stdout + result.stderr
    assert not marker.exists()
    assert (tmp_path / "out" / "model.safetensors").exists()


# ---- (d) code-executing lm-eval tasks ----------------------------------------------------


def unsafe_task_folder(tmp_path: Path) -> Path:
    """demo_add as a task marked `unsafe_code: true` (as code-execution tasks are)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    for name in ("demo_data.py", "add_test.jsonl"):
        shutil.copy(Path(TASKS) / name, folder / name)
    text = (Path(TASKS) / "demo_add.yaml").read_text().replace("task: demo_add", "task: demo_add_unsafe")
    (folder / "demo_add_unsafe.yaml").write_text(text.replace("tag: [demo_skills]", "unsafe_code: true"))
    return folder


@pytest.mark.parametrize("allowed", [False, True])
def test_code_executing_task_needs_allow_unsafe_code(allowed, demo_experts, tmp_path):
    from transformers import AutoTokenizer

    config = parse_config({
        "models": {"base": "b", "sources": {"x": "x"}},
        "objectives": [{"name": "u", "tasks": ["demo_add_unsafe"], "metric": "acc,none", "limit": 4}],
        "lm_eval": {"include_path": str(unsafe_task_folder(tmp_path)), "include_defaults": False,
                    "allow_unsafe_code": allowed}}, root=ROOT)
    import torch

    model = load_live_model(demo_experts["add"], torch.device("cpu"))
    evaluator = build_evaluators(config)[0]
    tokenizer = AutoTokenizer.from_pretrained(demo_experts["add"])
    if not allowed:
        with pytest.raises(EvaluatorError, match="demo_add_unsafe executes model-written code; set "
                                                 "lm_eval.allow_unsafe_code: true"):
            evaluator.setup(model, tokenizer)
    else:
        evaluator.setup(model, tokenizer)
        assert evaluator.score().ok


def test_run_refuses_a_code_executing_task_without_allow_unsafe_code(families, tmp_path, ray_session):
    data = cost_config(families, tmp_path)
    data["objectives"] = [{"name": "u", "tasks": ["demo_add_unsafe"], "metric": "acc,none", "limit": 4}]
    data["lm_eval"] = {"include_path": str(unsafe_task_folder(tmp_path)), "include_defaults": False}
    error = one_error(CliRunner().invoke(app, ["run", str(config_file(data, tmp_path))]))
    assert error.endswith("objectives.u.tasks: demo_add_unsafe executes model-written code; set "
                          "lm_eval.allow_unsafe_code: true to allow it")
    assert not (tmp_path / "run" / "study.db").exists()
