"""What may run, and what is shown: custom model code only with `models.trust_remote_code`,
code-executing lm-eval tasks only with `lm_eval.allow_unsafe_code`, storage passwords
never printed or stored, and no Ray dashboard listening. (Pickles: test_checkpoint.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_evaluators import ROOT, TASKS
from test_merge_cli import MERGESEARCH, ties_recipe, write

from mergesearch.config import parse_config
from mergesearch.errors import EvaluatorError
from mergesearch.evaluators import build_evaluators
from mergesearch.merging import CheckpointError, load_live_model
from mergesearch.search import Runner
from mergesearch.search.study import RunRef, create_or_load

POSTGRES = os.environ.get("MERGESEARCH_TEST_POSTGRES")

CUSTOM_CODE = '''import pathlib
pathlib.Path({marker!r}).write_text("custom code ran")
from transformers import LlamaConfig, LlamaForCausalLM

class CustomConfig(LlamaConfig):
    model_type = {model_type!r}

class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''


def custom_code_model(families, tmp_path: Path, model_type: str) -> tuple[Path, Path]:
    """The llama base with config.json pointing at Python files in the folder that would
    leave a marker file if imported."""
    folder, marker = tmp_path / f"custom-{model_type}", tmp_path / "MARKER"
    shutil.copytree(families["llama"]["base"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type=model_type, auto_map={
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(cfg))
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (folder / name).write_text(CUSTOM_CODE.format(marker=str(marker), model_type=model_type))
    return folder, marker


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


def test_search_refuses_custom_code_before_touching_the_study(families, tmp_path):
    folder, marker = custom_code_model(families, tmp_path, "custom_llama")
    config = parse_config({"models": {"base": str(folder), "sources": {"s0": families["llama"]["s0"]}},
                           "objectives": [{"name": "c", "evaluator": "cost"}],
                           "study": {"run_dir": str(tmp_path / "run")}})
    with pytest.raises(CheckpointError, match="models.trust_remote_code: true"):
        Runner(config).run()
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_known_architecture_is_built_by_transformers_and_the_folders_code_never_runs(families, tmp_path):
    import torch

    folder, marker = custom_code_model(families, tmp_path, "llama")
    model = load_live_model(folder, torch.device("cpu"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


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


def test_snapshot_stores_the_storage_password_masked(monkeypatch):
    monkeypatch.setenv("PG_PASSWORD", "s3cret")
    for storage in ("postgresql://ms:s3cret@db.internal/ms", "postgresql://ms:${PG_PASSWORD}@db.internal/ms"):
        config = parse_config({"models": {"base": "b", "sources": {"x": "x"}},
                               "objectives": [{"name": "c", "evaluator": "cost"}],
                               "study": {"storage": storage}})
        assert config.storage_url == "postgresql://ms:s3cret@db.internal/ms"
        assert config.snapshot()["study"]["storage"] == "postgresql://ms:***@db.internal/ms"


def test_unreachable_storage_error_masks_the_password(tmp_path):
    url = "postgresql://ms:s3cret@127.0.0.1:1/ms"
    result = subprocess.run([MERGESEARCH, "status", "--storage", url, "--study", "x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "postgresql://ms:***@127.0.0.1:1/ms" in result.stderr
    assert "s3cret" not in result.stdout + result.stderr


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
