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
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergesearch.errors import RecipeError

Scalar = Union[bool, int, float, str]


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    filter: str | None = None
    value: Scalar | list[Scalar]


ParamValue = Union[Scalar, list[Scalar], list[Conditional], Conditional]


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


# The dtypes a merge computes in and a merged model is written in (mergekit's names, less int64).
DTYPES = ("float32", "float16", "bfloat16", "float64")

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

    # ---- helpers --------------------------------------------------------------------

    def source_names(self) -> list[str]:
        return [s.model for s in self.models]

    def setting(self, key: str, tensor_name: str, t: float, source: SourceModel | None = None) -> Any:
        """A knob's value for one tensor at relative depth ``t``: the source's own value,
        else the recipe's; None where neither gives one (the method's default applies)."""
        scopes = [self.parameters] if source is None else [source.parameters, self.parameters]
        return first_setting(scopes, key, tensor_name, t)


# ---- parameter values ----------------------------------------------------------------


def evaluate_setting(value: ParamValue, tensor_name: str, t: float) -> Any:
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
                return evaluate_setting(cond.value, tensor_name, t)
        return None
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not numeric:
        return value[int(t * (len(value) - 1))]
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


def first_setting(scopes: list[dict[str, ParamValue]], key: str, tensor_name: str, t: float) -> Any:
    """The value of ``key`` from the first scope that gives one for this tensor (mergekit's
    precedence: a model's parameters, then the slice's, then the top level), or None."""
    for scope in scopes:
        if key in scope:
            v = evaluate_setting(scope[key], tensor_name, t)
            if v is not None:
                return v
    return None


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


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}" if loc else err["msg"]


