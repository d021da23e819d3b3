"""Fisher-weighted averaging (arXiv:2111.09832): the merge against the paper's formula on
hand-computed cases, the diagonal Fisher against per-example gradients taken directly
with autograd, the on-disk cache, calibration data, and a search that uses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.studies import write_config
from transformers import AutoModelForCausalLM

from mergesearch.config import load_config
from mergesearch.merging import MergeEngine, MergeInputs, get_method
from mergesearch.merging.fisher_info import cached_fisher, diagonal_fisher, load_fisher
from mergesearch.merging.mergekit import to_mergekit_yaml
from mergesearch.recipe import Recipe, RecipeError
from mergesearch.search import Runner
from mergesearch.search.calibration import calibration_texts

fisher_merge = get_method("fisher").fn


def inputs(models, fisher) -> MergeInputs:
    models, fisher = torch.tensor(models), torch.tensor(fisher)
    return MergeInputs(name="t", base=None, models=models, fisher=fisher,
                       fisher_mean=fisher.flatten(1).mean(1))


def test_each_entry_is_the_fisher_weighted_mean_of_the_models():
    # entry 0: (1*3*1 + 1*1*5) / (3 + 1) = 2;  entry 1: (0*3 + 2*-1) / (0 + 2) = -1
    out = fisher_merge(inputs([[1.0, 3.0], [5.0, -1.0]], [[3.0, 0.0], [1.0, 2.0]]),
                       weight=[1.0, 1.0], fisher_floor=0.0, normalize_fisher=False)
    assert out.tolist() == [2.0, -1.0]


def test_model_weights_multiply_the_fisher():
    # entry 0: (2*3*1 + 1*1*5) / (2*3 + 1*1) = 11/7;  entry 1: (0 + 1*2*-1) / 2 = -1
    out = fisher_merge(inputs([[1.0, 3.0], [5.0, -1.0]], [[3.0, 0.0], [1.0, 2.0]]),
                       weight=[2.0, 1.0], fisher_floor=0.0, normalize_fisher=False)
    assert out.tolist() == pytest.approx([11 / 7, -1.0])


def test_floor_gives_entries_without_information_the_weighted_average():
    # entry 1 with floor 1: ((0+1)*3 + (2+1)*-1) / (1 + 3) = 0;  both Fisher 0 at entry 0:
    # the floor alone weighs them, (1*1 + 1*5) / 2 = 3
    out = fisher_merge(inputs([[1.0, 3.0], [5.0, -1.0]], [[0.0, 0.0], [0.0, 2.0]]),
                       weight=[1.0, 1.0], fisher_floor=1.0, normalize_fisher=False)
    assert out.tolist() == [3.0, 0.0]


def test_normalized_fisher_ignores_a_models_overall_scale():
    models, fisher = [[1.0, 3.0], [5.0, -1.0]], [[3.0, 1.0], [1.0, 2.0]]
    ref = fisher_merge(inputs(models, fisher), weight=[1.0, 1.0], fisher_floor=0.0, normalize_fisher=True)
    scaled = fisher_merge(inputs(models, [[300.0, 100.0], [1.0, 2.0]]), weight=[1.0, 1.0],
                          fisher_floor=0.0, normalize_fisher=True)
    # means 2 and 1.5: F/mean = [1.5, .5] and [2/3, 4/3] -> entry 0: (1.5*1 + 2/3*5)/(1.5 + 2/3)
    assert ref.tolist() == pytest.approx([(1.5 + 10 / 3) / (1.5 + 2 / 3), (0.5 * 3 - 4 / 3) / (0.5 + 4 / 3)])
    assert torch.allclose(ref, scaled)


def test_all_zero_weights_are_refused():
    with pytest.raises(ValueError, match="positive weight"):
        fisher_merge(inputs([[1.0], [2.0]], [[1.0], [1.0]]), weight=[0.0, 0.0], fisher_floor=1e-6,
                     normalize_fisher=False)


def per_example_fisher(path: str, examples: list[list[int]]) -> dict[str, torch.Tensor]:
    """The reference: torch.autograd.grad of each example's summed token log-likelihood,
    squared, averaged; on a freshly loaded model."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    named = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in named.items()}
    for ids in examples:
        x = torch.tensor([ids])
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1], -1)
        ll = sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1))
        for (n, _), g in zip(named.items(), torch.autograd.grad(ll, list(named.values()))):
            total[n] += g * g
    return {n: t / len(examples) for n, t in total.items()}


