"""mergekit configs in and out: a recipe from a mergekit YAML (``models:`` or
depth-preserving ``slices:``), a recipe as the YAML `mergekit-yaml` builds the same merge
from, and reading a recipe file in either format.

This sits beside the merge engine, not in `mergesearch.recipe`, because it reads the
method registry (which methods mergekit has, their defaults, which are random) and the
architecture (which tensors mergekit plans with the first and the last slice).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mergesearch.errors import RecipeError
from mergesearch.files import load_yaml
from mergesearch.merging.architecture import POST_WEIGHTS, PRE_WEIGHTS
from mergesearch.merging.registry import get_method
from mergesearch.recipe import Conditional, ParamValue, Recipe, evaluate_setting, first_setting

UNION_REFUSAL = ("mergesearch does not build merged vocabularies ('union'); "
                 "use tokenizer_source: base")


def load_recipe(path: str | Path) -> Recipe:
    """Read our recipe JSON or a mergekit YAML, whichever the file holds."""
    data = load_yaml(path, "recipe", RecipeError)
    if "merge_method" in data:
        return from_mergekit(data, source=str(path))
    return Recipe.from_dict(data, source=str(path))


# ---- out -------------------------------------------------------------------------------


def to_mergekit(recipe: Recipe, out_dtype: str | None = None) -> dict[str, Any]:
    """mergekit's config for this recipe; RecipeError where mergekit 0.1.5 cannot express
    it (a method it lacks; LiNeS other than through a GTA method's lambda). ``out_dtype``:
    the merged model's dtype where the recipe leaves it to the base (a caller that opened
    the base knows it), so that mergekit writes the same weights."""
    parameters = _mergekit_parameters(recipe)
    out: dict[str, Any] = {
        "merge_method": recipe.method,
        "models": [
            {"model": s.model, **({"parameters": _dump(s.parameters)} if s.parameters else {})}
            for s in recipe.models
        ],
    }
    if recipe.base_model is not None:
        out["base_model"] = recipe.base_model
    if parameters:
        out["parameters"] = _dump(parameters)
    for key in ("tokenizer_source", "chat_template"):
        if getattr(recipe, key) is not None:
            out[key] = getattr(recipe, key)
    if recipe.compute_dtype != "auto":
        out["dtype"] = recipe.compute_dtype or "float32"
    written = recipe.dtype or out_dtype
    if written and written != out.get("dtype"):
        out["out_dtype"] = written
    return out


def to_mergekit_yaml(recipe: Recipe, out_dtype: str | None = None) -> str:
    """`to_mergekit` as YAML, headed by `mergekit_caveat` as comments where there is one."""
    text = yaml.safe_dump(to_mergekit(recipe, out_dtype), sort_keys=False)
    caveat = mergekit_caveat(recipe)
    return "".join(f"# {line}\n" for line in caveat.splitlines()) + text if caveat else text


def mergekit_caveat(recipe: Recipe) -> str | None:
    """Why mergekit builds other weights from this recipe's config, or None: a random
    method's masks come from our seeded generator, while mergekit draws its own."""
    try:
        random = get_method(recipe.method).random
    except KeyError:
        return None
    if not random:
        return None
    return (f"mergekit draws {recipe.method}'s random masks itself, unseeded, so this config\n"
            "builds a different model from this recipe's. To rebuild this recipe's weights\n"
            "run `mergesearch merge recipe.json OUT` (or export with --save-model).")


