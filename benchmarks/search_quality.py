"""Search quality on the demo problem: hypervolume against the number of trials.

For each sampler and seed, a search over the demo config's space (three objectives: the
add, reverse and sort experts' skills; ``--family smol``: smol.yaml's family, four
objectives, its own limits unless ``--limit``) runs sequentially, in process: Optuna in-memory
storage, the project's `SearchSpace`, and a real `CandidateWorker` (merge in place + real
lm-eval scoring) instead of Ray, which changes nothing about what is found and keeps the
benchmark cheap. The hypervolume is the one `mergesearch status` reports, above a fixed
reference point: the worst of the base and the experts on each skill (printed, and written
beside the CSV).

Samplers: the project's (`nsga2`, `nsga3`, `tpe`, `gp`, `random`, `cmaes` needs one
objective), and `cmaes-ws`, what mergekit-evolve does: CMA-ES on one objective, the mean
of the three (its trials' three scores still make its front), with one merge method fixed
per run. It runs once per method of the space, each with its own seeds and its own trial
budget, and reports the method whose runs end with the highest median hypervolume (the
choice a mergekit-evolve user makes after trying each method); every method's figures are
printed too. ``<sampler>+warm`` (or ``--warm-start`` for all) first scores the warm
start's recipes (`mergesearch.spaces.warm_start`), as ``sampler.warm_start: true`` does.

Reported: the median hypervolume over seeds with the quartiles at 25/50/100/150 trials,
how many trials each seed takes to reach random search's median hypervolume at the last
trial, the best balanced point found (`balance_curve`: the weakest skill's share of its
expert's gain, what the "model families" issue asks to reach 0.85), per-seed curves as CSV
(``sampler,seed,trial,hv,balanced``, beside ``--out``, with the reference point and the
base's and experts' scores in a ``.json`` next to it) and a plot of the median hypervolume
with a quartile band.

Scores are cached on disk by recipe hash (``--cache``, SQLite; one row per recipe, under a
key of the models' files, the objectives, the tasks' files and the seed), shared by every
sampler and every rerun: the scoring is deterministic for a recipe (lm-eval loglikelihood
on CPU with one thread; the same dare_ties recipe scored twice in one process and in two
processes gave identical scores), so a cached score is the score the search would get.
Multi-fidelity runs (`fidelity.py`) do not use it. (Checked on the demo family; check the
same for another family's generate_until tasks before trusting its cache.)

    python benchmarks/search_quality.py [--samplers nsga2 tpe gp random cmaes-ws tpe+warm]
        [--family demo] [--seeds 5] [--first-seed 0] [--trials 150] [--checkpoints 25 50 100 150] [--limit 30] [--jobs 2] [--population N]
        [--warm-start] [--shared] [--nsga2 crossover=blx alpha=0.5 mutation_prob=0.1]
        [--out benchmarks/search_quality.png] [--cache runs/benchmark/scores.sqlite | --no-cache]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sqlite3
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLERS = ["nsga2", "tpe", "gp", "random", "cmaes-ws"]
WARM = "+warm"
CHECKPOINTS = (25, 50, 100, 150)
CACHE = ROOT / "runs" / "benchmark" / "scores.sqlite"

_problem = None  # per process: (config, base, sources, num_layers, worker, anchors)
_cache = None  # per process: a ScoreCache, or None


def load_problem(limit: int | None, population: int | None = None, methods: list[str] | None = None,
                 fidelity: dict | None = None, family: str = "demo", shared: bool = False):
    """The family's config (`mergesearch/demo/<family>.yaml`) with `limit` examples per
    objective (None: the config's) and, if given, these methods and fidelity settings (and
    ``space.shared``); an in-process worker, and the base's and experts' scores."""
    import torch

    from mergesearch.config import load_config, parse_config
    from mergesearch.merging import Checkpoint
    from mergesearch.recipe import Recipe
    from mergesearch.search.calibration import fisher_files, uses_fisher
    from mergesearch.search.worker import CandidateWorker, resolve_models

    torch.set_num_threads(1)
    snap = load_config(ROOT / "mergesearch" / "demo" / f"{family}.yaml").snapshot()
    root = Path(snap.pop("root"))
    for objective in snap["objectives"]:
        objective["limit"] = limit or objective.get("limit")
    if population:
        snap["sampler"]["population_size"] = population
    if methods:
        snap["space"]["methods"] = {m: {} for m in methods}
    if shared:
        snap["space"]["shared"] = True
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
    anchors = np.array([[r[n] for n in names] for r in references])
    num_layers = Checkpoint.open(base).num_layers
    return config, base, sources, num_layers, worker, anchors


# ---- the score cache ------------------------------------------------------------------


class ScoreCache:
    """Full-fidelity scores by recipe hash, in SQLite (safe for several processes: each
    opens its own connection; a row is written once, ``INSERT OR IGNORE``), under a key of
    everything a score depends on besides the recipe (`problem_key`)."""

    def __init__(self, path: Path, problem: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.problem = problem
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS scores (problem TEXT, recipe TEXT, "
                        "result TEXT, PRIMARY KEY (problem, recipe))")

    def get(self, recipe_hash: str) -> dict | None:
        row = self.db.execute("SELECT result FROM scores WHERE problem = ? AND recipe = ?",
                              (self.problem, recipe_hash)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, recipe_hash: str, result: dict) -> None:
        self.db.execute("INSERT OR IGNORE INTO scores VALUES (?, ?, ?)",
                        (self.problem, recipe_hash, json.dumps(result)))


def problem_key(config, base: str, sources: dict[str, str]) -> str:
    """A digest of what a recipe's scores depend on besides the recipe: the models' files
    (names, sizes, modification times), the objectives (tasks, metrics, limits), the
    lm-eval settings and its task files' contents, and the merge seed."""
    snap = config.snapshot()
    parts = {"objectives": snap["objectives"], "lm_eval": snap["lm_eval"], "seed": snap["seed"],
             "models": {name: _files_digest(Path(p), content=False)
                        for name, p in {"base": base, **sources}.items()}}
    parts["tasks"] = [_files_digest(Path(p), content=True) for p in config.include_paths()]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _files_digest(folder: Path, content: bool) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = f.stat()
        h.update(f"{f.relative_to(folder)}\0{stat.st_size}\0".encode())
        h.update(f.read_bytes() if content else str(stat.st_mtime_ns).encode())
    return h.hexdigest()


