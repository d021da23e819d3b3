"""The search space: config -> Optuna distributions; trial -> a valid Recipe."""

from __future__ import annotations

import warnings

import optuna
import pytest

from mergesearch.config import ConfigError, Space
from mergesearch.merging import all_methods, validate_recipe
from mergesearch.recipe import Recipe, evaluate_setting
from mergesearch.search.methodwise import methodwise_gp
from mergesearch.spaces import SearchSpace

BASE = "/m/base"
SOURCES = {"add": "/m/add", "rev": "/m/rev", "sort": "/m/sort"}
optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample(space: Space, n: int = 1, layers: int = 4, seed: int = 0, sources=SOURCES):
    ss = SearchSpace(space, BASE, sources, layers, seed=9)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((trial, ss.sample(trial)))
        study.tell(trial, 0.0)
    return ss, out


def param(recipe: Recipe, alias: str, knob: str):
    path = BASE if alias == "base" else SOURCES[alias]
    return next(m.parameters[knob] for m in recipe.models if m.model == path)


# ---- every method --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [
    {"layer_groups": 2},
    {"layer_groups": 3, "layer_mode": "smooth", "split_attn_mlp": True, "per_layer": ["weight", "density", "t"]},
])
@pytest.mark.parametrize("method", sorted(all_methods()))
def test_every_registry_method_yields_valid_recipes_that_rebuild_from_their_params(method, shape):
    ss, trials = sample(Space(methods=[method], **shape), n=12, layers=5)
    for trial, recipe in trials:
        assert recipe.method == method and recipe.seed == 9
        validate_recipe(recipe, 5)
        assert ss.recipe_from_params(trial.params).hash() == recipe.hash()


