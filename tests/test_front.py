"""The front's hypervolume over the trials: the curve `mergesearch status` draws, so that a
user sees whether a search is still improving."""

from __future__ import annotations

import optuna
import pytest

from mergesearch.search.front import (
    REFERENCES_ATTR,
    hypervolume_curve,
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