# ---- one search -----------------------------------------------------------------------


def _init(limit: int | None, population: int | None, methods: list[str] | None = None,
          fidelity: dict | None = None, nsga2: dict | None = None,
          cache: str | None = None, family: str = "demo", shared: bool = False) -> None:
    global _problem, _cache
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    _problem = load_problem(limit, population, methods, fidelity, family, shared)
    config, base, sources = _problem[:3]
    if cache and not config.fidelity.enabled:
        _cache = ScoreCache(Path(cache), problem_key(config, base, sources))
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


def _score(worker, scored, recipe, names: list[str]) -> tuple[list[float] | None, float, int, bool]:
    """(values or None on an error, fidelity, examples spent, whether it was scored now)
    of one new recipe: from the disk cache where it holds the recipe, else scored (and
    promoted as the runner promotes, with fidelity on)."""
    key = recipe.hash()
    hit = _cache.get(key) if _cache else None
    if hit is not None:
        return hit["values"], 1.0, hit["examples"], False
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
        return None, fidelity, spent, True
    values = [result.values[n] for n in names]
    if _cache and fidelity >= 1:
        _cache.put(key, {"values": values, "examples": spent})
    return values, fidelity, spent, True


def run_sampler(sampler: str, seed: int, n_trials: int, max_examples: int | None = None,
                warm: bool = False, method: str | None = None) -> dict:
    """One search of `n_trials` (or until `max_examples` have been scored); returns its
    per-trial scores (NaN rows for failed candidates and for candidates scored on a subset
    only), the method of each, and the examples scored up to each trial. With
    ``fidelity.enabled`` in the problem's config, candidates are promoted as the runner
    promotes them. ``warm``: the warm start's recipes first; ``method``: search that method
    alone (cmaes-ws); ``cmaes-ws`` optimises the mean of the objectives."""
    import optuna

    from mergesearch.search.runner import Scored
    from mergesearch.search.samplers import build_sampler, needs_flat_space
    from mergesearch.spaces import SearchSpace
    from mergesearch.spaces.warm_start import enqueue_warm_start

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config, base, sources, num_layers, worker, anchors = _problem
    names = [o.name for o in config.objectives]
    weighted_sum = sampler == "cmaes-ws"
    config = _search_config(config, "cmaes" if weighted_sum else sampler, seed, n_trials, method)
    space = SearchSpace(config.space, base, sources, num_layers, seed=config.seed,
                        flat=needs_flat_space(config))
    study = optuna.create_study(
        sampler=build_sampler(config),
        directions=["maximize"] if weighted_sum else ["maximize"] * len(names))
    if warm:
        enqueue_warm_start(study, space)
    scored = Scored(config)
    rows, methods, examples, cache, fresh, started = [], [], [], {}, 0, time.perf_counter()
    for _ in range(n_trials):
        if max_examples is not None and examples and examples[-1] >= max_examples:
            break
        trial = study.ask()
        recipe = space.sample(trial)
        key = recipe.hash()
        spent = 0
        if key not in cache:
            values, fidelity, spent, now = _score(worker, scored, recipe, names)
            fresh += now
            cache[key] = None if values is None else (values, fidelity)
            if values is not None:
                scored.add(key, dict(zip(names, values)), fidelity)
        examples.append((examples[-1] if examples else 0) + spent)
        methods.append(recipe.method)
        if cache[key] is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            rows.append([np.nan] * len(names))
            continue
        values, fidelity = cache[key]
        study.tell(trial, float(np.mean(values)) if weighted_sum else values)
        rows.append(values if fidelity >= 1 else [np.nan] * len(names))
    return {"sampler": sampler, "seed": seed, "warm": warm, "method": method, "objectives": names, "values": rows,
            "unique": len(cache), "fresh": fresh, "methods": methods, "examples": examples,
            "seconds": time.perf_counter() - started, "reference": anchors.min(axis=0).tolist(),
            "anchors": anchors.tolist()}


