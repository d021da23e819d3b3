"""`mergesearch run | resume | status | front | export | merge | eval | demo | schema`.

User errors (bad config, recipe, model folder, storage) print one line and exit with code
2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from mergesearch.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Evolutionary, multi-objective search over model-merge recipes.")
err = Console(stderr=True)
out = Console()


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.print(f"mergesearch {version('mergesearch')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                        help="Print the installed version and exit")) -> None:
    """Evolutionary, multi-objective search over model-merge recipes."""


def user_errors(fn):
    """Turn the errors a user can fix into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@user_errors
def merge(
    recipe: Path = typer.Argument(..., help="Our recipe JSON or a mergekit YAML"),
    out_arg: Path | None = typer.Argument(None, metavar="OUT",
                                          help="Folder to write the merged model to (or --out)"),
    out_dir: Path | None = typer.Option(None, "--out", help="Folder to write the merged model to"),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 (default: CUDA when present)"),
    trust_remote_code: bool = typer.Option(False, help="Allow the base model folder's own modelling code"),
):
    """Merge the models of RECIPE and write the result to OUT or --out (atomically), as
    `mergekit-yaml RECIPE OUT` would."""
    from rich.progress import Progress

    from mergesearch.merging import Checkpoint, validate_recipe
    from mergesearch.merging.build import open_live, write_merged
    from mergesearch.merging.card import model_card
    from mergesearch.merging.checkpoint import check_custom_code
    from mergesearch.merging.mergekit import load_recipe
    from mergesearch.merging.tokenizer import tokenizer_donor
    from mergesearch.recipe import RecipeError

    out_dir = _merge_out(out_arg, out_dir)
    r = load_recipe(recipe)
    base = r.base_model or r.models[0].model
    # Everything checkable is checked before any weights are read.
    validate_recipe(r)
    validate_recipe(r, Checkpoint.open(base).num_layers)
    names = [m for m in dict.fromkeys([base, *r.source_names()])]
    for m in names:
        Checkpoint.open(m)
    check_custom_code(Checkpoint.open(base), trust_remote_code)
    tokenizer_donor(r, Checkpoint.open(base).path)
    if out_dir.exists() and not out_dir.is_dir():
        raise RecipeError(f"{out_dir}: exists and is not a folder")
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("loading models", total=None)
        engine, model = open_live(base, names[1:], device=device, dtype=r.dtype,
                                  trust_remote_code=trust_remote_code)
        bar.update(task, description="merging", total=len(engine.names), completed=0)

        def merged(i: int, n: int) -> None:  # the write follows the last tensor
            bar.update(task, completed=i, **({"description": "writing", "total": None} if i == n else {}))

        try:
            path = write_merged(engine, model, r, out_dir, card=model_card(r, out_dir.name), progress=merged)
        except OSError as e:  # disk full, permission denied: the previous folder is kept
            kept = "; the previous folder is unchanged" if out_dir.exists() else ""
            raise RecipeError(f"--out: cannot write {out_dir} ({e.strerror or e}){kept}") from None
    out.print(f"wrote {path}")


def _merge_out(positional: Path | None, option: Path | None) -> Path:
    """The output folder, given as mergekit-yaml takes it (positional) or as --out."""
    from mergesearch.recipe import RecipeError

    if positional is not None and option is not None:
        raise RecipeError(f"give the output folder once: OUT ({positional}) or --out ({option})")
    if positional is None and option is None:
        raise RecipeError("no output folder: give OUT (mergesearch merge RECIPE OUT) or --out")
    return positional if positional is not None else option


