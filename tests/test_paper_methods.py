"""The methods from papers that mergekit 0.1.5 lacks (PCB, consensus/TALL masks, layer
swapping) and the LiNeS layer schedule: each against its paper's formula on small cases
worked out by hand in the comments, their reproducibility, their search dimensions, and
their refusal of a mergekit export mergekit could not run.

References, where the numbers follow public code rather than the paper alone:
PCB: the authors' duguodong7/pcb-merging ``pcb-merging.py`` (FusionBench has no PCB);
consensus: nik-dim/tall_masks and FusionBench ``method/tall_mask/utils.py``;
LiNeS: wang-kee/LiNeS ``LiNeS_scaling``; layer swapping: the paper (no reference code).
"""

from __future__ import annotations

import json
import math

import optuna
import pytest
import torch
import yaml
from optuna.distributions import FloatDistribution, IntDistribution
from safetensors.torch import load_file
from support.methods import close, run
from support.recipes import assert_same_tensors, mergekit_tensors
from typer.testing import CliRunner

from mergesearch.cli import app
from mergesearch.config import Space
from mergesearch.merging import MergeEngine, MergeInputs, get_method, validate_recipe
from mergesearch.merging.architecture import layer_t
from mergesearch.merging.lines import lines_scale
from mergesearch.merging.mergekit import to_mergekit_yaml
from mergesearch.merging.methods.layer_swap import outer_share
from mergesearch.recipe import Recipe, RecipeError
from mergesearch.spaces import SearchSpace

NEW_METHODS = ["pcb", "consensus_ta", "consensus_ties", "layer_swap"]
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def llama(families):
    f = families["llama"]  # 4 layers, untied embeddings
    return f, MergeEngine(f["base"], [f["s0"], f["s1"], f["s2"]], device="cpu")


def merged(tv: MergeEngine, recipe: Recipe) -> dict[str, torch.Tensor]:
    return dict(tv.merged_tensors(recipe))


def source(tv: MergeEngine, name: str, model: str) -> torch.Tensor:
    return tv.stacks[name][tv.row(model)].float()


def changed(recipe: Recipe, **update) -> Recipe:
    """The recipe with fields replaced, validated (model_copy would skip validation)."""
    return Recipe.model_validate({**recipe.model_dump(), **update})


def ta_recipe(f: dict, method: str = "task_arithmetic", **fields) -> Recipe:
    params = {"density": 0.6} if method == "ties" else {}
    return Recipe(method=method, base_model=f["base"], parameters={"lambda": 0.8, **params},
                  models=[{"model": f["s0"], "parameters": {"weight": 0.7}},
                          {"model": f["s1"], "parameters": {"weight": 0.4}}], **fields)


# ---- PCB ------------------------------------------------------------------------------


def test_pcb_balances_intra_and_inter_scores_and_averages_by_them():
    # tau1 = [2, 1, 0], tau2 = [2, 3, 1] (clip 0, density 1, weights 1, lambda 1); n = 2
    # inter = tanh(tau_i * (tau1 + tau2)) = tanh(tau_i * [4, 4, 1]):
    #   inter1 = [t8, t4, 0], inter2 = [t8, t12, t1]
    # intra = exp(2 * minmax(|tau_i|)^2): minmax |tau1| = [1, .5, 0] -> [e^2, e^.5, 1];
    #   minmax |tau2| = [.5, 1, 0] -> [e^.5, e^2, 1]
    # scores s1 = [e^2 t8, e^.5 t4, 0], s2 = [e^.5 t8, e^2 t12, t1]
    # beta = minmax(s): beta1 = [1, b, 0] with b = e^-1.5 t4 / t8; beta2 = [c, 1, 0]
    # entry 0: (2 + 2c) / (1 + c) = 2; entry 1: (1 * b + 3 * 1) / (b + 1);
    # entry 2: each task's lowest score gets beta 0 -> 0 / max(0, 1e-12) = 0
    b = math.exp(-1.5) * math.tanh(4) / math.tanh(8)
    out = run("pcb", [0, 0, 0], [[2, 1, 0], [2, 3, 1]], clip=0.0, density=1.0)
    assert close(out, [2, (b + 3) / (b + 1), 0])  # [2, 2.635349, 0]


