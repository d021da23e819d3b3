"""A warm start: the recipes a person would try first, as parameters of the search space,
to be enqueued (``study.enqueue_trial``) before the sampler proposes its own, so that it
learns from them like from any other trial.

The guesses, each only where the configured space holds its method and can express it:

- each source alone: task_arithmetic with weight 1 on that source and 0 on the others
  (with ``lambda`` 1 this is the expert itself);
- uniform task arithmetic: weight 1/n on every source (the mean task vector), and weight
  1 on every source (their sum);
- for every method of the task-arithmetic family that sparsifies by ``density`` (ties,
  dare_ties, della, ...): density 0.5 on every source, with weight 1 where the method
  normalises the weights by default (ties, della) and 1/n where it does not, so that
  each is the mean of the kept task vectors, as mergekit's examples use them.

Every other dimension of the guess's method takes the knob's default where it lies in the
searched range (``lambda`` 1, LiNeS' alpha 1 and beta 0: no schedule), else the middle of
the range; DELLA's ``epsilon_frac`` takes 0.5. Layer groups and attention/MLP parts all
take the same value. A guess is left out where the space cannot express it: a value
outside the searched range (a weight range that excludes 0 leaves out "each source alone"),
or different values per source where ``space.shared`` gives one value for all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from mergesearch.merging.lines import LINES_PARAMS
from mergesearch.merging.registry import MergeMethod
from mergesearch.spaces.space import BASE_ALIAS, LINES_PREFIX, METHOD_PARAM, SearchSpace

WARM_START_ATTR = "warm_start"  # user attr of an enqueued guess: what it is
DENSITY = 0.5  # TIES' usual density (Yadav et al.; mergekit's examples)
EPSILON_FRAC = 0.5  # DELLA's epsilon: the middle of what the density leaves room for


@dataclass(frozen=True)
class Guess:
    """One first recipe: a method, and values for some of its knobs, each either one
    value for every source or a value per source alias."""

    label: str
    method: str
    knobs: dict[str, float | dict[str, float]] = field(default_factory=dict)


def first_guesses(space: SearchSpace) -> list[Guess]:
    """The guesses for this space's methods and sources, in the order they are tried."""
    aliases, n = list(space.sources), len(space.sources)
    guesses = []
    if "task_arithmetic" in space.methods:
        if n > 1:
            for alias in aliases:
                one_hot = {a: float(a == alias) for a in aliases}
                guesses.append(Guess(f"{alias} alone", "task_arithmetic", {"weight": one_hot}))
        guesses.append(Guess(f"task_arithmetic, weight 1/{n}", "task_arithmetic", {"weight": 1 / n}))
        guesses.append(Guess("task_arithmetic, weight 1", "task_arithmetic", {"weight": 1.0}))
    for name, method in space.methods.items():
        if _sparsifies_task_vectors(method):
            weight = 1.0 if method.param("normalize").default else 1 / n
            label = f"{name}, density {DENSITY}, weight {'1' if weight == 1 else f'1/{n}'}"
            guesses.append(Guess(label, name, {"weight": weight, "density": DENSITY}))
    return guesses


def warm_start_trials(space: SearchSpace) -> list[tuple[str, dict[str, Any]]]:
    """(label, params) of every guess the space can express, without repeats."""
    out: list[tuple[str, dict[str, Any]]] = []
    for guess in first_guesses(space):
        params = guess_params(space, guess)
        if params is not None and all(params != p for _, p in out):
            out.append((guess.label, params))
    return out


def guess_params(space: SearchSpace, guess: Guess) -> dict[str, Any] | None:
    """The guess as the space's parameters (its method's, the method choice and LiNeS'),
    or None where the space cannot express it."""
    trial = _GuessTrial(space, guess)
    try:
        space.sample(trial)
    except _Inexpressible:
        return None
    return trial.params


