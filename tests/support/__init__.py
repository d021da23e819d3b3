"""Helpers the tests share, by topic: tiny model families (`models`), the command line
(`cli`), merge recipes and their tensors (`recipes`), study configs (`studies`), merge
methods on literal tensors (`methods`). Tests import them from here, never from another
test module."""

from .cli import cli_error
from .models import ARCHS, build_family

__all__ = ["ARCHS", "build_family", "cli_error"]
