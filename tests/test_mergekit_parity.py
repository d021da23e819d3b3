"""Our tensors against mergekit 0.1.5's, on tiny models built here (untied Llama, tied GPT-2)."""

from __future__ import annotations

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from mergesearch.merging import TaskVectors
from mergesearch.recipe import Recipe

ARCHS = ["llama", "gpt2"]
ATTN_MLP = [{"filter": "attn", "value": [0.2, 0.9]}, {"filter": "mlp", "value": 0.6}, {"value": 0.4}]


def cases(f: dict, num_layers: int) -> dict[str, dict]:
    per_layer = [round(0.2 + 0.15 * i, 2) for i in range(num_layers)]
    srcs = [f["s0"], f["s1"], f["s2"]]
    return {
        "linear": {"models": [{"model": f["s0"], "parameters": {"weight": 0.5}},
                              {"model": f["s1"], "parameters": {"weight": [0.1, 0.7]}},
                              {"model": f["base"], "parameters": {"weight": 0.3}}]},
        "task_arithmetic": {"base_model": f["base"], "parameters": {"lambda": 0.8},
                            "models": [{"model": s, "parameters": {"weight": ATTN_MLP}} for s in srcs]},
        "ties": {"base_model": f["base"], "parameters": {"density": per_layer},
                 "models": [{"model": s, "parameters": {"weight": 0.3 + 0.2 * i}} for i, s in enumerate(srcs)]},
        "breadcrumbs": {"base_model": f["base"], "models": [
            {"model": s, "parameters": {"weight": 0.5, "density": 0.7, "gamma": 0.05}} for s in srcs]},
        "breadcrumbs_ties": {"base_model": f["base"], "parameters": {"density": ATTN_MLP, "gamma": 0.02},
                             "models": [{"model": s, "parameters": {"weight": 0.5}} for s in srcs]},
        "sce": {"base_model": f["base"], "parameters": {"select_topk": 0.5}, "models": [{"model": s} for s in srcs]},
        "slerp": {"base_model": f["base"], "parameters": {"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.5}]},
                  "models": [{"model": f["base"]}, {"model": f["s0"]}]},
        "nuslerp": {"base_model": f["base"], "models": [{"model": f["s0"], "parameters": {"weight": 0.3}},
                                                          {"model": f["s1"], "parameters": {"weight": 0.7}}]},
        "nuslerp_rows_nobase": {"parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                                "models": [{"model": f["s0"], "parameters": {"weight": 0.3}},
                                           {"model": f["s1"], "parameters": {"weight": 0.7}}]},
        "multislerp": {"base_model": f["base"],
                       "models": [{"model": s, "parameters": {"weight": 0.2 + 0.3 * i}} for i, s in enumerate(srcs)]},
        "model_stock": {"base_model": f["base"], "models": [{"model": s} for s in srcs]},
        "model_stock_filterwise": {"base_model": f["base"], "parameters": {"filter_wise": True},
                                   "models": [{"model": s} for s in srcs]},
        "passthrough": {"models": [{"model": f["s1"], "parameters": {"scale": 0.5}}]},
    }


def mergekit_tensors(config: dict, out) -> dict[str, torch.Tensor]:
    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    return tensors


@pytest.fixture(scope="module", params=ARCHS)
def family(request, families):
    f = families[request.param]
    return f, TaskVectors(f["base"], [f["s0"], f["s1"], f["s2"]], device="cpu")


@pytest.mark.parametrize("case", list(cases({k: k for k in ("base", "s0", "s1", "s2")}, 4)))
def test_method_matches_mergekit(case, family, tmp_path):
    f, tv = family
    spec = cases(f, tv.num_layers)[case]
    config = {"merge_method": case.split("_nobase")[0].split("_rows")[0].removesuffix("_filterwise"),
              "dtype": "float32", **spec}
    ours = dict(tv.merged_tensors(Recipe.from_mergekit(config)))
    theirs = mergekit_tensors(config, tmp_path / "mk")
    assert set(theirs) <= set(ours)
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor.float(), atol=1e-6), name


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "slerp"])
def test_exported_mergekit_yaml_gives_our_tensors(method, family, tmp_path):
    f, tv = family
    recipe = Recipe.from_mergekit({"merge_method": method, **cases(f, tv.num_layers)[method]})
    config = yaml.safe_load(recipe.to_mergekit_yaml())
    theirs = mergekit_tensors({**config, "dtype": "float32"}, tmp_path / "mk")
    ours = dict(tv.merged_tensors(recipe))
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor.float(), atol=1e-6), name


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_methods_export_the_same_method_and_parameters(method, families):
    f = families["llama"]
    recipe = Recipe(method=method, base_model=f["base"], seed=3, models=[
        {"model": f["s0"], "parameters": {"weight": 0.5, "density": 0.6, "epsilon": 0.1}},
        {"model": f["s1"], "parameters": {"weight": [0.2, 0.8], "density": 0.5}}])
    parsed = MergeConfiguration.model_validate(yaml.safe_load(recipe.to_mergekit_yaml()))
    assert parsed.merge_method == method
    assert parsed.models[0].parameters["epsilon"] == 0.1
    assert parsed.models[1].parameters["weight"] == [0.2, 0.8]


def test_random_methods_are_bit_identical_across_runs_and_load_order(families):
    f = families["llama"]
    recipe = Recipe(method="dare_ties", base_model=f["base"], seed=11, models=[
        {"model": f["s0"], "parameters": {"weight": 0.5, "density": 0.4}},
        {"model": f["s2"], "parameters": {"weight": 0.5, "density": 0.7}}])
    a = dict(TaskVectors(f["base"], [f["s0"], f["s1"], f["s2"]], device="cpu").merged_tensors(recipe))
    tv = TaskVectors(f["base"], [f["s2"], f["s0"]], device="cpu", cache_random=False)
    tv.names.reverse()  # tensors processed in the opposite order
    b = dict(tv.merged_tensors(recipe))
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = dict(tv.merged_tensors(recipe.model_copy(update={"seed": 12})))
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], other["model.layers.0.mlp.up_proj.weight"])
