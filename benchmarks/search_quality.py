"""Search quality on the demo problem: hypervolume against the number of trials.

For each sampler and seed, a search over the demo config's space (three objectives: the
add, reverse and sort experts' skills) runs sequentially, in process: Optuna in-memory
storage, the project's `SearchSpace`, and a real `CandidateWorker` (merge in place + real
lm-eval scoring) instead of Ray, which changes nothing about what is found and keeps the
benchmark cheap. The hypervolume is the one `mergesearch status` reports: above the worst
of the base and the experts on each skill.

Samplers: `nsga2`, `tpe`, `gp`, `random`, and `cmaes-ws`, what mergekit-evolve does: CMA-ES
on one objective, the mean of the three (its trials' three scores still make its front).

    python benchmarks/search_quality.py [--samplers nsga2 tpe gp random cmaes-ws]
        [--seeds 3] [--first-seed 0] [--trials 150] [--limit 30] [--jobs 2] [--population N]
        [--nsga2 crossover=blx alpha=0.5 mutation_prob=0.1] [--out benchmarks/search_quality.png]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLERS = ["nsga2", "tpe", "gp", "random", "cmaes-ws"]
CHECKPOINTS = (25, 50, 100, 150)

_problem = None  # per process: (config, space, worker, references)


def load_problem(limit: int, population: int | None = None, methods: list[str] | None = None,
                 fidelity: dict | None = None):
    """The demo config with `limit` examples per objective (and, if given, these methods
    and fidelity settings), an in-process worker, and the base's and experts' scores."""
    import torch

    from mergesearch.config import load_config, parse_config
    from mergesearch.merging import Checkpoint
    from mergesearch.recipe import Recipe
    from mergesearch.search.calibration import fisher_files, uses_fisher
    from mergesearch.search.worker import CandidateWorker, resolve_models

    torch.set_num_threads(1)
    snap = load_config(ROOT / "mergesearch" / "demo" / "demo.yaml").snapshot()
    root = Path(snap.pop("root"))
    for objective in snap["objectives"]:
        objective["limit"] = limit
    if population:
        snap["sampler"]["population_size"] = population
    if methods:
        snap["space"]["methods"] = {m: {} for m in methods}
    if fidelity:
        snap["fidelity"] = fidelity
    snap["study"]["run_dir"] = str(ROOT / "runs" / "benchmark")  # where a Fisher cache goes
    config = parse_config(snap, root=root)
    base, sources = resolve_models(config)
    fisher = None
    if uses_fisher(config):
        fisher = {m: str(f) for m, f in fisher_files(config, [base, *sources.values()], "cpu").items()}
    worker = CandidateWorker(config.snapshot(), base, sources, threads=1, fisher=fisher)
    names = [o.name for o in config.objectives]
    references = [worker.evaluate(None).values]
    for path in sources.values():
        recipe = Recipe(method="passthrough", models=[{"model": path}])
        references.append(worker.evaluate(recipe.model_dump_json()).values)
    reference = np.array([[r[n] for n in names] for r in references]).min(axis=0)
    num_layers = Checkpoint.open(base).num_layers
    return config, base, sources, num_layers, worker, reference


def _init(limit: int, population: int | None, methods: list[str] | None = None,
          fidelity: dict | None = None, nsga2: dict | None = None) -> None:
    global _problem
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    _problem = load_problem(limit, population, methods, fidelity)
    if nsga2:
        _use_nsga2_variant(nsga2)


def _use_nsga2_variant(options: dict) -> None:
    """Make `nsga2` an NSGA-II with another crossover or mutation probability, to compare
    variants with the default (``crossover``: uniform, blx, sbx; ``alpha`` for blx;
    ``mutation_prob``)."""
    import optuna
    from optuna.samplers import nsgaii

    from mergesearch.search import samplers

    default = samplers.build_sampler

    def build(config, offset=0):
        if config.sampler.name != "nsga2":
            return default(config, offset)
        crossover = {"uniform": lambda: nsgaii.UniformCrossover(),
                     "sbx": lambda: nsgaii.SBXCrossover(),
                     "blx": lambda: nsgaii.BLXAlphaCrossover(alpha=float(options.get("alpha", 0.5)))}
        kwargs = {"crossover": crossover[options.get("crossover", "uniform")]()}
        if "mutation_prob" in options:
            kwargs["mutation_prob"] = float(options["mutation_prob"])
        return optuna.samplers.NSGAIISampler(population_size=config.population_size,
                                             seed=config.sampler.seed + offset, **kwargs)

    samplers.build_sampler = build


def run_sampler(sampler: str, seed: int, n_trials: int, max_examples: int | None = None) -> dict:
    """One search of `n_trials` (or until `max_examples` have been scored); returns its
    per-trial scores (NaN rows for failed candidates and for candidates scored on a subset
    only), the method of each, and the examples scored up to each trial. With
    ``fidelity.enabled`` in the problem's config, candidates are promoted as the runner
    promotes them."""
    import optuna

    from mergesearch.search.runner import Scored
    from mergesearch.search.samplers import build_sampler, needs_flat_space
    from mergesearch.spaces import SearchSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config, base, sources, num_layers, worker, reference = _problem
    names = [o.name for o in config.objectives]
    weighted_sum = sampler == "cmaes-ws"
    config = config.model_copy(update={"sampler": config.sampler.model_copy(
        update={"name": "cmaes" if weighted_sum else sampler, "seed": seed})})
    space = SearchSpace(config.space, base, sources, num_layers, seed=config.seed,
                        flat=needs_flat_space(config))
    study = optuna.create_study(
        sampler=build_sampler(config),
        directions=["maximize"] if weighted_sum else ["maximize"] * len(names))
    scored = Scored(config)
    rows, methods, examples, cache, started = [], [], [], {}, time.perf_counter()
    for _ in range(n_trials):
        if max_examples is not None and examples and examples[-1] >= max_examples:
            break
        trial = study.ask()
        recipe = space.sample(trial)
        key = recipe.hash()
        spent = 0
        if key not in cache:
            result = worker.evaluate(recipe.model_dump_json(), scored.first_fraction)
            spent = result.examples
            fidelity = min(result.fraction.values(), default=1.0)
            if not result.error and scored.promote(result):
                skip = tuple(o for o, f in result.fraction.items() if f >= 1)
                full = worker.evaluate(recipe.model_dump_json(), 1.0, skip)
                spent += full.examples
                result = replace(full, values={**result.values, **full.values})
                fidelity = 1.0
            if result.error:
                cache[key] = None
            else:
                cache[key] = ([result.values[n] for n in names], fidelity)
                scored.add(key, result.values, fidelity)
        examples.append((examples[-1] if examples else 0) + spent)
        methods.append(recipe.method)
        if cache[key] is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            rows.append([np.nan] * len(names))
            continue
        values, fidelity = cache[key]
        study.tell(trial, float(np.mean(values)) if weighted_sum else values)
        rows.append(values if fidelity >= 1 else [np.nan] * len(names))
    return {"sampler": sampler, "seed": seed, "values": rows, "unique": len(cache),
            "methods": methods, "examples": examples,
            "seconds": time.perf_counter() - started, "reference": reference.tolist()}


def hv_curve(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Hypervolume of the first n trials, for every n."""
    from mergesearch.search.front import hypervolume

    maximize = np.ones(values.shape[1], dtype=bool)
    curve, best = np.zeros(len(values)), None
    for n in range(len(values)):
        if np.isfinite(values[n]).all():
            best = values[: n + 1][np.isfinite(values[: n + 1]).all(axis=1)]
            curve[n] = hypervolume(best, reference, maximize)
        else:
            curve[n] = curve[n - 1] if n else 0.0
    return curve


