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
from test_safety import custom_code_model, unsafe_task_folder
from typer.testing import CliRunner

from mergesearch.cli import app
from mergesearch.config import parse_config
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


def write_config(data: dict, tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def one_error(result) -> str:
    """The single `error:` line of a refused command; no traceback."""
    output = result.stdout + result.stderr
    assert result.exit_code == 2, (output, result.exception)
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


# ---- (a) what a local Ray exposes --------------------------------------------------------


def test_ray_dashboard_host_defaults_to_localhost(families, tmp_path):
    config = parse_config(cost_config(families, tmp_path))
    assert config.workers.dashboard_host == "127.0.0.1"
    assert config.snapshot()["workers"]["dashboard_host"] == "127.0.0.1"  # what workers and resume see


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


def test_password_given_as_a_url_query_parameter_is_masked_in_the_snapshot(families, tmp_path):
    config = parse_config(cost_config(families, tmp_path, study={
        "name": "sec", "storage": f"postgresql+psycopg2://ms@db.internal/ms?sslmode=require&password={PASSWORD}"}))
    stored = config.snapshot()["study"]["storage"]
    assert stored == "postgresql+psycopg2://ms@db.internal/ms?sslmode=require&password=***"


def test_run_against_unreachable_postgres_never_shows_the_password(families, tmp_path, ray_session):
    storage = f"postgresql://ms:{PASSWORD}@127.0.0.1:1/ms"
    path = write_config(cost_config(families, tmp_path, study={
        "name": "sec", "run_dir": str(tmp_path / "run"), "storage": storage}), tmp_path)
    result = CliRunner().invoke(app, ["run", str(path)])
    error = one_error(result)
    assert error.startswith("error: study.storage: cannot open postgresql://ms:***@127.0.0.1:1/ms (")
    assert PASSWORD not in result.stdout + result.stderr
    run = tmp_path / "run"
    assert not run.exists() or all(PASSWORD.encode() not in p.read_bytes() for p in run.rglob("*") if p.is_file())


def test_password_given_as_a_url_query_parameter_is_never_shown(tmp_path):
    storage = f"postgresql://ms@127.0.0.1:1/ms?password={PASSWORD}"
    result = CliRunner().invoke(app, ["status", "--storage", storage, "--study", "sec"])
    error = one_error(result)
    assert error.startswith("error: study.storage: cannot open postgresql://ms@127.0.0.1:1/ms?password=*** (")
    assert PASSWORD not in result.stdout + result.stderr


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


# ---- (c) custom model and tokenizer code -------------------------------------------------

CUSTOM_TOKENIZER = '''import pathlib
pathlib.Path({marker!r}).write_text("custom tokenizer code ran")
from transformers import PreTrainedTokenizerFast

class CustomTokenizer(PreTrainedTokenizerFast):
    pass
'''


def custom_tokenizer_model(families, tmp_path: Path, name: str = "s0") -> tuple[Path, Path]:
    """A copy of a llama family model whose tokenizer_config.json maps its tokenizer to a
    Python file in the folder that would leave a marker file if imported."""
    folder, marker = tmp_path / f"custom-tokenizer-{name}", tmp_path / "TOKENIZER-MARKER"
    shutil.copytree(families["llama"][name], folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="CustomTokenizer",
               auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "tokenization_custom.py").write_text(CUSTOM_TOKENIZER.format(marker=str(marker)))
    return folder, marker


def merge(tmp_path: Path, base: str, source: str):
    recipe = {"merge_method": "task_arithmetic", "base_model": base,
              "models": [{"model": source, "parameters": {"weight": 0.5}}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return CliRunner().invoke(app, ["merge", str(path), "--out", str(tmp_path / "out"), "--device", "cpu"])


def test_custom_model_code_runs_only_with_trust_remote_code(families, tmp_path):
    """The marker the other tests look for is real: trusting the folder runs its code."""
    folder, marker = custom_code_model(families, tmp_path, "custom_llama")
    with pytest.raises(CheckpointError, match="set models.trust_remote_code: true"):
        load_live_model(folder, torch.device("cpu"))
    assert not marker.exists()
    model = load_live_model(folder, torch.device("cpu"), trust_remote_code=True)
    assert type(model).__name__ == "CustomForCausalLM"
    assert marker.read_text() == "custom code ran"


def test_eval_of_a_model_folder_with_custom_code_is_refused_naming_the_flag(families, tmp_path):
    folder, marker = custom_code_model(families, tmp_path, "custom_llama")
    config = write_config(cost_config(families, tmp_path), tmp_path)
    error = one_error(CliRunner().invoke(app, ["eval", str(config), "--model", str(folder)]))
    assert error == (f"error: {folder}: its architecture ('custom_llama') is defined by Python code in the "
                     "model folder (config.json auto_map); set models.trust_remote_code: true to run it")
    assert not marker.exists()


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


def test_run_refuses_a_code_executing_task_without_allow_unsafe_code(families, tmp_path, ray_session):
    data = cost_config(families, tmp_path)
    data["objectives"] = [{"name": "u", "tasks": ["demo_add_unsafe"], "metric": "acc,none", "limit": 4}]
    data["lm_eval"] = {"include_path": str(unsafe_task_folder(tmp_path)), "include_defaults": False}
    error = one_error(CliRunner().invoke(app, ["run", str(write_config(data, tmp_path))]))
    assert error.endswith("objectives.u.tasks: demo_add_unsafe executes model-written code; set "
                          "lm_eval.allow_unsafe_code: true to allow it")
    assert not (tmp_path / "run" / "study.db").exists()
