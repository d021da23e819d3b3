"""The tokenizer and chat template written beside merged weights, as mergekit 0.1.5 writes them.

By default the base's tokenizer files are copied (mergekit: the base, else a model of the
merge). A recipe's ``tokenizer_source`` ("base" or a model of the merge) names the tokenizer
to write instead, and its ``chat_template`` (a built-in name or Jinja text) is set on that
tokenizer, saved the way transformers saves one (``chat_template.jinja``). mergekit rebuilds
the embeddings for the tokenizer it writes, so a ``tokenizer_source`` is taken only where
that leaves them as they are: every model has the tokenizer's vocabulary, one row a token.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from mergesearch.errors import RecipeError
from mergesearch.merging.checkpoint import Checkpoint
from mergesearch.merging.mergekit import UNION_REFUSAL
from mergesearch.recipe import Recipe

# The built-in template names mergekit 0.1.5 knows (its `_data/chat_templates`); ours are
# written from each format's public description and live in `chat_templates/`.
MERGEKIT_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")
TEMPLATES = resources.files("mergesearch.merging") / "chat_templates"


def shipped_templates() -> list[str]:
    return sorted(f.name.removesuffix(".jinja") for f in TEMPLATES.iterdir()
                  if f.name.endswith(".jinja"))


def chat_template_text(value: str) -> str:
    """The Jinja text of a recipe's ``chat_template``, read as mergekit reads it: a short
    one-line value without ``{`` names a built-in template; anything else is the template
    itself (mergekit takes it from 20 characters with a ``{``)."""
    ours = ", ".join(shipped_templates())
    if len(value) < 256 and "\n" not in value and "{" not in value:
        f = TEMPLATES / f"{value}.jinja"
        if f.is_file():
            return f.read_text()
        if value == "auto":
            raise RecipeError("chat_template: 'auto' (the models' most common template) is not "
                              f"supported; name one ({ours}) or give the template's Jinja text")
        if value in MERGEKIT_TEMPLATES:
            raise RecipeError(f"chat_template: mergesearch does not ship mergekit's {value!r} "
                              f"template (it has {ours}); give the template's Jinja text")
    if len(value) < 20 or "{" not in value:
        raise RecipeError(f"chat_template: {value!r} is neither a built-in template ({ours}) "
                          "nor Jinja text")
    return value


def tokenizer_donor(recipe: Recipe, default: str | Path | None) -> Path | None:
    """The folder whose tokenizer is written: ``tokenizer_source``'s, else ``default``.
    RecipeError where mergekit would write another tokenizer or other embeddings."""
    if recipe.chat_template is not None:
        chat_template_text(recipe.chat_template)
    source = recipe.tokenizer_source
    if source is None:
        donor = Path(default) if default is not None else None
        if recipe.chat_template is not None and (donor is None or Checkpoint.open(str(donor)).vocab is None):
            raise RecipeError(f"chat_template: {donor or 'the merge'} has no tokenizer to carry it")
        return donor
    if source == "union":
        raise RecipeError(f"tokenizer_source: union: {UNION_REFUSAL}")
    names = list(dict.fromkeys([*([recipe.base_model] if recipe.base_model else []),
                                *recipe.source_names()]))
    if source != "base" and source not in names:
        raise RecipeError(f"tokenizer_source: {source} is not a model of this merge; "
                          "use base or one of its models")
    donor = Checkpoint.open(names[0] if source == "base" else source)
    vocab = donor.vocab
    if vocab is None:
        raise RecipeError(f"tokenizer_source: {donor.name} has no tokenizer")
    for name in names:
        if Checkpoint.open(name).vocab not in (None, vocab):
            raise RecipeError(f"tokenizer_source: the vocabulary of {name} differs from "
                              f"{donor.name}'s; {UNION_REFUSAL}")
    rows = donor.config.get("text_config", donor.config).get("vocab_size")
    if rows is not None and rows != len(vocab):
        raise RecipeError(
            f"tokenizer_source: {donor.name}'s tokenizer has {len(vocab)} tokens and its "
            f"embeddings {rows} rows; mergekit resizes the embeddings to the tokenizer and "
            "mergesearch does not: leave tokenizer_source out to keep the base's tokenizer")
    return donor.path


def write_tokenizer(folder: Path, recipe: Recipe | None, default: str | Path | None,
                    files: tuple[str, ...]) -> None:
    """Write the tokenizer (``files`` of the donor folder) and the recipe's chat template."""
    donor = tokenizer_donor(recipe, default) if recipe is not None else (
        Path(default) if default is not None else None)
    if donor is None:
        return
    template = recipe.chat_template if recipe is not None else None
    if template is not None:
        from transformers import AutoTokenizer

        # As mergekit: the tokenizer with its template set, saved by transformers.
        tokenizer = AutoTokenizer.from_pretrained(donor, trust_remote_code=False)
        tokenizer.chat_template = chat_template_text(template)
        tokenizer.save_pretrained(folder)
        files = ("generation_config.json",)
    for name in files:
        src = donor / name
        if src.exists() and not (folder / name).exists():
            shutil.copy2(src, folder / name)
