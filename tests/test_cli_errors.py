"""User errors at the command line, each refused before any work starts: exit code 2, one
`error:` line naming the file, field or option, never a traceback, nothing created and
nothing stored lost."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from support import cli_error
from support.studies import TASKS

from mergesearch.config import ConfigError, mask_password, parse_config
from mergesearch.search import runner
from mergesearch.search.study import create_or_load


def config_data(run_dir: Path, base: str = "b", sources=None, **study) -> dict:
    return {
        "models": {"base": base, "sources": sources or {"x": "x", "y": "y"}},
        "objectives": [{"name": "q", "tasks": ["demo_add"], "metric": "acc,none", "limit": 4}],
        "lm_eval": {"include_path": TASKS, "include_defaults": False},
        "study": {"name": "s", "run_dir": str(run_dir), **study},
        "budget": {"n_trials": 2},
    }


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run folder with its study (a config snapshot, no trials): made without Ray."""
    run = tmp_path / "run"
    create_or_load(parse_config(config_data(run), root=tmp_path))
    assert (run / "study.db").exists() and (run / "run.json").exists()
    return run


@pytest.fixture
def no_ray(monkeypatch) -> list:
    """Fails the command if it gets as far as starting Ray: every check comes before."""
    started = []

    def tripwire(config) -> None:
        started.append(config)
        raise AssertionError("Ray was started before the arguments and the storage were checked")

    monkeypatch.setattr(runner, "start_ray", tripwire)
    return started


# ---- 1. files that are not UTF-8 -------------------------------------------------------------


def test_config_that_is_not_utf8_is_refused_naming_the_file_and_the_byte(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("# caf\xe9 au lait\n".encode("latin-1") + yaml.safe_dump(config_data(tmp_path / "r")).encode())
    error = cli_error("run", f)
    assert error == f"error: {f}: not UTF-8 text (byte 0xe9 at offset 5); save the file as UTF-8"


def test_mergekit_yaml_that_is_not_utf8_is_refused_naming_the_file_and_the_byte(tmp_path):
    f = tmp_path / "merge.yaml"
    f.write_bytes(b"merge_method: linear\nmodels:\n  - model: /m/caf\xe9\n")
    error = cli_error("merge", f, "--out", tmp_path / "out")
    assert error == f"error: {f}: not UTF-8 text (byte 0xe9 at offset 46); save the file as UTF-8"
    assert not (tmp_path / "out").exists()


# ---- 2. sources given as a list -----------------------------------------------------------


def test_sources_listed_with_the_same_folder_name_get_distinct_aliases(tmp_path):
    cfg = parse_config(config_data(tmp_path, sources=["/x/exp-a/final", "/x/exp-b/final", "/x/other"]))
    assert cfg.models.sources == {"exp-a_final": "/x/exp-a/final", "exp-b_final": "/x/exp-b/final",
                                  "other": "/x/other"}


def test_sources_alias_is_the_shortest_suffix_that_tells_them_apart(tmp_path):
    cfg = parse_config(config_data(tmp_path, sources=["/r/a/run.1/final", "/r/b/run.1/final", "/r/c/final"]))
    assert cfg.models.sources == {"a_run_1_final": "/r/a/run.1/final", "b_run_1_final": "/r/b/run.1/final",
                                  "c_final": "/r/c/final"}


def test_a_source_listed_twice_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"^cfg.yaml: models.sources: /x/a/final is listed twice$"):
        parse_config(config_data(tmp_path, sources=["/x/a/final", "/y", "/x/a/final"]), source="cfg.yaml")


def test_sources_no_suffix_tells_apart_are_refused_naming_both(tmp_path):
    with pytest.raises(ConfigError, match=r"^cfg.yaml: models.sources: x/final and x//final "
                                          r"have no distinct alias; give the sources as a mapping alias: folder$"):
        parse_config(config_data(tmp_path, sources=["x/final", "x//final"]), source="cfg.yaml")


