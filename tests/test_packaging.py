"""What a user installs: the wheel carries what `mergesearch demo` reads, `--version` names
the installed release, and the README's `postgresql://` URL opens with the `postgres` extra."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from importlib.metadata import version
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

import mergesearch
from mergesearch.cli import app
from mergesearch.search.study import open_storage

ROOT = Path(__file__).resolve().parent.parent
POSTGRES = os.environ.get("MERGESEARCH_TEST_POSTGRES")

# Run by the wheel's own code (cwd and PYTHONPATH keep the checkout out of reach): the
# packaged demo config loads, its task folder holds the task YAMLs and their data, and
# lm-eval builds demo_add's 150 test documents from there.
DEMO_CHECK = """
import sys
from pathlib import Path
import mergesearch
from mergesearch.cli import DEMO_CONFIG
from mergesearch.config import load_config
from mergesearch.evaluators.lm_eval import task_manager
site = Path(sys.argv[1]).resolve()
assert Path(mergesearch.__file__).resolve().is_relative_to(site), mergesearch.__file__
config = load_config(DEMO_CONFIG)
[tasks] = map(Path, config.include_paths())
assert tasks.is_relative_to(site), tasks
print(sorted(p.name for p in tasks.iterdir() if p.suffix in (".yaml", ".jsonl", ".py")))
manager = task_manager(tuple(config.include_paths()), config.lm_eval.include_defaults)
names = [t for o in config.objectives + config.heldout for t in o.tasks]
print(sorted(set(names) & set(manager.all_tasks)))
print(len(manager.load(["demo_add"])["tasks"]["demo_add"].eval_docs))
"""

TASK_FILES = sorted(
    [f"demo_{s}{h}.yaml" for s in ("add", "reverse", "sort") for h in ("", "_heldout")]
    + [f"{s}_{split}.jsonl" for s in ("add", "reverse", "sort") for split in ("test", "heldout")]
    + ["demo_data.py", "demo_text.jsonl"])


def package_files() -> list[str]:
    """Every file of the package in the checkout, as the wheel names it."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "mergesearch").rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel .` makes, built from a copy of the checkout's sources (the
    build writes `build/` beside them)."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    src = tmp_path / "src"
    shutil.copytree(ROOT / "mergesearch", src / "mergesearch",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("mergesearch-*.whl")
    return wheel


@pytest.mark.slow
def test_the_wheel_carries_every_file_of_the_package(wheel):
    with zipfile.ZipFile(wheel) as z:
        carried = sorted(n for n in z.namelist() if n.startswith("mergesearch/"))
    assert carried == package_files()


@pytest.mark.slow
def test_the_installed_wheel_finds_the_demo_config_its_tasks_and_their_data(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", DEMO_CHECK, str(site)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    files, tasks, documents = result.stdout.strip().splitlines()[-3:]
    assert files == str(TASK_FILES)
    assert tasks == str(sorted(f.removesuffix(".yaml") for f in TASK_FILES if f.endswith(".yaml")))
    assert documents == "150"


def test_version_option_prints_the_installed_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"mergesearch {version('mergesearch')}\n"
    assert version("mergesearch") == mergesearch.__version__


@pytest.mark.skipif(not POSTGRES, reason="MERGESEARCH_TEST_POSTGRES is not set (.ci/run starts a server)")
def test_a_plain_postgresql_url_opens_with_the_postgres_extra():
    """The README's `postgresql://user:password@host/db` form, with no `+driver`: SQLAlchemy
    >= 2.1 opens it with psycopg 3, which the `postgres` extra installs."""
    url = "postgresql://" + POSTGRES.partition("://")[2]
    storage = open_storage(url)
    assert storage.engine.dialect.driver == "psycopg"
    name = f"plain-url-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.75, 2.0]))
    try:
        assert optuna.load_study(study_name=name, storage=open_storage(url)).trials[0].values == [0.75, 2.0]
    finally:
        optuna.delete_study(study_name=name, storage=storage)