def _search_config(config, sampler: str, seed: int, n_trials: int, method: str | None):
    """The problem's config for one search: its sampler and seed, its trial budget (TPE's
    and GP's startup trials depend on it), and with ``method`` that method alone."""
    update = {"sampler": config.sampler.model_copy(update={"name": sampler, "seed": seed}),
              "budget": config.budget.model_copy(update={"n_trials": n_trials})}
    if method:
        update["space"] = config.space.model_copy(update={"methods": {method: config.space.methods[method]}})
    return config.model_copy(update=update)


# ---- curves and figures ---------------------------------------------------------------


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


RETAIN = 0.95  # a balanced point keeps this share of the base's score where no expert beats it
BALANCED = 0.85  # the weakest skill's normalised score the demo's search should reach (issue 15)


def balance_curve(values: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """The best balanced score among the first n trials, for every n. A trial's balanced
    score is its weakest skill, normalised from the base (0) to the best expert on that
    skill (1), over the objectives some expert improves on the base (the skills; the
    `balance` that `mergesearch front` shows); a trial that keeps less than `RETAIN` of the
    base's score on another objective (a retention objective, such as the SmolLM2 family's
    ``facts``) has none (-inf). ``anchors``: the base's scores, then each expert's."""
    from mergesearch.search.front import gains_kept

    gains = gains_kept(values, anchors[0], anchors[1:], np.ones(values.shape[1], dtype=bool))
    skill = ~np.isnan(gains).all(axis=0)
    kept = (values[:, ~skill] >= RETAIN * anchors[0, ~skill]).all(axis=1)
    score = np.where(kept & np.isfinite(gains[:, skill]).all(axis=1), gains[:, skill].min(axis=1), -np.inf)
    return np.maximum.accumulate(score)


def trials_to_reach(curve: np.ndarray, target: float) -> int | None:
    hit = np.nonzero(curve >= target - 1e-12)[0]
    return int(hit[0]) + 1 if len(hit) else None


def quartiles(c: np.ndarray, trial: int) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) over seeds of the curves' value after
    ``trial`` trials (a curve that ended earlier holds its last value)."""
    at = c[:, min(trial, c.shape[1]) - 1]
    q1, med, q3 = np.percentile(at, [25, 50, 75])
    return float(q1), float(med), float(q3)


def plot(curves: dict[str, np.ndarray], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves.items():
        x = np.arange(1, c.shape[1] + 1)
        q1, med, q3 = np.percentile(c, [25, 50, 75], axis=0)
        ax.plot(x, med, label=name)
        ax.fill_between(x, q1, q3, alpha=0.15)
    ax.set_xlabel("trials")
    ax.set_ylabel("hypervolume (median; band: quartiles over seeds)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def write_curves(curves: dict[str, np.ndarray], balance: dict[str, np.ndarray], seeds: list[int],
                 out: Path, info: dict) -> tuple[Path, Path]:
    """Per-seed curves as ``sampler,seed,trial,hv,balanced`` rows; the reference point and
    the run's settings in a JSON file beside them."""
    path, side = out.with_suffix(".csv"), out.with_suffix(".json")
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sampler", "seed", "trial", "hv", "balanced"])
        for name, c in curves.items():
            for seed, curve, bal in zip(seeds, c, balance[name]):
                w.writerows([name, seed, t + 1, f"{hv:.6g}", f"{b:.4f}"]
                            for t, (hv, b) in enumerate(zip(curve, bal)))
    side.write_text(json.dumps(info, indent=2) + "\n")
    return path, side


