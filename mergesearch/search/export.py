"""Export a chosen trial: recipe.json, mergekit.yaml and, optionally, the merged model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from optuna.trial import FrozenTrial

from mergesearch.config import Config
from mergesearch.errors import StudyError
from mergesearch.merging.registry import get_method
from mergesearch.recipe import Recipe, RecipeError


def trial_recipe(trial: FrozenTrial) -> Recipe:
    data = trial.user_attrs.get("recipe")
    if not data:
        raise StudyError(f"trial {trial.number} has no recipe")
    return Recipe.from_dict(data, source=f"trial {trial.number} recipe")


def export_trial(config: Config, trial: FrozenTrial, out: str | Path, save_model: bool = False) -> Path:
    """Write the trial's recipe (ours and mergekit's) and, with ``save_model``, the merged
    checkpoint. Every file is replaced atomically, so an export that fails part-way
    leaves the previous export intact."""
    recipe = trial_recipe(trial)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if save_model:
            from mergesearch.merging import TaskVectors, load_live_model
            from mergesearch.merging import save_model as write_model

            sources = [s for s in dict.fromkeys([*recipe.source_names()]) if s != recipe.base_model]
            base = recipe.base_model or _config_base(config)
            engine = TaskVectors(base, [s for s in sources if s != base])
            if "fisher" in get_method(recipe.method).needs:
                from mergesearch.search.fisher import attach_fisher

                attach_fisher(config, engine)
            model = load_live_model(engine.base.path, engine.device, recipe.dtype or config.models.dtype,
                                    trust_remote_code=config.models.trust_remote_code)
            engine.merge_into(model, recipe)
            write_model(model, out / "model", tokenizer_from=engine.base.path, recipe=recipe)
        _write_atomic(out / "recipe.json", recipe.to_json() + "\n")
        try:
            _write_atomic(out / "mergekit.yaml", recipe.to_mergekit_yaml())
        except RecipeError:  # a method mergekit lacks: no stale mergekit.yaml either
            (out / "mergekit.yaml").unlink(missing_ok=True)
    except OSError as e:
        raise StudyError(f"{e.filename or out}: cannot write export ({e.strerror})") from None
    return out


def _config_base(config: Config) -> str:
    from mergesearch.search.worker import resolve_models

    return resolve_models(config)[0]


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