def test_pcb_weights_scale_each_task_vector_and_lambda_the_merge():
    # as above with w = [1, 0.5], lambda 2: entry 1 = 2 * (1 * 1 * b + 0.5 * 3 * 1) / (b + 1);
    # entry 0 = 2 * (2 + 0.5 * 2 c) / (1 + c), c = (e^.5 t8 - t1) / (e^2 t12 - t1)
    b = math.exp(-1.5) * math.tanh(4) / math.tanh(8)
    t1 = math.tanh(1)
    c = (math.exp(0.5) * math.tanh(8) - t1) / (math.exp(2) * math.tanh(12) - t1)
    out = run("pcb", [0, 0, 0], [[2, 1, 0], [2, 3, 1]], clip=0.0, density=1.0,
              weight=[1.0, 0.5], **{"lambda": 2.0})
    assert close(out, [2 * (2 + c) / (1 + c), 2 * (b + 1.5) / (b + 1), 0])


def test_pcb_drops_the_scores_at_or_below_the_density_quantile():
    # one task vector [1, 2, 3, 4]: scores exp(minmax^2) * tanh(tau^2) rise with |tau|;
    # density 0.5: q = sorted scores[int(4 * 0.5)] = the 3rd; beta = [0, 0, 0, 1] -> [0,0,0,4]
    # density 0.75: q = sorted[int(4 * 0.25)] = the 2nd; entries 3 and 4 keep their value
    # (one task: beta / beta = 1), so 2 entries survive, not 3 (the authors' rule)
    assert close(run("pcb", [0, 0, 0, 0], [[1, 2, 3, 4]], clip=0.0, density=0.5), [0, 0, 0, 4])
    assert close(run("pcb", [0, 0, 0, 0], [[1, 2, 3, 4]], clip=0.0, density=0.75), [0, 0, 3, 4])


def test_pcb_clips_outliers_at_the_authors_quantile_index():
    # clip 1e-4 of d = 4: |tau| is clamped to [sorted[int(4e-4)], sorted[int(4 * 0.9999 - 1)]]
    # = [sorted[0], sorted[2]] = [1, 3], so 10 -> 3; density 1 still zeroes the lowest
    # score (entry 0): [0, 2, 3, 3]
    assert close(run("pcb", [0, 0, 0, 0], [[1, 2, 3, 10]], density=1.0), [0, 2, 3, 3])


def test_pcb_with_density_zero_is_the_base():
    assert close(run("pcb", [1, 1], [[2, 3], [0, 5]], density=0.0), [1, 1])


# ---- consensus (TALL masks) -----------------------------------------------------------


def test_consensus_ta_keeps_entries_active_in_at_least_k_tasks():
    # base 1; tau1 = [1, 0, 2, .1], tau2 = [1, 0, -1, 0], tau3 = [1, 3, 0, 0]; weights 1
    # tau_MTL = sum = [3, 3, 1, .1]; active: |tau_t| > 0.4 |tau_MTL - tau_t|
    #   entry 0: 1 > 0.8 in all three -> 3; entry 1: only tau3 (3 > 0) -> 1
    #   entry 2: tau1 2 > 0.4, tau2 1 > 0.8, tau3 0 > 0.4 no -> 2; entry 3: only tau1 -> 1
    # k = 2 keeps entries 0 and 2: lambda 0.5 * [3, 0, 1, 0] + 1 = [2.5, 1, 1.5, 1]
    out = run("consensus_ta", [1, 1, 1, 1], [[2, 1, 3, 1.1], [2, 1, 0, 1], [2, 4, 1, 1]],
              weight=1.0, **{"lambda": 0.5})
    assert close(out, [2.5, 1, 1.5, 1])


def test_consensus_ta_with_k_one_keeps_every_entry_some_task_claims():
    # same case, k = 1: every entry has a task -> plain task arithmetic 0.5 * [3, 3, 1, .1] + 1
    out = run("consensus_ta", [1, 1, 1, 1], [[2, 1, 3, 1.1], [2, 1, 0, 1], [2, 4, 1, 1]],
              weight=1.0, k=1, **{"lambda": 0.5})
    assert close(out, [2.5, 2.5, 1.5, 1.05])