def trials_to_reach(curve: np.ndarray, target: float) -> int | None:
    hit = np.nonzero(curve >= target - 1e-12)[0]
    return int(hit[0]) + 1 if len(hit) else None


def plot(curves: dict[str, np.ndarray], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves.items():
        x = np.arange(1, c.shape[1] + 1)
        ax.plot(x, c.mean(axis=0), label=name)
        ax.fill_between(x, c.min(axis=0), c.max(axis=0), alpha=0.15)
    ax.set_xlabel("trials")
    ax.set_ylabel("hypervolume (mean; band: min-max over seeds)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samplers", nargs="+", default=SAMPLERS, choices=SAMPLERS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=150)
    ap.add_argument("--limit", type=int, default=30, help="examples per objective")
    ap.add_argument("--population", type=int, default=None, help="NSGA-II population (default: the config's)")
    ap.add_argument("--jobs", type=int, default=2, help="searches run side by side, one process each")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--nsga2", nargs="*", default=[], metavar="KEY=VALUE",
                    help="an NSGA-II variant: crossover=uniform|blx|sbx, alpha=, mutation_prob=")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "search_quality.png")
    args = ap.parse_args()

    jobs = [(s, seed) for s in args.samplers for seed in range(args.first_seed, args.first_seed + args.seeds)]
    nsga2 = dict(option.split("=", 1) for option in args.nsga2)
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, initializer=_init,
                             initargs=(args.limit, args.population, None, None, nsga2)) as pool:
        results = list(pool.map(run_sampler, *zip(*jobs), [args.trials] * len(jobs)))
    reference = np.array(results[0]["reference"])
    curves = {s: np.stack([hv_curve(np.array(r["values"], dtype=float), reference)
                           for r in results if r["sampler"] == s]) for s in args.samplers}

    print(f"demo problem, {args.limit} examples per objective, {args.seeds} seeds, {args.trials} trials; "
          f"{time.perf_counter() - started:.0f}s; unique evaluations "
          f"{sum(r['unique'] for r in results)} of {len(jobs) * args.trials}")
    marks = sorted({c for c in CHECKPOINTS if c <= args.trials} | {args.trials})
    print("| sampler | " + " | ".join(f"HV @{c}" for c in marks) + " |")
    print("|---|" + "---|" * len(marks))
    for s, c in curves.items():
        cells = [f"{c[:, m - 1].mean():.4f} ± {c[:, m - 1].std():.4f}" for m in marks]
        print(f"| {s} | " + " | ".join(cells) + " |")
    if "random" in curves:
        target = curves["random"][:, -1].mean()
        for s, c in curves.items():
            reach = [trials_to_reach(curve, target) for curve in c]
            print(f"{s}: trials to reach random's {args.trials}-trial mean HV ({target:.4f}), per seed: {reach}")
    plot(curves, args.out, f"demo problem: {args.limit} examples per objective, {args.seeds} seeds")
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
