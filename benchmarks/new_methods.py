"""The demo problem's front with and without the papers' methods in the space.

Two spaces, searched the same way (sampler, seeds, trials, examples per objective): the
demo config's mergekit methods (task_arithmetic, ties, dare_ties, della_linear), and the
same plus PCB, consensus TIES, layer swapping and Fisher-weighted averaging. Each search
runs in process as in `search_quality.py`. Prints the hypervolume against trials and which
methods the final fronts are made of (pooled over seeds).

    python benchmarks/new_methods.py [--sampler tpe] [--seeds 3] [--trials 100] [--limit 30] [--jobs 2]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from search_quality import _init, hv_curve, run_sampler

MERGEKIT = ["task_arithmetic", "ties", "dare_ties", "della_linear"]
PAPERS = ["pcb", "consensus_ties", "layer_swap", "fisher"]


def front_mask(values: np.ndarray) -> np.ndarray:
    """Rows (maximised, finite) that no other row dominates."""
    ok = np.isfinite(values).all(axis=1)
    mask = np.zeros(len(values), dtype=bool)
    for i in np.nonzero(ok)[0]:
        v = values[i]
        others = values[ok]
        mask[i] = not ((others >= v).all(axis=1) & (others > v).any(axis=1)).any()
    return mask


def search(methods: list[str], args) -> list[dict]:
    jobs = list(range(args.seeds))
    with ProcessPoolExecutor(args.jobs, initializer=_init, initargs=(args.limit, None, methods)) as pool:
        return list(pool.map(run_sampler, [args.sampler] * len(jobs), jobs, [args.trials] * len(jobs)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sampler", default="tpe")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--limit", type=int, default=30, help="examples per objective")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()

    started = time.perf_counter()
    spaces = {"mergekit's methods": MERGEKIT, "+ the papers' methods": MERGEKIT + PAPERS}
    results = {name: search(methods, args) for name, methods in spaces.items()}
    reference = np.array(next(iter(results.values()))[0]["reference"])
    print(f"demo problem, {args.sampler}, {args.limit} examples per objective, {args.seeds} seeds, "
          f"{args.trials} trials; {time.perf_counter() - started:.0f}s")
    marks = [m for m in (25, 50, 100, 150) if m < args.trials] + [args.trials]
    print("| space | " + " | ".join(f"HV @{m}" for m in marks) + " | front made of (all seeds) |")
    print("|---|" + "---|" * (len(marks) + 1))
    for name, runs in results.items():
        curves = np.stack([hv_curve(np.array(r["values"], dtype=float), reference) for r in runs])
        made_of = Counter()
        for r in runs:
            values = np.array(r["values"], dtype=float)
            made_of.update(m for m, on in zip(r["methods"], front_mask(values)) if on)
        cells = [f"{curves[:, m - 1].mean():.4f} ± {curves[:, m - 1].std():.4f}" for m in marks]
        front = ", ".join(f"{m} {n}" for m, n in made_of.most_common())
        print(f"| {name} | " + " | ".join(cells) + f" | {front} |")


if __name__ == "__main__":
    main()