def test_consensus_mask_is_strict_as_in_the_reference_code():
    # tau1 = tau2 = [1]: tau_MTL = 2, |tau_t| = 1 = 1.0 * |2 - 1|: not active (strict >),
    # so k = 1 drops the entry; mask_lambda 0.99 makes both active
    assert close(run("consensus_ta", [0], [[1], [1]], weight=1.0, mask_lambda=1.0, k=1), [0])
    assert close(run("consensus_ta", [0], [[1], [1]], weight=1.0, mask_lambda=0.99, k=1), [2])


def test_consensus_mask_lambda_is_per_task():
    # tau1 = [1], tau2 = [3]: tau_MTL = 4; tau1: 1 > l1 * 3, tau2: 3 > l2 * 1
    # l = [0.3, 0.3]: 1 > .9, 3 > .3, count 2, kept; l = [0.3, 3.0]: 3 > 3 no, count 1, dropped
    assert close(run("consensus_ta", [0], [[1], [3]], weight=1.0, mask_lambda=[0.3, 0.3]), [4])
    assert close(run("consensus_ta", [0], [[1], [3]], weight=1.0, mask_lambda=[0.3, 3.0]), [0])


def test_consensus_ties_masks_the_ties_merge():
    # tau1 = [2, -1, 1], tau2 = [2, 3, -.5], density 1: TIES elects +,+,+ and takes the
    # disjoint mean: tau_MTL = [2, 3, 1]. Active (0.4): tau1 [2>0, 1>1.6 no, 1>0] ,
    # tau2 [2>0, 3>0, .5>.6 no] -> counts [2, 1, 1]; k = 2 keeps entry 0 only
    out = run("consensus_ties", [0, 0, 0], [[2, -1, 1], [2, 3, -0.5]], weight=1.0, density=1.0)
    assert close(out, [2, 0, 0])
    out = run("consensus_ties", [0, 0, 0], [[2, -1, 1], [2, 3, -0.5]], weight=1.0, density=1.0, k=1)
    assert close(out, [2, 3, 1])


def test_consensus_with_k_zero_is_the_plain_method(llama):
    f, tv = llama
    plain = merged(tv, ta_recipe(f, "ties"))
    masked = ta_recipe(f, "ties")
    masked = changed(masked, method="consensus_ties", parameters={**masked.parameters, "k": 0})
    for name, tensor in merged(tv, masked).items():
        # equal up to rounding: lambda scales (merged - base) here, the delta sum in ties
        assert torch.allclose(tensor, plain[name], atol=1e-7), name


# ---- layer swapping -------------------------------------------------------------------


@pytest.mark.parametrize("n_bottom, n_top, transition, shares", [
    (1, 1, 0, [1, 0, 0, 1]),
    (1, 1, 1, [1, 0.5, 0.5, 1]),
    (2, 0, 1, [1, 1, 0.5, 0]),
    (1, 0, 2, [1, 2 / 3, 1 / 3, 0]),
    (0, 0, 2, [0, 0, 0, 0]),
    (3, 2, 0, [1, 1, 1, 1]),
])
def test_layer_swap_outer_share_per_layer_of_four(n_bottom, n_top, transition, shares):
    got = [outer_share(layer, 4, n_bottom, n_top, transition) for layer in range(4)]
    assert got == pytest.approx(shares)


def test_layer_swap_blends_the_two_experts_by_the_outer_share():
    # layer 1 of 4 with n_bottom 1, transition 1: share .5 -> the mean of [0, 4] and [2, 2]
    models = torch.tensor([[0.0, 4.0], [2.0, 2.0]])
    x = MergeInputs("model.layers.1.mlp.up_proj.weight", None, models, layer=1, num_layers=4)
    out = get_method("layer_swap").fn(x, n_bottom=1, n_top=0, transition=1, outer=0)
    assert close(out, [1, 3])