def test_a_stored_trial_rebuilds_its_recipe_from_sqlite_and_when_enqueued(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    ss = SearchSpace(Space(methods=["ties", "della", "nuslerp"], layer_groups=2), BASE, SOURCES, 4)
    study = optuna.create_study(storage=url, study_name="s", sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(10):
        trial = study.ask()
        trial.set_user_attr("hash", ss.sample(trial).hash())
        study.tell(trial, 0.0)

    stored = optuna.load_study(storage=url, study_name="s").trials
    assert [ss.recipe_from_params(t.params).hash() for t in stored] == [t.user_attrs["hash"] for t in stored]
    study.enqueue_trial(stored[3].params)
    assert ss.sample(study.ask()).hash() == stored[3].user_attrs["hash"]


@pytest.mark.parametrize("sampler", [
    optuna.samplers.RandomSampler(seed=0),
    optuna.samplers.TPESampler(seed=0, n_startup_trials=4, multivariate=True),
    optuna.samplers.CmaEsSampler(seed=0, n_startup_trials=4),
    methodwise_gp(seed=0, n_startup_trials=4),
], ids=["random", "tpe", "cmaes", "gp"])
def test_single_objective_samplers_drive_the_space(sampler):
    ss = SearchSpace(Space(methods=["ties", "della"], layer_groups=2), BASE, SOURCES, 4)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CMA-ES: conditional knobs fall back to independent sampling
        for _ in range(12):
            trial = study.ask()
            recipe = ss.sample(trial)
            validate_recipe(recipe, 4)
            study.tell(trial, param(recipe, "add", "weight")[0])
    assert study.best_value > 0


def test_nsga2_runs_on_the_space():
    ss = SearchSpace(Space(methods=["ties", "dare_linear"], layer_groups=2), BASE, SOURCES, 4)
    study = optuna.create_study(directions=["maximize", "maximize"],
                                sampler=optuna.samplers.NSGAIISampler(population_size=4, seed=0))
    for _ in range(12):
        trial = study.ask()
        r = ss.sample(trial)
        validate_recipe(r, 4)
        study.tell(trial, [param(r, "add", "weight")[0], param(r, "rev", "weight")[0]])
    assert len(study.trials) == 12 and study.best_trials


# ---- methods and their knobs -----------------------------------------------------------


def test_the_method_is_a_categorical_only_when_there_is_a_choice():
    _, trials = sample(Space(methods=["ties", "task_arithmetic"]), n=20)
    assert {t.params["method"] for t, _ in trials} == {"ties", "task_arithmetic"}
    _, [(trial, recipe)] = sample(Space(methods=["ties"]))
    assert "method" not in trial.params and recipe.method == "ties"


def test_knobs_are_conditional_on_the_method():
    _, trials = sample(Space(methods=["ties", "dare_ties"]), n=20)
    for trial, recipe in trials:
        other = "dare_ties" if recipe.method == "ties" else "ties"
        assert not any(k.startswith(other + ".") for k in trial.params)
        assert any(k.startswith(recipe.method + ".") for k in trial.params)


def test_a_flat_space_samples_every_methods_knobs_and_builds_the_same_recipe():
    conditional = SearchSpace(Space(methods=["ties", "dare_ties"]), BASE, SOURCES, 4, seed=9)
    flat = SearchSpace(Space(methods=["ties", "dare_ties"]), BASE, SOURCES, 4, seed=9, flat=True)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(6):
        trial = study.ask()
        recipe = flat.sample(trial)
        assert any(k.startswith("ties.") for k in trial.params)
        assert any(k.startswith("dare_ties.") for k in trial.params)
        assert conditional.recipe_from_params(trial.params) == recipe
        study.tell(trial, 0.0)


def test_nsga2_evolves_every_knob_of_a_flat_space_but_only_the_method_of_a_conditional_one():
    def relative_dims(flat: bool) -> set[str]:
        ss = SearchSpace(Space(methods=["ties", "dare_ties"]), BASE, SOURCES, 4, flat=flat)
        sampler = optuna.samplers.NSGAIISampler(population_size=4, seed=0)
        study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
        for i in range(8):
            trial = study.ask()
            ss.sample(trial)
            study.tell(trial, [i % 3, i % 2])
        return set(sampler.infer_relative_search_space(study, study.ask()))

    assert relative_dims(flat=False) == {"method"}
    flat_dims = relative_dims(flat=True)
    assert {"method", "ties.weight.add", "ties.density.sort", "dare_ties.weight.rev"} <= flat_dims
    assert len(flat_dims) == 15  # method + 2 methods x (lambda + 3 sources x (weight, density))


def test_knobs_the_registry_does_not_search_stay_at_their_default():
    _, [(trial, recipe)] = sample(Space(methods=["task_arithmetic"]))
    assert sorted(trial.params) == ["task_arithmetic.lambda", "task_arithmetic.weight.add",
                                    "task_arithmetic.weight.rev", "task_arithmetic.weight.sort"]
    assert set(recipe.parameters) == {"lambda"}  # no density, int8_mask, normalize, rescale
    assert all(set(m.parameters) == {"weight"} for m in recipe.models)


def test_a_boolean_range_makes_a_categorical():
    _, trials = sample(Space(methods={"ties": {"normalize": [False, True]}}), n=20)
    assert {r.parameters["normalize"] for _, r in trials} == {False, True}


def test_registry_ranges_and_user_bounds_are_respected_over_many_trials():
    space = Space(methods={"della": {"epsilon": [0.02, 0.05]}}, params={"weight": [0.2, 0.3]},
                  layer_groups=2)
    _, trials = sample(space, n=200)
    values = {k: [v for _, r in trials for m in r.models for v in m.parameters[k]]
              for k in ("weight", "density")}
    assert 0.2 <= min(values["weight"]) and max(values["weight"]) <= 0.3
    assert 0.1 <= min(values["density"]) and max(values["density"]) <= 1.0  # the registry's range
    assert 0.5 <= min(r.parameters["lambda"] for _, r in trials) <= 0.6  # registry: [0.5, 1.5]
    assert max(m.parameters["epsilon"] for _, r in trials for m in r.models) <= 0.05


def test_fixed_values_appear_verbatim_and_method_overrides_win():
    _, [(trial, recipe)] = sample(Space(methods={"ties": {"density": 0.7}},
                                        params={"density": 0.2, "lambda": 1.1, "int8_mask": True}))
    assert [m.parameters["density"] for m in recipe.models] == [0.7, 0.7, 0.7]
    assert recipe.parameters == {"lambda": 1.1, "int8_mask": True}
    assert not any("density" in k or "lambda" in k for k in trial.params)


# ---- over depth and tensor kinds ------------------------------------------------------


def test_piecewise_groups_repeat_values_over_consecutive_layers():
    _, [(trial, recipe)] = sample(Space(methods=["ties"], layer_groups=2), layers=4)
    a, b = trial.params["ties.weight.add.g0"], trial.params["ties.weight.add.g1"]
    assert param(recipe, "add", "weight") == [a, a, b, b]
    assert "ties.lambda" in trial.params and isinstance(recipe.parameters["lambda"], float)


def test_smooth_mode_writes_anchors_the_engine_interpolates():
    _, [(trial, recipe)] = sample(Space(methods=["ties"], layer_groups=2, layer_mode="smooth"), layers=5)
    a, b = trial.params["ties.density.rev.g0"], trial.params["ties.density.rev.g1"]
    density = param(recipe, "rev", "density")
    assert density == [a, b]
    assert evaluate_setting(density, "model.layers.2.mlp.up_proj.weight", 2 / 4) == pytest.approx((a + b) / 2)


def test_a_global_knob_named_in_per_layer_varies_over_depth():
    _, [(trial, recipe)] = sample(Space(methods=["slerp"], layer_groups=2, per_layer=["t"]), layers=4)
    a, b = trial.params["slerp.t.g0"], trial.params["slerp.t.g1"]
    assert recipe.parameters["t"] == [a, a, b, b]


@pytest.mark.parametrize("attn,mlp,other", [
    (["model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.o_proj.weight"],
     ["model.layers.0.mlp.up_proj.weight", "model.layers.3.mlp.down_proj.weight"],
     ["model.layers.0.post_attention_layernorm.weight", "model.norm.weight", "model.embed_tokens.weight"]),
    (["transformer.h.1.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias"],
     ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"],
     ["transformer.h.0.ln_1.weight", "transformer.ln_f.weight", "transformer.wte.weight"]),
    (["gpt_neox.layers.0.attention.query_key_value.weight"],
     ["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"],
     ["gpt_neox.layers.0.post_attention_layernorm.weight"]),
], ids=["llama", "gpt2", "gpt-neox"])
def test_split_attn_mlp_values_hit_the_right_tensors(attn, mlp, other):
    _, [(trial, recipe)] = sample(Space(methods=["task_arithmetic"], split_attn_mlp=True))
    weight = param(recipe, "add", "weight")
    for names, part in ((attn, "attn"), (mlp, "mlp"), (other, "other")):
        for name in names:
            assert evaluate_setting(weight, name, 0.0) == trial.params[f"task_arithmetic.weight.add.{part}"], name


def test_split_attn_mlp_with_layer_groups_gives_each_kind_its_own_per_layer_list():
    _, [(trial, recipe)] = sample(Space(methods=["ties"], split_attn_mlp=True, layer_groups=2), layers=4)
    p = trial.params
    density = param(recipe, "sort", "density")
    a0, a1 = p["ties.density.sort.attn.g0"], p["ties.density.sort.attn.g1"]
    m0, m1 = p["ties.density.sort.mlp.g0"], p["ties.density.sort.mlp.g1"]
    assert evaluate_setting(density, "model.layers.3.self_attn.v_proj.weight", 1.0) == a1
    assert evaluate_setting(density, "model.layers.1.mlp.gate_proj.weight", 1 / 3) == m0
    assert [evaluate_setting(density, "transformer.h.2.attn.c_attn.weight", t) for t in (0, 1 / 3, 2 / 3, 1)] == [a0, a0, a1, a1]
    assert [evaluate_setting(density, "transformer.h.2.mlp.c_fc.weight", t) for t in (0, 1 / 3, 2 / 3, 1)] == [m0, m0, m1, m1]


# ---- which models ----------------------------------------------------------------------


def test_slerp_searches_which_source_and_nuslerp_which_pair():
    _, trials = sample(Space(methods=["slerp", "nuslerp"]), n=80)
    slerp = {r.models[0].model for _, r in trials if r.method == "slerp"}
    pairs = {tuple(m.model for m in r.models) for _, r in trials if r.method == "nuslerp"}
    assert slerp == set(SOURCES.values())
    assert pairs == {("/m/add", "/m/rev"), ("/m/add", "/m/sort"), ("/m/rev", "/m/sort")}
    assert all(r.base_model == BASE for _, r in trials)


def test_linear_averages_the_sources_and_the_base_with_its_own_weight():
    _, [(trial, recipe)] = sample(Space(methods=["linear"]))
    assert recipe.base_model is None
    assert [m.model for m in recipe.models] == [BASE, *SOURCES.values()]
    assert param(recipe, "base", "weight") == trial.params["linear.weight.base"]


def test_della_epsilon_keeps_density_inside_0_1_and_a_fixed_epsilon_narrows_density():
    _, trials = sample(Space(methods=["della", "della_linear"], layer_groups=2, layer_mode="smooth"),
                       n=60, layers=6)
    for _, r in trials:
        validate_recipe(r, 6)
    _, trials = sample(Space(methods={"della": {"epsilon": 0.3}}), n=60)
    densities = [m.parameters["density"] for _, r in trials for m in r.models]
    assert 0.3 < min(densities) and max(densities) < 0.7
    assert {m.parameters["epsilon"] for _, r in trials for m in r.models} == {0.3}


# ---- dimensions ------------------------------------------------------------------------


def test_dimensions_list_every_searchable_knob():
    ss = SearchSpace(Space(methods=["ties", "slerp"], layer_groups=2), BASE, SOURCES, 4)
    dims = ss.dimensions()
    assert dims["method"].choices == ("ties", "slerp")
    assert dims["slerp.source"].choices == ("add", "rev", "sort")
    assert dims["ties.density.sort.g1"] == optuna.distributions.FloatDistribution(0.1, 1.0)
    assert set(ss.dimensions("slerp")) == {"slerp.source", "slerp.t"}
    assert len(ss.dimensions("ties")) == 1 + 3 * 2 * 2  # lambda; weight and density x 3 sources x 2 groups


# ---- refusals --------------------------------------------------------------------------


def test_more_layer_groups_than_layers_is_refused():
    with pytest.raises(ConfigError, match="space.layer_groups: 8 groups for a model of 4 layers"):
        SearchSpace(Space(methods=["ties"], layer_groups=8), BASE, SOURCES, 4)


def test_a_method_that_needs_a_base_without_one_is_refused():
    with pytest.raises(ConfigError, match=r"space.methods.ties: ties needs a base model \(models.base\)"):
        SearchSpace(Space(methods=["linear", "ties"]), None, SOURCES, 4)
    SearchSpace(Space(methods=["linear", "multislerp"]), None, SOURCES, 4)  # no base needed


def test_a_method_with_too_few_sources_is_refused():
    with pytest.raises(ConfigError, match="space.methods.model_stock: needs at least 2 sources, the config has 1"):
        SearchSpace(Space(methods=["model_stock"]), BASE, {"add": "/m/add"}, 4)


def test_a_fixed_value_outside_the_valid_range_is_refused_with_its_field():
    # pydantic checks this when the config is read; a Space built around it is checked again
    space = Space.model_construct(methods={"ties": {"density": 1.5}})
    with pytest.raises(ConfigError, match=r"space.methods.ties.density: 1.5 is outside its valid range \[0.0, 1.0\]"):
        SearchSpace(space, BASE, SOURCES, 4)
    space = Space.model_construct(methods={"ties": {}}, params={"lambda": [2, 1]})
    with pytest.raises(ConfigError, match=r"space.params.lambda: a range is \[low, high\]"):
        SearchSpace(space, BASE, SOURCES, 4)


def test_a_fixed_density_that_della_epsilon_pushes_out_of_0_1_is_refused():
    with pytest.raises(ConfigError, match=r"space.methods.della.density: density 0.1 \+/- epsilon 0.15"):
        SearchSpace(Space(methods={"della": {"density": 0.1}}, params={"epsilon": 0.15}), BASE, SOURCES, 4)


def test_an_unknown_per_layer_knob_is_refused():
    with pytest.raises(ConfigError, match="space.per_layer: 'wieght' is not a knob of any merge method"):
        SearchSpace(Space(methods=["ties"], per_layer=["wieght"]), BASE, SOURCES, 4)
