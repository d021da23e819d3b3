"""Model references, as a config or recipe names a model: a folder (relative to the
config's folder), a Hugging Face hub id, or ``<scheme>:<name>`` for a model some
installed package provides (the demo's ``demo:add``).

A scheme is an entry point of group ``mergesearch.model_references`` whose name is the
scheme and whose value is a function taking the whole reference and returning a folder or
hub id. Looking schemes up there, rather than importing their packages, keeps the search
free of the demo (and open to plug-ins) while resolving every reference in one place.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from pathlib import Path

from mergesearch.errors import ConfigError

ENTRY_POINT_GROUP = "mergesearch.model_references"
# A scheme is a word before the first colon: never a path (which starts with / . or ~, or
# has a slash before any colon) and never a hub id (which has no colon).
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9_+.-]*):(?!//)(.+)")


@functools.cache
def reference_schemes() -> dict[str, importlib.metadata.EntryPoint]:
    """The installed schemes, by name; a resolver is imported only when a reference uses it."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def resolve_reference(ref: str, root: str | Path = ".") -> str:
    """The folder or hub id that ``ref`` names. A folder that exists relative to ``root``
    (the config's folder) wins; ``<scheme>:<name>`` goes to the scheme's resolver; anything
    else is taken for a hub id as is. An unknown scheme is refused naming the reference."""
    path = Path(ref).expanduser()
    path = path if path.is_absolute() else (Path(root) / path).resolve()
    scheme = SCHEME.fullmatch(ref)
    if scheme and not path.exists():
        resolver = reference_schemes().get(scheme.group(1))
        if resolver is None:
            known = ", ".join(f"{s}:" for s in sorted(reference_schemes())) or "none installed"
            raise ConfigError(f"models: {ref!r}: unknown model reference scheme {scheme.group(1)!r} "
                              f"(known: {known}); give a folder, a hub id or <scheme>:<name>")
        return str(resolver.load()(ref))
    return str(path) if path.exists() else ref
