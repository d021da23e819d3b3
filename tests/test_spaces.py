"""The search space: config -> Optuna distributions; trial -> a valid Recipe."""

from __future__ import annotations

import optuna
import pytest

from mergesearch.config import ConfigError, Space
from mergesearch.merging import all_methods, validate_recipe
from mergesearch.recipe import evaluate
from mergesearch.spaces import SearchSpace

SOURCES = {"add": "/m/add", "rev": "/m/rev", "sort": "/m/sort"}
optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample(space: Space, n: int = 1, layers: int = 4, seed: int = 0):
    ss = SearchSpace(space, "/m/base", SOURCES, layers, seed=9)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((trial, ss.sample(trial)))
        study.tell(trial, 0.0)
    return ss, out


def test_every_registry_method_yields_a_valid_recipe_that_rebuilds_from_its_params():
    ss, trials = sample(Space(methods=list(all_methods()), layer_groups=2), n=150)
    assert {r.method for _, r in trials} == set(all_methods())
    for trial, recipe in trials:
        validate_recipe(recipe, 4)
        assert ss.recipe_from_params(trial.params) == recipe


def test_knobs_are_conditional_on_the_method():
    _, trials = sample(Space(methods=["ties", "dare_ties"]), n=20)
    for trial, recipe in trials:
        other = "dare_ties" if recipe.method == "ties" else "ties"
        assert not any(k.startswith(other + ".") for k in trial.params)


def test_registry_ranges_and_user_bounds_are_respected():
    _, trials = sample(Space(methods=["ties"], params={"weight": [0.2, 0.3]}), n=40)
    weights = [m.parameters["weight"] for _, r in trials for m in r.models]
    densities = [m.parameters["density"] for _, r in trials for m in r.models]
    assert min(weights) >= 0.2 and max(weights) <= 0.3
    assert min(densities) >= 0.1 and max(densities) <= 1.0  # the registry's search range


def test_fixed_values_appear_verbatim_and_method_overrides_win():
    _, [(trial, recipe)] = sample(Space(methods={"ties": {"density": 0.7}}, params={"density": 0.2, "lambda": 1.1}))
    assert all(m.parameters["density"] == 0.7 for m in recipe.models)
    assert recipe.parameters["lambda"] == 1.1
    assert not any("density" in k for k in trial.params)


def test_piecewise_groups_repeat_values_over_consecutive_layers():
    _, [(_, recipe)] = sample(Space(methods=["ties"], layer_groups=2), layers=4)
    w = recipe.models[0].parameters["weight"]
    assert len(w) == 4 and w[0] == w[1] and w[2] == w[3] and w[0] != w[2]


def test_smooth_mode_writes_anchors():
    _, [(trial, recipe)] = sample(Space(methods=["ties"], layer_groups=2, layer_mode="smooth"))
    assert recipe.models[0].parameters["weight"] == [trial.params["ties.weight.add.g0"],
                                                     trial.params["ties.weight.add.g1"]]


@pytest.mark.parametrize("attn,mlp,other", [
    ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"),
    ("transformer.h.1.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.ln_f.weight"),
])
def test_split_attn_mlp_values_hit_the_right_tensors(attn, mlp, other):
    _, [(trial, recipe)] = sample(Space(methods=["task_arithmetic"], split_attn_mlp=True))
    w = recipe.models[0].parameters["weight"]
    p = trial.params
    assert evaluate(w, attn, 0.0) == p["task_arithmetic.weight.add.attn"]
    assert evaluate(w, mlp, 0.0) == p["task_arithmetic.weight.add.mlp"]
    assert evaluate(w, other, 0.0) == p["task_arithmetic.weight.add.other"]


def test_slerp_searches_which_source_and_della_epsilon_stays_valid():
    _, trials = sample(Space(methods=["slerp", "della"], layer_groups=2), n=60)
    slerps = {r.models[0].model for _, r in trials if r.method == "slerp"}
    assert slerps == set(SOURCES.values())
    for _, r in trials:
        validate_recipe(r, 4)  # density +/- epsilon inside (0, 1) for every DELLA recipe


def test_nsga2_runs_on_the_space():
    ss = SearchSpace(Space(methods=["ties", "dare_linear"], layer_groups=2), "/m/base", SOURCES, 4)
    study = optuna.create_study(directions=["maximize", "maximize"],
                                sampler=optuna.samplers.NSGAIISampler(population_size=4, seed=0))
    for _ in range(12):
        trial = study.ask()
        r = ss.sample(trial)
        w = [m.parameters["weight"][0] for m in r.models]
        study.tell(trial, [w[0], w[1]])
    assert len(study.best_trials) >= 1


def test_more_layer_groups_than_layers_is_refused():
    with pytest.raises(ConfigError, match="space.layer_groups: 8 groups for a model of 4 layers"):
        SearchSpace(Space(methods=["ties"], layer_groups=8), "/m/base", SOURCES, 4)


def test_dimensions_list_every_searchable_knob():
    dims = SearchSpace(Space(methods=["ties", "slerp"]), "/m/base", SOURCES, 4).dimensions()
    assert dims["method"].choices == ("ties", "slerp")
    assert {"ties.weight.add", "ties.density.sort", "ties.lambda", "slerp.t", "slerp.source"} <= set(dims)
