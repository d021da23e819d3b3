"""The search: study and storage, worker pools (Ray or in-process), the ask/tell runner, the
front, export."""

from mergesearch.search.export import export_trial, trial_recipe
from mergesearch.search.front import (
    choose,
    front_rows,
    hypervolume,
    pareto_front,
    plot_front,
    study_hypervolume,
)
from mergesearch.search.pool import RayPool, SerialPool, WorkerDied, WorkerPool
from mergesearch.search.runner import Progress, Runner
from mergesearch.search.study import RunRef, create_or_load, open_storage, recover_orphans
from mergesearch.search.worker import CandidateResult, CandidateWorker, resolve_models

__all__ = [
    "CandidateResult", "CandidateWorker", "Progress", "RayPool", "RunRef", "Runner", "SerialPool",
    "WorkerDied", "WorkerPool", "choose", "create_or_load", "export_trial", "front_rows",
    "hypervolume", "open_storage", "pareto_front", "plot_front", "recover_orphans",
    "resolve_models", "study_hypervolume", "trial_recipe",
]
