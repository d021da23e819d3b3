"""Does merging work on the demo family? Each model's accuracy on each skill's test split,
then uniform task arithmetic (one weight for every expert) at a few weights and TIES at
density 0.5, each as a normalised score per skill: (merge - base) / (expert - base), where
1 is the expert's own level and 0 the base's. Scored in-process by the demo config's
objectives (real lm-eval), on all 150 test examples unless ``--limit``.

``--ceiling N`` then measures how balanced a merge this family allows: N trials of a search
that maximises the weakest skill's normalised score itself (one objective; Optuna's GP),
over the demo space's task arithmetic (``lambda`` and a weight per expert in each layer group),
starting from every weight at 1; its best point is scored on the held-out split too.

    python benchmarks/demo_family.py [--rebuild] [--limit N] [--weights 0.3 0.5 0.7 0.8 1.0] [--ceiling N]

``--rebuild`` builds the family afresh (into the cache, see MERGESEARCH_CACHE) and so
times the build from nothing; without it a cached family is reused.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "mergesearch" / "demo" / "demo.yaml"


def recipe(method: str, base: str, sources: dict[str, str], **knobs) -> str:
    """A merge of every source with the same knobs, as the worker takes it."""
    from mergesearch.recipe import Recipe

    models = [{"model": path, "parameters": dict(knobs)} for path in sources.values()]
    return Recipe(method=method, base_model=base, models=models).model_dump_json()


def normalised(merge: dict[str, float], base: dict[str, float],
               experts: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per skill: 0 at the base's accuracy, 1 at its expert's."""
    out = {}
    for skill, expert in experts.items():
        gap = expert[skill] - base[skill]
        out[skill] = (merge[skill] - base[skill]) / gap if gap else float("nan")
    return out


def ceiling(worker, heldout, base_path: str, sources: dict[str, str], base: dict[str, float],
            experts: dict[str, dict[str, float]], trials: int) -> None:
    """Search task arithmetic's weights for the best weakest skill, directly."""
    import optuna

    from mergesearch.config import load_config
    from mergesearch.merging import Checkpoint
    from mergesearch.spaces import SearchSpace
    from mergesearch.spaces.warm_start import warm_start_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = load_config(DEMO_CONFIG)
    space_config = config.space.model_copy(
        update={"methods": {"task_arithmetic": config.space.methods["task_arithmetic"]}})
    space = SearchSpace(space_config, base_path, sources, Checkpoint.open(base_path).num_layers, seed=0)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.GPSampler(seed=0, n_startup_trials=10))
    study.enqueue_trial(dict(warm_start_trials(space))["task_arithmetic, weight 1"])
    best = (-float("inf"), -1, "")
    for _ in range(trials):
        trial = study.ask()
        merge = space.sample(trial).model_dump_json()
        weakest = min(normalised(worker.evaluate(merge).values, base, experts).values())
        study.tell(trial, weakest)
        best = max(best, (weakest, trial.number, merge), key=lambda b: b[0])
    weakest, number, merge = best
    print(f"\nceiling: the weakest skill maximised directly, {trials} trials: best {weakest:.3f} "
          f"(trial {number}: " + ", ".join(f"{k} {v:.3f}" for k, v in study.trials[number].params.items()) + ")")
    skills = list(experts)
    held = {name: _by_skill(heldout.evaluate(r).values, skills)
            for name, r in [("base", None), ("merge", merge), *((s, _alone(sources[s])) for s in skills)]}
    print("  normalised, test split: " + _line(normalised(worker.evaluate(merge).values, base, experts)))
    print("  normalised, held out:   " + _line(normalised(held["merge"], held["base"],
                                                          {s: held[s] for s in skills})))


def _by_skill(values: dict[str, float], skills: list[str]) -> dict[str, float]:
    """Held-out scores under their skills' names (the heldout objectives are in the same order)."""
    return dict(zip(skills, values.values()))


def _alone(path: str) -> str:
    return recipe("passthrough", None, {"expert": path})


def _line(scores: dict[str, float]) -> str:
    return " ".join(f"{skill} {value:.3f}" for skill, value in scores.items())


def row(name: str, values: dict[str, float], skills: list[str]) -> str:
    return f"{name:<24}" + "".join(f"{values[s]:>9.3f}" for s in skills)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true", help="build the family afresh and time it")
    ap.add_argument("--limit", type=int, default=None, help="test examples per skill (default all)")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.8, 1.0])
    ap.add_argument("--ceiling", type=int, default=0, metavar="TRIALS",
                    help="then search the weakest skill directly for this many trials")
    args = ap.parse_args()

    from mergesearch.config import load_config
    from mergesearch.demo import build_experts
    from mergesearch.search import CandidateWorker

    started = time.perf_counter()
    paths = {name: str(path) for name, path in build_experts(force=args.rebuild).items()}
    build_s = time.perf_counter() - started
    config = load_config(DEMO_CONFIG).snapshot()
    for objective in config["objectives"]:
        objective["limit"] = args.limit
    skills = [o["name"] for o in config["objectives"]]
    sources = {s: paths[s] for s in skills}
    worker = CandidateWorker(config, paths["base"], sources)

    print(f"build: {build_s:.1f} s" + ("" if args.rebuild else " (cached unless first use)"))
    print(f"\naccuracy, test split ({args.limit or 'all'} examples per skill)")
    print(f"{'model':<24}" + "".join(f"{s:>9}" for s in skills))
    base = worker.evaluate(None).values
    print(row("base", base, skills))
    experts = {}
    for skill in skills:
        experts[skill] = worker.evaluate(_alone(sources[skill])).values
        print(row(f"expert {skill}", experts[skill], skills))

    print("\nmerges: accuracy | normalised (merge - base) / (expert - base)")
    merges = [(f"task_arithmetic w={w:g}", recipe("task_arithmetic", paths["base"], sources, weight=w))
              for w in args.weights]
    merges.append(("ties w=1 density=0.5", recipe("ties", paths["base"], sources, weight=1.0, density=0.5)))
    weakest = {}  # uniform task arithmetic: weight -> its weakest skill's normalised score
    for name, merge in merges:
        values = worker.evaluate(merge).values
        scores = normalised(values, base, experts)
        print(row(name, values, skills) + "  |" + "".join(f"{v:>7.2f}" for v in scores.values()))
        if name.startswith("task_arithmetic"):
            weakest[name] = min(scores.values())
    best = max(weakest, key=weakest.get)
    print(f"\nuniform task arithmetic, best of the weights: {best}, weakest skill {weakest[best]:.2f} normalised")
    if args.ceiling:
        heldout = CandidateWorker(config, paths["base"], sources, heldout=True)
        ceiling(worker, heldout, paths["base"], sources, base, experts, args.ceiling)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
