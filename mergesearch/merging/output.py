"""Writing a merged checkpoint atomically: the target folder appears whole or not at all."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from mergesearch.recipe import Recipe, RecipeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")


def save_model(model: torch.nn.Module, out: str | Path, tokenizer_from: str | Path | None = None,
               recipe: Recipe | None = None, max_shard_size: str = "5GB") -> Path:
    """Save ``model`` (safetensors shards and config), the tokenizer files of
    ``tokenizer_from`` and the recipe beside them, into ``out`` atomically.

    Everything is written to a temporary folder beside ``out`` and renamed into place; a
    previous folder at ``out`` is kept until the new one is complete.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        try:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        except SafetensorError as e:  # safetensors' own type for a failed write (disk full, ...)
            raise _os_error(e, tmp) from e
        if tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_from) / name
                if src.exists() and not (tmp / name).exists():
                    shutil.copy2(src, tmp / name)
        if recipe is not None:
            recipe.save(tmp / "recipe.json")
            try:
                (tmp / "mergekit.yaml").write_text(recipe.to_mergekit_yaml())
            except RecipeError:
                pass  # a method mergekit lacks: recipe.json alone describes the merge
        _fsync_tree(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out.exists():
            os.replace(old, out)  # the new folder never arrived: put the previous one back
        raise
    return out


def _os_error(e: SafetensorError, path: Path) -> OSError:
    """safetensors' "I/O error: File too large (os error 27)" as the OSError it was."""
    message = str(e).rpartition("I/O error: ")[2]
    code = re.search(r"\(os error (\d+)\)\s*$", message)
    if code:
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path))
    return OSError(errno.EIO, message, str(path))


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as h:
                os.fsync(h.fileno())
