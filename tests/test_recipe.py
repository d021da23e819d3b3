"""Recipes: identity, JSON round trip, mergekit YAML import (models: and slices:)."""

from __future__ import annotations

import pytest
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from mergesearch.merging import TaskVectors
from mergesearch.recipe import Recipe, RecipeError, evaluate

FIXED = Recipe(method="ties", base_model="b", seed=3, parameters={"lambda": 0.9},
               models=[{"model": "x", "parameters": {"weight": 0.5, "density": [0.2, 0.8]}}])


def test_hash_is_stable_across_processes_and_versions():
    assert FIXED.hash() == "5a345675f1faaf6d"


def test_hash_ignores_key_order_and_sees_any_change():
    same = Recipe.model_validate({"seed": 3, "models": [{"parameters": {"density": [0.2, 0.8], "weight": 0.5},
                                                         "model": "x"}],
                                  "parameters": {"lambda": 0.9}, "base_model": "b", "method": "ties"})
    assert same.hash() == FIXED.hash()
    assert FIXED.model_copy(update={"seed": 4}).hash() != FIXED.hash()


def test_json_round_trip(tmp_path):
    FIXED.save(tmp_path / "r.json")
    assert Recipe.load(tmp_path / "r.json") == FIXED


def test_gradient_interpolates_like_mergekit():
    assert evaluate([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)
    assert evaluate([0.2, 0.4, 0.6, 0.8], "x", 1 / 3) == pytest.approx(0.4)  # one value per layer


def test_filters_pick_the_first_matching_condition():
    value = Recipe.model_validate({"method": "linear", "models": [{"model": "x", "parameters": {
        "weight": [{"filter": "mlp", "value": 1.0}, {"value": 2.0}]}}]}).models[0].parameters["weight"]
    assert evaluate(value, "model.layers.0.mlp.up_proj.weight", 0) == 1.0
    assert evaluate(value, "model.layers.0.self_attn.q_proj.weight", 0) == 2.0


def test_mergekit_models_form_with_parameters_at_every_level():
    r = Recipe.from_mergekit("""
merge_method: dare_ties
base_model: base
parameters: {density: 0.5, int8_mask: true}
models:
  - model: a
    parameters: {weight: [0.1, 0.9]}
  - model: b
    parameters: {weight: 0.3, density: 0.7}
dtype: bfloat16
""")
    assert r.method == "dare_ties" and r.dtype == "bfloat16"
    assert r.parameters == {"density": 0.5, "int8_mask": True}
    assert r.models[1].parameters == {"weight": 0.3, "density": 0.7}


def test_mergekit_slices_form_matches_mergekit_tensors(families, tmp_path):
    f = families["llama"]  # 4 layers
    config = {
        "merge_method": "task_arithmetic", "base_model": f["base"], "dtype": "float32",
        "slices": [
            {"sources": [{"model": f["s0"], "layer_range": [0, 2], "parameters": {"weight": [0.1, 0.9]}},
                         {"model": f["s1"], "layer_range": [0, 2], "parameters": {"weight": 0.5}},
                         {"model": f["base"], "layer_range": [0, 2]}],
             "parameters": {"lambda": 1.0}},
            {"sources": [{"model": f["s0"], "layer_range": [2, 4], "parameters": {"weight": 0.3}},
                         {"model": f["s1"], "layer_range": [2, 4], "parameters": {"weight": [1.0, 0.0]}},
                         {"model": f["base"], "layer_range": [2, 4]}]},
        ],
    }
    recipe = Recipe.from_mergekit(config)
    weight = recipe.models[0].parameters["weight"]
    assert weight[-1].value == [0.1, 0.9, 0.3, 0.3]  # one value per layer
    assert evaluate(weight, "lm_head.weight", 0.0) == 0.3  # the last slice's, as in mergekit
    assert evaluate(weight, "model.embed_tokens.weight", 0.0) == 0.1  # the first slice's
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mk"),
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    theirs = load_file(tmp_path / "mk" / "model.safetensors")
    ours = dict(TaskVectors(f["base"], [f["s0"], f["s1"]], device="cpu").merged_tensors(recipe))
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, atol=1e-6), name


def test_depth_changing_frankenmerge_is_refused():
    with pytest.raises(RecipeError, match="depth-changing frankenmerge"):
        Recipe.from_mergekit({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 2]}]},
            {"sources": [{"model": "a", "layer_range": [1, 4]}]}]})


def test_slices_taking_layers_from_other_positions_are_refused():
    with pytest.raises(RecipeError, match="different layer ranges"):
        Recipe.from_mergekit({"merge_method": "linear", "slices": [{"sources": [
            {"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [2, 4]}]}]})


def test_load_refuses_a_file_that_is_not_a_mapping(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="r.yaml: expected a mapping"):
        Recipe.load(f)
