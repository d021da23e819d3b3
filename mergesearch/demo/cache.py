"""The demo families' cache: a folder per build, made once, whole or not at all.

A family (the tiny demo's experts, the SmolLM2 family) is built into a temporary folder
beside its cache folder and renamed into place, under an exclusive lock, so that processes
asking at the same time wait for one build and a killed build leaves nothing a reader could
take for complete.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """Where the demo families are cached: ``$MERGESEARCH_CACHE`` or ~/.cache/mergesearch."""
    return Path(os.environ.get("MERGESEARCH_CACHE") or Path.home() / ".cache" / "mergesearch")


def cached_build(root: Path, names: Iterable[str], build: Callable[[Path], None], what: str,
                 force: bool = False) -> dict[str, Path]:
    """The folders ``root/<name>`` for ``names``, each holding a ``model.safetensors``:
    ``build(tmp)`` writes them into a temporary folder first, unless they are there already
    (``force``: build again)."""
    paths = {name: root / name for name in names}
    if not force and _complete(paths):
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f".{root.name}.lock", what):
        if force or not _complete(paths):  # another process may have built it while we waited
            _build_in_place(root, build)
    return paths


def _complete(paths: dict[str, Path]) -> bool:
    return all((p / "model.safetensors").exists() for p in paths.values())


@contextmanager
def _locked(path: Path, what: str) -> Iterator[None]:
    """An exclusive `flock` on ``path``: one build at a time across processes. The lock
    file stays (removing it would let a third process lock a different file)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process building {what}", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_in_place(root: Path, build: Callable[[Path], None]) -> None:
    """``build`` into a temporary folder beside ``root``, then rename it into place. Called
    with the lock held, so leftovers of builds that were killed outright are removed first.
    A complete folder being replaced (``force``) is renamed aside, then removed: files that
    readers have open stay readable."""
    for stale in root.parent.glob(f".{root.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    # Not mkdtemp's 0700: the cache is readable as the umask allows, like any folder.
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    tmp.mkdir(0o777)
    try:
        build(tmp)
        if root.exists():
            os.replace(root, tmp / "replaced")
        os.replace(tmp, root)
        shutil.rmtree(root / "replaced", ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
