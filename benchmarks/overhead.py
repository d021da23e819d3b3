"""Orchestration overhead per trial, and worker utilisation when evaluation times vary.

Runs real searches (Ray workers, SQLite storage, NSGA-II) over the demo experts with an
evaluator that only waits: first a zero-time one (what is left is the merge of the tiny
demo model plus ask, dispatch, tell and storage writes), then one whose time varies
tenfold (0.1-1.0 s) to see whether the asynchronous driver keeps every worker busy.

    python benchmarks/overhead.py [--trials 60] [--workers 2] [--storage sqlite|journal]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

from mergesearch.evaluators.base import Evaluator  # noqa: E402


class WaitEvaluator(Evaluator):
    """Scores a number derived from the recipe after waiting `seconds` (or a time that
    varies tenfold, from 0.1 to 1.0 s, with `MERGESEARCH_BENCH_UNEVEN=1`)."""

    def setup(self, model, tokenizer, engine=None) -> None:
        self.uneven = os.environ.get("MERGESEARCH_BENCH_UNEVEN") == "1"

    def measure(self, recipe):
        h = int(recipe.hash(), 16) if recipe else 0
        if self.uneven:
            time.sleep(0.1 + 0.9 * (h % 1000) / 999)
        return (h % 10_000) / 10_000, {}


class BlockedClock:
    """Time the driver spends blocked in `ray.wait`: the rest of its wall time is the
    orchestration itself (ask, sampling, dispatch, tell, storage writes, front update)."""

    def __init__(self):
        import ray

        self.ray, self.wait, self.blocked = ray, ray.wait, 0.0

    def __enter__(self):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return self.wait(*args, **kwargs)
            finally:
                self.blocked += time.perf_counter() - t

        self.ray.wait = timed
        return self

    def __exit__(self, *exc):
        self.ray.wait = self.wait


def run(trials: int, workers: int, uneven: bool, storage: str = "sqlite") -> dict[str, float]:
    from optuna.trial import TrialState

    from mergesearch.config import parse_config
    from mergesearch.search import Runner

    os.environ["MERGESEARCH_BENCH_UNEVEN"] = "1" if uneven else "0"
    tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
    config = parse_config({
        "models": {"base": "demo:base", "sources": {"add": "demo:add", "reverse": "demo:reverse", "sort": "demo:sort"}},
        "space": {"methods": ["task_arithmetic", "ties"]},
        "objectives": [{"name": "a", "evaluator": "overhead:WaitEvaluator", "direction": "maximize"},
                       {"name": "b", "evaluator": "cost"}],
        "study": {"name": "overhead", "run_dir": str(tmp),
                  **({"storage": f"journal:{tmp}/journal.log"} if storage == "journal" else {})},
        "sampler": {"name": "nsga2", "population_size": 8},
        "budget": {"n_trials": trials}, "workers": {"count": workers, "cpus_per_worker": 1},
    }, root=ROOT)
    loop: dict[str, float] = {}

    def first_progress(p) -> None:  # the loop starts once the workers are up
        loop.setdefault("start", time.perf_counter())

    runner = Runner(config, on_progress=first_progress)
    with BlockedClock() as clock:
        study = runner.run()
    loop_s = time.perf_counter() - loop["start"]
    done = [t for t in study.trials if t.state == TrialState.COMPLETE and "timings" in t.user_attrs
            and "duplicate_of" not in t.user_attrs and "duplicate_of_hash" not in t.user_attrs]
    start = min(t.datetime_start for t in study.trials)
    end = max(t.datetime_complete for t in study.trials)
    wall = (end - start).total_seconds()
    busy = sum(sum(t.user_attrs["timings"].values()) for t in done)
    in_worker = [sum(t.user_attrs["timings"].values()) for t in done]
    dispatch = [t.user_attrs["wall_s"] - w for t, w in zip(done, in_worker)]
    return {"trials": len(study.trials), "evaluated": len(done), "wall_s": wall,
            "driver_ms": 1000 * (loop_s - clock.blocked) / len(study.trials),
            "per_trial_ms": 1000 * wall * workers / len(study.trials),
            "merge_ms": 1000 * sum(t.user_attrs["timings"]["merge_s"] for t in done) / len(done),
            "dispatch_ms": 1000 * sum(dispatch) / len(done),
            "utilisation": busy / (workers * wall)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--storage", choices=["sqlite", "journal"], default="sqlite")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(HERE))
    fast = run(args.trials, args.workers, uneven=False, storage=args.storage)
    print(f"zero-time evaluator: {fast['trials']} trials in {fast['wall_s']:.1f}s with {args.workers} workers")
    print(f"  driver (ask, sample, dispatch, tell, storage writes, front): {fast['driver_ms']:.1f} ms per trial")
    print(f"  worker: {fast['per_trial_ms']:.0f} ms per trial, of which merge {fast['merge_ms']:.0f} ms; "
          f"dispatch + result transfer {fast['dispatch_ms']:.0f} ms per trial")
    slow = run(args.trials, args.workers, uneven=True, storage=args.storage)
    print(f"evaluation 0.1-1.0 s: {slow['trials']} trials in {slow['wall_s']:.1f}s; "
          f"worker utilisation {100 * slow['utilisation']:.1f}%; driver {slow['driver_ms']:.1f} ms per trial")


if __name__ == "__main__":
    main()
