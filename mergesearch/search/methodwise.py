"""A sampler that models each merge method on its own trials.

The search space is conditional: a trial first draws ``method``, then only that method's
knobs (``<method>.<knob>...``, see `mergesearch.spaces.space`). A sampler that needs one
flat space (Optuna's GPSampler) would otherwise have to draw every method's knobs on
every trial and model ~50 dimensions of which a trial uses a quarter; on the demo family
that is worse than random search. `MethodwiseSampler` splits the decision in two:

1. the method, drawn by a ``chooser`` (TPE on the one categorical: methods whose trials
   lie on or near the front are drawn more often, the others still now and then);
2. that method's knobs, proposed by a sampler of its own (``per_method()``, one instance
   per method) that sees only the trials of that method, in only its dimensions, running
   trials of that method included (so a GP's batch acquisition spreads the workers).

Knobs shared by every method (``lines.alpha``, ``lines.beta``) belong to every method's
space. Until a method has ``min_trials`` completed trials its knobs are drawn at random;
until the study has ``n_startup_trials`` completed trials everything is.

Each per-method model sees only its method's trials, so a GP's expected hypervolume
improvement is measured against that method's own front, not the study's: the chooser
is what moves trials towards the methods that make the study's front.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from mergesearch.spaces.space import LINES_PREFIX, METHOD_PARAM


class MethodwiseSampler(BaseSampler):
    def __init__(self, chooser: BaseSampler, per_method: Callable[[], BaseSampler], *,
                 n_startup_trials: int, min_trials: int, seed: int | None = None):
        self._chooser, self._per_method = chooser, per_method
        self._models: dict[Any, BaseSampler] = {}
        self._n_startup, self._min_trials = n_startup_trials, min_trials
        self._random = RandomSampler(seed=seed)

    def reseed_rng(self) -> None:
        for sampler in (self._chooser, self._random, *self._models.values()):
            sampler.reseed_rng()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        """Every dimension any finished trial drew (the latest distribution of each name)."""
        space: dict[str, BaseDistribution] = {}
        for t in study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,), use_cache=True):
            space.update(t.distributions)
        return {name: d for name, d in space.items() if not d.single()}

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        done = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,), use_cache=True)
        if len(done) < self._n_startup:
            return {}
        chosen: dict[str, Any] = {}
        method = None
        if METHOD_PARAM in search_space:
            method = self._chooser.sample_independent(study, trial, METHOD_PARAM, search_space[METHOD_PARAM])
            chosen[METHOD_PARAM] = method
        own = {name: d for name, d in search_space.items() if _belongs(name, method)}
        view = _MethodView(study, method)
        if own and len(view._get_trials(states=(TrialState.COMPLETE,))) >= self._min_trials:
            model = self._models.setdefault(method, self._per_method())
            chosen.update(model.sample_relative(view, trial, own))  # type: ignore[arg-type]
        return chosen

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._chooser.before_trial(study, trial)
        self._random.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._chooser.after_trial(study, trial, state, values)
        self._random.after_trial(study, trial, state, values)


def _belongs(name: str, method: Any) -> bool:
    """Whether a dimension is part of ``method``'s space (None: the only method, whose
    names carry no choice)."""
    if name == METHOD_PARAM:
        return False
    return method is None or name.startswith((f"{method}.", LINES_PREFIX))


class _MethodView:
    """The study as a per-method sampler must see it: only that method's trials. It answers
    what Optuna's GPSampler asks of a study (trials by state, directions, and the storage
    where it leaves its proposal for other processes)."""

    def __init__(self, study: Study, method: Any):
        self._study, self._method = study, method
        self.directions, self._storage = study.directions, study._storage

    def _get_trials(self, deepcopy: bool = False, states: Container[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=False, states=states, use_cache=False)
        if self._method is None:
            return trials
        return [t for t in trials if t.params.get(METHOD_PARAM) == self._method]


def methodwise_gp(seed: int, n_startup_trials: int) -> optuna.samplers.BaseSampler:
    """TPE chooses the method; a GP per method (log EHVI over several objectives, batched
    over running trials) proposes its knobs once it has ``n_startup_trials // 2`` (at
    least 3) trials of that method."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        chooser = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials,
                                             constant_liar=True)
    seeds = itertools.count(seed + 1)  # one per method, in the order the methods are first modelled
    return MethodwiseSampler(
        chooser, lambda: optuna.samplers.GPSampler(seed=next(seeds), n_startup_trials=0),
        n_startup_trials=n_startup_trials, min_trials=max(3, n_startup_trials // 2), seed=seed)
