"""Multi-fidelity scoring on the demo problem: hypervolume per evaluated example.

The same search (sampler, seeds) with multi-fidelity off and on, each given the same
budget of evaluated examples: what the search without it spends on `--trials` trials.
With it on, a candidate is scored on `--fraction` of each objective's examples first and
on all of them only if it could still enter the front (`--margin` standard errors of
optimism); only full-fidelity scores make the front. Each search runs in process as in
`search_quality.py`.

    python benchmarks/fidelity.py [--sampler tpe] [--seeds 5] [--trials 80] [--limit 60]
        [--fraction 0.25] [--margins 2 1] [--jobs 2]

Hypervolumes are reported as the median over seeds with the quartiles in brackets.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from search_quality import _init, hv_curve, run_sampler


def search(fidelity: dict | None, args, max_examples: int | None) -> list[dict]:
    seeds = list(range(args.seeds))
    trials = args.trials if fidelity is None else 20 * args.trials  # stopped by max_examples
    with ProcessPoolExecutor(args.jobs, initializer=_init, initargs=(args.limit, None, None, fidelity)) as pool:
        return list(pool.map(run_sampler, [args.sampler] * len(seeds), seeds, [trials] * len(seeds),
                             [max_examples] * len(seeds)))


def hv_at(run: dict, reference: np.ndarray, budgets: list[int]) -> list[float]:
    """Hypervolume of the full-fidelity scores known once `b` examples were spent."""
    curve = hv_curve(np.array(run["values"], dtype=float), reference)
    spent = np.array(run["examples"])
    return [float(curve[np.nonzero(spent <= b)[0][-1]]) if (spent <= b).any() else 0.0 for b in budgets]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sampler", default="tpe")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=80, help="trials of the search without multi-fidelity")
    ap.add_argument("--limit", type=int, default=60, help="examples per objective")
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--margins", type=float, nargs="+", default=[2.0, 1.0])
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()

    started = time.perf_counter()
    settings = {"off": None, **{f"on, margin {m:g}": {"enabled": True, "fraction": args.fraction, "margin": m}
                                for m in args.margins}}
    results = {"off": search(None, args, None)}
    budget = int(np.mean([r["examples"][-1] for r in results["off"]]))
    for name, fidelity in list(settings.items())[1:]:
        results[name] = search(fidelity, args, budget)
    reference = np.array(results["off"][0]["reference"])
    budgets = [budget // 4, budget // 2, budget]
    print(f"demo problem, {args.sampler}, {args.limit} examples per objective, first pass "
          f"{args.fraction:g}, {args.seeds} seeds; budget {budget} examples (= {args.trials} trials "
          f"without multi-fidelity); {time.perf_counter() - started:.0f}s")
    print("| multi-fidelity | trials | promoted to the full set | " + " | ".join(f"HV @{b} examples" for b in budgets)
          + " | HV per 10k examples |")
    print("|---|---|---|" + "---|" * (len(budgets) + 1))
    for name, runs in results.items():
        hv = np.array([hv_at(r, reference, budgets) for r in runs])
        trials = np.mean([len(r["values"]) for r in runs])
        full = np.mean([np.isfinite(np.array(r["values"], dtype=float)).all(axis=1).mean() for r in runs])
        q1, med, q3 = np.percentile(hv, [25, 50, 75], axis=0)
        cells = [f"{med[i]:.4f} [{q1[i]:.4f}, {q3[i]:.4f}]" for i in range(len(budgets))]
        per = med[-1] / budget * 1e4
        print(f"| {name} | {trials:.0f} | {full:.0%} | " + " | ".join(cells) + f" | {per:.4f} |")


if __name__ == "__main__":
    main()
