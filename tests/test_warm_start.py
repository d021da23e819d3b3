"""The warm start: the recipes a person would try first, enqueued as the space's own
parameters on a new study (never again on a resume), so the sampler learns from them."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from support.studies import config_for

from mergesearch.config import Space
from mergesearch.search import Runner, SerialPool
from mergesearch.search import runner as runner_module
from mergesearch.search.study import counted
from mergesearch.spaces import SearchSpace
from mergesearch.spaces.warm_start import WARM_START_ATTR, enqueue_warm_start, warm_start_trials

BASE = "/m/base"
SOURCES = {"add": "/m/add", "rev": "/m/rev"}
optuna.logging.set_verbosity(optuna.logging.WARNING)


def space_of(flat: bool = False, **space) -> SearchSpace:
    return SearchSpace(Space(**space), BASE, SOURCES, 4, flat=flat)


def weights(method: str, add: float, rev: float) -> dict[str, float]:
    return {f"{method}.weight.add.g0": add, f"{method}.weight.add.g1": add,
            f"{method}.weight.rev.g0": rev, f"{method}.weight.rev.g1": rev}


def test_a_new_study_gets_the_first_guesses_with_their_exact_parameters():
    space = space_of(methods=["task_arithmetic", "ties", "linear"], layer_groups=2)
    study = optuna.create_study(directions=["maximize", "maximize"])
    labels = enqueue_warm_start(study, space)

    ta = {"method": "task_arithmetic", "task_arithmetic.lambda": 1.0}
    ties = {"method": "ties", "ties.lambda": 1.0, **weights("ties", 1.0, 1.0),
            **{f"ties.density.{a}.g{g}": 0.5 for a in SOURCES for g in (0, 1)}}
    expected = [
        ("add alone", {**ta, **weights("task_arithmetic", 1.0, 0.0)}),
        ("rev alone", {**ta, **weights("task_arithmetic", 0.0, 1.0)}),
        ("task_arithmetic, weight 1/2", {**ta, **weights("task_arithmetic", 0.5, 0.5)}),
        ("task_arithmetic, weight 1", {**ta, **weights("task_arithmetic", 1.0, 1.0)}),
        ("ties, density 0.5, weight 1", ties),  # ties normalises: weight 1 is the mean
    ]
    assert labels == [label for label, _ in expected]  # linear: no guess of its own
    waiting = study.get_trials(states=(TrialState.WAITING,))  # Optuna keeps their "fixed_params"
    assert [(t.user_attrs[WARM_START_ATTR], t.system_attrs["fixed_params"]) for t in waiting] == expected

    first = space.sample(study.ask())  # the sampler is handed the guess, knob for knob
    assert first.method == "task_arithmetic" and first.parameters == {"lambda": 1.0}
    assert [m.parameters["weight"] for m in first.models] == [[1.0] * 4, [0.0] * 4]


def test_non_normalising_sparse_methods_take_weight_one_over_n_and_della_a_middle_epsilon():
    (label, params), = warm_start_trials(space_of(methods=["della_linear"]))
    assert label == "della_linear, density 0.5, weight 1/2"
    assert params == {"della_linear.lambda": 1.0,
                      **{f"della_linear.{k}.{a}": v for a in SOURCES
                         for k, v in (("weight", 0.5), ("density", 0.5), ("epsilon_frac", 0.5))}}


@pytest.mark.parametrize("space, labels", [
    ({"params": {"weight": [0.2, 1.0]}},  # 0 is out of range: no source alone
     ["task_arithmetic, weight 1/2", "task_arithmetic, weight 1"]),
    ({"shared": True},  # one weight for both sources: no source alone
     ["task_arithmetic, weight 1/2", "task_arithmetic, weight 1"]),
    ({"params": {"lambda": 0.7}}, ["add alone", "rev alone", "task_arithmetic, weight 1/2",
                                   "task_arithmetic, weight 1"]),
])
def test_guesses_the_space_cannot_express_are_left_out(space, labels):
    trials = warm_start_trials(space_of(methods=["task_arithmetic"], **space))
    assert [label for label, _ in trials] == labels


def test_a_shared_space_takes_the_guess_under_the_shared_names():
    (_, params), = [t for t in warm_start_trials(space_of(methods=["ties"], shared=True, layer_groups=2))]
    assert params == {"ties.lambda": 1.0, "ties.weight.g0": 1.0, "ties.weight.g1": 1.0,
                      "ties.density.g0": 0.5, "ties.density.g1": 0.5}


def test_one_source_gets_each_recipe_once():
    space = SearchSpace(Space(methods=["task_arithmetic"]), BASE, {"add": "/m/add"}, 4)
    assert [label for label, _ in warm_start_trials(space)] == ["task_arithmetic, weight 1/1"]


def test_a_flat_space_fixes_the_guessed_methods_knobs_and_leaves_the_rest_to_the_sampler():
    flat = space_of(flat=True, methods=["task_arithmetic", "ties"])
    conditional = space_of(methods=["task_arithmetic", "ties"])
    assert warm_start_trials(flat) == warm_start_trials(conditional)
    study = optuna.create_study(directions=["maximize"] * 2, sampler=optuna.samplers.RandomSampler(seed=0))
    enqueue_warm_start(study, flat)
    for label, params in warm_start_trials(conditional):
        trial = study.ask()
        recipe = flat.sample(trial)
        assert recipe.hash() == conditional.recipe_from_params(params).hash(), label
        assert any(k.startswith("ties.") for k in trial.params) and trial.params.items() >= params.items()
        study.tell(trial, [0.0, 0.0])


# ---- in a search: a new study only -----------------------------------------------------


@pytest.fixture
def no_ray(monkeypatch) -> None:
    def tripwire(config) -> None:
        raise AssertionError("Ray was started by a search on a SerialPool")

    monkeypatch.setattr(runner_module, "start_ray", tripwire)


def test_a_search_scores_the_warm_start_first_and_a_resume_does_not_enqueue_it_again(
        families, tmp_path, no_ray):
    config = config_for(families, tmp_path, budget={"n_trials": 3}, space={"methods": ["task_arithmetic"]},
                        sampler={"name": "tpe", "seed": 0, "warm_start": True})
    labels = ["s0 alone", "s1 alone", "task_arithmetic, weight 1/2"]  # as many as the budget
    study = Runner(config, pool=SerialPool).run()
    assert [t.user_attrs.get(WARM_START_ATTR) for t in study.trials] == labels
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3

    config.budget.n_trials = 6
    study = Runner(config, pool=SerialPool).run()
    assert sum(counted(t) for t in study.trials) == 6
    assert [t.user_attrs.get(WARM_START_ATTR) for t in study.trials] == labels + [None] * 3


def test_without_the_option_nothing_is_enqueued(families, tmp_path, no_ray):
    config = config_for(families, tmp_path, budget={"n_trials": 2}, space={"methods": ["task_arithmetic"]},
                        sampler={"name": "random", "seed": 0, "warm_start": False})
    study = Runner(config, pool=SerialPool).run()
    assert not any(WARM_START_ATTR in t.user_attrs for t in study.trials)
