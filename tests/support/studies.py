"""Configs for studies: the demo's (real experts, real lm-eval tasks) made small, and cheap
ones over a tiny family with the `cost` objective; and opening a run's study."""

from __future__ import annotations

from pathlib import Path

import optuna
import yaml

from mergesearch.config import parse_config
from mergesearch.search import RunRef

ROOT = Path(__file__).resolve().parents[2]  # the repository
TASKS = str(ROOT / "mergesearch" / "demo" / "tasks")  # the demo's lm-eval tasks


def task_config(objectives: list[dict], **extra):
    """A parsed config scoring ``objectives`` on the demo's tasks (models are placeholders)."""
    return parse_config({"models": {"base": "b", "sources": {"x": "x"}}, "objectives": objectives,
                         "lm_eval": {"include_path": TASKS, "include_defaults": False}, **extra},
                        root=ROOT)


def write_config(tmp_path: Path, n_trials: int, **overrides) -> Path:
    """The demo config, made small: two objectives, few examples, a run folder in tmp."""
    cfg = yaml.safe_load((ROOT / "mergesearch" / "demo" / "demo.yaml").read_text())
    cfg["lm_eval"]["include_path"] = TASKS
    cfg["objectives"] = [
        {"name": "add", "tasks": ["demo_add"], "metric": "acc,none", "limit": 16},
        {"name": "sort", "tasks": ["demo_sort"], "metric": "acc,none", "limit": 16},
    ]
    cfg["heldout"] = []
    cfg["budget"] = {"n_trials": n_trials}
    cfg["sampler"] = {"name": "nsga2", "seed": 0, "population_size": 4, "warm_start": False}
    cfg["study"] = {"name": "t", "run_dir": str(tmp_path / "run")}
    for key, value in overrides.items():
        cfg[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def load_study(run: Path) -> optuna.Study:
    """The study of run folder ``run``, as `status` and `resume` open it."""
    return RunRef.from_args(str(run)).load()


def config_for(families, tmp_path: Path, **overrides):
    """A study over the tiny llama family, with a cheap objective and its run in tmp."""
    f = families["llama"]
    data = {"models": {"base": f["base"], "sources": {"s0": f["s0"], "s1": f["s1"]}},
            "objectives": [{"name": "c", "evaluator": "cost"}],
            "study": {"name": "faults", "run_dir": str(tmp_path / "run")},
            "budget": {"n_trials": 6}, "workers": {"count": 1, "cpus_per_worker": 1}}
    # The sampler alone proposes, so that a seeded sampler's order is the test's (the warm
    # start has its own tests: test_warm_start.py), unless a test asks for it.
    sampler = {"warm_start": False, **overrides.pop("sampler", {})}
    data.update(overrides, sampler=sampler)
    return parse_config(data)
