"""Export a chosen trial: recipe.json, mergekit.yaml and, optionally, the merged model."""

from __future__ import annotations

import os
from pathlib import Path

from optuna.trial import FrozenTrial

from mergesearch.config import Config
from mergesearch.errors import StudyError
from mergesearch.merging import Checkpoint
from mergesearch.merging.build import open_live, write_merged
from mergesearch.merging.card import model_card
from mergesearch.merging.mergekit import to_mergekit_yaml
from mergesearch.merging.output import new_file
from mergesearch.merging.registry import get_method
from mergesearch.recipe import Recipe, RecipeError
from mergesearch.search.calibration import attach_fisher
from mergesearch.search.worker import resolve_models


def trial_recipe(trial: FrozenTrial) -> Recipe:
    data = trial.user_attrs.get("recipe")
    if not data:
        raise StudyError(f"trial {trial.number} has no recipe")
    return Recipe.from_dict(data, source=f"trial {trial.number} recipe")


def export_trial(config: Config, trial: FrozenTrial, out: str | Path, save_model: bool = False) -> Path:
    """Write the trial's recipe (ours and mergekit's) and, with ``save_model``, the merged
    checkpoint. The recipe files are written beside their targets first and renamed into
    place last, and the model folder is replaced atomically, so an export that fails
    part-way (disk full, permission denied) leaves the previous export intact."""
    recipe = trial_recipe(trial)
    out = Path(out)
    previous = any((out / name).exists() for name in ("recipe.json", "mergekit.yaml", "model"))
    staged: list[tuple[str | None, Path]] = []  # (temporary file or None: remove, target)
    try:
        out.mkdir(parents=True, exist_ok=True)
        staged.append((_stage(out / "recipe.json", recipe.to_json() + "\n"), out / "recipe.json"))
        try:
            yaml_text = to_mergekit_yaml(recipe, out_dtype=_model_dtype(config, recipe))
            staged.append((_stage(out / "mergekit.yaml", yaml_text), out / "mergekit.yaml"))
        except RecipeError:  # a method mergekit lacks: no stale mergekit.yaml either
            staged.append((None, out / "mergekit.yaml"))
        if save_model:
            _write_model(config, trial, recipe, out)
        while staged:
            tmp, target = staged.pop(0)
            if tmp is None:
                target.unlink(missing_ok=True)
            else:
                os.replace(tmp, target)
    except OSError as e:
        kept = "; the previous export is unchanged" if previous else ""
        raise StudyError(f"--out: cannot write {out} ({e.strerror or e}){kept}") from None
    finally:
        for tmp, _ in staged:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
    return out


def _write_model(config: Config, trial: FrozenTrial, recipe: Recipe, out: Path) -> None:
    """The merged model the trial scored, with its model card, to ``out / "model"``."""
    sources = [s for s in dict.fromkeys(recipe.source_names()) if s != recipe.base_model]
    base = recipe.base_model or _config_base(config)
    engine, model = open_live(base, [s for s in sources if s != base],
                              dtype=recipe.dtype or config.models.dtype,
                              trust_remote_code=config.models.trust_remote_code)
    if "fisher" in get_method(recipe.method).needs:
        attach_fisher(config, engine)
    card = model_card(recipe, out.name, trial=trial.number, scores=trial.user_attrs.get("scores"))
    write_merged(engine, model, recipe, out / "model", card=card)


def _config_base(config: Config) -> str:
    return resolve_models(config)[0]


def _model_dtype(config: Config, recipe: Recipe) -> str:
    """The dtype of the model the study scored: the recipe's, the config's, else the base's
    as stored (what transformers' ``dtype="auto"`` loads)."""
    if recipe.dtype or config.models.dtype:
        return str(recipe.dtype or config.models.dtype).removeprefix("torch.")
    base = Checkpoint.open(recipe.base_model or _config_base(config)).config
    return str(base.get("dtype") or base.get("torch_dtype") or "float32")


def _stage(path: Path, text: str) -> str:
    """``text`` written and synced to a temporary file beside ``path``, for `os.replace`; its
    mode is the umask's, as a plain write's would be."""
    fd, tmp = new_file(path.parent, f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp
