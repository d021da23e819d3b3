"""`mergesearch merge`, the in-place engine, and the refusal of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from mergesearch.merging import TaskVectors, load_live_model, save_model
from mergesearch.recipe import Recipe

MERGESEARCH = [sys.executable, "-m", "mergesearch.cli"]


def ties_recipe(f: dict, **change) -> dict:
    recipe = {"merge_method": "ties", "base_model": f["base"], "parameters": {"density": 0.5},
              "models": [{"model": f["s0"], "parameters": {"weight": 0.6}},
                         {"model": f["s1"], "parameters": {"weight": [0.2, 0.8]}}]}
    recipe.update(change)
    return recipe


def merge(recipe: dict, tmp_path: Path, out: Path | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return subprocess.run([*MERGESEARCH, "merge", str(path), "--out", str(out or tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)


def test_merge_writes_a_model_transformers_loads_with_our_tensors(families, tmp_path):
    f = families["llama"]
    result = merge(ties_recipe(f), tmp_path)
    assert result.returncode == 0, result.stderr
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    expected = dict(TaskVectors(f["base"], [f["s0"], f["s1"]], device="cpu").merged_tensors(
        Recipe.from_mergekit(ties_recipe(f))))
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert json.loads((tmp_path / "out" / "recipe.json").read_text())["method"] == "ties"
    assert yaml.safe_load((tmp_path / "out" / "mergekit.yaml").read_text())["merge_method"] == "ties"


def test_merge_into_then_restore_base_is_exact(families):
    f = families["gpt2"]
    tv = TaskVectors(f["base"], [f["s0"], f["s1"]], device="cpu")
    model = load_live_model(tv.base.path, tv.device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe.from_mergekit(ties_recipe(f))
    tv.merge_into(model, recipe)
    merged = dict(tv.merged_tensors(recipe))
    assert torch.equal(model.state_dict()["transformer.h.1.mlp.c_fc.weight"],
                       merged["transformer.h.1.mlp.c_fc.weight"])
    # tied embeddings: written once, and the output head still shares them
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, merged["transformer.wte.weight"])
    tv.restore_base(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_failed_write_leaves_no_folder_and_keeps_the_previous_one(families, tmp_path, monkeypatch):
    f = families["llama"]
    model = load_live_model(f["base"], torch.device("cpu"))
    out = tmp_path / "merged"
    save_model(model, out)
    previous = sorted(p.name for p in out.iterdir())

    def broken(self, path, **kwargs):
        Path(path, "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(OSError):
        save_model(model, out)
    with pytest.raises(OSError):
        save_model(model, tmp_path / "fresh")
    assert sorted(p.name for p in out.iterdir()) == previous
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


BAD = {
    "unknown_method": (lambda f: ties_recipe(f, merge_method="tiez"), "method: unknown merge method 'tiez'"),
    "density_out_of_range": (lambda f: ties_recipe(f, parameters={"density": 1.5}),
                             "parameters.density: 1.5 is outside its valid range"),
    "list_longer_than_layers": (lambda f: ties_recipe(f, parameters={"density": [0.5] * 5}),
                                "parameters.density: 5 values fit no layer count of this model (4 layers)"),
    "unknown_parameter": (lambda f: ties_recipe(f, parameters={"densty": 0.5}),
                          "parameters.densty: not a parameter of ties"),
    "missing_model_folder": (lambda f: ties_recipe(f, base_model="/nonexistent/base"),
                             "/nonexistent/base: model folder not found"),
    "missing_weight": (lambda f: {**ties_recipe(f), "models": [{"model": f["s0"]}]},
                       "parameters.weight: required by ties"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipe_is_refused_with_one_line_and_exit_code_2(case, families, tmp_path):
    make, message = BAD[case]
    result = merge(make(families["llama"]), tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_incompatible_sources_are_refused_naming_model_and_tensor(families, tmp_path):
    f = families["llama"]
    odd = tmp_path / "odd"
    shutil.copytree(f["s0"], odd)
    model = AutoModelForCausalLM.from_pretrained(odd)
    model.resize_token_embeddings(60)  # other embedding rows
    model.save_pretrained(odd)
    result = merge(ties_recipe(f, models=[{"model": str(odd), "parameters": {"weight": 1.0}}]), tmp_path)
    assert result.returncode == 2
    assert f"{odd}: tensor lm_head.weight has shape [60, 32], the base has [51, 32]" in result.stderr


def test_other_architecture_is_refused(families, tmp_path):
    f = families["llama"]
    bad = ties_recipe(f, models=[{"model": families["gpt2"]["s0"], "parameters": {"weight": 1.0}}])
    result = merge(bad, tmp_path)
    assert result.returncode == 2 and "architecture gpt2" in result.stderr


def test_other_vocabulary_is_refused(tmp_path, families):
    from mergesearch.demo.tokenizer import char_tokenizer

    f = families["llama"]
    other = tmp_path / "other-vocab"
    shutil.copytree(f["s0"], other)
    tok = char_tokenizer("0123456789abcdefghijklmnopqrstuvwxyZ +-=:>,.?!\n")  # 'z' -> 'Z'
    tok.save_pretrained(other)
    result = merge(ties_recipe(f, models=[{"model": str(other), "parameters": {"weight": 1.0}}]), tmp_path)
    assert result.returncode == 2 and "tokenizer vocabulary differs" in result.stderr


def test_corrupt_safetensors_is_refused_naming_the_file(tmp_path, families):
    f = families["llama"]
    broken = tmp_path / "broken"
    shutil.copytree(f["s1"], broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    result = merge(ties_recipe(f, models=[{"model": str(broken), "parameters": {"weight": 1.0}}]), tmp_path)
    assert result.returncode == 2
    assert str(broken / "model.safetensors") in result.stderr and "Traceback" not in result.stderr
