"""The Recipe: one merge, as a plain value.

A recipe names a method, an optional base model, the source models with their
per-model parameters, the method's global parameters and a seed. It is what the search
space produces, what the engine consumes, what the study stores on each trial and what
export writes out. Parameter values follow mergekit's grammar so that any mergekit
`models:` config is a recipe:

* a scalar (``0.5``, ``true``);
* a gradient: a list of anchors interpolated over the layers (``[0.2, 0.8]``); a list
  with one value per layer is the special case with an anchor on every layer;
* a list of ``{filter, value}`` conditions: the first whose filter is a substring of the
  tensor name (or has no filter) gives the value, e.g. ``self_attn`` or ``mlp``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Scalar = Union[bool, int, float, str]


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    filter: str | None = None
    value: Scalar | list[Scalar]


ParamValue = Union[Scalar, list[Scalar], list[Conditional], Conditional]


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the field or file."""


class Lines(BaseModel):
    """LiNeS: the merged task vector of layer l of L scaled by alpha + beta * l / (L - 1)
    (tensors outside the layers by alpha); see `mergesearch.merging.lines`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    alpha: float = 1.0
    beta: float = 0.0


class SourceModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


# Recipe fields left out of the hash while unset (added after recipes were first stored).
OPTIONAL_FIELDS = ("lines", "compute_dtype", "tokenizer_source", "chat_template", "slice_ranges")


class Recipe(BaseModel):
    """One merge candidate. Immutable; `hash()` is stable across processes and machines."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    base_model: str | None = None
    models: list[SourceModel]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    seed: int = 0
    dtype: str | None = None  # of the merged model's weights (default: the base's)
    # The dtype the merge computes in: float32 unless set (our recipes' default, whatever
    # the checkpoints hold); "auto" computes in each tensor's stored dtype. mergekit
    # configs set it, as mergekit computes in its `dtype` (else the stored dtype).
    compute_dtype: str | None = None
    lines: Lines | None = None  # a LiNeS layer schedule on top of the method
    # What mergekit writes beside the weights: the tokenizer of "base" or of a model of
    # the merge (default: the base's), and a chat template (a built-in name or Jinja text).
    tokenizer_source: str | None = None
    chat_template: str | None = None
    # The layer ranges of the mergekit slices this recipe was read from: only the model
    # can tell whether they cover its layers exactly (`validate_recipe` checks it).
    slice_ranges: list[tuple[int, int]] | None = None

    @field_validator("compute_dtype")
    @classmethod
    def _float32_is_the_default(cls, v: str | None) -> str | None:
        return None if v in ("float32", "torch.float32") else v

    # ---- identity -------------------------------------------------------------------

    def canonical_json(self) -> str:
        # Fields added later enter only when set, so recipes without them keep their hashes.
        exclude = {k for k in OPTIONAL_FIELDS if getattr(self, k) is None}
        return json.dumps(self.model_dump(mode="json", exclude=exclude), sort_keys=True,
                          separators=(",", ":"))

    def hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    # ---- our JSON -------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_defaults=True), indent=2)

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> Recipe:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise RecipeError(f"{source}: {_first_error(e)}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read our recipe JSON or a mergekit YAML, whichever the file holds."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise RecipeError(f"{path}: cannot read recipe ({e.strerror})") from None
        except UnicodeDecodeError as e:  # config.read_text's message; recipe imports no config
            raise RecipeError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                              f"{e.start}); save the file as UTF-8") from None
        try:
            data = yaml.safe_load(text)  # JSON is YAML
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML/JSON ({_yaml_problem(e)})") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: expected a mapping at the top level")
        if "merge_method" in data:
            return cls.from_mergekit(data, source=str(path))
        return cls.from_dict(data, source=str(path))

    # ---- mergekit YAML --------------------------------------------------------------

    def to_mergekit(self, out_dtype: str | None = None) -> dict[str, Any]:
        """mergekit's config for this recipe; RecipeError where mergekit 0.1.5 cannot
        express it (a method it lacks; LiNeS other than through a GTA method's lambda).
        ``out_dtype``: the merged model's dtype where the recipe leaves it to the base (a
        caller that opened the base knows it), so that mergekit writes the same weights."""
        parameters = self._mergekit_parameters()
        out: dict[str, Any] = {
            "merge_method": self.method,
            "models": [
                {"model": s.model, **({"parameters": _dump(s.parameters)} if s.parameters else {})}
                for s in self.models
            ],
        }
        if self.base_model is not None:
            out["base_model"] = self.base_model
        if parameters:
            out["parameters"] = _dump(parameters)
        for key in ("tokenizer_source", "chat_template"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.compute_dtype != "auto":
            out["dtype"] = self.compute_dtype or "float32"
        written = self.dtype or out_dtype
        if written and written != out.get("dtype"):
            out["out_dtype"] = written
        return out

    def _mergekit_parameters(self) -> dict[str, ParamValue]:
        # Only the registry knows which methods mergekit has (a look above, as in slices).
        from mergesearch.merging.registry import get_method

        try:
            method = get_method(self.method)
        except KeyError:
            return dict(self.parameters)  # unknown here: mergekit will say so itself
        if not method.mergekit:
            raise RecipeError(
                f"method: mergekit 0.1.5 has no {self.method!r} merge method, so this recipe has "
                f"no mergekit config; merge it with `mergesearch merge`")
        params = dict(self.parameters)
        if self.lines is None:
            return params
        # LiNeS is exact as a lambda gradient [l*alpha, l*(alpha+beta)] where lambda scales
        # the merged task vector (mergekit's generalized task arithmetic): mergekit evaluates
        # a gradient at l/(L-1) for layer l and at 0 for the other tensors, as LiNeS does.
        lam_param = method.param("lambda")
        lam = params.get("lambda", lam_param.default if lam_param else None)
        if lam_param is None or isinstance(lam, bool) or not isinstance(lam, (int, float)):
            why = (f"{self.method} has no lambda to carry it" if lam_param is None
                   else "its lambda is not a single number")
            raise RecipeError(f"lines: mergekit cannot express LiNeS for this recipe ({why}); "
                              f"merge it with `mergesearch merge`")
        a, b = self.lines.alpha, self.lines.beta
        params["lambda"] = [lam * a, lam * (a + b)]
        return params

    def to_mergekit_yaml(self, out_dtype: str | None = None) -> str:
        text = yaml.safe_dump(self.to_mergekit(out_dtype), sort_keys=False)
        caveat = self.mergekit_caveat()
        return "".join(f"# {line}\n" for line in caveat.splitlines()) + text if caveat else text

    def mergekit_caveat(self) -> str | None:
        """Why mergekit builds other weights from this recipe's config, or None: a random
        method's masks come from our seeded generator, while mergekit draws its own."""
        from mergesearch.merging.registry import get_method

        try:
            random = get_method(self.method).random
        except KeyError:
            return None
        if not random:
            return None
        return (f"mergekit draws {self.method}'s random masks itself, unseeded, so this config\n"
                "builds a different model from this recipe's. To rebuild this recipe's weights\n"
                "run `mergesearch merge recipe.json OUT` (or export with --save-model).")

    @classmethod
    def from_mergekit(cls, data: dict[str, Any] | str, source: str = "mergekit config") -> Recipe:
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
        return cls.from_dict(
            {"method": method, "base_model": base, "models": models, "parameters": params,
             "dtype": dtype, "compute_dtype": compute or "auto",
             "tokenizer_source": tokenizer_source, "chat_template": chat_template,
             "slice_ranges": ranges},
            source=source,
        )

    # ---- helpers --------------------------------------------------------------------

    def source_names(self) -> list[str]:
        return [s.model for s in self.models]


# ---- parameter values ----------------------------------------------------------------


def evaluate(value: ParamValue, tensor_name: str, t: float) -> Any:
    """Resolve a parameter value for one tensor at relative depth ``t`` in [0, 1].

    Same rules as mergekit's `evaluate_setting`: numeric anchor lists interpolate
    linearly at ``t * (n - 1)``; non-numeric lists pick the anchor at ``int(t * (n - 1))``;
    conditions apply in order, the first matching filter wins; no match gives None.
    """
    if isinstance(value, Conditional):
        value = [value]
    if isinstance(value, (bool, int, float, str)):
        return value
    if not value:
        return None
    if all(isinstance(v, Conditional) for v in value):
        for cond in value:
            if cond.filter in (None, "*") or (tensor_name and cond.filter in tensor_name):
                return evaluate(cond.value, tensor_name, t)
        return None
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not numeric:
        return value[int(t * (len(value) - 1))]
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


def anchors(value: ParamValue) -> list[list[Scalar]]:
    """Every anchor list inside a value (for length checks)."""
    if isinstance(value, Conditional):
        value = [value]
    if isinstance(value, list):
        if value and all(isinstance(v, Conditional) for v in value):
            return [a for c in value for a in anchors(c.value)]
        return [value]
    return []


def scalars(value: ParamValue) -> list[Scalar]:
    """Every scalar a value can resolve to at an anchor (for range checks)."""
    return [v for a in anchors(value) for v in a] or (
        [value] if isinstance(value, (bool, int, float, str)) else []
    )


def layer_t(layer: int | None, num_layers: int) -> float:
    """Relative depth as mergekit computes it: layer i of L at i/(L-1); non-layer tensors at 0."""
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def _dump(params: dict[str, ParamValue]) -> dict[str, Any]:
    def one(v: ParamValue) -> Any:
        if isinstance(v, Conditional):
            return {k: x for k, x in v.model_dump(mode="json").items() if x is not None}
        if isinstance(v, list):
            return [one(x) for x in v]
        return v

    return {k: one(v) for k, v in params.items()}


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


UNION_REFUSAL = ("mergesearch does not build merged vocabularies ('union'); "
                 "use tokenizer_source: base")


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


def _yaml_problem(e: yaml.YAMLError) -> str:
    """The parser's complaint on one line (its own message spans several)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}" if loc else err["msg"]


def _flatten_slices(
    slices: list[dict[str, Any]], top_params: dict[str, Any], base: str | None, source: str,
    method: str,
) -> tuple[list[dict[str, Any]], dict[str, Any], list[tuple[int, int]]]:
    """Turn depth-preserving `slices:` into one models list with per-layer parameter lists
    (and the slices' layer ranges, for the check against the model's layer count).

    Each slice's gradients are evaluated at mergekit's per-slice t for each of its layers,
    so the resulting one-value-per-layer lists reproduce the slice semantics exactly.
    """
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
        elif set(names) != set(order):
            different = i if different is None else different  # said after the ranges: a frankenmerge is likelier
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
    if len(slices) == 1:
        sl = slices[0]
        models = [{"model": s["model"], "parameters": s.get("parameters") or {}} for s in sl["sources"]]
        params = dict(top_params)
        for k, v in (sl.get("parameters") or {}).items():
            params[k] = _fall_back(v, top_params[k]) if k in top_params else v
        return models, params, ranges

    # Several slices: every parameter becomes an explicit per-layer list (per filter).
    def default(key: str) -> Any:
        # A slice without a value falls back to the method's default, as in mergekit; only
        # the registry knows it (the one place a recipe looks above itself).
        from mergesearch.merging.registry import get_method

        try:
            param = get_method(method).param(key)
        except KeyError:
            param = None
        if param is None or param.required:
            raise RecipeError(f"{source}: parameter {key!r} is missing in some slices")
        return param.default

    def resolve(settings: list[Any], name: str, t: float, key: str) -> Any:
        # mergekit's precedence: the first setting that gives a value, else the default
        for setting in settings:
            v = evaluate(_coerce(setting), name, t)
            if v is not None:
                return v
        return default(key)

    def per_layer(getter, key: str) -> Any:
        if not any(getter(sl) for sl in slices):
            return None
        seen: list[str | None] = []
        for sl in slices:
            for v in getter(sl):
                seen += [c for c in _conditions(v) if c not in seen and c != "*"]
        # Each filter name stands in for the tensors it matches: a more specific filter
        # goes first (a self_attn tensor also matches attn) and the catch-all last, or a
        # slice's catch-all would shadow another slice's filters.
        filters = [*_specific_first([f for f in seen if f is not None]), None]
        conds = []
        for f in filters:
            vals = [resolve(getter(sl), f or "", j / (b - a - 1) if b - a > 1 else 1.0, key)
                    for (a, b), sl in zip(ranges, slices) for j in range(b - a)]
            conds.append({"filter": f, "value": _compact(vals)} if f else {"value": _compact(vals)})
        layers = conds[0]["value"] if len(conds) == 1 else conds
        # mergekit plans the embeddings with the first slice and the final norm and
        # lm_head with the last, both at t = 0: say so with filters ahead of the layers.
        edges = []
        for names, sl in ((PRE_WEIGHTS, slices[0]), (POST_WEIGHTS, slices[-1])):
            for name in names:
                v = resolve(getter(sl), name, 0.0, key)
                if v != evaluate(_coerce(layers), name, 0.0):
                    edges.append({"filter": name, "value": v})
        if not edges:
            return layers
        return edges + (conds if len(conds) > 1 else [{"value": layers}])

    # Top-level gradients too: mergekit evaluates them at each slice's own t.
    keys = {k for sl in slices for k in (sl.get("parameters") or {})} | set(top_params)
    params = dict(top_params)
    for k in keys:
        params[k] = per_layer(lambda sl, k=k: [v for v in [(sl.get("parameters") or {}).get(k), top_params.get(k)] if v is not None], k)
    models = []
    for name in order:
        pkeys = {k for sl in slices for s in sl["sources"] if s["model"] == name for k in (s.get("parameters") or {})}
        mparams = {}
        for k in pkeys:
            def g(sl, k=k, name=name):
                own = [(s.get("parameters") or {}).get(k) for s in sl["sources"] if s["model"] == name]
                return [v for v in [*own, (sl.get("parameters") or {}).get(k), top_params.get(k)] if v is not None]
            mparams[k] = per_layer(g, k)
        models.append({"model": name, "parameters": mparams})
    return models, params, ranges


# The tensors before the first layer and after the last in the supported architectures
# (Llama/Mistral/Qwen/Gemma/Phi, GPT-2, GPT-NeoX), named as in mergekit's definitions.
PRE_WEIGHTS = ("model.embed_tokens.weight", "transformer.wte.weight", "transformer.wpe.weight",
               "gpt_neox.embed_in.weight")
POST_WEIGHTS = ("lm_head.weight", "lm_head.bias", "model.norm.weight", "model.norm.bias",
                "model.final_layernorm.weight", "model.final_layernorm.bias",
                "transformer.ln_f.weight", "transformer.ln_f.bias",
                "gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias",
                "embed_out.weight")


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

