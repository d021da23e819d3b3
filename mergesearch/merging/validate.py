"""Recipe checks against the registry, made before any weights are read."""

from __future__ import annotations

from typing import Any

from mergesearch.errors import RecipeError
from mergesearch.merging.lines import LINES_PARAMS
from mergesearch.merging.registry import MergeMethod, get_method
from mergesearch.merging.sparsify import della_in_range
from mergesearch.recipe import DTYPES, Recipe, SourceModel, anchors, scalars


def method_inputs(method: MergeMethod, recipe: Recipe) -> tuple[str | None, list[SourceModel]]:
    """The base and the inputs a method sees: methods without a base role take every listed
    model; the others take the listed models other than the base, in recipe order."""
    if method.base == "none":
        return None, list(recipe.models)
    return recipe.base_model, [s for s in recipe.models if s.model != recipe.base_model]


def validate_recipe(recipe: Recipe, num_layers: int | None = None) -> MergeMethod:
    """Raise RecipeError naming the first bad field; return the recipe's method."""
    try:
        method = get_method(recipe.method)
    except KeyError as e:
        raise RecipeError(f"method: {e.args[0]}") from None
    base, inputs = method_inputs(method, recipe)
    if recipe.dtype is not None and recipe.dtype.removeprefix("torch.") not in DTYPES:
        raise RecipeError(f"dtype: {recipe.dtype!r} is not one of {', '.join(DTYPES)}")
    if recipe.compute_dtype not in (None, "auto") and recipe.compute_dtype.removeprefix("torch.") not in DTYPES:
        raise RecipeError(f"compute_dtype: {recipe.compute_dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if not recipe.models:
        raise RecipeError("models: at least one source model is needed")
    if method.base == "required" and not base:
        raise RecipeError(f"base_model: {method.name} needs a base model")
    if method.base == "none" and base and base not in recipe.source_names() and method.name != "passthrough":
        raise RecipeError(
            f"base_model: {method.name} has no base role; list {base} under models with a weight"
        )
    if len(inputs) < method.min_sources:
        raise RecipeError(f"models: {method.name} needs at least {method.min_sources} model(s) besides the base, got {len(inputs)}")
    if method.max_sources is not None and len(inputs) > method.max_sources:
        raise RecipeError(f"models: {method.name} takes at most {method.max_sources} model(s) besides the base, got {len(inputs)}")
    names = recipe.source_names()
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise RecipeError(f"models: {dup} is listed twice")
    _check_slices(recipe, num_layers)

    known = {p.name for p in method.params}
    for where, params, allowed in (
        ("parameters", recipe.parameters, known),
        *((f"models[{i}].parameters", s.parameters, {p.name for p in method.per_model_params})
          for i, s in enumerate(recipe.models)),
    ):
        for key, value in params.items():
            if key not in allowed:
                hint = " (a global knob: set it under parameters)" if key in known else ""
                raise RecipeError(f"{where}.{key}: not a parameter of {method.name}{hint}; "
                                  f"its parameters are {', '.join(sorted(known)) or 'none'}")
            _check_value(method, f"{where}.{key}", key, value, num_layers)

    for p in method.global_params:
        if p.required and p.name not in recipe.parameters:
            raise RecipeError(f"parameters.{p.name}: required by {method.name}")
    for i, s in enumerate(recipe.models):
        if s not in inputs:
            continue
        for p in method.per_model_params:
            if p.required and p.name not in s.parameters and p.name not in recipe.parameters:
                raise RecipeError(f"models[{i}].parameters.{p.name}: required by {method.name} for {s.model}")
    _check_della(method, recipe, num_layers)
    _check_lines(method, recipe, base)
    return method


def _check_lines(method: MergeMethod, recipe: Recipe, base: str | None) -> None:
    """LiNeS scales a task vector: the method must have a base model in this recipe."""
    if recipe.lines is None:
        return
    if not base:
        raise RecipeError(f"lines: LiNeS scales the merged task vector, and {method.name} "
                          f"has no base model here to take it from")
    for p in LINES_PARAMS:
        problem = p.check(getattr(recipe.lines, p.name))
        if problem:
            raise RecipeError(f"lines.{p.name}: {problem}")


def _check_slices(recipe: Recipe, num_layers: int | None) -> None:
    """A recipe read from mergekit slices must keep every layer: slices that leave layers
    out or go past the last one build a model of another depth in mergekit."""
    if recipe.slice_ranges is None or num_layers is None:
        return
    start, last = 0, len(recipe.slice_ranges) - 1
    for i, (a, b) in enumerate(recipe.slice_ranges):
        if a != start or b <= a or b > num_layers or (i == last and b != num_layers):
            raise RecipeError(
                f"slices[{i}].layer_range: [{a}, {b}] of a model with {num_layers} layers: the "
                f"slices must cover layers 0..{num_layers - 1} in order; depth-changing "
                "(frankenmerge) slices are not supported")
        start = b


def _check_value(method: MergeMethod, field: str, key: str, value: Any, num_layers: int | None) -> None:
    param = method.param(key)
    # Any number of anchors is a gradient: mergekit interpolates them over the layers,
    # more anchors than layers included (one per layer is the exact special case).
    for a in anchors(value):
        if not a:
            raise RecipeError(f"{field}: empty list")
    for v in scalars(value):
        if param.type is not bool and v is None:
            continue
        problem = param.check(v)
        if problem and not (param.default is None and v is None):
            raise RecipeError(f"{field}: {problem}")
        if param.layers and num_layers is not None and not problem and v > num_layers:
            raise RecipeError(f"{field}: {v} layers of a model with {num_layers}")


def _check_della(method: MergeMethod, recipe: Recipe, num_layers: int | None) -> None:
    """DELLA needs density +/- epsilon inside (0, 1) wherever density < 1."""
    if method.sparsity.kind != "della":
        return
    layers = range(num_layers or 2)
    for i, s in enumerate(recipe.models):
        for layer in layers:
            t = layer / (len(layers) - 1)
            d = _resolve(s, recipe, "density", t, method)
            e = _resolve(s, recipe, "epsilon", t, method)
            if isinstance(d, (int, float)) and isinstance(e, (int, float)) and not della_in_range(d, e):
                raise RecipeError(
                    f"models[{i}].parameters.epsilon: density {d:g} +/- epsilon {e:g} must stay inside (0, 1)"
                )


def _resolve(s: SourceModel, recipe: Recipe, key: str, t: float, method: MergeMethod) -> Any:
    v = recipe.setting(key, "", t, s)
    return v if v is not None else method.param(key).default