# ---- 3. arguments checked before any work -------------------------------------------------


def test_resume_refuses_a_negative_trial_budget_before_starting_ray(run_dir, no_ray):
    error = cli_error("resume", run_dir, "--n-trials", "-5")
    assert error == "error: --n-trials: -5 is not a trial budget; give a number >= 1"
    assert not no_ray


@pytest.mark.parametrize("n", ["0", "-1"])
def test_demo_refuses_a_trial_budget_below_one_before_any_work(n, tmp_path, no_ray):
    error = cli_error("demo", "--run-dir", tmp_path / "demo", "--n-trials", n)
    assert error == f"error: --n-trials: {n} is not a trial budget; give a number >= 1"
    assert not (tmp_path / "demo").exists()


def test_runner_checks_a_value_set_after_loading_before_starting_ray(families, tmp_path, no_ray):
    llama = families["llama"]
    config = parse_config(config_data(tmp_path / "run", llama["base"], {"a": llama["s0"], "b": llama["s1"]}))
    config.budget.n_trials = -5  # pydantic does not check an assignment; the workers would
    with pytest.raises(ConfigError, match=r"^config: budget.n_trials: Input should be greater than or equal to 1$"):
        runner.Runner(config).run()
    assert not no_ray and not (tmp_path / "run").exists()


# ---- 4. opening a run never creates its storage ----------------------------------------------


@pytest.mark.parametrize("command", [["resume"], ["status"], ["front"], ["export", "--out", "x"]])
def test_a_run_whose_storage_file_was_deleted_is_refused_naming_it_and_not_recreated(command, run_dir):
    db = run_dir / "study.db"
    for f in run_dir.glob("study.db*"):
        f.unlink()
    error = cli_error(command[0], run_dir, *command[1:])
    assert error == f"error: {db}: storage file not found (named by {run_dir / 'run.json'})"
    assert not db.exists()


def test_a_storage_file_given_with_storage_is_never_created(tmp_path):
    db = tmp_path / "none.db"
    error = cli_error("status", "--storage", f"sqlite:///{db}", "--study", "s")
    assert error == f"error: {db}: storage file not found (named by --storage)"
    assert not db.exists()


def test_a_study_missing_from_the_run_folders_storage_blames_run_json_not_study(run_dir):
    (run_dir / "run.json").write_text(json.dumps({"storage": f"sqlite:///{run_dir / 'study.db'}", "study": "gone"}))
    error = cli_error("status", run_dir)
    assert error == f"error: {run_dir / 'run.json'}: no study named 'gone' in sqlite:///{run_dir / 'study.db'}"


# ---- 5. the storage is checked before Ray starts --------------------------------------------


def test_run_refuses_an_unreachable_storage_before_starting_ray(families, tmp_path, no_ray):
    llama = families["llama"]
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(config_data(
        tmp_path / "run", llama["base"], {"a": llama["s0"], "b": llama["s1"]},
        storage="postgresql://u:p@ss@127.0.0.1:9/db")))
    error = cli_error("run", f)
    assert error.startswith("error: study.storage: cannot open postgresql://u:***@127.0.0.1:9/db (")
    assert not no_ray and not (tmp_path / "run").exists()


def test_run_refuses_a_study_with_other_objectives_before_starting_ray(families, tmp_path, no_ray):
    llama = families["llama"]
    storage = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize"])
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(config_data(tmp_path / "run", llama["base"], {"a": llama["s0"], "b": llama["s1"]},
                                            storage=storage)))
    error = cli_error("run", f)
    assert error == ("error: study.name: study 's' already exists with objectives "
                     "maximize, minimize, not q (maximize); choose another study name")
    assert not no_ray and not (tmp_path / "run").exists()
    assert len(optuna.load_study(study_name="s", storage=storage).directions) == 2


