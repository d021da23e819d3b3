"""MethodwiseSampler: the method drawn by one sampler, each method's knobs by a model of
its own that sees only that method's trials and dimensions (`mergesearch.search.methodwise`)."""

from __future__ import annotations

import optuna
import pytest

from mergesearch.config import parse_config
from mergesearch.search.methodwise import MethodwiseSampler, methodwise_gp
from mergesearch.search.samplers import build_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)


def two_methods(trial: optuna.Trial) -> tuple[float, float]:
    """Method ``a`` is better everywhere; its optimum is x = 0.3, y = 0.7."""
    method = trial.suggest_categorical("method", ["a", "b"])
    x, y = trial.suggest_float(f"{method}.x", 0, 1), trial.suggest_float(f"{method}.y", 0, 1)
    scale = 1.0 if method == "a" else 0.5
    return scale * (1 - (x - 0.3) ** 2), scale * (1 - (y - 0.7) ** 2)


class Recording(optuna.samplers.RandomSampler):
    """A per-method model that records what it is shown."""

    seen: list[tuple[set[str], set[str], int]] = []

    def sample_relative(self, study, trial, search_space):
        trials = study._get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        Recording.seen.append((set(search_space), {t.params["method"] for t in trials}, len(trials)))
        return {name: d.low for name, d in search_space.items()}  # every knob here is a float


def recorded_study(n_startup_trials: int, min_trials: int) -> optuna.Study:
    """A study whose per-method models are `Recording`s (their record emptied)."""
    Recording.seen = []
    sampler = MethodwiseSampler(optuna.samplers.RandomSampler(seed=1), lambda: Recording(seed=2),
                                n_startup_trials=n_startup_trials, min_trials=min_trials, seed=0)
    return optuna.create_study(directions=["maximize"] * 2, sampler=sampler)


def test_each_methods_model_sees_only_its_own_trials_and_dimensions():
    study = recorded_study(n_startup_trials=6, min_trials=3)
    study.optimize(two_methods, n_trials=30)
    assert Recording.seen, "no model was asked"
    for dims, methods, n in Recording.seen:
        (method,) = methods
        assert dims == {f"{method}.x", f"{method}.y"} and n >= 3
    # what the model proposed is what the trial drew (its lower bounds)
    modelled = [t for t in study.trials if t.params[f"{t.params['method']}.x"] == 0.0]
    assert len(modelled) == len(Recording.seen)


def test_the_first_trials_are_drawn_at_random_until_the_startup_count():
    study = recorded_study(n_startup_trials=8, min_trials=1)
    study.optimize(two_methods, n_trials=8)
    assert Recording.seen == []
    study.optimize(two_methods, n_trials=1)
    assert len(Recording.seen) == 1 and Recording.seen[0][2] >= 1


def test_a_gp_per_method_finds_the_better_method_and_its_optimum():
    study = optuna.create_study(directions=["maximize"] * 2, sampler=methodwise_gp(seed=0, n_startup_trials=6))
    study.optimize(two_methods, n_trials=30)
    late = study.trials[15:]
    assert sum(t.params["method"] == "a" for t in late) >= 10
    best = max(study.trials, key=lambda t: sum(t.values))
    assert best.params["method"] == "a"
    assert best.params["a.x"] == pytest.approx(0.3, abs=0.05)
    assert best.params["a.y"] == pytest.approx(0.7, abs=0.05)


def test_the_same_seed_proposes_the_same_trials():
    def run():
        study = optuna.create_study(directions=["maximize"] * 2, sampler=methodwise_gp(seed=4, n_startup_trials=5))
        study.optimize(two_methods, n_trials=14)
        return [t.params for t in study.trials]

    assert run() == run()


def test_trials_in_flight_of_the_method_reach_its_gp():
    """Two asks before any tell (two workers): the second proposal is conditioned on the
    first, so the GP does not hand both workers the same point."""
    study = optuna.create_study(directions=["maximize"] * 2, sampler=methodwise_gp(seed=0, n_startup_trials=5))
    for _ in range(12):
        trial = study.ask()
        study.tell(trial, two_methods(trial))
    first, second = study.ask(), study.ask()
    p1, p2 = (two_methods(first), two_methods(second))
    assert first.params != second.params
    assert p1 != p2


def test_one_method_spaces_have_no_choice_and_one_model():
    sampler = methodwise_gp(seed=0, n_startup_trials=5)
    study = optuna.create_study(directions=["maximize"] * 2, sampler=sampler)
    study.optimize(lambda t: (-(t.suggest_float("ties.x", 0, 1) - 0.4) ** 2, t.suggest_float("ties.y", 0, 1)),
                   n_trials=12)
    assert list(sampler._models) == [None]


def test_the_config_names_it():
    config = parse_config({"models": {"base": "b", "sources": {"x": "x", "y": "y"}},
                           "objectives": [{"name": "o", "evaluator": "cost"}],
                           "sampler": {"name": "gp", "seed": 2}, "budget": {"n_trials": 80}})
    sampler = build_sampler(config)
    assert isinstance(sampler, MethodwiseSampler)
    assert (sampler._n_startup, sampler._min_trials) == (8, 4)
