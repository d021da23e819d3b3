"""Cost metrics of a recipe, read from the recipe and the tensor sizes alone.

``kept_fraction``: the fraction of task-vector entries the merge keeps, weighted by tensor
size, over every source. How many entries a method keeps at its knobs is declared on the
method (`mergesearch.merging.registry.Sparsity`): exact for deterministic masks (TIES,
breadcrumbs, PCB, SCE), the expected value for random ones (DARE, DELLA), 1 for methods
that keep every entry; for consensus (TALL) masks, the inner method's, an upper bound.
Lets a search trade quality against sparsity.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, field_validator

from mergesearch.evaluators.base import Evaluator, EvaluatorOptions
from mergesearch.merging.architecture import layer_t
from mergesearch.merging.engine import resolve_params
from mergesearch.merging.registry import get_method
from mergesearch.merging.validate import method_inputs
from mergesearch.recipe import Recipe


def kept_fraction(recipe: Recipe | None, engine: Any) -> float:
    if recipe is None:
        return 1.0
    method = get_method(recipe.method)
    sparsity = method.sparsity
    if sparsity.knob is None:
        return 1.0
    _, inputs = method_inputs(method, recipe)
    kept = total = 0.0
    for name in engine.names:
        n = math.prod(engine.shapes[name])
        t = layer_t(engine.layers[name], engine.num_layers)
        value = resolve_params(method, recipe, inputs, name, t)[sparsity.knob]
        for fraction in value if isinstance(value, list) else [value] * len(inputs):
            kept += sparsity.kept_entries(fraction, n)
            total += n
    return kept / total if total else 1.0


class CostOptions(EvaluatorOptions):
    """A cost objective: which cost (one so far)."""

    metric: str | None = Field(None, description="kept_fraction (the default)")

    @field_validator("metric")
    @classmethod
    def _offered(cls, v: str | None) -> str | None:
        if v not in (None, "kept_fraction"):
            raise ValueError("cost objectives offer kept_fraction")
        return v


class CostEvaluator(Evaluator):
    direction = "minimize"  # fewer kept entries: a sparser, cheaper merge
    Options = CostOptions

    def setup(self, model: Any, tokenizer: Any, engine: Any = None) -> None:
        self.engine = engine

    def measure(self, recipe: Recipe | None) -> tuple[float, dict[str, float]]:
        if self.engine is None:
            raise ValueError("kept_fraction needs the merge engine (score a recipe, not a model folder)")
        return kept_fraction(recipe, self.engine), {"stderr": 0.0}  # exact