def _mergekit_parameters(recipe: Recipe) -> dict[str, ParamValue]:
    try:
        method = get_method(recipe.method)
    except KeyError:
        return dict(recipe.parameters)  # unknown here: mergekit will say so itself
    if not method.mergekit:
        raise RecipeError(
            f"method: mergekit 0.1.5 has no {recipe.method!r} merge method, so this recipe has "
            f"no mergekit config; merge it with `mergesearch merge`")
    params = dict(recipe.parameters)
    if recipe.lines is None:
        return params
    # LiNeS is exact as a lambda gradient [l*alpha, l*(alpha+beta)] where lambda scales
    # the merged task vector (mergekit's generalized task arithmetic): mergekit evaluates
    # a gradient at l/(L-1) for layer l and at 0 for the other tensors, as LiNeS does.
    lam_param = method.param("lambda")
    lam = params.get("lambda", lam_param.default if lam_param else None)
    if lam_param is None or isinstance(lam, bool) or not isinstance(lam, (int, float)):
        why = (f"{recipe.method} has no lambda to carry it" if lam_param is None
               else "its lambda is not a single number")
        raise RecipeError(f"lines: mergekit cannot express LiNeS for this recipe ({why}); "
                          f"merge it with `mergesearch merge`")
    a, b = recipe.lines.alpha, recipe.lines.beta
    params["lambda"] = [lam * a, lam * (a + b)]
    return params


def _dump(params: dict[str, ParamValue]) -> dict[str, Any]:
    def one(v: ParamValue) -> Any:
        if isinstance(v, Conditional):
            return {k: x for k, x in v.model_dump(mode="json").items() if x is not None}
        if isinstance(v, list):
            return [one(x) for x in v]
        return v

    return {k: one(v) for k, v in params.items()}


# ---- in --------------------------------------------------------------------------------


def from_mergekit(data: dict[str, Any] | str, source: str = "mergekit config") -> Recipe:
    """Import a mergekit config (`models:` or depth-preserving `slices:` form)."""
    if isinstance(data, str):
        data = yaml.safe_load(data)
    data = _yaml_numbers(dict(data))
    method = data.pop("merge_method", None)
    if not method:
        raise RecipeError(f"{source}: merge_method is missing")
    base = data.pop("base_model", None)
    params = data.pop("parameters", None) or {}
    # mergekit loads (and so computes in) `dtype`, else each tensor's stored dtype, and
    # writes `out_dtype`, else what it computed in.
    compute = data.pop("dtype", None)
    dtype = data.pop("out_dtype", None) or compute
    tokenizer_source = _tokenizer_source(data, source)
    chat_template = data.pop("chat_template", None)
    if "modules" in data:
        raise RecipeError(f"{source}: modules: configs are not supported; use models: or slices:")
    models, slices = data.pop("models", None), data.pop("slices", None)
    if data:
        raise RecipeError(f"{source}: unknown key {sorted(data)[0]!r}")
    if bool(models) == bool(slices):
        raise RecipeError(f"{source}: exactly one of 'models' or 'slices' must be given")
    ranges = None
    if slices:
        models, params, ranges = _flatten_slices(slices, params, base, source, method)
    return Recipe.from_dict(
        {"method": method, "base_model": base, "models": models, "parameters": params,
         "dtype": dtype, "compute_dtype": compute or "auto",
         "tokenizer_source": tokenizer_source, "chat_template": chat_template,
         "slice_ranges": ranges},
        source=source,
    )


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml_numbers(data: Any) -> Any:
    """YAML 1.1 reads ``1e-8`` (no dot) as a string; mergekit takes it as the number, and
    every knob here is a number or a flag, so parameter values like it become floats."""
    if isinstance(data, dict):
        return {k: (_yaml_numbers(v) if k not in ("model", "base_model", "filter") else v)
                for k, v in data.items()}
    if isinstance(data, list):
        return [_yaml_numbers(v) for v in data]
    if isinstance(data, str) and _NUMBER.fullmatch(data):
        return float(data)
    return data


def _tokenizer_source(data: dict[str, Any], source: str) -> str | None:
    """mergekit's `tokenizer_source`, or the `source` of its newer `tokenizer:` section.
    What would change the vocabulary (a union, added tokens, padding) is refused: the
    embeddings mergekit writes would then differ from ours."""
    legacy, section = data.pop("tokenizer_source", None), data.pop("tokenizer", None)
    if legacy is not None and section is not None:
        raise RecipeError(f"{source}: give tokenizer_source or tokenizer, not both")
    if section is not None:
        if not isinstance(section, dict):
            raise RecipeError(f"{source}: tokenizer: expected a mapping with a source")
        for key in sorted(section):
            if key == "source" or section[key] is None:
                continue
            what = {"tokens": "sets token embeddings",
                    "pad_to_multiple_of": "pads the vocabulary"}.get(key)
            if what is None:
                raise RecipeError(f"{source}: tokenizer: unknown key {key!r}")
            raise RecipeError(f"{source}: tokenizer.{key}: mergekit {what} there and "
                              f"mergesearch does not; use tokenizer_source: base")
        legacy, where = section.get("source", "union"), "tokenizer.source"
    else:
        where = "tokenizer_source"
    if legacy is None:
        return None
    if legacy == "union":
        raise RecipeError(f"{source}: {where}: union: {UNION_REFUSAL}")
    if not isinstance(legacy, str):
        raise RecipeError(f"{source}: {where}: expected 'base' or a model of the merge")
    return legacy


