"""SearchSpace: the config's `space` as Optuna distributions, and a trial as a Recipe.

Define-by-run. The method is a categorical ``method`` (none when only one is searched);
each method's knobs are sampled only when that method is chosen, under names prefixed by
it::

    <method>.<knob>                      global knob            ties.lambda
    <method>.<knob>.<alias>              per-model knob         ties.weight.add
        ... .g<i>                        layer group i          ties.weight.add.g0
        ... .attn / .mlp / .other        split_attn_mlp         ties.weight.add.attn.g1
    <method>.source / <method>.sources   which source(s)        slerp.source, nuslerp.sources
    <method>.epsilon_frac.<alias>        DELLA's epsilon        della.epsilon_frac.add
    <method>.<knob> (per-model)          space.shared           ties.weight (every source)
    lines.alpha, lines.beta              LiNeS (space.lines)    shared by every method

Which knobs exist, their defaults and search ranges come from the merge-method registry
(`Param.search`); the config overrides them, ``space.methods.<m>.<knob>`` before
``space.params.<knob>``: a value fixes the knob (written verbatim), ``[low, high]`` bounds
it. Knobs the registry does not search (``search=None``) and booleans stay at the method's
default unless the config gives a value or a range (``[false, true]`` for a boolean).

Knobs named in ``per_layer`` (per-model or global, e.g. slerp's ``t``) get ``layer_groups``
values over depth: ``piecewise`` writes one value per layer, constant within each group of
consecutive layers; ``smooth`` writes the values as anchors the engine interpolates over
depth. ``split_attn_mlp`` gives those knobs three values, written as conditions:

    [{filter: attn}, {filter: .attention.}, {filter: mlp}, {value: <other>}]

``attn`` matches Llama-family ``self_attn`` and GPT-2 ``attn``, ``.attention.`` matches
GPT-NeoX (it shares the attention value; ``post_attention_layernorm`` matches neither);
``mlp`` matches the MLPs of all three; norms, embeddings and the head take the third,
separately searched value.

Sources. Methods with a base role get ``base_model`` = the base and the sources as
models. ``linear`` (no base role) averages the sources *and the base*, which gets its own
weight (``linear.weight.base``), so the search can pull back towards the base. Methods that
take a fixed number of sources are searched over which ones: slerp and passthrough take
one (a categorical over aliases), nuslerp a pair (a categorical over ``a+b`` pairs).

Whole-number knobs (``type=int``: consensus's ``k``, layer_swap's layer counts and
``outer``) are integer dimensions. Knobs that count layers (``Param.layers``) declare their
search range as a fraction of the model's depth: layer_swap's ``n_bottom`` searches 0 ..
L/2 layers.

LiNeS (``space.lines: true``) adds two dimensions shared by all methods, ``lines.alpha``
and ``lines.beta`` (ranges from `mergesearch.merging.lines`); recipes of methods with a
base model carry them as ``lines``, the others (linear, layer_swap) ignore them.

DELLA's epsilon must keep density +/- epsilon inside (0, 1): it is sampled as a fraction
of its range capped by the densities this source drew, so every recipe is valid (the
range's low end yields when a density near 0 or 1 leaves less room). A fixed epsilon
narrows the density range instead.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from mergesearch.config import Space
from mergesearch.errors import ConfigError
from mergesearch.merging.architecture import ATTN_FILTERS, MLP_FILTERS, layer_t
from mergesearch.merging.lines import LINES_PARAMS
from mergesearch.merging.registry import MergeMethod, Param, all_methods, get_method
from mergesearch.merging.sparsify import della_max_epsilon
from mergesearch.recipe import Recipe, evaluate_setting
from mergesearch.spaces.knobs import check_space, knob_specs, suggest

BASE_ALIAS = "base"  # linear's name for the base model among its inputs
METHOD_PARAM = "method"  # the categorical drawn first when several methods are searched
LINES_PREFIX = "lines."  # LiNeS' dimensions, shared by every method


class SearchSpace:
    def __init__(self, space: Space, base: str | None, sources: dict[str, str], num_layers: int,
                 seed: int = 0, flat: bool = False):
        check_space(space)
        self.space, self.base, self.sources = space, base or None, dict(sources)
        self.num_layers, self.seed, self.flat = num_layers, seed, flat
        self.methods: dict[str, MergeMethod] = {m: get_method(m) for m in space.methods}
        self._check_models()
        # method -> knob -> spec, settled once so that sampling only reads it
        self.knobs = {m: knob_specs(space, method, num_layers) for m, method in self.methods.items()}

    # ---- trial -> recipe ---------------------------------------------------------------

    def sample(self, trial: optuna.Trial) -> Recipe:
        """The trial's recipe. With ``flat``, every method's knobs are sampled in every
        trial (those of the methods not chosen go unused): samplers that evolve only the
        dimensions all trials share (NSGA-II/III, CMA-ES) then evolve every knob
        instead of the method alone."""
        names = list(self.methods)
        name = names[0] if len(names) == 1 else trial.suggest_categorical(METHOD_PARAM, names)
        lines = ({p.name: trial.suggest_float(f"{LINES_PREFIX}{p.name}", *p.search) for p in LINES_PARAMS}
                 if self.space.lines else None)
        recipes = {m: self._recipe(trial, m, lines) for m in (names if self.flat else [name])}
        return recipes[name]

    def _recipe(self, trial: optuna.Trial, name: str, lines: dict[str, float] | None = None) -> Recipe:
        method = self.methods[name]
        params = {}
        for p in method.global_params:
            params[p.name] = self._value(trial, method, p, f"{name}.{p.name}")
        models = []
        for alias, path in self._inputs(trial, method):
            per: dict[str, Any] = {}
            suffix = self._alias_suffix(alias)
            for p in method.per_model_params:
                if p.name == "epsilon" and method.sparsity.kind == "della":  # after density, listed later
                    per[p.name] = self._epsilon(trial, method, suffix, per.get("density"))
                else:
                    per[p.name] = self._value(trial, method, p, f"{name}.{p.name}{suffix}")
            models.append({"model": path, "parameters": _set(per)})
        base = None if method.base == "none" else self.base
        return Recipe(method=name, base_model=base, models=models, parameters=_set(params),
                      seed=self.seed, lines=lines if base else None)

    def recipe_from_params(self, params: dict[str, Any]) -> Recipe:
        """Rebuild a trial's recipe from its ``params`` alone (resume, enqueued trials)."""
        return self.sample(optuna.trial.FixedTrial(params))

    def dimensions(self, method: str | None = None) -> dict[str, BaseDistribution]:
        """Every dimension a trial may sample (of one method, or of all with ``method``)."""
        if method is not None and method not in self.methods:
            raise ConfigError(f"space.methods: {method!r} is not searched here; "
                              f"searched: {', '.join(self.methods)}")
        dims: dict[str, BaseDistribution] = {}
        for m in [method] if method else self.methods:
            key, choices = self._source_choices(self.methods[m])
            for choice in choices or [None]:
                self.sample(_Recorder(dims, {METHOD_PARAM: m, key: choice}))
        if method:
            dims.pop(METHOD_PARAM, None)
        return dims

    # ---- pieces ------------------------------------------------------------------------

    def _alias_suffix(self, alias: str) -> str:
        """How a per-model knob's name ends for this input: ``.<alias>``, or nothing with
        ``shared`` (one value for every source; optuna returns a name's first value when it
        is asked again). linear's base keeps its own weight, which pulls towards the base."""
        return "" if self.space.shared and alias != BASE_ALIAS else f".{alias}"

    def _inputs(self, trial: optuna.Trial, method: MergeMethod) -> list[tuple[str, str]]:
        """(alias, path) of the models the method merges, choosing some where it takes a
        fixed number; linear also averages the base."""
        aliases = list(self.sources)
        key, choices = self._source_choices(method)
        if choices:
            aliases = trial.suggest_categorical(key, choices).split("+")
        inputs = [(a, self.sources[a]) for a in aliases]
        if method.base == "none" and method.param("weight") and self.base:
            inputs.insert(0, (BASE_ALIAS, self.base))
        return inputs

    def _source_choices(self, method: MergeMethod) -> tuple[str, list[str] | None]:
        k = method.max_sources
        if k is None or len(self.sources) <= k:
            return "", None
        if k == 1:
            return f"{method.name}.source", list(self.sources)
        return f"{method.name}.sources", ["+".join(c) for c in combinations(self.sources, k)]

    def _value(self, trial: optuna.Trial, method: MergeMethod, p: Param, key: str) -> Any:
        spec = self.knobs[method.name][p.name]
        if not isinstance(spec, FloatDistribution) or p.name not in self.space.per_layer:
            return suggest(trial, key, spec)
        if not self.space.split_attn_mlp:
            return self._over_depth(trial, key, spec)
        attn, mlp, other = (self._over_depth(trial, f"{key}.{part}", spec)
                            for part in ("attn", "mlp", "other"))
        return ([{"filter": f, "value": attn} for f in ATTN_FILTERS]
                + [{"filter": f, "value": mlp} for f in MLP_FILTERS] + [{"value": other}])

    def _over_depth(self, trial: optuna.Trial, key: str, spec: FloatDistribution) -> Any:
        groups = self.space.layer_groups
        if groups == 1:
            return suggest(trial, key, spec)
        values = [suggest(trial, f"{key}.g{g}", spec) for g in range(groups)]
        if self.space.layer_mode == "smooth":
            return values  # anchors, interpolated over depth by the engine
        return [values[layer * groups // self.num_layers] for layer in range(self.num_layers)]

    def _epsilon(self, trial: optuna.Trial, method: MergeMethod, suffix: str, density: Any) -> Any:
        spec = self.knobs[method.name]["epsilon"]
        if not isinstance(spec, FloatDistribution):
            return spec
        # density d < 1 needs epsilon < min(d, 1 - d) at every layer and tensor kind
        ds = [d for d in self._resolved(density) if d < 1]
        cap = min((della_max_epsilon(d) for d in ds), default=spec.high) * (1 - 1e-3)
        high = min(spec.high, cap)
        low = min(spec.low, high)
        frac = trial.suggest_float(f"{method.name}.epsilon_frac{suffix}", 0.0, 1.0)
        return low + frac * (high - low)

    def _resolved(self, value: Any) -> list[float]:
        """The numbers a sampled value takes over every layer, for every tensor kind."""
        if value is None:
            return []
        kinds = [value]
        if isinstance(value, list) and value and isinstance(value[0], dict):
            kinds = [c["value"] for c in value]  # split_attn_mlp conditions
        ts = [layer_t(layer, self.num_layers) for layer in range(self.num_layers)]
        return [evaluate_setting(v, "", t) for v in kinds for t in ts]

    # ---- construction: check the models against the space ------------------------------

    def _check_models(self) -> None:
        space = self.space
        if self.num_layers < 1:
            raise ConfigError(f"models.base: a model with {self.num_layers} layers")
        if space.layer_groups > self.num_layers:
            raise ConfigError(f"space.layer_groups: {space.layer_groups} groups for a model of "
                              f"{self.num_layers} layers")
        known = {p.name for m in all_methods().values() for p in m.params}
        for knob in space.per_layer:
            if knob not in known:
                raise ConfigError(f"space.per_layer: {knob!r} is not a knob of any merge method")
        paths = [self.base] if self.base else []
        for alias, path in self.sources.items():
            if path in paths:
                raise ConfigError(f"models.sources.{alias}: {path} is listed twice (or is the base)")
            paths.append(path)
        for name, method in self.methods.items():
            if method.base == "required" and not self.base:
                raise ConfigError(f"space.methods.{name}: {name} needs a base model (models.base)")
            if len(self.sources) < method.min_sources:
                raise ConfigError(f"space.methods.{name}: needs at least {method.min_sources} "
                                  f"sources, the config has {len(self.sources)}")
            if method.base == "none" and method.param("weight") and BASE_ALIAS in self.sources:
                raise ConfigError(f"models.sources.{BASE_ALIAS}: {name} names the base model's "
                                  f"knobs '{BASE_ALIAS}'; give this source another alias")


def _set(params: dict[str, Any]) -> dict[str, Any]:
    """Leave knobs at their default out of the recipe."""
    return {k: v for k, v in params.items() if v is not None}


class _Recorder:
    """A stand-in trial that records what `sample` asks for (see `dimensions`)."""

    def __init__(self, dims: dict[str, BaseDistribution], choices: dict[str, Any]):
        self.dims, self.choices = dims, choices

    def suggest_float(self, name: str, low: float, high: float) -> float:
        self.dims[name] = FloatDistribution(low, high)
        return (low + high) / 2

    def suggest_int(self, name: str, low: int, high: int) -> int:
        self.dims[name] = IntDistribution(low, high)
        return (low + high) // 2

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        self.dims[name] = CategoricalDistribution(choices)
        return self.choices.get(name, choices[0])
