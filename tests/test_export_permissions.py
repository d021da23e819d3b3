"""Exported and merged models get the modes the user's umask gives, as `save_pretrained`'s
files do: on a shared cluster the others can read them (temporary files and folders from
`tempfile.mkstemp`/`mkdtemp` would be renamed into place as 0600 files in a 0700 folder)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from support.cli import merge_in_process
from support.recipes import ties_recipe

from mergesearch.config import parse_config
from mergesearch.search.export import export_trial
from mergesearch.search.study import create_or_load


@pytest.fixture(params=[(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)],
                ids=["umask022", "umask027"])
def umask(request):
    """(file mode, folder mode) expected under the umask set for the test."""
    mask, file_mode, folder_mode = request.param
    old = os.umask(mask)
    yield file_mode, folder_mode
    os.umask(old)


def modes(folder: Path) -> tuple[dict[str, int], dict[str, int]]:
    """The modes of the files and of the folders under ``folder`` (itself included)."""
    paths = [folder, *sorted(folder.rglob("*"))]
    files = {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_file()}
    folders = {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()}
    return files, folders


def test_export_with_the_model_follows_the_umask(families, tmp_path, umask):
    file_mode, folder_mode = umask
    f = families["llama"]
    config = parse_config({"models": {"base": f["base"], "sources": {"s0": f["s0"], "s1": f["s1"]}},
                           "objectives": [{"name": "c", "evaluator": "cost"}],
                           "study": {"name": "modes", "run_dir": str(tmp_path / "run")}})
    study = create_or_load(config)
    trial = study.ask()
    trial.set_user_attr("recipe", {"method": "task_arithmetic", "base_model": f["base"], "models": [
        {"model": f["s0"], "parameters": {"weight": 0.4}}, {"model": f["s1"], "parameters": {"weight": 0.6}}]})
    study.tell(trial, 0.5)
    out = tmp_path / "export"
    export_trial(config, study.trials[0], out, save_model=True)
    files, folders = modes(out)
    assert {"recipe.json", "mergekit.yaml", "model/model.safetensors", "model/config.json"} <= set(files)
    assert {name: oct(mode) for name, mode in files.items() if mode != file_mode} == {}
    assert folders == {".": folder_mode, "model": folder_mode}


def test_merge_command_follows_the_umask(families, tmp_path, umask):
    file_mode, folder_mode = umask
    result = merge_in_process(ties_recipe(families["llama"]), tmp_path)
    assert result.exit_code == 0, result.stderr
    files, folders = modes(tmp_path / "out")
    assert {"model.safetensors", "config.json", "recipe.json", "tokenizer.json"} <= set(files)
    assert {name: oct(mode) for name, mode in files.items() if mode != file_mode} == {}
    assert folders == {".": folder_mode}
