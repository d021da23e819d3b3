"""Does merging work on the demo family? Each model's accuracy on each skill's test split,
then uniform task arithmetic (one weight for every expert) at a few weights and TIES at
density 0.5, each as a normalised score per skill: (merge - base) / (expert - base), where
1 is the expert's own level and 0 the base's. Scored in-process by the demo config's
objectives (real lm-eval), on all 150 test examples unless ``--limit``.

    python benchmarks/demo_family.py [--rebuild] [--limit N] [--weights 0.3 0.5 0.7 0.8 1.0]

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
        experts[skill] = worker.evaluate(recipe("passthrough", None, {skill: sources[skill]})).values
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
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