@app.command("eval")
@user_errors
def eval_(config: Path = typer.Argument(..., help="Config YAML (its objectives are used); "
                                      "'demo' for the demo's own"),
          model: Path | None = typer.Option(None, "--model", help="A saved model folder"),
          recipe: Path | None = typer.Option(None, "--recipe", help="A recipe (ours or mergekit YAML)"),
          heldout: bool = typer.Option(False, "--heldout", help="Score the config's heldout objectives"),
          as_json: bool = typer.Option(False, "--json", help="Print JSON")):
    """Score one saved model or one recipe with the config's objectives."""
    from rich.table import Table

    from mergesearch.config import ConfigError, load_config
    from mergesearch.evaluators import check_objectives
    from mergesearch.merging.mergekit import load_recipe
    from mergesearch.recipe import RecipeError
    from mergesearch.search import CandidateWorker, resolve_models

    cfg = load_config(DEMO_CONFIG if str(config) == "demo" and not config.exists() else config)
    check_objectives(cfg, source=str(config))  # before the model loads
    if (model is None) == (recipe is None):
        raise ConfigError("give exactly one of --model DIR or --recipe FILE")
    if heldout and not cfg.heldout:
        raise ConfigError(f"{config}: heldout: the config has no heldout objectives")
    if model is not None and not model.is_dir():
        raise RecipeError(f"{model}: model folder not found")
    # Our one progress line (transient; the libraries' own bars are silenced by the worker).
    with err.status("loading the model and setting up the objectives") as status:
        if model is not None:
            worker = CandidateWorker(cfg.snapshot(), str(model), {}, heldout=heldout)
            recipe_json = None
        else:
            r = load_recipe(recipe)
            base, sources = resolve_models(cfg)
            names = {alias: path for alias, path in sources.items()}
            wanted = [m for m in r.source_names() if m != (r.base_model or base)]
            extra = {f"_{i}": m for i, m in enumerate(wanted) if m not in names.values()}
            worker = CandidateWorker(cfg.snapshot(), r.base_model or base, {**names, **extra},
                                     heldout=heldout)
            recipe_json = r.model_dump_json()
        status.update(f"scoring {len(worker.evaluators)} objectives")
        result = worker.evaluate(recipe_json)
    if as_json:
        print(json.dumps({k: getattr(result, k) for k in ("values", "metrics", "error", "timings")}, indent=2))
    else:
        table = Table("objective", "value")
        for name, value in result.values.items():
            table.add_row(name, f"{value:.6g}")
        out.print(table)
    if result.error:
        err.print(f"[red]failed:[/red] {escape(result.error)}", highlight=False)
        raise typer.Exit(1)


# ---- search -----------------------------------------------------------------------------

RunArg = typer.Argument(None, help="Run folder (holds run.json)")
StorageOpt = typer.Option(None, "--storage", help="Optuna storage URL, instead of a run folder")
StudyOpt = typer.Option(None, "--study", help="Study name, with --storage")


def _search(config) -> None:
    from rich.live import Live
    from rich.text import Text

    from mergesearch.search import Runner, study_hypervolume

    def line(p) -> Text:
        total = f"/{p.total}" if p.total else ""
        eta = p.eta_s()
        best = "  ".join(f"{k}={v:.4g}" for k, v in p.best.items())
        return Text(f"trials {p.done}{total}  in flight {p.in_flight}  failed {p.failed}  "
                    f"front {p.front_size}  {best}" + (f"  ETA {eta:.0f}s" if eta is not None else "")
                    + (f"\n{p.note}" if p.note else ""))

    out.print(f"study [bold]{config.study.name}[/bold] in {config.run_dir}")
    shown = [Text("starting workers...")]

    def show(p) -> None:
        shown[0] = line(p)
        live.update(shown[0])

    import ray

    ours = not ray.is_initialized()  # a Ray this command starts, it also stops
    # Transient: an error replaces the progress line instead of following it.
    with Live(shown[0], console=err, refresh_per_second=4, transient=True) as live:
        runner = Runner(config, on_progress=show)
        try:
            study = runner.run()
        except KeyboardInterrupt:
            live.stop()
            err.print(shown[0])
            err.print("interrupted; the study is consistent. Continue with: "
                      f"mergesearch resume {escape(str(config.run_dir))}")
            raise typer.Exit(130) from None
        finally:
            if ours:
                _stop_ray_deaf_to_ctrl_c()
    err.print(shown[0])
    out.print(f"done: hypervolume {study_hypervolume(study):.4g}; see `mergesearch front {config.run_dir}`")


def _stop_ray_deaf_to_ctrl_c() -> None:
    """Stop Ray now rather than in its exit hook, where a Ctrl-C after the last trial would
    print a traceback; everything is stored by then, so a Ctrl-C here can wait."""
    import ray

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ray.shutdown()
    finally:
        signal.signal(signal.SIGINT, previous)


@app.command()
@user_errors
def run(config: Path = typer.Argument(..., help="Config YAML")):
    """Run (or continue) the search a config describes."""
    from mergesearch.config import load_config

    _search(load_config(config))


@app.command()
@user_errors
def resume(run_dir: str | None = RunArg, storage: str | None = StorageOpt,
           study: str | None = StudyOpt,
           n_trials: int | None = typer.Option(None, help="Raise the trial budget")):
    """Continue a study to its budget after Ctrl-C, a crash or a reboot."""
    from mergesearch.search import RunRef

    _check_trial_budget(n_trials)
    config = RunRef.from_args(run_dir, storage, study).config()
    if n_trials is not None:
        config.budget.n_trials = n_trials
    _search(config)


