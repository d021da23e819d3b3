"""Cost metrics of a recipe, read from the recipe and the tensor sizes alone.

``kept_fraction``: the fraction of task-vector entries the merge keeps, weighted by tensor
size, over every source: exact for magnitude top-k (TIES, breadcrumbs: int(d * n) entries,
at least one for TIES), the expected value for random masks (DARE, DELLA), 1 for methods
that keep every entry. Lets a search trade quality against sparsity.
"""

from __future__ import annotations

import math
from typing import Any

from mergesearch.evaluators.base import Evaluator
from mergesearch.merging.engine import resolve_params
from mergesearch.merging.registry import get_method
from mergesearch.merging.validate import method_inputs
from mergesearch.recipe import Recipe, layer_t

SPARSIFYING = {"ties": "topk", "breadcrumbs": "floor", "breadcrumbs_ties": "floor",
               "dare_ties": "mean", "dare_linear": "mean", "della": "mean", "della_linear": "mean"}


def kept_fraction(recipe: Recipe | None, engine: Any) -> float:
    if recipe is None or recipe.method not in SPARSIFYING:
        return 1.0
    method = get_method(recipe.method)
    _, inputs = method_inputs(method, recipe)
    rule = SPARSIFYING[recipe.method]
    kept = total = 0.0
    for name in engine.names:
        n = math.prod(engine.stacks[name].shape[1:])
        t = layer_t(engine.layers[name], engine.num_layers)
        for d in resolve_params(method, recipe, inputs, name, t)["density"]:
            if d >= 1:
                k = n
            elif rule == "topk":
                k = 0 if d <= 0 else max(1, int(d * n))
            elif rule == "floor":
                k = int(d * n)
            else:
                k = max(0.0, d) * n
            kept += k
            total += n
    return kept / total if total else 1.0


class CostEvaluator(Evaluator):
    def setup(self, model: Any, tokenizer: Any, engine: Any = None) -> None:
        self.engine = engine

    def measure(self, recipe: Recipe | None) -> tuple[float, dict[str, float]]:
        if self.engine is None:
            raise ValueError("kept_fraction needs the merge engine (score a recipe, not a model folder)")
        return kept_fraction(recipe, self.engine), {"stderr": 0.0}  # exact
