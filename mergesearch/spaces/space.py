"""SearchSpace: the config's `space` as Optuna distributions, and a trial as a Recipe.

Define-by-run: the method is a categorical; each method's knobs are sampled only when
that method is chosen, under names prefixed by it (``ties.density.add.g0``). Which knobs
exist, their defaults and search ranges come from the merge-method registry; the config
overrides them (``space.methods.<m>.<knob>`` before ``space.params.<knob>``): a value fixes
a knob, ``[low, high]`` bounds it.

Per-model knobs get one dimension per source. Knobs in ``per_layer`` get ``layer_groups``
values over depth: ``piecewise`` writes one value per layer, constant within each group of
consecutive layers; ``smooth`` writes the values as anchors the engine interpolates over
depth. With ``split_attn_mlp`` those knobs get separate values for attention (``attn``
matches Llama's ``self_attn`` and GPT-2's ``attn``), MLP (``mlp``) and all other tensors.

Methods with a fixed number of sources are searched over which sources: ``slerp`` and
``passthrough`` take one (a categorical), ``nuslerp`` a pair. DELLA's epsilon is sampled as
a fraction of the largest value its densities allow, so every sampled recipe is valid.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import optuna

from mergesearch.config import ConfigError, Space
from mergesearch.merging.registry import MergeMethod, Param, get_method
from mergesearch.recipe import Recipe

SPLIT = (("attn", "attn"), ("mlp", "mlp"))  # (dimension suffix, tensor-name filter)


class SearchSpace:
    def __init__(self, space: Space, base: str, sources: dict[str, str], num_layers: int,
                 seed: int = 0):
        self.space, self.base, self.sources = space, base, dict(sources)
        self.num_layers, self.seed = num_layers, seed
        self.methods: dict[str, MergeMethod] = {m: get_method(m) for m in space.methods}
        if space.layer_groups > num_layers:
            raise ConfigError(f"space.layer_groups: {space.layer_groups} groups for a model of "
                              f"{num_layers} layers")
        for name, method in self.methods.items():
            if len(self.sources) < method.min_sources:
                raise ConfigError(f"space.methods.{name}: needs at least {method.min_sources} sources, "
                                  f"the config has {len(self.sources)}")

    # ---- sampling ---------------------------------------------------------------------

    def sample(self, trial: optuna.Trial) -> Recipe:
        names = list(self.methods)
        name = names[0] if len(names) == 1 else trial.suggest_categorical("method", names)
        method = self.methods[name]
        aliases = self._choose_sources(trial, method)
        params: dict[str, Any] = {}
        for p in method.global_params:
            value = self._knob(trial, method, p, f"{name}.{p.name}")
            if value is not None:
                params[p.name] = value
        models = []
        for alias in aliases:
            per: dict[str, Any] = {}
            for p in method.per_model_params:
                if p.name == "epsilon":
                    continue
                value = self._per_model(trial, method, p, f"{name}.{p.name}.{alias}")
                if value is not None:
                    per[p.name] = value
            if method.param("epsilon"):
                eps = self._epsilon(trial, method, f"{name}.epsilon.{alias}", per.get("density", 1.0))
                if eps is not None:
                    per["epsilon"] = eps
            models.append({"model": self.sources[alias], "parameters": per})
        return Recipe(method=name, base_model=None if method.base == "none" else self.base,
                      models=models, parameters=params, seed=self.seed)

    def recipe_from_params(self, params: dict[str, Any]) -> Recipe:
        """Rebuild a trial's recipe from its parameters alone."""
        return self.sample(optuna.trial.FixedTrial(params))

    # ---- pieces -----------------------------------------------------------------------

    def _choose_sources(self, trial: optuna.Trial, method: MergeMethod) -> list[str]:
        aliases = list(self.sources)
        if method.max_sources is None or len(aliases) <= method.max_sources:
            return aliases
        k = method.max_sources
        if k == 1:
            return [trial.suggest_categorical(f"{method.name}.source", aliases)]
        options = ["+".join(c) for c in combinations(aliases, k)]
        return trial.suggest_categorical(f"{method.name}.sources", options).split("+")

    def _override(self, method: MergeMethod, p: Param) -> Any:
        own = self.space.methods.get(method.name, {})
        return own.get(p.name, self.space.params.get(p.name))

    def _range(self, method: MergeMethod, p: Param) -> tuple[float, float] | None:
        bound = self._override(method, p)
        if isinstance(bound, list):
            return bound[0], bound[1]
        if bound is not None or p.type is bool:
            return None
        return p.search

    def _knob(self, trial: optuna.Trial, method: MergeMethod, p: Param, key: str) -> Any:
        """One value: fixed by the config, sampled in its range, or left to the default."""
        bound = self._override(method, p)
        if p.type is bool:
            if isinstance(bound, list):
                return trial.suggest_categorical(key, sorted(set(bound)))
            return bound
        if bound is not None and not isinstance(bound, list):
            return bound
        rng = self._range(method, p)
        return None if rng is None else trial.suggest_float(key, *rng)

    def _per_model(self, trial: optuna.Trial, method: MergeMethod, p: Param, key: str) -> Any:
        if p.name not in self.space.per_layer or self._range(method, p) is None:
            return self._knob(trial, method, p, key)
        if not self.space.split_attn_mlp:
            return self._over_depth(trial, method, p, key)
        value = [{"filter": f, "value": self._over_depth(trial, method, p, f"{key}.{suffix}")}
                 for suffix, f in SPLIT]
        return value + [{"value": self._over_depth(trial, method, p, f"{key}.other")}]

    def _over_depth(self, trial: optuna.Trial, method: MergeMethod, p: Param, key: str) -> Any:
        groups = self.space.layer_groups
        if groups == 1:
            return self._knob(trial, method, p, key)
        values = [self._knob(trial, method, p, f"{key}.g{g}") for g in range(groups)]
        if self.space.layer_mode == "smooth":
            return values  # anchors, interpolated over depth by the engine
        return [values[layer * groups // self.num_layers] for layer in range(self.num_layers)]

    def _epsilon(self, trial: optuna.Trial, method: MergeMethod, key: str, density: Any) -> Any:
        p = method.param("epsilon")
        bound = self._override(method, p)
        if bound is not None and not isinstance(bound, list):
            return bound
        hi = (self._range(method, p) or (p.default, p.default))[1]
        # the widest epsilon every density of this model allows: d - e > 0 and d + e < 1
        ds = [d for d in _numbers(density) if d < 1] or [0.5]
        room = min(min(d, 1 - d) for d in ds) * 0.999
        return min(hi, room) * trial.suggest_float(f"{key}_frac", 0.0, 1.0)

    # ---- description ------------------------------------------------------------------

    def dimensions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """Every dimension any trial may sample (union over methods and sources)."""
        dims: dict[str, optuna.distributions.BaseDistribution] = {}

        class Recorder:
            def suggest_float(self, name, low, high, **_):
                dims[name] = optuna.distributions.FloatDistribution(low, high)
                return (low + high) / 2

            def suggest_categorical(self, name, choices):
                dims[name] = optuna.distributions.CategoricalDistribution(choices)
                return self.choice.get(name, choices[0])

        rec = Recorder()
        for m in self.methods:
            method = self.methods[m]
            options: list[dict[str, Any]] = [{"method": m}]
            if method.max_sources is not None and len(self.sources) > method.max_sources:
                key = f"{m}.source" if method.max_sources == 1 else f"{m}.sources"
                choices = (list(self.sources) if method.max_sources == 1 else
                           ["+".join(c) for c in combinations(self.sources, method.max_sources)])
                options = [{"method": m, key: c} for c in choices]
            for choice in options:
                rec.choice = choice
                self.sample(rec)
        return dims


def _numbers(value: Any) -> list[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v.get("value") if isinstance(v, dict) else v)]
    return []