def _check_trial_budget(n_trials: int | None) -> None:
    """--n-trials, refused before any work starts (it is set on a config already checked)."""
    from mergesearch.errors import ArgumentError

    if n_trials is not None and n_trials < 1:
        raise ArgumentError(f"--n-trials: {n_trials} is not a trial budget; give a number >= 1")


def _check_output_file(path: Path | None, option: str) -> None:
    """An output file's folder exists: checked before the study is read, not after."""
    from mergesearch.errors import ArgumentError

    if path is None or str(path) == "-":
        return
    if path.is_dir():
        raise ArgumentError(f"{option}: {path} is a folder; give a file name")
    if not path.parent.exists():
        raise ArgumentError(f"{option}: {path.parent}: no such folder")
    if not path.parent.is_dir():
        raise ArgumentError(f"{option}: {path.parent} is not a folder")


@app.command()
@user_errors
def status(run_dir: str | None = RunArg, storage: str | None = StorageOpt,
           study: str | None = StudyOpt):
    """Progress, failures and the best value per objective."""
    from collections import Counter

    from rich.table import Table

    from mergesearch.search import RunRef, pareto_front, study_hypervolume
    from mergesearch.search.front import (
        hypervolume_curve,
        most_balanced,
        objective_names,
        sparkline,
    )
    from mergesearch.search.study import counted, failure_reason, is_duplicate, orphaned

    ref = RunRef.from_args(run_dir, storage, study)
    st = ref.load()
    config = ref.config(st)
    trials = st.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    done = sum(counted(t) for t in trials)
    budget = config.budget.n_trials
    # What became of trials that are not counted: duplicates, and a dead driver's.
    notes = {"COMPLETE": sum(t.state.name == "COMPLETE" and is_duplicate(t) for t in trials),
             "RUNNING": sum(t.state.name == "RUNNING" and orphaned(st.user_attrs, t) for t in trials)}
    described = {k: f"{k.lower()} {v}" for k, v in states.items()}
    if notes["COMPLETE"]:
        described["COMPLETE"] += f" ({notes['COMPLETE']} duplicates of a recipe already scored, not counted)"
    if notes["RUNNING"] == states["RUNNING"] > 0:
        described["RUNNING"] += " (no live driver: left by a dead driver; `resume` re-runs them)"
    elif notes["RUNNING"]:
        described["RUNNING"] += f" ({notes['RUNNING']} with no live driver: left by a dead driver; " \
                                "`resume` re-runs them)"
    out.print(f"study [bold]{escape(st.study_name)}[/bold]: {done}{'/' + str(budget) if budget else ''} "
              "trials counted; " + ", ".join(escape(described[k]) for k in sorted(described)), soft_wrap=True)
    names = objective_names(st)
    front = pareto_front(st)
    if front:
        table = Table("objective", "direction", "best", "trial")
        for i, (name, d) in enumerate(zip(names, st.directions)):
            pick = (max if d.name == "MAXIMIZE" else min)(front, key=lambda t: t.values[i])
            table.add_row(name, d.name.lower(), f"{pick.values[i]:.4g}", str(pick.number))
        out.print(table)
        out.print(f"front: {len(front)} trials; hypervolume {study_hypervolume(st):.4g}")
        curve = hypervolume_curve(st)
        last_gain = next(k for k, hv in curve if hv == curve[-1][1])
        out.print(f"hypervolume by trials scored: {sparkline([hv for _, hv in curve])} "
                  f"(reached within the first {last_gain} of {curve[-1][0]} scored)", highlight=False)
        if pick := most_balanced(st, front):
            out.print(f"most balanced: trial {pick[0].number}, keeping at least {pick[1]:.0%} of each "
                      "source's gain over the base (`front` shows the balance, `export --balanced` "
                      "takes it)", highlight=False)
    rerun = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs and t.state.is_finished()}
    failures = Counter(failure_reason(t, rerun) for t in trials if t.state.name == "FAIL")
    for reason, n in failures.most_common(5):
        out.print(f"failed x{n}: {escape(reason)}", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def front(run_dir: str | None = RunArg, storage: str | None = StorageOpt,
          study: str | None = StudyOpt,
          csv: Path | None = typer.Option(None, "--csv", help="Write the front as CSV ('-': stdout)"),
          plot: Path | None = typer.Option(None, "--plot", help="Write a PNG of the front")):
    """The Pareto-optimal trials."""
    from rich.table import Table

    from mergesearch.search import RunRef, front_rows, plot_front
    from mergesearch.search.front import front_csv

    _check_output_file(csv, "--csv")
    _check_output_file(plot, "--plot")
    st = RunRef.from_args(run_dir, storage, study).load()
    rows = front_rows(st)
    if csv is not None:
        text = front_csv(st)
        if str(csv) == "-":
            sys.stdout.write(text)
        else:
            csv.write_text(text)
            out.print(f"wrote {csv}")
    if plot is not None:
        out.print(f"wrote {plot_front(st, plot)}")
    if csv is None or str(csv) != "-":
        if not rows:
            out.print("no completed trials yet")
            return
        table = Table(*rows[0].keys())
        for r in rows:
            table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()))
        out.print(table)


