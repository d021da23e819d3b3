"""The cost evaluator's kept fraction: read from each method's declared `Sparsity`, and equal
to what the merge actually keeps."""

from __future__ import annotations

import pytest
import torch

from mergesearch.evaluators.cost import kept_fraction
from mergesearch.merging import MergeEngine, load_live_model
from mergesearch.merging.registry import all_methods, get_method
from mergesearch.merging.validate import validate_recipe
from mergesearch.recipe import Recipe

DENSITY = 0.1


def sparsifying_methods() -> list[str]:
    """Every registered method with a knob saying what fraction of the task vectors to keep."""
    return sorted(name for name, m in all_methods().items()
                  if m.param("density") or m.sparsity.knob is not None)


def recipe_at(name: str, base: str, sources: list[str]) -> Recipe:
    """``name`` keeping DENSITY of each task vector; the second source has weight 0, so the
    merged task vector is the first source's, as sparsified (for SCE, which has no weights,
    the mask is shared by both)."""
    method = get_method(name)
    knob = method.sparsity.knob or "density"
    per_model = {"density": DENSITY, "epsilon": DENSITY / 2}
    models = []
    for source, weight in zip(sources, (1.0, 0.0), strict=True):
        knobs = {"weight": weight, **per_model, knob: DENSITY}
        models.append({"model": source, "parameters": {
            k: v for k, v in knobs.items() if method.param(k) and method.param(k).per_model}})
    glob = {k: v for k, v in {"k": 1, knob: DENSITY}.items()
            if method.param(k) and not method.param(k).per_model}
    recipe = Recipe(method=name, base_model=base, models=models, parameters=glob)
    validate_recipe(recipe)
    return recipe


@pytest.fixture(scope="module")
def merged_setup(families):
    f = families["llama"]
    tv = MergeEngine(f["base"], [f["s0"], f["s1"]], device="cpu")
    model = load_live_model(f["base"], torch.device("cpu"))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    return f, tv, model, base


def test_every_density_method_declares_its_sparsity():
    names = sparsifying_methods()
    assert {"pcb", "consensus_ties", "sce", "ties", "dare_ties", "della", "breadcrumbs"} <= set(names)
    kinds = {n: get_method(n).sparsity.kind for n in names}
    assert kinds["ties"] == kinds["consensus_ties"] == "magnitude"
    assert kinds["task_arithmetic"] == kinds["consensus_ta"] == "none"
    assert (kinds["dare_ties"], kinds["della"], kinds["breadcrumbs"], kinds["pcb"], kinds["sce"]) == (
        "random", "della", "outliers", "pcb", "variance")


@pytest.mark.parametrize("name, entries", [
    ("ties", 100), ("consensus_ties", 100), ("breadcrumbs", 100), ("dare_ties", 100.0),
    ("della", 100.0),
    ("pcb", 99),  # 1000 - int(1000 * 0.9) - 1: the cut entry's beta is min-maxed to 0
    ("sce", 100),
])
def test_declared_rule_keeps_the_hand_computed_count_of_1000_entries(name, entries):
    assert get_method(name).sparsity.kept_entries(DENSITY, 1000) == entries


@pytest.mark.parametrize("name", sparsifying_methods())
def test_kept_fraction_at_density_0_1_equals_the_nonzero_share_of_the_merged_task_vector(
        name, merged_setup):
    f, tv, model, base = merged_setup
    recipe = recipe_at(name, f["base"], [f["s0"], f["s1"]])
    tv.merge_into(model, recipe)
    changed = sum(int((p.detach() != base[n]).sum()) for n, p in model.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    random = get_method(name).sparsity.kind in ("random", "della")
    assert kept_fraction(recipe, tv) == pytest.approx(changed / total, abs=0.01 if random else 1e-4)
