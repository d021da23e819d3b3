"""Evaluation time per candidate on the demo tasks: our once-per-worker set-up against
calling `lm_eval.simple_evaluate` afresh for every candidate (what a naive loop does).

    python benchmarks/eval_speed.py [--limit 60] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mergesearch.config import parse_config
    from mergesearch.demo import build_experts
    from mergesearch.search import CandidateWorker

    paths = {k: str(v) for k, v in build_experts().items()}
    tasks = ["demo_add", "demo_reverse", "demo_sort"]
    cfg = parse_config({
        "models": {"base": paths["base"], "sources": {"add": paths["add"]}},
        "objectives": [{"name": t, "tasks": [t], "metric": "acc,none", "limit": args.limit} for t in tasks],
        "lm_eval": {"include_path": str(ROOT / "mergesearch" / "demo" / "tasks"), "include_defaults": False}})

    t0 = time.perf_counter()
    worker = CandidateWorker(cfg.snapshot(), paths["base"], {"add": paths["add"]})
    setup = time.perf_counter() - t0
    worker.evaluate(None)
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        worker.evaluate(None)
        times.append(time.perf_counter() - t)
    ours = min(times)

    lm = HFLM(pretrained=worker.model, tokenizer=worker.tokenizer, batch_size=16)
    naive = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        tm = TaskManager(include_path=str(ROOT / "mergesearch" / "demo" / "tasks"), include_defaults=False)
        lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=args.limit,
                                bootstrap_iters=0, verbosity="ERROR")
        naive.append(time.perf_counter() - t)
    with_defaults = time.perf_counter()
    TaskManager()  # what the CLI indexes when built with lm-eval's own tasks too
    index_s = time.perf_counter() - with_defaults

    print(f"demo tasks {tasks}, limit {args.limit} each")
    print(f"worker set-up (once): {setup:.2f}s")
    print(f"ours per candidate: {ours:.3f}s")
    print(f"simple_evaluate per candidate (local tasks only): {min(naive):.3f}s "
          f"({min(naive) / ours:.1f}x ours)")
    print(f"building a default TaskManager (lm-eval's ~14k tasks), per call if not cached: {index_s:.2f}s")


if __name__ == "__main__":
    main()
