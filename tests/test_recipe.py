"""Recipes: identity, JSON round trip, mergekit YAML import (models: and slices:)."""

from __future__ import annotations

import pytest
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from mergesearch.merging import MergeEngine
from mergesearch.merging.architecture import layer_t
from mergesearch.merging.mergekit import from_mergekit, load_recipe, to_mergekit_yaml
from mergesearch.recipe import Recipe, RecipeError, evaluate_setting

FIXED = Recipe(method="ties", base_model="b", seed=3, parameters={"lambda": 0.9},
               models=[{"model": "x", "parameters": {"weight": 0.5, "density": [0.2, 0.8]}}])


# ---- identity -------------------------------------------------------------------------


def test_hash_is_stable_across_processes_and_versions():
    # a literal: a change here invalidates every stored study's recipe hashes
    assert FIXED.hash() == "5a345675f1faaf6d"


def test_hash_ignores_key_order():
    same = Recipe.model_validate({"seed": 3, "models": [{"parameters": {"density": [0.2, 0.8], "weight": 0.5},
                                                         "model": "x"}],
                                  "parameters": {"lambda": 0.9}, "base_model": "b", "method": "ties"})
    assert same.hash() == FIXED.hash()


@pytest.mark.parametrize("change", [
    {"seed": 4}, {"method": "dare_ties"}, {"base_model": "c"}, {"dtype": "bfloat16"},
    {"parameters": {"lambda": 0.91}}, {"parameters": {"lambda": 0.9, "normalize": False}},
    {"models": [{"model": "y", "parameters": {"weight": 0.5, "density": [0.2, 0.8]}}]},
    {"models": [{"model": "x", "parameters": {"weight": 0.5, "density": [0.8, 0.2]}}]},
    {"models": [{"model": "x", "parameters": {"weight": 0.5, "density": [0.2, 0.8]}}, {"model": "z"}]},
], ids=lambda c: "-".join(c))
def test_hash_sees_any_change(change):
    changed = Recipe.model_validate({**FIXED.model_dump(), **change})
    assert changed != FIXED and changed.hash() != FIXED.hash()


def test_json_round_trip(tmp_path):
    FIXED.save(tmp_path / "r.json")
    assert load_recipe(tmp_path / "r.json") == FIXED
    assert load_recipe(tmp_path / "r.json").hash() == FIXED.hash()


