"""`mergesearch run | resume | status | front | export | merge | eval | demo | schema`.

User errors (bad config, recipe, model folder, storage) print one line and exit with code
2, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import typer
from rich.console import Console

from mergesearch.errors import USER_ERRORS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Evolutionary, multi-objective search over model-merge recipes.")
err = Console(stderr=True)
out = Console()


@app.callback()
def _root() -> None:
    """Evolutionary, multi-objective search over model-merge recipes."""


def user_errors(fn):
    """Turn the errors a user can fix into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@user_errors
def merge(
    recipe: Path = typer.Argument(..., help="Our recipe JSON or a mergekit YAML"),
    out_dir: Path = typer.Option(..., "--out", help="Folder to write the merged model to"),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 (default: CUDA when present)"),
):
    """Merge the models of RECIPE and write the result to --out (atomically)."""
    from rich.progress import Progress

    from mergesearch.merging import (
        Checkpoint,
        TaskVectors,
        load_live_model,
        save_model,
        validate_recipe,
    )
    from mergesearch.recipe import Recipe, RecipeError

    r = Recipe.load(recipe)
    base = r.base_model or r.models[0].model
    # Everything checkable is checked before any weights are read.
    validate_recipe(r, Checkpoint.open(base).num_layers)
    names = [m for m in dict.fromkeys([base, *r.source_names()])]
    for m in names:
        Checkpoint.open(m)
    if out_dir.exists() and not out_dir.is_dir():
        raise RecipeError(f"{out_dir}: exists and is not a folder")
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("loading models", total=None)
        tv = TaskVectors(base, names[1:], device=device)
        model = load_live_model(tv.base.path, tv.device, r.dtype)
        bar.update(task, description="merging", total=len(tv.names), completed=0)
        tv.merge_into(model, r, progress=lambda i, n: bar.update(task, completed=i))
        bar.update(task, description="writing", total=None)
        path = save_model(model, out_dir, tokenizer_from=tv.base.path, recipe=r)
    out.print(f"wrote {path}")


def main() -> None:  # pragma: no cover
    app(prog_name="mergesearch")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())