# ---- slices ----------------------------------------------------------------------------


def _flatten_slices(
    slices: list[dict[str, Any]], top: dict[str, Any], base: str | None, source: str, method: str,
) -> tuple[list[dict[str, Any]], dict[str, Any], list[tuple[int, int]]]:
    """Turn depth-preserving `slices:` into one models list with per-layer parameter lists
    (and the slices' layer ranges, for the check against the model's layer count).

    Each slice's gradients are evaluated at mergekit's per-slice t for each of its layers,
    so the resulting one-value-per-layer lists reproduce the slice semantics exactly.
    """
    order, ranges = _slice_layout(slices, base, source)
    if len(slices) == 1:
        sl = slices[0]
        models = [{"model": s["model"], "parameters": s.get("parameters") or {}} for s in sl["sources"]]
        params = dict(top)
        for k, v in (sl.get("parameters") or {}).items():
            params[k] = _fall_back(v, top[k]) if k in top else v
        return models, params, ranges
    # Several slices: every parameter becomes an explicit per-layer list (per filter).
    flat = _PerLayer(slices, ranges, source, method)

    def own(sl: dict[str, Any]) -> dict[str, Any]:
        return sl.get("parameters") or {}

    keys = {k for sl in slices for k in own(sl)} | set(top)
    params = {k: flat.value(lambda sl: [own(sl), top], k) for k in keys}
    models = []
    for name in order:
        def scopes(sl: dict[str, Any], name: str = name) -> list[dict[str, Any]]:
            mine = [s.get("parameters") or {} for s in sl["sources"] if s["model"] == name]
            return [*mine, own(sl), top]

        pkeys = {k for sl in slices for s in sl["sources"] if s["model"] == name
                 for k in (s.get("parameters") or {})}
        models.append({"model": name, "parameters": {k: flat.value(scopes, k) for k in pkeys}})
    return models, params, ranges


def _slice_layout(slices: list[dict[str, Any]], base: str | None, source: str,
                  ) -> tuple[list[str], list[tuple[int, int]]]:
    """The models of the slices (in the first slice's order) and their layer ranges; a
    RecipeError for slices that change the depth or mix models."""
    order: list[str] = []
    ranges: list[tuple[int, int]] = []
    different = None
    for i, sl in enumerate(slices):
        srcs = sl.get("sources") or []
        if not srcs:
            raise RecipeError(f"{source}: slices[{i}].sources is empty")
        if sl.get("base_model") not in (None, base):
            raise RecipeError(f"{source}: slices[{i}].base_model differs from base_model")
        names = [s["model"] for s in srcs]
        rngs = {tuple(s["layer_range"]) for s in srcs}
        if len(rngs) != 1:
            raise RecipeError(
                f"{source}: slices[{i}] takes different layer ranges from its sources; "
                "this changes which layer sits where and is not supported"
            )
        ranges.append(rngs.pop())
        if i == 0:
            order = names
        elif set(names) != set(order) and different is None:
            different = i  # said after the ranges: a frankenmerge is likelier
    expected = 0
    for i, (a, b) in enumerate(ranges):
        if a != expected or b <= a:
            raise RecipeError(
                f"{source}: slices[{i}].layer_range {[a, b]} changes the layer count or order "
                "(a depth-changing frankenmerge); only slices that keep every layer at its "
                "position are supported"
            )
        expected = b
    if different is not None:
        raise RecipeError(f"{source}: slices[{different}] uses different models than slices[0]")
    return order, ranges


