"""The samplers for a small budget (issue 16): TPE and GP model the results after a few
trials drawn at random, TPE jointly per method and lying about trials in flight, GP per
method with log EHVI for several objectives; and the smaller space, one value per knob for all
sources (``space.shared``)."""

from __future__ import annotations

import optuna
import pytest

from mergesearch.config import Space, parse_config
from mergesearch.merging import validate_recipe
from mergesearch.search.samplers import build_sampler, startup_trials
from mergesearch.spaces import SearchSpace

BASE = "/m/base"
SOURCES = {"add": "/m/add", "rev": "/m/rev", "sort": "/m/sort"}
optuna.logging.set_verbosity(optuna.logging.WARNING)


def config(sampler: dict, budget: dict | None = None, objectives: int = 2):
    return parse_config({
        "models": {"base": "b", "sources": {"x": "x", "y": "y"}},
        "objectives": [{"name": f"o{i}", "evaluator": "cost"} for i in range(objectives)],
        "sampler": sampler, "budget": budget or {"n_trials": 50}})


@pytest.mark.parametrize("budget, startup", [
    ({"n_trials": 20}, 5), ({"n_trials": 50}, 5), ({"n_trials": 80}, 8), ({"n_trials": 150}, 10),
    ({"timeout": 600}, 10),
])
def test_model_based_samplers_start_modelling_after_a_tenth_of_the_budget(budget, startup):
    assert startup_trials(config({"name": "tpe"}, budget)) == startup


def test_tpe_is_multivariate_by_method_and_lies_about_trials_in_flight():
    tpe = build_sampler(config({"name": "tpe", "seed": 3}, {"n_trials": 150}))
    assert isinstance(tpe, optuna.samplers.TPESampler)
    assert (tpe._multivariate, tpe._group, tpe._constant_liar, tpe._n_startup_trials) == (True, True, True, 10)


def test_gp_models_each_method_of_the_space_with_a_trial_in_flight():
    """Past its startup trials the GP sampler proposes each method's knobs from a GP of that
    method's trials (the space stays conditional: a trial draws only its method's knobs),
    with one trial in flight throughout; every recipe is valid."""
    space = SearchSpace(Space(methods=["ties", "task_arithmetic"]), BASE, SOURCES, 4)
    sampler = build_sampler(config({"name": "gp", "n_startup_trials": 4}))
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    running = None
    for _ in range(16):
        trial = study.ask()
        recipe = space.sample(trial)
        validate_recipe(recipe, 4)
        assert all(n == "method" or n.startswith(f"{recipe.method}.") for n in trial.params)
        if running is None:  # one trial stays in flight throughout
            running = trial
            continue
        study.tell(trial, [recipe.models[0].parameters["weight"], recipe.models[1].parameters["weight"]])
    assert len(study.trials) == 16 and running.number == 0
    assert set(sampler._models) <= {"ties", "task_arithmetic"} and sampler._models


def test_a_shared_space_has_one_value_per_knob_for_every_source():
    shared = SearchSpace(Space(methods=["ties", "linear"], layer_groups=2, shared=True), BASE, SOURCES, 4)
    assert sorted(shared.dimensions("ties")) == ["ties.density.g0", "ties.density.g1", "ties.lambda",
                                                "ties.weight.g0", "ties.weight.g1"]
    # linear keeps the base's own weight: the search can still pull towards the base
    assert sorted(shared.dimensions("linear")) == ["linear.weight.base.g0", "linear.weight.base.g1",
                                                  "linear.weight.g0", "linear.weight.g1"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(6):
        trial = study.ask()
        recipe = shared.sample(trial)
        validate_recipe(recipe, 4)
        sources = [m for m in recipe.models if m.model != BASE]
        assert len({str(m.parameters) for m in sources}) == 1  # every source alike
        assert shared.recipe_from_params(trial.params).hash() == recipe.hash()
        study.tell(trial, 0.0)


def test_a_shared_della_space_draws_one_epsilon_for_every_source():
    shared = SearchSpace(Space(methods=["della"], shared=True), BASE, SOURCES, 4)
    assert sorted(shared.dimensions("della")) == ["della.density", "della.epsilon_frac", "della.lambda",
                                                 "della.weight"]