def test_run_refuses_a_run_folder_inside_a_file_before_starting_ray(families, tmp_path, no_ray):
    llama = families["llama"]
    (tmp_path / "afile").write_text("")
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(config_data(tmp_path / "afile" / "run", llama["base"],
                                            {"a": llama["s0"], "b": llama["s1"]})))
    error = cli_error("run", f)
    afile = tmp_path / "afile"
    assert error == f"error: study.run_dir: cannot create {afile / 'run'}: {afile} is not a folder"
    assert not no_ray


# ---- 6. run folders and output files ----------------------------------------------------------


@pytest.mark.parametrize("command", ["status", "resume", "front"])
def test_a_config_file_given_for_a_run_folder_is_refused_naming_it(command, tmp_path):
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(config_data(tmp_path / "run")))
    error = cli_error(command, config)
    assert error == (f"error: RUN: {config} is a file, not a run folder; "
                     f"a search starts from a config with `mergesearch run {config}`")


@pytest.mark.parametrize("option", ["--plot", "--csv"])
def test_front_refuses_an_output_in_a_missing_folder_before_reading_the_study(option, tmp_path):
    missing = tmp_path / "no" / "such"
    error = cli_error("front", tmp_path / "no-run", option, missing / "front.out")
    assert error == f"error: {option}: {missing}: no such folder"


def test_export_refuses_two_ways_of_choosing_the_trial_before_reading_the_study(tmp_path):
    error = cli_error("export", tmp_path / "no-run", "--trial", "0", "--balanced", "--out", tmp_path / "x")
    assert error == "error: choose one of --trial, --best, --weights, --balanced"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("content, problem", [
    ('["storage", "study"]', 'expected a JSON object with "storage" and "study"'),
    ('{"storage": "sqlite:///x.db"}', '"study" is missing'),
    ('{"study": "s"}', '"storage" is missing'),
    ('{"storage": 3, "study": "s"}', '"storage" is not a string'),
])
def test_a_malformed_run_json_is_refused_naming_it(content, problem, run_dir):
    (run_dir / "run.json").write_text(content)
    assert cli_error("status", run_dir) == f"error: {run_dir / 'run.json'}: {problem}"


def test_a_run_json_that_is_not_utf8_is_refused_naming_it(run_dir):
    (run_dir / "run.json").write_bytes(b'{"study": "\xe9"}')
    assert cli_error("status", run_dir) == (f"error: {run_dir / 'run.json'}: not UTF-8 text (byte 0xe9 at offset 11); "
                                         "save the file as UTF-8")


# ---- 7. storage passwords -----------------------------------------------------------------


@pytest.mark.parametrize("url, masked", [
    ("postgresql://u:secret@host/db", "postgresql://u:***@host/db"),
    ("postgresql://u:p@ss@host/db", "postgresql://u:***@host/db"),
    ("postgresql+psycopg2://u:p@s@s@host:5432/db?sslmode=require",
     "postgresql+psycopg2://u:***@host:5432/db?sslmode=require"),
    ("mysql+pymysql://u:pa/s:s?x@host/db", "mysql+pymysql://u:***@host/db"),
    ("postgresql://u%40corp:p@ss@host/db?x=a@b", "postgresql://u%40corp:***@host/db?x=a@b"),
    ("postgresql://u@host/db?sslmode=require&password=p@ss&x=1",
     "postgresql://u@host/db?sslmode=require&password=***&x=1"),
    ("postgresql://u:p@ss@host/db?PASSWORD=q@r", "postgresql://u:***@host/db?PASSWORD=***"),
    ("postgresql://u@host/db?x=a@b", "postgresql://u@host/db?x=a@b"),
    ("postgresql://host:5432/db", "postgresql://host:5432/db"),
    ("sqlite:////tmp/a@b/x.db", "sqlite:////tmp/a@b/x.db"),
    ("journal:/tmp/a:b@c/j.log", "journal:/tmp/a:b@c/j.log"),
])
def test_storage_password_is_masked_whatever_it_holds(url, masked):
    assert mask_password(url) == masked
