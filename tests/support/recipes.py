"""Merge recipes over a tiny family, written as users write them, and the tensors they
should give (ours through the engine, mergekit's through its own `run_merge`)."""

from __future__ import annotations

from pathlib import Path

import optuna
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from mergesearch.config import Space
from mergesearch.merging import Checkpoint, MergeEngine
from mergesearch.merging.mergekit import from_mergekit
from mergesearch.recipe import Recipe
from mergesearch.spaces import SearchSpace


def ties_recipe(f: dict, **change) -> dict:
    """A mergekit TIES config over family ``f``'s base, s0 and s1; ``change`` replaces keys."""
    recipe = {"merge_method": "ties", "base_model": f["base"], "parameters": {"density": 0.5},
              "models": [{"model": f["s0"], "parameters": {"weight": 0.6}},
                         {"model": f["s1"], "parameters": {"weight": [0.2, 0.8]}}]}
    recipe.update(change)
    return recipe


def recipe_for(method: str, f: dict) -> Recipe:
    """A recipe of ``method`` over family ``f``'s base and s0..s2, drawn from the search space."""
    sources = {k: f[k] for k in ("s0", "s1", "s2")}
    space = SearchSpace(Space(methods=[method], layer_groups=2), f["base"], sources,
                        Checkpoint.open(f["base"]).num_layers, seed=9)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    return space.sample(study.ask())


def write(recipe: dict, tmp_path: Path) -> Path:
    """``recipe`` as ``tmp_path/recipe.yaml``."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def expected_tensors(f: dict, recipe: dict) -> dict[str, torch.Tensor]:
    """What the engine merges for mergekit config ``recipe`` over family ``f``'s s0 and s1."""
    return dict(MergeEngine(f["base"], [f["s0"], f["s1"]], device="cpu").merged_tensors(
        from_mergekit(recipe)))


def mergekit_tensors(config: dict, out) -> dict[str, torch.Tensor]:
    """What mergekit's own `run_merge` writes for ``config`` into ``out``."""
    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    return tensors


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Every tensor mergekit wrote equals ours (to float32 rounding)."""
    # mergekit leaves out GPT-2's tied lm_head, as the checkpoints do
    assert set(theirs) == set(ours)
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor.float(), atol=1e-6), name