def test_json_round_trip_keeps_filters_and_gradients(tmp_path):
    r = Recipe(method="slerp", base_model="b", models=[{"model": "b"}, {"model": "x"}],
               parameters={"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]})
    r.save(tmp_path / "r.json")
    assert load_recipe(tmp_path / "r.json") == r


# ---- parameter values -----------------------------------------------------------------


def test_gradient_interpolates_like_mergekit():
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)
    assert evaluate_setting([0.2, 0.4, 0.6, 0.8], "x", 1 / 3) == pytest.approx(0.4)  # one value per layer


def test_layers_sit_at_i_over_l_minus_one_and_other_tensors_at_zero():
    assert [layer_t(i, 4) for i in range(4)] == [0, 1 / 3, 2 / 3, 1]
    assert layer_t(None, 4) == 0.0


def test_filters_pick_the_first_matching_condition():
    value = Recipe.model_validate({"method": "linear", "models": [{"model": "x", "parameters": {
        "weight": [{"filter": "mlp", "value": 1.0}, {"value": 2.0}]}}]}).models[0].parameters["weight"]
    assert evaluate_setting(value, "model.layers.0.mlp.up_proj.weight", 0) == 1.0
    assert evaluate_setting(value, "model.layers.0.self_attn.q_proj.weight", 0) == 2.0


# ---- mergekit YAML: models: -----------------------------------------------------------


def test_mergekit_models_form_with_parameters_at_every_level():
    r = from_mergekit("""
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
    assert r.method == "dare_ties" and r.base_model == "base" and r.dtype == "bfloat16"
    assert r.parameters == {"density": 0.5, "int8_mask": True}
    assert r.models[0].parameters == {"weight": [0.1, 0.9]}
    assert r.models[1].parameters == {"weight": 0.3, "density": 0.7}


def test_mergekit_scientific_notation_is_a_number():
    # YAML 1.1 reads 1e-8 as a string; mergekit takes the number
    r = from_mergekit("merge_method: multislerp\nparameters: {eps: 1e-8}\n"
                             "models: [{model: a, parameters: {weight: [1e-1, 2E+0]}}, {model: b}]\n")
    assert r.parameters["eps"] == 1e-8 and r.models[0].parameters["weight"] == [0.1, 2.0]


def test_mergekit_export_and_import_round_trip():
    typed = FIXED.model_copy(update={"dtype": "bfloat16"})
    assert from_mergekit(to_mergekit_yaml(typed)) == typed.model_copy(update={"seed": 0})


def test_mergekit_export_without_a_model_dtype_writes_float32():
    # our arithmetic is float32; told nothing else, mergekit writes what it computed in
    back = from_mergekit(to_mergekit_yaml(FIXED))
    assert back == FIXED.model_copy(update={"seed": 0, "dtype": "float32"})


# ---- mergekit YAML: slices: -----------------------------------------------------------


def src(model: str, a: int, b: int, **params) -> dict:
    return {"model": model, "layer_range": [a, b], **({"parameters": params} if params else {})}


def test_single_slice_is_the_models_form():
    r = from_mergekit({"merge_method": "ties", "base_model": "b", "parameters": {"lambda": 0.5},
                              "slices": [{"sources": [src("x", 0, 4, weight=[0.1, 0.9]), src("b", 0, 4)],
                                          "parameters": {"density": 0.3}}]})
    models_form = from_mergekit({
        "merge_method": "ties", "base_model": "b", "parameters": {"lambda": 0.5, "density": 0.3},
        "models": [{"model": "x", "parameters": {"weight": [0.1, 0.9]}}, {"model": "b"}]})
    # the same recipe, plus the range the model's layer count is checked against
    assert r.slice_ranges == [(0, 4)]
    assert r.model_copy(update={"slice_ranges": None}) == models_form


def test_single_slice_filters_fall_back_to_top_level_parameters():
    # mergekit reads the slice's parameters first, then the top-level ones
    r = from_mergekit({"merge_method": "ties", "base_model": "b",
                              "parameters": {"density": 0.3},
                              "slices": [{"sources": [src("x", 0, 4, weight=1.0), src("b", 0, 4)],
                                          "parameters": {"density": {"filter": "mlp", "value": 0.8}}}]})
    assert evaluate_setting(r.parameters["density"], "model.layers.1.mlp.up_proj.weight", 0.5) == 0.8
    assert evaluate_setting(r.parameters["density"], "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.3


def test_several_slices_become_one_value_per_layer():
    r = from_mergekit({"merge_method": "task_arithmetic", "base_model": "b", "slices": [
        {"sources": [src("x", 0, 3, weight=[0.0, 1.0]), src("b", 0, 3)]},
        {"sources": [src("x", 3, 4, weight=[0.0, 1.0]), src("b", 3, 4)]}]})
    # slice 1 at t = 0, 0.5, 1; slice 2 has one layer, at t = 1 (as mergekit plans it);
    # the embeddings come from slice 1 at t = 0, the final norm and head from slice 2 at t = 0
    weight = r.models[0].parameters["weight"]
    layers = [evaluate_setting(weight, f"model.layers.{i}.mlp.up_proj.weight", layer_t(i, 4)) for i in range(4)]
    assert layers == [0.0, 0.5, 1.0, 1.0]
    assert evaluate_setting(weight, "model.embed_tokens.weight", 0.0) == 0.0
    assert evaluate_setting(weight, "lm_head.weight", 0.0) == 0.0


LLAMA_SLICES = {
    # per-source gradients that differ per slice; slice-level and top-level fallbacks
    "gradients_per_slice": ("task_arithmetic", {}, [
        ({"lambda": 1.0}, {"s0": {"weight": [0.1, 0.9]}, "s1": {"weight": 0.5}}),
        ({}, {"s0": {"weight": 0.3}, "s1": {"weight": [1.0, 0.0]}})], [(0, 2), (2, 4)]),
    # parameters at every level: top-level, slice-level, per source; a one-layer slice
    "every_level": ("ties", {"density": 0.5, "weight": 0.3}, [
        ({"density": [0.2, 0.8]}, {"s0": {"weight": 0.9}, "s1": {}}),
        ({}, {"s0": {}, "s1": {"density": [0.9, 0.1]}})], [(0, 1), (1, 4)]),
    # a top-level gradient is evaluated at each slice's own t
    "top_level_gradient": ("task_arithmetic", {"weight": [0.0, 1.0]}, [
        ({}, {"s0": {}, "s1": {}}), ({}, {"s0": {}, "s1": {"weight": 0.2}})], [(0, 2), (2, 4)]),
    # each slice with its own filters: neither catch-all may hide the other's filter
    "different_filters": ("task_arithmetic", {}, [
        ({}, {"s0": {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.1}]}, "s1": {"weight": 0.5}}),
        ({}, {"s0": {"weight": [{"filter": "self_attn", "value": [0.2, 0.7]}, {"value": 0.4}]},
              "s1": {"weight": 0.5}})], [(0, 2), (2, 4)]),
    # one filter inside another (self_attn contains attn)
    "nested_filters": ("task_arithmetic", {}, [
        ({}, {"s0": {"weight": [{"filter": "attn", "value": 0.9}, {"value": 0.1}]}, "s1": {"weight": 0.5}}),
        ({}, {"s0": {"weight": [{"filter": "self_attn", "value": 0.2}, {"value": 0.4}]},
              "s1": {"weight": 0.5}})], [(0, 2), (2, 4)]),
    # filters, and a last slice whose catch-all (final norm, lm_head) differs from the first's
    "filters_and_head": ("breadcrumbs_ties", {"density": 0.8}, [
        ({"gamma": 0.1}, {"s0": {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.1}]}, "s1": {"weight": 1.0}}),
        ({}, {"s0": {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.8}]}, "s1": {"weight": 0.6}})],
        [(0, 3), (3, 4)]),
}


@pytest.mark.parametrize("case", list(LLAMA_SLICES))
def test_mergekit_slices_form_matches_mergekit_tensors(case, families, tmp_path):
    f = families["llama"]  # 4 layers
    method, top, slices, ranges = LLAMA_SLICES[case]
    config = {"merge_method": method, "base_model": f["base"], "dtype": "float32", "parameters": top,
              "slices": [{"parameters": sp, "sources": [src(f[m], a, b, **p) for m, p in per.items()]
                          + [src(f["base"], a, b)]}
                         for (sp, per), (a, b) in zip(slices, ranges)]}
    recipe = from_mergekit(config)
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mk"),
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    theirs = load_file(tmp_path / "mk" / "model.safetensors")
    ours = dict(MergeEngine(f["base"], [f["s0"], f["s1"]], device="cpu").merged_tensors(recipe))
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, atol=1e-6), name


def test_depth_changing_frankenmerge_is_refused():
    with pytest.raises(RecipeError, match=r"slices\[1\]\.layer_range \[1, 4\].*depth-changing frankenmerge"):
        from_mergekit({"merge_method": "passthrough", "slices": [
            {"sources": [src("a", 0, 2)]}, {"sources": [src("a", 1, 4)]}]})


def test_slices_out_of_order_are_refused():
    with pytest.raises(RecipeError, match="depth-changing frankenmerge"):
        from_mergekit({"merge_method": "passthrough", "slices": [
            {"sources": [src("a", 2, 4)]}, {"sources": [src("a", 0, 2)]}]})


def test_slices_taking_layers_from_other_positions_are_refused():
    with pytest.raises(RecipeError, match=r"slices\[0\] takes different layer ranges"):
        from_mergekit({"merge_method": "linear", "slices": [{"sources": [
            src("a", 0, 2), src("b", 2, 4)]}]})


def test_slices_with_different_models_are_refused():
    with pytest.raises(RecipeError, match=r"slices\[1\] uses different models"):
        from_mergekit({"merge_method": "linear", "slices": [
            {"sources": [src("a", 0, 2, weight=1.0), src("b", 0, 2, weight=1.0)]},
            {"sources": [src("a", 2, 4, weight=1.0), src("c", 2, 4, weight=1.0)]}]})


def test_a_required_parameter_missing_in_one_slice_is_refused():
    with pytest.raises(RecipeError, match="'weight' is missing in some slices"):
        from_mergekit({"merge_method": "linear", "slices": [
            {"sources": [src("a", 0, 2, weight=1.0), src("b", 0, 2, weight=1.0)]},
            {"sources": [src("a", 2, 4), src("b", 2, 4, weight=1.0)]}]})


# ---- refusals -------------------------------------------------------------------------


def test_load_refuses_a_file_that_is_not_a_mapping(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="r.yaml: expected a mapping"):
        load_recipe(f)


def test_load_refuses_invalid_yaml_in_one_line_naming_the_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("merge_method: ties\nmodels: [a, b\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    assert str(e.value).startswith(f"{f}: YAML syntax error at line 3")
    assert "\n" not in str(e.value)


def test_load_refuses_a_missing_file_naming_it(tmp_path):
    with pytest.raises(RecipeError, match="nope.json: cannot read recipe"):
        load_recipe(tmp_path / "nope.json")


def test_load_refuses_an_unknown_field_naming_it(tmp_path):
    f = tmp_path / "r.json"
    f.write_text('{"method": "ties", "models": [{"model": "x", "wieght": 1}]}')
    with pytest.raises(RecipeError, match=r"r.json: models.0.wieght"):
        load_recipe(f)


def test_mergekit_unknown_key_and_modules_are_refused():
    with pytest.raises(RecipeError, match="unknown key 'modelz'"):
        from_mergekit({"merge_method": "linear", "modelz": []})
    with pytest.raises(RecipeError, match="modules: configs are not supported"):
        from_mergekit({"merge_method": "linear", "modules": {}})
    with pytest.raises(RecipeError, match="merge_method is missing"):
        from_mergekit({"models": [{"model": "a"}]})