EXAMPLES = [[1, 5, 9, 2, 7], [3, 3, 8], [4, 6, 2, 2, 2, 9]]


def test_diagonal_fisher_is_the_mean_squared_per_example_gradient(families):
    path = families["llama"]["s0"]
    ours = diagonal_fisher(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), EXAMPLES)
    ref = per_example_fisher(path, EXAMPLES)
    assert set(ref) <= set(ours)
    for name, r in ref.items():
        torch.testing.assert_close(ours[name], r, rtol=1e-4, atol=1e-10)
    # and not the square of the mean gradient, which a single batched backward would give
    batched = per_example_fisher(path, [EXAMPLES[0]])
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(ours[name], batched[name])


def test_tied_parameters_get_one_fisher_under_each_name(families):
    model = AutoModelForCausalLM.from_pretrained(families["gpt2"]["base"], dtype=torch.float32)
    f = diagonal_fisher(model, EXAMPLES[:2])
    assert torch.equal(f["lm_head.weight"], f["transformer.wte.weight"])
    assert f["transformer.wte.weight"].sum() > 0


def test_fisher_is_cached_by_model_and_examples(families, tmp_path):
    path = families["llama"]["s1"]
    first = cached_fisher(path, EXAMPLES, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cached_fisher(path, EXAMPLES, tmp_path) == first and first.stat().st_mtime_ns == stamp
    other = cached_fisher(path, EXAMPLES[:2], tmp_path)
    assert other != first and len(list(tmp_path.glob("*.safetensors"))) == 2
    ref = per_example_fisher(path, EXAMPLES)
    torch.testing.assert_close(load_fisher(first)["model.embed_tokens.weight"],
                               ref["model.embed_tokens.weight"], rtol=1e-4, atol=1e-10)


def test_engine_merges_every_tensor_with_the_attached_fisher(families):
    f = families["llama"]
    tv = MergeEngine(f["base"], [f["s0"], f["s1"]], device="cpu")
    g = torch.Generator().manual_seed(0)
    fisher = {m: {n: torch.rand(tv.stacks[n].shape[1:], generator=g) for n in tv.names}
              for m in [f["s0"], f["s1"]]}
    tv.attach_fisher(fisher)
    recipe = Recipe(method="fisher", parameters={"fisher_floor": 0.0},
                    models=[{"model": f["s0"], "parameters": {"weight": 0.3}},
                            {"model": f["s1"], "parameters": {"weight": 0.7}}])
    for name, out in tv.merged_tensors(recipe):
        a, b = (tv.stacks[name][tv.row(m)].float() for m in (f["s0"], f["s1"]))
        fa, fb = 0.3 * fisher[f["s0"]][name], 0.7 * fisher[f["s1"]][name]
        torch.testing.assert_close(out, (fa * a + fb * b) / (fa + fb))


def test_fisher_recipe_without_fisher_is_refused_naming_the_method(families):
    f = families["llama"]
    tv = MergeEngine(f["base"], [f["s0"]], device="cpu")
    recipe = Recipe(method="fisher", models=[{"model": f["s0"], "parameters": {"weight": 1.0}}])
    with pytest.raises(RecipeError, match="method: fisher needs each model's Fisher"):
        next(tv.merged_tensors(recipe))


def test_mergekit_export_of_a_fisher_recipe_is_refused():
    recipe = Recipe(method="fisher", models=[{"model": "a", "parameters": {"weight": 1.0}},
                                             {"model": "b", "parameters": {"weight": 1.0}}])
    with pytest.raises(RecipeError, match="mergekit"):
        to_mergekit_yaml(recipe)


def test_calibration_uses_test_documents_the_objectives_do_not_score(tmp_path, demo_experts):
    config = load_config(write_config(tmp_path, n_trials=1, fisher={"examples": 4}))
    texts = calibration_texts(config)
    root = Path(__file__).resolve().parent.parent / "mergesearch" / "demo" / "tasks"
    add = [json.loads(line) for line in (root / "add_test.jsonl").read_text().splitlines()]
    sort = [json.loads(line) for line in (root / "sort_test.jsonl").read_text().splitlines()]
    # the objectives score the first 16 documents (limit: 16): documents 16, 17 are used,
    # prompt and correct answer, alternating between the objectives
    assert texts == [add[16]["context"] + add[16]["choices"][add[16]["label"]],
                     sort[16]["context"] + sort[16]["choices"][sort[16]["label"]],
                     add[17]["context"] + add[17]["choices"][add[17]["label"]],
                     sort[17]["context"] + sort[17]["choices"][sort[17]["label"]]]


def test_calibration_dataset_when_given(tmp_path, demo_experts):
    data = tmp_path / "calib.jsonl"
    data.write_text('{"text": "12+3=15"}\n{"text": "abc"}\n{"text": "9+9=18"}\n')
    config = load_config(write_config(tmp_path, n_trials=1, fisher={
        "dataset": {"path": "json", "data_files": str(data)}, "examples": 2}))
    assert calibration_texts(config) == ["12+3=15", "abc"]


def test_search_over_fisher_computes_each_models_fisher_once_beside_the_run(tmp_path, demo_experts, ray_session):
    config = load_config(write_config(tmp_path, n_trials=4, space={"methods": ["fisher"]},
                                      fisher={"examples": 8, "seq_len": 32}))
    study = Runner(config).run()
    files = sorted((config.run_dir / "fisher").glob("*.safetensors"))
    assert len(files) == 4  # the base and the three experts
    completed = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(completed) == 4
    assert all(t.user_attrs["recipe"]["method"] == "fisher" for t in completed)
    assert {len(t.user_attrs["recipe"]["models"]) for t in completed} == {4}  # base among them
    stamps = [f.stat().st_mtime_ns for f in files]
    Runner(load_config(write_config(tmp_path, n_trials=6, space={"methods": ["fisher"]},
                                    fisher={"examples": 8, "seq_len": 32}))).run()
    assert [f.stat().st_mtime_ns for f in files] == stamps  # resumed: read from the cache


def test_fisher_beside_bf16_weights_is_kept_in_bf16_and_merges_with_those_values(families, tmp_path):
    paths = {}
    for key in ("base", "s0", "s1"):
        paths[key] = str(tmp_path / key)
        AutoModelForCausalLM.from_pretrained(families["llama"][key], dtype=torch.bfloat16).save_pretrained(paths[key])
    tv = MergeEngine(paths["base"], [paths["s0"], paths["s1"]], device="cpu")
    g = torch.Generator().manual_seed(1)
    fisher = {paths[k]: {n: torch.rand(tv.stacks[n].shape[1:], generator=g) * 1e-9 for n in tv.names}
              for k in ("s0", "s1")}
    tv.attach_fisher(fisher)
    name = "model.layers.1.mlp.down_proj.weight"
    assert tv.fisher[name].dtype == torch.bfloat16
    recipe = Recipe(method="fisher", parameters={"fisher_floor": 0.0},
                    models=[{"model": paths["s0"], "parameters": {"weight": 1.0}},
                            {"model": paths["s1"], "parameters": {"weight": 1.0}}])
    out = dict(tv.merged_tensors(recipe))[name]
    fa, fb = (fisher[paths[k]][name].bfloat16().float() for k in ("s0", "s1"))  # tiny values survive
    a, b = (tv.stacks[name][tv.row(paths[k])].float() for k in ("s0", "s1"))
    assert fa.min() > 0
    torch.testing.assert_close(out, (fa * a + fb * b) / (fa + fb))