def test_layer_swap_picks_layers_embeddings_and_head_on_a_four_layer_model(llama):
    f, tv = llama
    recipe = Recipe(method="layer_swap", models=[{"model": f["s0"]}, {"model": f["s1"]}],
                    parameters={"n_bottom": 1, "n_top": 1, "transition": 1})
    out = merged(tv, recipe)
    outer, inner = f["s0"], f["s1"]
    for name, tensor in out.items():
        layer = tv.layers[name]
        if layer in (0, 3) or layer is None:  # the blocks; embeddings and head go with them
            assert torch.equal(tensor, source(tv, name, outer)), name
        else:  # one transition layer each side: the average
            mean = (source(tv, name, outer) + source(tv, name, inner)) / 2
            assert torch.allclose(tensor, mean, atol=1e-7), name


def test_layer_swap_outer_one_takes_the_edges_from_the_second_model(llama):
    f, tv = llama
    recipe = Recipe(method="layer_swap", models=[{"model": f["s0"]}, {"model": f["s1"]}],
                    parameters={"n_bottom": 2, "n_top": 0, "outer": 1})
    out = merged(tv, recipe)
    for name, tensor in out.items():
        layer = tv.layers[name]
        if "embed_tokens" in name or layer in (0, 1):
            want = f["s1"]
        else:  # layers 2, 3 and (no top block) the final norm and the head
            want = f["s0"]
        assert torch.equal(tensor, source(tv, name, want)), name


def test_layer_swap_refuses_more_layers_than_the_model_has(llama):
    f, tv = llama
    recipe = Recipe(method="layer_swap", models=[{"model": f["s0"]}, {"model": f["s1"]}],
                    parameters={"n_bottom": 5, "n_top": 0})
    with pytest.raises(RecipeError, match=r"parameters.n_bottom: 5 layers of a model with 4"):
        tv.check(recipe)


def test_a_fractional_value_for_a_whole_number_knob_is_refused():
    recipe = Recipe(method="layer_swap", models=[{"model": "a"}, {"model": "b"}],
                    parameters={"n_bottom": 1.5, "n_top": 0})
    with pytest.raises(RecipeError, match=r"parameters.n_bottom: expected a whole number, got 1.5"):
        validate_recipe(recipe, 4)


# ---- LiNeS ----------------------------------------------------------------------------


def test_lines_scale_rises_linearly_with_depth_and_is_alpha_outside_the_layers():
    # alpha .5, beta .3, L = 4: .5 + .3 * l / 3 = [.5, .6, .7, .8]; embeddings/head: .5
    assert [lines_scale(0.5, 0.3, layer, 4) for layer in range(4)] == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert lines_scale(0.5, 0.3, None, 4) == 0.5


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_lines_alpha_one_beta_zero_reproduces_the_plain_method_exactly(method, llama):
    f, tv = llama
    plain = merged(tv, ta_recipe(f, method))
    with_lines = merged(tv, ta_recipe(f, method, lines={"alpha": 1.0, "beta": 0.0}))
    for name, tensor in with_lines.items():
        assert torch.equal(tensor, plain[name]), name


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "pcb"])
def test_lines_scales_each_layers_merged_task_vector(method, llama):
    f, tv = llama
    recipe = ta_recipe(f, method) if method != "pcb" else Recipe(
        method="pcb", base_model=f["base"], models=[{"model": f["s0"]}, {"model": f["s1"]}])
    plain = merged(tv, recipe)
    scaled = merged(tv, changed(recipe, lines={"alpha": 0.5, "beta": 0.3}))
    for name, tensor in scaled.items():
        base = tv.stacks[name][0].float()
        s = 0.5 + 0.3 * layer_t(tv.layers[name], 4) if tv.layers[name] is not None else 0.5
        assert torch.allclose(tensor, base + s * (plain[name] - base), atol=1e-6), name


def test_lines_needs_a_base_model():
    recipe = Recipe(method="linear", models=[{"model": "a", "parameters": {"weight": 1}},
                                             {"model": "b", "parameters": {"weight": 1}}],
                    lines={"alpha": 0.5, "beta": 0.5})
    with pytest.raises(RecipeError, match="lines: LiNeS scales the merged task vector, and linear"):
        validate_recipe(recipe)