@app.command()
@user_errors
def export(run_dir: str | None = RunArg, storage: str | None = StorageOpt,
           study: str | None = StudyOpt,
           trial: int | None = typer.Option(None, help="Trial number"),
           best: str | None = typer.Option(None, help="Best front point on this objective"),
           weights: str | None = typer.Option(None, help="Front point maximising e.g. add=0.7,sort=0.3"),
           balanced: bool = typer.Option(False, "--balanced",
                                         help="The front point with the highest balance (see `front`)"),
           out_dir: Path = typer.Option(..., "--out", help="Folder to write to"),
           save_model: bool = typer.Option(False, "--save-model", help="Also write the merged model")):
    """Write a trial's recipe.json and mergekit.yaml (and with --save-model, the model)."""
    from mergesearch.errors import StudyError
    from mergesearch.merging.mergekit import mergekit_caveat
    from mergesearch.search import RunRef, choose, export_trial
    from mergesearch.search.export import trial_recipe
    from mergesearch.search.front import parse_weights

    if sum(x is not None for x in (trial, best, weights)) + balanced > 1:
        raise StudyError("choose one of --trial, --best, --weights, --balanced")
    ref = RunRef.from_args(run_dir, storage, study)
    st = ref.load()
    t = choose(st, trial=trial, best=best, weights=parse_weights(weights) if weights else None,
               balanced=balanced)
    path = export_trial(ref.config(st), t, out_dir, save_model=save_model)
    scores = ", ".join(f"{k}={v:.4g}" for k, v in (t.user_attrs.get("scores") or {}).items())
    out.print(f"trial {t.number} ({scores}) exported to {path}")
    if not (path / "mergekit.yaml").exists():
        out.print("no mergekit.yaml: mergekit 0.1.5 cannot express this recipe; "
                  "`mergesearch merge recipe.json` merges it")
    elif caveat := mergekit_caveat(trial_recipe(t)):
        out.print(f"note: {escape(' '.join(caveat.splitlines()))}", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def demo(run_dir: Path | None = typer.Option(None, help="Run folder (default: runs/<family>)"),
         n_trials: int | None = typer.Option(None, help="Trials (default: the demo config's)"),
         family: str = typer.Option("demo", "--family", help="demo: the tiny built-in experts; "
                                    "smol: SmolLM2-135M-Instruct and its LoRA experts (`make smol`)")):
    """Build the offline experts (once) and run the demo search on them."""
    from mergesearch.config import load_config
    from mergesearch.errors import ArgumentError
    from mergesearch.search import RunRef, plot_front

    _check_trial_budget(n_trials)
    if family not in DEMO_CONFIGS:
        raise ArgumentError(f"--family: unknown family {family!r}; known: {', '.join(DEMO_CONFIGS)}")
    if family == "smol":
        from mergesearch.demo.smol import build_family

        # Up front, not inside the search's progress display: its GGUF missing is said at
        # once, and the first build (minutes) prints its own lines.
        build_family()
    config = load_config(DEMO_CONFIGS[family])
    if run_dir is not None:
        config.study.run_dir = str(run_dir.resolve())
    else:
        config.study.run_dir = str(Path(f"runs/{family}").resolve())
    if n_trials is not None:
        config.budget.n_trials = n_trials
    _search(config)
    st = RunRef.from_args(str(config.run_dir)).load()
    out.print(f"front plot: {plot_front(st, config.run_dir / 'front.png')}")
    front(str(config.run_dir), None, None, None, None)


@app.command()
def schema():
    """Print the config's JSON schema, with each built-in evaluator's options in $defs."""
    from mergesearch.config import Config
    from mergesearch.evaluators import options_schemas

    schema = Config.model_json_schema()
    schema.setdefault("$defs", {}).update(options_schemas())
    out.print_json(json.dumps(schema))


DEMO_CONFIG = Path(__file__).resolve().parent / "demo" / "demo.yaml"  # shipped in the package
DEMO_CONFIGS = {"demo": DEMO_CONFIG, "smol": DEMO_CONFIG.with_name("smol.yaml")}


def main() -> None:  # pragma: no cover
    app(prog_name="mergesearch")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())