# ---- the runs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    label: str  # the curve it belongs to: sampler[+warm], or cmaes-ws[+warm][method]
    sampler: str
    seed: int
    warm: bool
    method: str | None = None


def make_jobs(samplers: list[str], seeds: list[int], methods: list[str], warm_all: bool) -> list[Job]:
    jobs = []
    for name in samplers:
        sampler, warm = name.removesuffix(WARM), name.endswith(WARM) or warm_all
        label = sampler + (WARM if warm else "")
        for m in methods if sampler == "cmaes-ws" else [None]:
            jobs += [Job(f"{label}[{m}]" if m else label, sampler, s, warm, m) for s in seeds]
    return jobs


def run_job(job: Job, n_trials: int) -> dict:
    return {**run_sampler(job.sampler, job.seed, n_trials, warm=job.warm, method=job.method),
            "label": job.label}


def best_method_curves(curves: dict[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
    """For each cmaes-ws label, the method whose runs end highest (median over seeds)."""
    best: dict[str, tuple[str, np.ndarray]] = {}
    for label, c in curves.items():
        if "[" not in label:
            continue
        base, method = label[:-1].split("[")
        if base not in best or np.median(c[:, -1]) > np.median(best[base][1][:, -1]):
            best[base] = (method, c)
    return best


def report(curves: dict[str, np.ndarray], n_trials: int, best: dict[str, tuple[str, np.ndarray]],
           checkpoints: tuple[int, ...] = CHECKPOINTS) -> None:
    marks = sorted({c for c in checkpoints if c <= n_trials} | {n_trials})
    print("| sampler | " + " | ".join(f"HV @{c}" for c in marks) + " |")
    print("|---|" + "---|" * len(marks))
    for s, c in curves.items():
        cells = [f"{med:.4f} [{q1:.4f}, {q3:.4f}]" for q1, med, q3 in (quartiles(c, m) for m in marks)]
        note = f" (best method: {best[s][0]})" if s in best else ""
        print(f"| {s}{note} | " + " | ".join(cells) + " |")
    print("median [first quartile, third quartile] over seeds")
    if "random" not in curves:
        return
    target = float(np.median(curves["random"][:, -1]))
    print(f"random's median {n_trials}-trial hypervolume: {target:.4f}")
    for s, c in curves.items():
        reach = [trials_to_reach(curve, target) for curve in c]
        within = sum(r is not None and r <= 50 for r in reach)
        gain = np.median(c[:, -1]) / target - 1 if target > 0 else float("nan")
        print(f"{s}: trials to reach it, per seed: {reach}; within 50 trials on {within} of "
              f"{len(reach)} seeds; median at {n_trials} trials {gain:+.0%} vs random")


def report_balance(balance: dict[str, np.ndarray], n_trials: int, checkpoints: tuple[int, ...]) -> None:
    marks = sorted({c for c in checkpoints if c <= n_trials} | {n_trials})
    print(f"best balanced point (weakest skill normalised, base 0 and expert 1; retention "
          f">= {RETAIN:.0%} of the base's): median [quartiles]")
    print("| sampler | " + " | ".join(f"@{c}" for c in marks) + f" | seeds >= {BALANCED} |")
    print("|---|" + "---|" * (len(marks) + 1))
    for s, c in balance.items():
        cells = [f"{med:.2f} [{q1:.2f}, {q3:.2f}]" for q1, med, q3 in (quartiles(c, m) for m in marks)]
        print(f"| {s} | " + " | ".join(cells) + f" | {int((c[:, -1] >= BALANCED).sum())} of {len(c)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samplers", nargs="+", default=SAMPLERS,
                    help=f"{', '.join(SAMPLERS)}, nsga3 or a registered sampler; "
                         f"'{WARM}' after a name: with the warm start")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=150)
    ap.add_argument("--family", choices=["demo", "smol"], default="demo",
                    help="the search problem: mergesearch/demo/<family>.yaml")
    ap.add_argument("--limit", type=int, default=None,
                    help="examples per objective (default: 30 for the demo, else the config's)")
    ap.add_argument("--population", type=int, default=None, help="NSGA-II population (default: the config's)")
    ap.add_argument("--jobs", type=int, default=2, help="searches run side by side, one process each")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--checkpoints", type=int, nargs="+", default=list(CHECKPOINTS),
                    help="trial counts the table reports (and the last trial)")
    ap.add_argument("--warm-start", action="store_true", help="every sampler with the warm start")
    ap.add_argument("--shared", action="store_true",
                    help="space.shared: one value of each per-source knob for all sources")
    ap.add_argument("--nsga2", nargs="*", default=[], metavar="KEY=VALUE",
                    help="an NSGA-II variant: crossover=uniform|blx|sbx, alpha=, mutation_prob=")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "search_quality.png")
    ap.add_argument("--cache", type=Path, default=CACHE, help="SQLite file of scores by recipe hash")
    ap.add_argument("--no-cache", action="store_true", help="score every recipe anew")
    args = ap.parse_args()

    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    nsga2 = dict(option.split("=", 1) for option in args.nsga2)
    cache = None if args.no_cache else str(args.cache)
    limit = args.limit or (30 if args.family == "demo" else None)
    examples = f"{limit} examples" if limit else "the config's examples"
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, initializer=_init,
                             initargs=(limit, args.population, None, None, nsga2, cache, args.family,
                                       args.shared)) as pool:
        methods = list(pool.submit(_space_methods).result())
        jobs = make_jobs(args.samplers, seeds, methods, args.warm_start)
        results = list(pool.map(run_job, jobs, [args.trials] * len(jobs)))
    names, reference = results[0]["objectives"], np.array(results[0]["reference"])
    anchors = np.array(results[0]["anchors"])
    curves, balance = {}, {}
    for label in dict.fromkeys(j.label for j in jobs):
        runs = [np.array(r["values"], dtype=float) for r in results if r["label"] == label]
        curves[label] = np.stack([hv_curve(values, reference) for values in runs])
        balance[label] = np.stack([balance_curve(values, anchors) for values in runs])
    best = best_method_curves(curves)
    summary = {**{k: v for k, v in curves.items() if "[" not in k}, **{k: c for k, (_, c) in best.items()}}

    print(f"{args.family} family, {examples} per objective, seeds {seeds}, "
          f"{args.trials} trials; "
          f"{time.perf_counter() - started:.0f}s; distinct recipes {sum(r['unique'] for r in results)} "
          f"of {len(jobs) * args.trials} trials, {sum(r['fresh'] for r in results)} scored now "
          f"(the others from the score cache)")
    print("reference point (worst of the base and the experts): "
          + ", ".join(f"{n} {v:.4f}" for n, v in zip(names, reference)))
    every = {**summary, **{k: v for k, v in curves.items() if "[" in k}}
    report(every, args.trials, best, tuple(args.checkpoints))
    balance |= {k: balance[f"{k}[{m}]"] for k, (m, _) in best.items()}  # cmaes-ws: its best method
    report_balance({k: balance[k] for k in every}, args.trials, tuple(args.checkpoints))
    info = {"family": args.family, "reference": dict(zip(names, reference.tolist())),
            "base_and_experts": anchors.tolist(), "limit": limit,
            "trials": args.trials,
            "seeds": seeds, "best_method": {k: m for k, (m, _) in best.items()},
            "seconds_per_run_median": {k: float(np.median([r["seconds"] for r in results if r["label"] == k]))
                                for k in curves}}
    csv_path, side = write_curves(every, balance, seeds, args.out, info)
    plot(summary, args.out, f"{args.family}: {examples} per objective, "
                            f"{len(seeds)} seeds")
    print(f"curves: {csv_path}; reference point and settings: {side}; plot: {args.out}")


def _space_methods() -> list[str]:
    """The methods of the problem's space (from a worker process, which loaded it)."""
    return list(_problem[0].space.methods)


if __name__ == "__main__":
    main()