def test_lines_out_of_range_is_refused_naming_the_field():
    recipe = ta_recipe({"base": "b", "s0": "x", "s1": "y"}, lines={"alpha": -1.0})
    with pytest.raises(RecipeError, match=r"lines.alpha: -1.0 is outside its valid range"):
        validate_recipe(recipe)


def test_a_recipe_without_lines_keeps_its_hash_and_one_with_lines_differs():
    plain = ta_recipe({"base": "b", "s0": "x", "s1": "y"})
    assert "lines" not in plain.canonical_json()
    assert plain.hash() == Recipe.model_validate(json.loads(plain.canonical_json())).hash()
    assert changed(plain, lines={"alpha": 1.0, "beta": 0.0}).hash() != plain.hash()


# ---- mergekit export and `mergesearch merge` ------------------------------------------


@pytest.mark.parametrize("method", NEW_METHODS)
def test_mergekit_export_refuses_a_method_mergekit_lacks(method):
    recipe = Recipe(method=method, base_model=None if method == "layer_swap" else "b",
                    models=[{"model": "x"}, {"model": "y"}])
    with pytest.raises(RecipeError, match=f"method: mergekit 0.1.5 has no '{method}' merge method"):
        to_mergekit_yaml(recipe)


def test_mergekit_export_writes_lines_as_a_lambda_gradient():
    # lambda 0.8 * [alpha, alpha + beta] = [0.4, 0.6]; mergekit reads it at l / (L - 1)
    recipe = ta_recipe({"base": "b", "s0": "x", "s1": "y"}, "ties", lines={"alpha": 0.5, "beta": 0.25})
    params = yaml.safe_load(to_mergekit_yaml(recipe))["parameters"]
    assert params["lambda"] == pytest.approx([0.4, 0.6])


def test_mergekit_runs_the_exported_lines_recipe_to_our_tensors(llama, tmp_path):
    f, tv = llama
    recipe = ta_recipe(f, "ties", lines={"alpha": 0.5, "beta": 0.25})
    config = yaml.safe_load(to_mergekit_yaml(recipe))
    theirs = mergekit_tensors({**config, "dtype": "float32"}, tmp_path / "mk")
    assert_same_tensors(merged(tv, recipe), theirs)


@pytest.mark.parametrize("change", [{"method": "slerp", "parameters": {"t": 0.5}},
                                    {"parameters": {"lambda": [1.0, 2.0]}}],
                         ids=["no-lambda", "lambda-gradient"])
def test_mergekit_export_refuses_lines_it_cannot_express(change):
    recipe = ta_recipe({"base": "b", "s0": "x", "s1": "y"}, lines={"alpha": 0.5, "beta": 0.25})
    recipe = changed(recipe, **change)
    with pytest.raises(RecipeError, match="lines: mergekit cannot express LiNeS"):
        to_mergekit_yaml(recipe)


def test_merge_cli_merges_a_pcb_recipe_and_writes_no_mergekit_yaml(llama, tmp_path):
    f, tv = llama
    recipe = Recipe(method="pcb", base_model=f["base"], parameters={"density": 0.3},
                    models=[{"model": f["s0"]}, {"model": f["s1"]}, {"model": f["s2"]}],
                    lines={"alpha": 0.6, "beta": 0.4})
    recipe.save(tmp_path / "recipe.json")
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "recipe.json"), "--out",
                                      str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "recipe.json").exists()
    assert not (tmp_path / "out" / "mergekit.yaml").exists()
    written = load_file(tmp_path / "out" / "model.safetensors")
    for name, tensor in merged(tv, recipe).items():
        assert torch.allclose(written[name].float(), tensor, atol=1e-6), name


# ---- reproducibility ------------------------------------------------------------------


