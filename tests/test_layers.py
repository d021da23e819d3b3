"""The package's layers hold: every import points down the order below, peers of one
layer do not import each other, and no module imports the package inside a function (the
way a cycle is dodged) except the CLI, which defers whole commands to start fast.

    errors                                  the leaf: the errors a user can fix
    files, registry, quiet                  leaf utilities (reading user files, named
                                            registries, silencing libraries)
    recipe                                  the Recipe, a plain value
    config                                  the YAML schema, a plain value
    merging                                 architecture, methods, registry, engine, I/O
    evaluators | spaces | demo              peers: read merging, never each other
    search                                  study, workers, the trial loop, export
    cli                                     the commands

The order is also written in the README ("Extending").
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mergesearch"
LAYERS = [
    {"errors"},
    {"files", "registry", "quiet"},
    {"recipe"},
    {"config"},
    {"merging"},
    {"evaluators", "spaces", "demo"},
    {"search"},
    {"cli", "__main__"},
]
LEVEL = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
# The package's __init__ runs before any of its modules: it may only re-export values.
ROOT_MAY_IMPORT = {"errors", "recipe"}
DEFERS_WHOLE_COMMANDS = {"cli"}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def unit_of(path: Path) -> str:
    """The top-level unit a file belongs to: ``merging`` for merging/engine.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def package_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported unit, line, inside a function) for each import of the package."""
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                package = path.relative_to(PACKAGE).parent.parts
                base = package[:len(package) - node.level + 1]
                name = ".".join(["mergesearch", *base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            names = [name]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name != "mergesearch" and not name.startswith("mergesearch."):
                continue
            unit = name.split(".")[1] if "." in name else "__init__"
            inside = any(f.lineno <= node.lineno <= f.end_lineno for f in functions)
            found.append((unit, node.lineno, inside))
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    unit = unit_of(path)
    for imported, line, _ in package_imports(path):
        where = f"{path.relative_to(PACKAGE)}:{line} imports mergesearch.{imported}"
        if unit == "__init__":
            assert imported in ROOT_MAY_IMPORT, where
        elif imported != unit:
            assert imported in LEVEL, f"{where}, which no layer holds"
            assert LEVEL[imported] < LEVEL[unit], f"{where}, which is not below it"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_the_package_inside_a_function(path):
    if unit_of(path) in DEFERS_WHOLE_COMMANDS:
        return
    inside = [line for _, line, deferred in package_imports(path) if deferred]
    assert not inside, f"{path.relative_to(PACKAGE)} imports mergesearch inside a function at lines {inside}"


def test_every_unit_of_the_package_has_a_layer():
    units = {unit_of(p) for p in modules()} - {"__init__"}
    assert units <= set(LEVEL), sorted(units - set(LEVEL))