def enqueue_warm_start(study: optuna.Study, space: SearchSpace, limit: int | None = None) -> list[str]:
    """Enqueue the guesses on ``study`` (the first ``limit`` of them: no more than the
    budget scores); their labels. The caller enqueues on a new study only: a resumed one
    has them already."""
    trials = warm_start_trials(space)[:limit]
    for label, params in trials:
        study.enqueue_trial(params, user_attrs={WARM_START_ATTR: label}, skip_if_exists=True)
    return [label for label, _ in trials]


def _sparsifies_task_vectors(method: MergeMethod) -> bool:
    """A method of the task-arithmetic family (per-source weight, a ``normalize`` switch)
    that keeps a ``density`` fraction of each task vector."""
    weight, density = method.param("weight"), method.param("density")
    return (method.sparsity.knob == "density" and method.param("normalize") is not None
            and weight is not None and weight.per_model and density is not None and density.per_model)


class _Inexpressible(Exception):
    """The guess asks for a value the space cannot take."""


class _GuessTrial:
    """A stand-in trial that answers `SearchSpace.sample` with the guess's values and
    records those of the guess's method (with a flat space, the other methods' knobs are
    asked too: they are left to the sampler)."""

    def __init__(self, space: SearchSpace, guess: Guess):
        self.space, self.guess = space, guess
        self.params: dict[str, Any] = {}

    def suggest_float(self, name: str, low: float, high: float) -> float:
        return self._answer(name, FloatDistribution(low, high))

    def suggest_int(self, name: str, low: int, high: int) -> int:
        return self._answer(name, IntDistribution(low, high))

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self._answer(name, CategoricalDistribution(choices))

    def _answer(self, name: str, dist: Any) -> Any:
        if name in self.params:  # asked again (space.shared): the first answer holds
            return self.params[name]
        method = self.guess.method
        if name == METHOD_PARAM:
            value = method
        elif name.startswith((f"{method}.", LINES_PREFIX)):
            value = self._knob_value(name, dist)
        else:  # another method's knob in a flat space: any valid value, not recorded
            return _fallback(dist, None)
        if not _holds(dist, value):
            raise _Inexpressible(name)
        self.params[name] = value
        return value

    def _knob_value(self, name: str, dist: Any) -> Any:
        prefix, _, rest = name.partition(".")
        knob, _, tail = rest.partition(".")
        if prefix == "lines":
            return _fallback(dist, _lines_default(knob))
        if knob == "epsilon_frac":
            return EPSILON_FRAC
        if knob in self.guess.knobs:
            return self._per_source(self.guess.knobs[knob], self._alias(tail))
        p = self.space.methods[self.guess.method].param(knob)
        return _fallback(dist, None if p is None or p.required else p.default)

    def _per_source(self, value: float | dict[str, float], alias: str | None) -> float:
        if not isinstance(value, dict):
            return value
        if alias in value:
            return value[alias]
        if alias is None and len(set(value.values())) == 1:  # shared: one value fits all
            return next(iter(value.values()))
        raise _Inexpressible(alias)

    def _alias(self, tail: str) -> str | None:
        """The source alias a knob name's tail starts with (None: a shared or global
        knob); the longest match, as an alias may contain dots."""
        names = [*self.space.sources, BASE_ALIAS]
        hits = [a for a in names if tail == a or tail.startswith(f"{a}.")]
        return max(hits, key=len, default=None)


def _lines_default(knob: str) -> Any:
    return next((p.default for p in LINES_PARAMS if p.name == knob), None)


def _fallback(dist: Any, default: Any) -> Any:
    """``default`` where the distribution holds it, else the middle of the range (the
    first choice of a categorical)."""
    if default is not None and _holds(dist, default):
        return default
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[0]
    if isinstance(dist, IntDistribution):
        return (dist.low + dist.high) // 2
    return (dist.low + dist.high) / 2


def _holds(dist: Any, value: Any) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    return not isinstance(value, bool) and dist.low <= value <= dist.high
