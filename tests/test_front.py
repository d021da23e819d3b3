"""The front's hypervolume over the trials: the curve `mergesearch status` draws, so that a
user sees whether a search is still improving; and each front point's balance, how much of
every source's gain over the base it keeps at once."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from mergesearch.errors import StudyError
from mergesearch.search.front import (
    REFERENCES_ATTR,
    balance,
    choose,
    front_rows,
    hypervolume_curve,
    kept_gains,
    sparkline,
    study_hypervolume,
)


@pytest.fixture
def two_objective_study() -> optuna.Study:
    """Both maximised, reference (0, 0) from the base: (1, 1) covers 1; adding (2, 0.5)
    covers 1 + 1 x 0.5 = 1.5; (0.5, 0.5) lies inside and adds nothing."""
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.set_metric_names(["a", "b"])
    study.set_user_attr(REFERENCES_ATTR, {"base": {"a": 0.0, "b": 0.0}})
    for h, values in [("x", [1.0, 1.0]), ("y", [2.0, 0.5]), ("z", [0.5, 0.5])]:
        trial = study.ask()
        trial.set_user_attr("recipe_hash", h)
        study.tell(trial, values)
    return study


def test_hypervolume_curve_is_the_front_of_each_prefix_of_the_scored_trials(two_objective_study):
    assert hypervolume_curve(two_objective_study, points=3) == [(1, 1.0), (2, 1.5), (3, 1.5)]


def test_hypervolume_curve_ends_at_the_study_hypervolume(two_objective_study):
    assert hypervolume_curve(two_objective_study, points=2)[-1] == (3, study_hypervolume(two_objective_study))


def test_hypervolume_curve_samples_at_most_the_points_asked_for(two_objective_study):
    assert [k for k, _ in hypervolume_curve(two_objective_study, points=1)] == [3]


def test_sparkline_maps_the_lowest_and_highest_values_to_the_lowest_and_highest_blocks():
    assert sparkline([1.0, 1.25, 1.5, 1.5]) == "▁▅██"


def test_sparkline_of_a_flat_curve_is_flat():
    assert sparkline([0.0, 0.0]) == "▁▁" and sparkline([2.0, 2.0]) == "██"


# ---- balance: how much of every source's gain a merge keeps at once ---------------------------


@pytest.fixture
def skills_study() -> optuna.Study:
    """Objectives a and b (skills the sources add), c (a cost, minimised) and d (a retention
    task no source improves). The base scores (0.5, 0.2, 10, 0.9); source s0 (0.9, 0.2, 12,
    0.8) and s1 (0.5, 0.6, 6, 0.7): the best source gains 0.4 on a, 0.4 on b and 4 on c
    (6 instead of 10), nothing on d. Trials p, q, r all lie on the front."""
    study = optuna.create_study(directions=["maximize", "maximize", "minimize", "maximize"])
    study.set_metric_names(["a", "b", "c", "d"])
    names = ["a", "b", "c", "d"]
    study.set_user_attr(REFERENCES_ATTR, {
        "base": dict(zip(names, [0.5, 0.2, 10.0, 0.9])),
        "s0": dict(zip(names, [0.9, 0.2, 12.0, 0.8])),
        "s1": dict(zip(names, [0.5, 0.6, 6.0, 0.7]))})
    for h, values in [("p", [0.7, 0.4, 8.0, 0.85]), ("q", [0.9, 0.3, 6.0, 0.9]), ("r", [0.5, 0.6, 10.0, 0.9])]:
        trial = study.ask()
        trial.set_user_attr("recipe_hash", h)
        study.tell(trial, values)
    return study


def test_kept_gain_is_0_at_the_base_and_1_at_the_best_source_in_each_direction(skills_study):
    gains = kept_gains(skills_study, np.array([[0.7, 0.4, 8.0, 0.85], [0.9, 0.6, 6.0, 0.9]]))
    np.testing.assert_allclose(gains[:, :3], [[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]])


def test_an_objective_no_source_improves_has_no_kept_gain(skills_study):
    assert np.isnan(kept_gains(skills_study, np.array([[0.7, 0.4, 8.0, 0.85]]))[0, 3])


def test_balance_is_the_weakest_kept_gain_over_the_objectives_a_source_improves(skills_study):
    values = np.array([t.values for t in skills_study.trials])
    np.testing.assert_allclose(balance(skills_study, values), [0.5, 0.25, 0.0])


def test_balanced_choice_is_the_front_point_with_the_highest_balance(skills_study):
    assert choose(skills_study, balanced=True).user_attrs["recipe_hash"] == "p"


def test_front_rows_carry_each_points_balance(skills_study):
    assert [(r["recipe_hash"], r["balance"]) for r in front_rows(skills_study)] == [
        ("p", pytest.approx(0.5)), ("q", pytest.approx(0.25)), ("r", pytest.approx(0.0))]


def test_a_study_without_the_sources_scores_has_no_balance_and_refuses_a_balanced_choice(
        two_objective_study):
    assert all("balance" not in r for r in front_rows(two_objective_study))
    with pytest.raises(StudyError, match=r"^--balanced: no objective where a source beats the base"):
        choose(two_objective_study, balanced=True)
