"""The model card (README.md) written beside a merged model, as mergekit writes one: what was
merged, how, and (for an exported trial) how it scored."""

from __future__ import annotations

import json
from typing import Any

import yaml

from mergesearch.recipe import Recipe


def model_card(recipe: Recipe, name: str, trial: int | None = None,
               scores: dict[str, float] | None = None) -> str:
    """A short Markdown card with Hugging Face front matter for a merge of ``recipe``."""
    front = {"base_model": recipe.base_model or recipe.source_names(),
             "tags": ["mergesearch", "merge"], "library_name": "transformers"}
    base = f" with `{recipe.base_model}` as the base" if recipe.base_model else ""
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", f"# {name}", "",
        "A merge of pre-trained language models made with mergesearch.", "",
        "## Merge method", "", f"`{recipe.method}`{base}.", "",
        "## Models merged", "",
        *(f"- `{s.model}`" + (f": {_knobs(s.parameters)}" if s.parameters else "")
          for s in recipe.models),
    ]
    knobs = {**recipe.parameters, **({"lines": recipe.lines.model_dump()} if recipe.lines else {})}
    if knobs:
        lines += ["", "## Knobs", "", *(f"- {k}: {_value(v)}" for k, v in knobs.items())]
    if trial is not None:
        lines += ["", "## Search", "", f"Trial {trial} of a mergesearch study."]
        if scores:
            lines += ["", *(f"- {k}: {v:.6g}" for k, v in scores.items())]
    lines += ["", "## Recipe", "", "`mergesearch merge recipe.json` rebuilds these weights.",
              "", "```json", recipe.to_json(), "```", ""]
    return "\n".join(lines)


def _knobs(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_value(v)}" for k, v in params.items())


def _value(v: Any) -> str:
    if hasattr(v, "model_dump"):
        v = v.model_dump(mode="json", exclude_none=True)
    elif isinstance(v, list):
        v = [x.model_dump(mode="json", exclude_none=True) if hasattr(x, "model_dump") else x
             for x in v]
    return json.dumps(v)
