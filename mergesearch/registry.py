"""Named registries: how merge methods, evaluators and samplers are found by name.

One shape for all three, after lm-eval's ``api/registry.py``: a registry maps a name to
an object (a method, a class, a factory); ``register`` adds one, as a decorator or a call;
an entry may be given lazily as ``"package.module:attr"`` and is imported on first use, so
that a heavy module loads only when a config names it. Users extend the tool without
touching the package: register under a new name, or name ``package.module:attr``
directly where a registry allows it (`Registry.get(..., allow_import=True)`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind  # what an entry is, for messages: "merge method", "evaluator"
        self._entries: dict[str, T | str] = {}

    def register(self, name: str, obj: T | str | None = None) -> Callable[[T], T] | None:
        """``register(name, obj)``, or ``@register(name)`` above the object; ``obj`` may be
        ``"package.module:attr"``, imported when first asked for. A name is taken once."""
        if obj is not None:
            self._add(name, obj)
            return None

        def decorate(target: T) -> T:
            self._add(name, target)
            return target

        return decorate

    def _add(self, name: str, obj: T | str) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj

    def get(self, name: str, allow_import: bool = False) -> T:
        """The entry called ``name``; with ``allow_import``, also ``package.module:attr``
        for an entry not registered. KeyError naming the known entries otherwise; an
        ImportError or AttributeError where a lazy entry cannot be imported."""
        target = self._entries.get(name)
        if target is None and allow_import and ":" in name:
            target = name
        if target is None:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self))}")
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
            if name in self._entries:
                self._entries[name] = target
        return target

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)