@pytest.mark.parametrize("method", NEW_METHODS)
def test_new_methods_are_bit_identical_across_engines_and_source_load_order(method, llama, families):
    f, tv = llama
    recipe = Recipe(method=method, base_model=None if method == "layer_swap" else f["base"],
                    models=[{"model": f["s0"]}, {"model": f["s1"]}],
                    parameters={"n_bottom": 1, "n_top": 1, "transition": 1}
                    if method == "layer_swap" else {"weight": 0.9},
                    lines=None if method == "layer_swap" else {"alpha": 0.7, "beta": 0.2})
    again = MergeEngine(f["base"], [f["s1"], f["s0"]], device="cpu")
    first, second = merged(tv, recipe), merged(again, recipe)
    assert all(torch.equal(first[n], second[n]) for n in first)


# ---- the search space -----------------------------------------------------------------


def test_new_methods_are_searched_in_one_study_and_their_trials_merge(families):
    for arch in ("llama", "gpt2"):
        f = families[arch]
        tv = MergeEngine(f["base"], [f["s0"], f["s1"], f["s2"]], device="cpu")
        space = Space(methods=["ties", *NEW_METHODS], layer_groups=2, lines=True)
        ss = SearchSpace(space, f["base"], {"a": f["s0"], "b": f["s1"], "c": f["s2"]}, tv.num_layers, seed=5)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        seen = set()
        for _ in range(24):
            trial = study.ask()
            recipe = ss.sample(trial)
            seen.add(recipe.method)
            validate_recipe(recipe, tv.num_layers)
            assert ss.recipe_from_params(trial.params).hash() == recipe.hash()
            out = merged(tv, recipe)
            assert all(torch.isfinite(t).all() for t in out.values())
            study.tell(trial, 0.0)
        assert seen == {"ties", *NEW_METHODS}, arch


def test_layer_counts_are_integer_dimensions_scaled_to_the_depth():
    ss = SearchSpace(Space(methods=["layer_swap", "consensus_ta"]), "/m/base",
                     {"a": "/m/a", "b": "/m/b", "c": "/m/c"}, 8)
    dims = ss.dimensions()
    assert dims["layer_swap.n_bottom"] == IntDistribution(0, 4)
    assert dims["layer_swap.n_top"] == IntDistribution(0, 4)
    assert dims["layer_swap.transition"] == IntDistribution(0, 2)
    assert dims["layer_swap.outer"] == IntDistribution(0, 1)
    assert dims["consensus_ta.k"] == IntDistribution(1, 2)
    assert dims["consensus_ta.mask_lambda.a"] == FloatDistribution(0.2, 0.6)
    assert set(dims["layer_swap.sources"].choices) == {"a+b", "a+c", "b+c"}


def test_user_bounds_on_a_layer_count_are_absolute():
    ss = SearchSpace(Space(methods={"layer_swap": {"n_bottom": [1, 3]}}), "/m/base",
                     {"a": "/m/a", "b": "/m/b"}, 8)
    assert ss.dimensions()["layer_swap.n_bottom"] == IntDistribution(1, 3)


def test_space_lines_adds_alpha_and_beta_shared_by_the_methods_with_a_base():
    ss = SearchSpace(Space(methods=["ties", "layer_swap"], lines=True), "/m/base",
                     {"a": "/m/a", "b": "/m/b"}, 4)
    dims = ss.dimensions()
    assert dims["lines.alpha"] == FloatDistribution(0.2, 1.0)
    assert dims["lines.beta"] == FloatDistribution(0.0, 1.0)
    ties = ss.recipe_from_params({**{k: 0.5 for k in ss.dimensions("ties")}, "method": "ties",
                                  "lines.alpha": 0.3, "lines.beta": 0.6})
    assert (ties.lines.alpha, ties.lines.beta) == (0.3, 0.6)
    swap = ss.recipe_from_params({"method": "layer_swap", "layer_swap.n_bottom": 1,
                                  "layer_swap.n_top": 1, "layer_swap.transition": 0,
                                  "layer_swap.outer": 0, "lines.alpha": 0.3, "lines.beta": 0.6})
    assert swap.lines is None


def test_without_space_lines_recipes_carry_no_schedule():
    ss = SearchSpace(Space(methods=["ties"]), "/m/base", {"a": "/m/a", "b": "/m/b"}, 4)
    assert "lines.alpha" not in ss.dimensions()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    assert ss.sample(study.ask()).lines is None
