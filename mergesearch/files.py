"""Reading the files a user wrote (configs, recipes, run files): text and YAML, with
errors that name the file. A leaf beside `errors`: it imports nothing else of the package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mergesearch.errors import UserError


def read_text(path: Path) -> str:
    """A file the user wrote, as text; OSError where it cannot be read, and a ValueError
    naming the file and the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "save the file as UTF-8") from None


def load_yaml(path: str | Path, what: str, error: type[UserError]) -> dict[str, Any]:
    """The mapping a YAML (or JSON) file holds; ``error`` naming the file where it cannot
    be read, is not UTF-8, is not YAML (with the line and column) or is not a mapping."""
    path = Path(path)
    try:
        text = read_text(path)
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from None
    except ValueError as e:
        raise error(str(e)) from None
    try:
        data = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as e:
        raise error(f"{path}: YAML syntax error{_where(e)}: {_problem(e)}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level")
    return data


def _where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _problem(e: yaml.YAMLError) -> str:
    """The parser's complaint on one line (its own message spans several)."""
    return getattr(e, "problem", None) or str(e).splitlines()[0]
