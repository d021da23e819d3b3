"""`mergesearch merge`, the in-place engine, atomic writes, and the refusal of bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from support.cli import MERGESEARCH, assert_refused, disk_full_at, merge_in_process
from support.recipes import expected_tensors, ties_recipe, write
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mergesearch.cli import app
from mergesearch.merging import MergeEngine, load_live_model, save_model
from mergesearch.merging import output as output_module
from mergesearch.merging.mergekit import from_mergekit, load_recipe


def merge_subprocess(recipe: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([MERGESEARCH, "merge", str(write(recipe, tmp_path)), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)


# ---- writing a merged model -----------------------------------------------------------


@pytest.mark.e2e
def test_merge_writes_a_model_transformers_loads_with_our_tensors(families, tmp_path):
    f = families["llama"]
    result = merge_subprocess(ties_recipe(f), tmp_path)  # the real command, in its own process
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    expected = expected_tensors(f, ties_recipe(f))
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_merge_writes_the_recipe_and_its_mergekit_yaml_beside_the_model(families, tmp_path):
    f = families["llama"]
    result = merge_in_process(ties_recipe(f), tmp_path)
    assert result.exit_code == 0, result.stderr
    recipe = from_mergekit(ties_recipe(f))
    assert load_recipe(tmp_path / "out" / "recipe.json") == recipe
    # the mergekit.yaml also names the merged model's dtype
    assert load_recipe(tmp_path / "out" / "mergekit.yaml") == recipe.model_copy(update={"dtype": "float32"})
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_tied_embeddings_are_written_once_and_stay_tied(families, tmp_path):
    f = families["gpt2"]
    result = merge_in_process(ties_recipe(f), tmp_path)
    assert result.exit_code == 0, result.stderr
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as h:
        names = set(h.keys())
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, expected_tensors(f, ties_recipe(f))["transformer.wte.weight"])


# ---- the in-place engine --------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_into_equals_merged_tensors_and_restore_base_is_exact(arch, families):
    f = families[arch]
    tv = MergeEngine(f["base"], [f["s0"], f["s1"]], device="cpu")
    model = load_live_model(tv.base.path, tv.device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = from_mergekit(ties_recipe(f))
    tv.merge_into(model, recipe)
    merged = dict(tv.merged_tensors(recipe))
    live = model.state_dict()
    assert all(torch.equal(live[k], merged[k]) for k in merged)
    assert any(not torch.equal(live[k], before[k]) for k in merged)
    tv.restore_base(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_merge_into_keeps_gpt2_output_head_tied(families):
    f = families["gpt2"]
    tv = MergeEngine(f["base"], [f["s0"], f["s1"]], device="cpu")
    model = load_live_model(tv.base.path, tv.device)
    recipe = from_mergekit(ties_recipe(f))
    tv.merge_into(model, recipe)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, dict(tv.merged_tensors(recipe))["transformer.wte.weight"])


# ---- atomic writes --------------------------------------------------------------------


def saved(model_path: str, out: Path):
    """A model saved to ``out``, and the bytes of every file that save wrote."""
    model = load_live_model(model_path, torch.device("cpu"))
    save_model(model, out)
    return model, {p.name: p.read_bytes() for p in out.iterdir()}


def test_failed_write_leaves_no_folder_and_keeps_the_previous_one(families, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    model, previous = saved(families["llama"]["base"], out)

    def broken(self, path, **kwargs):
        Path(path, "model.safetensors").write_bytes(b"partial")  # a file, then the failure
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(OSError):
        save_model(model, out)
    with pytest.raises(OSError):
        save_model(model, tmp_path / "fresh")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary folders


def test_failed_final_rename_puts_the_previous_folder_back(families, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    model, previous = saved(families["gpt2"]["base"], out)
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(output_module.os, "replace", replace)
    with pytest.raises(OSError):
        save_model(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.e2e
def test_disk_full_while_merging_keeps_the_previous_model_and_prints_one_error(families, tmp_path):
    f = families["llama"]
    recipe = write(ties_recipe(f), tmp_path)
    out = tmp_path / "out"
    first = subprocess.run([MERGESEARCH, "merge", str(recipe), "--out", str(out)], capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    weights = (out / "model.safetensors").stat().st_size
    again = subprocess.run([MERGESEARCH, "merge", str(write(ties_recipe(f, parameters={"density": 0.9}), tmp_path)),
                            "--out", str(out)], capture_output=True, text=True, timeout=300,
                           preexec_fn=disk_full_at(weights // 2))
    assert again.returncode == 2, again.stderr
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in again.stderr + again.stdout
    assert errors[0].startswith(f"error: --out: cannot write {out} (File too large")
    assert errors[0].endswith("; the previous folder is unchanged")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]  # no temporary folders


# ---- bad input: exit code 2, one line naming the field or file, no traceback ---------


BAD = {
    "unknown_method": (lambda f: ties_recipe(f, merge_method="tiez"), "method: unknown merge method 'tiez'"),
    "density_above_one": (lambda f: ties_recipe(f, parameters={"density": 1.5}),
                          "parameters.density: 1.5 is outside its valid range [0.0, 1.0]"),
    "density_below_zero": (lambda f: ties_recipe(f, models=[{"model": f["s0"], "parameters": {
                           "weight": 1.0, "density": -0.1}}]),
                           "models[0].parameters.density: -0.1 is outside its valid range"),
    "slices_dropping_layers": (lambda f: {**ties_recipe(f, models=None), "slices": [{"sources": [
                               {"model": f["base"], "layer_range": [0, 2]},
                               {"model": f["s0"], "layer_range": [0, 2], "parameters": {"weight": 0.6}}]}]},
                               "slices[0].layer_range: [0, 2] of a model with 4 layers"),
    "unknown_parameter": (lambda f: ties_recipe(f, parameters={"densty": 0.5}),
                          "parameters.densty: not a parameter of ties"),
    "missing_weight": (lambda f: {**ties_recipe(f), "models": [{"model": f["s0"]}]},
                       "parameters.weight: required by ties"),
    "missing_model_folder": (lambda f: ties_recipe(f, base_model="/nonexistent/base"),
                             "/nonexistent/base: model folder not found"),
    "unknown_dtype": (lambda f: ties_recipe(f, dtype="float33"), "dtype: 'float33' is not one of"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipe_is_refused(case, families, tmp_path):
    make, message = BAD[case]
    assert_refused(merge_in_process(make(families["llama"]), tmp_path), message, tmp_path)


def test_invalid_yaml_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("merge_method: ties\nmodels: [a, b\n")
    result = CliRunner().invoke(app, ["merge", str(path), "--out", str(tmp_path / "out")])
    assert_refused(result, f"{path}: YAML syntax error", tmp_path)


def test_source_with_other_tensor_shapes_is_refused_naming_model_and_tensor(families, tmp_path):
    f = families["llama"]
    odd = tmp_path / "odd"
    shutil.copytree(f["s0"], odd)
    model = AutoModelForCausalLM.from_pretrained(odd)
    model.resize_token_embeddings(60)  # other embedding rows
    model.save_pretrained(odd)
    result = merge_in_process(ties_recipe(f, models=[{"model": str(odd), "parameters": {"weight": 1.0}}]), tmp_path)
    assert_refused(result, f"{odd}: tensor lm_head.weight has shape [60, 32], the base has [51, 32]", tmp_path)


def test_source_of_another_architecture_is_refused(families, tmp_path):
    f = families["llama"]
    gpt2 = families["gpt2"]["s0"]
    result = merge_in_process(ties_recipe(f, models=[{"model": gpt2, "parameters": {"weight": 1.0}}]), tmp_path)
    assert_refused(result, f"{gpt2}: architecture gpt2 ['GPT2LMHeadModel'] differs from the base's llama",
                   tmp_path)


def test_source_with_another_vocabulary_is_refused(tmp_path, families):
    from mergesearch.demo.tokenizer import char_tokenizer

    f = families["llama"]
    other = tmp_path / "other-vocab"
    shutil.copytree(f["s0"], other)
    char_tokenizer("0123456789abcdefghijklmnopqrstuvwxyZ +-=:>,.?!\n").save_pretrained(other)  # 'z' -> 'Z'
    result = merge_in_process(ties_recipe(f, models=[{"model": str(other), "parameters": {"weight": 1.0}}]),
                              tmp_path)
    assert_refused(result, f"{other}: tokenizer vocabulary differs from the base's", tmp_path)


@pytest.mark.e2e
def test_corrupt_safetensors_is_refused_naming_the_file(tmp_path, families):
    f = families["llama"]
    broken = tmp_path / "broken"
    shutil.copytree(f["s1"], broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    result = merge_subprocess(ties_recipe(f, models=[{"model": str(broken), "parameters": {"weight": 1.0}}]),
                              tmp_path)  # in its own process: the exit code and stderr as a user sees them
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(broken / "model.safetensors") in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_existing_file_at_the_target_is_refused(families, tmp_path):
    (tmp_path / "out").write_text("not a folder")
    result = merge_in_process(ties_recipe(families["llama"]), tmp_path)
    assert result.exit_code == 2 and "exists and is not a folder" in result.stderr
    assert (tmp_path / "out").read_text() == "not a folder"


def test_recipe_json_is_accepted_as_well_as_mergekit_yaml(families, tmp_path):
    f = families["llama"]
    recipe = from_mergekit(ties_recipe(f))
    recipe.save(tmp_path / "r.json")
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "r.json"), "--out", str(tmp_path / "out"),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "out" / "recipe.json").read_text()) == json.loads(recipe.to_json())