Scopes = Callable[[dict[str, Any]], list[dict[str, Any]]]


class _PerLayer:
    """One knob of several slices as one value over the whole depth: a list with a value
    per layer (per filter), each evaluated at its slice's own t, as mergekit does."""

    def __init__(self, slices: list[dict[str, Any]], ranges: list[tuple[int, int]],
                 source: str, method: str):
        self.slices, self.ranges, self.source, self.method = slices, ranges, source, method

    def value(self, scopes: Scopes, key: str) -> Any:
        settings = [[s[key] for s in scopes(sl) if s.get(key) is not None] for sl in self.slices]
        if not any(settings):
            return None
        seen: list[str | None] = []
        for values in settings:
            for v in values:
                seen += [c for c in _conditions(v) if c not in seen and c != "*"]
        # Each filter name stands in for the tensors it matches: a more specific filter
        # goes first (a self_attn tensor also matches attn) and the catch-all last, or a
        # slice's catch-all would shadow another slice's filters.
        filters = [*_specific_first([f for f in seen if f is not None]), None]
        conds = []
        for f in filters:
            vals = [self._resolve(scopes(sl), f or "", j / (b - a - 1) if b - a > 1 else 1.0, key)
                    for (a, b), sl in zip(self.ranges, self.slices) for j in range(b - a)]
            conds.append({"filter": f, "value": _compact(vals)} if f else {"value": _compact(vals)})
        layers = conds[0]["value"] if len(conds) == 1 else conds
        # mergekit plans the embeddings with the first slice and the final norm and
        # lm_head with the last, both at t = 0: say so with filters ahead of the layers.
        edges = []
        for names, sl in ((PRE_WEIGHTS, self.slices[0]), (POST_WEIGHTS, self.slices[-1])):
            for name in names:
                v = self._resolve(scopes(sl), name, 0.0, key)
                if v != evaluate_setting(_coerce(layers), name, 0.0):
                    edges.append({"filter": name, "value": v})
        if not edges:
            return layers
        return edges + (conds if len(conds) > 1 else [{"value": layers}])

    def _resolve(self, scopes: list[dict[str, Any]], name: str, t: float, key: str) -> Any:
        """mergekit's precedence: the first scope that gives a value, else the default."""
        v = first_setting([{key: _coerce(s[key])} for s in scopes if key in s], key, name, t)
        return v if v is not None else self._default(key)

    def _default(self, key: str) -> Any:
        # A slice without a value falls back to the method's default, as in mergekit.
        try:
            param = get_method(self.method).param(key)
        except KeyError:
            param = None
        if param is None or param.required:
            raise RecipeError(f"{self.source}: parameter {key!r} is missing in some slices")
        return param.default


def _specific_first(filters: list[str]) -> list[str]:
    """First-seen order, except that a filter goes ahead of those it contains."""
    out: list[str] = []
    for f in filters:
        out.insert(next((i for i, g in enumerate(out) if g in f), len(out)), f)
    return out


def _compact(vals: list[Any]) -> Any:
    """One value for a list whose values are all equal."""
    return vals[0] if all(v == vals[0] for v in vals) else vals


def _fall_back(value: Any, fallback: Any) -> Any:
    """``value``, falling back to ``fallback`` for tensors none of its filters match
    (mergekit reads a slice's parameters before the top-level ones)."""
    if {None, "*"} & set(_conditions(value)):  # it gives a value for every tensor
        return value
    return _as_conditions(value) + _as_conditions(fallback)


def _as_conditions(v: Any) -> list[dict[str, Any]]:
    if isinstance(v, dict):
        return [v]
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        return list(v)
    return [{"value": v}]


def _conditions(v: Any) -> list[str | None]:
    if isinstance(v, dict):
        return [v.get("filter")]
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        return [x.get("filter") for x in v]
    return [None]


def _coerce(v: Any) -> ParamValue:
    if isinstance(v, dict):
        return Conditional(**v)
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        return [Conditional(**x) for x in v]
    return v
