"""The knobs of a search space: what the config says of each method's knobs (a value, a
``[low, high]`` range, or nothing), checked against the registry's valid ranges in one
place, and settled once into a spec per knob: a distribution to sample, a fixed value, or
None (the method's default)."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from mergesearch.config import Space
from mergesearch.errors import ConfigError
from mergesearch.merging.registry import MergeMethod, Param, all_methods, get_method
from mergesearch.merging.sparsify import della_density_range, della_in_range

Spec = Any  # a knob in this space: a distribution, a fixed value, or None (the default)
_EDGE = 1e-6  # keeps density strictly inside (epsilon, 1 - epsilon)


def check_space(space: Space) -> None:
    """The config's space against the registry, before any model is read: every method is
    known and every override names one of its knobs, within the knob's valid range (the
    one place bounds are checked: `SearchSpace` builds its distributions from the same)."""
    for name, overrides in space.methods.items():
        try:
            method = get_method(name)
        except KeyError:
            raise ConfigError(f"space.methods.{name}: unknown merge method; "
                              f"known: {', '.join(sorted(all_methods()))}") from None
        for key in overrides:
            if method.param(key) is None:
                raise ConfigError(f"space.methods.{name}.{key}: not a parameter of {name}")
    for key in space.params:
        if not any(get_method(m).param(key) for m in space.methods):
            raise ConfigError(f"space.params.{key}: no chosen method has this parameter")
    for name in space.methods:
        for p in get_method(name).params:
            knob_bound(space, get_method(name), p)


def knob_bound(space: Space, method: MergeMethod, p: Param) -> Any:
    """The config's value or [low, high] for one knob of one method (None: not given),
    checked against the knob's valid range; ConfigError naming the field otherwise."""
    own = space.methods.get(method.name, {})
    field = f"space.methods.{method.name}.{p.name}" if p.name in own else f"space.params.{p.name}"
    bound = own.get(p.name, space.params.get(p.name))
    if isinstance(bound, list) and (len(bound) != 2 or bound[0] > bound[1]):
        raise ConfigError(f"{field}: a range is [low, high] with low <= high")
    for v in bound if isinstance(bound, list) else [] if bound is None else [bound]:
        problem = p.check(v)
        if problem:
            raise ConfigError(f"{field}: {problem}" + ("" if p.name in own else f" (for {method.name})"))
    return bound


def knob_specs(space: Space, method: MergeMethod, num_layers: int) -> dict[str, Spec]:
    """Each knob of ``method`` as a spec, for a model of ``num_layers`` layers."""
    knobs = {p.name: _spec(space, method, p, num_layers) for p in method.params}
    if method.sparsity.kind == "della":
        _fit_density_to_epsilon(knobs, method)
    return knobs


def _spec(space: Space, method: MergeMethod, p: Param, num_layers: int) -> Spec:
    bound = knob_bound(space, method, p)
    if bound is not None and not isinstance(bound, list):
        return bound
    if p.type is bool:
        return CategoricalDistribution(sorted(set(bound))) if bound else None
    low_high = bound or p.search
    if low_high is None and p.required:
        raise ConfigError(f"space.methods.{method.name}.{p.name}: required by {method.name} "
                          f"and not searched by default; give a value or [low, high]")
    if low_high and p.type is int:
        if p.layers and not bound:  # a fraction of the depth
            low_high = (int(low_high[0] * num_layers), int(low_high[1] * num_layers))
        return IntDistribution(int(low_high[0]), int(low_high[1]))
    return FloatDistribution(*low_high) if low_high else None


def _fit_density_to_epsilon(knobs: dict[str, Spec], method: MergeMethod) -> None:
    """A fixed (or default) epsilon e: keep density inside (e, 1 - e), DELLA's rule."""
    e = knobs["epsilon"] if knobs["epsilon"] is not None else method.param("epsilon").default
    d = knobs["density"]
    if isinstance(e, FloatDistribution) or d is None:
        return
    where = f"space.methods.{method.name}.density"
    if isinstance(d, FloatDistribution):
        open_low, open_high = della_density_range(e)
        low, high = max(d.low, open_low + _EDGE), min(d.high, open_high - _EDGE)
        if low > high:
            raise ConfigError(f"{where}: no density in [{d.low}, {d.high}] keeps density "
                              f"+/- epsilon {e} inside (0, 1)")
        knobs["density"] = FloatDistribution(low, high)
    elif not della_in_range(d, e):
        raise ConfigError(f"{where}: density {d} +/- epsilon {e} must stay inside (0, 1)")


def suggest(trial: optuna.Trial, key: str, spec: Spec) -> Any:
    """The trial's value for a knob: sampled from a distribution, else the fixed value."""
    if isinstance(spec, FloatDistribution):
        return trial.suggest_float(key, spec.low, spec.high)
    if isinstance(spec, IntDistribution):
        return trial.suggest_int(key, spec.low, spec.high)
    if isinstance(spec, CategoricalDistribution):
        return trial.suggest_categorical(key, spec.choices)
    return spec  # fixed by the config, or None: the method's default
