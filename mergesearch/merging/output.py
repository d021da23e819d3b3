"""Writing a merged checkpoint atomically: the target folder appears whole or not at all."""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError

from mergesearch.merging.mergekit import to_mergekit_yaml
from mergesearch.merging.tokenizer import write_tokenizer
from mergesearch.recipe import Recipe, RecipeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")


def save_model(model: torch.nn.Module, out: str | Path, tokenizer_from: str | Path | None = None,
               recipe: Recipe | None = None, max_shard_size: str = "5GB",
               card: str | None = None) -> Path:
    """Save ``model`` (safetensors shards and config), the tokenizer files of
    ``tokenizer_from`` (or the recipe's tokenizer_source, with its chat template), the
    recipe and the model ``card`` (README.md) beside them, into ``out`` atomically.

    Everything is written to a temporary folder beside ``out`` and renamed into place; a
    previous folder at ``out`` is kept until the new one is complete.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_folder(out.parent, f".{out.name}.tmp-")
    old = None
    try:
        try:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        except SafetensorError as e:  # safetensors' own type for a failed write (disk full, ...)
            raise _os_error(e, tmp) from e
        write_tokenizer(tmp, recipe, tokenizer_from, TOKENIZER_FILES)
        if card is not None:
            (tmp / "README.md").write_text(card)
        if recipe is not None:
            recipe.save(tmp / "recipe.json")
            try:
                dtype = str(model.dtype).removeprefix("torch.")
                (tmp / "mergekit.yaml").write_text(to_mergekit_yaml(recipe, out_dtype=dtype))
            except RecipeError:
                pass  # a method mergekit lacks: recipe.json alone describes the merge
        _umask_modes(tmp)
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


def new_folder(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in ``parent`` with the mode the user's umask gives, as
    `save_pretrained`'s files have (``tempfile.mkdtemp`` makes 0700 folders: on a shared
    cluster nobody else could read the model renamed from it)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o777)  # the kernel applies the umask (and default ACLs)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(parent / prefix))


def new_file(parent: Path, prefix: str) -> tuple[int, str]:
    """An open descriptor and the path of a new, uniquely named file in ``parent`` with the
    mode the user's umask gives (``tempfile.mkstemp`` makes 0600 files)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(path)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(parent / prefix))


def _umask_modes(folder: Path) -> None:
    """Give what is under ``folder`` the modes the umask gives new files and folders:
    safetensors writes its files 0600, and copies keep their source's mode. ``folder`` was
    made 0o777 less the umask (`new_folder`), so its mode tells the umask without touching
    the process-wide setting, which other threads may be using."""
    folder_mode = stat.S_IMODE(folder.stat().st_mode)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, folder_mode if path.is_dir() else folder_mode & 0o666)


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
