"""The local or remote Ray cluster that runs the workers, and what they inherit from
the driver's environment."""

from __future__ import annotations

import math
import os
from typing import Any

from mergesearch.config import Config

ENV_PASSTHROUGH = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM",
                   "HF_ALLOW_CODE_EVAL", "PYTHONPATH")


def worker_env() -> dict[str, str]:
    """The driver's variables that workers need: Hugging Face settings and MERGESEARCH_*."""
    return {k: v for k, v in os.environ.items() if k in ENV_PASSTHROUGH or k.startswith("MERGESEARCH_")}


def start_ray(config: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": worker_env()}, "log_to_driver": False,
                              "configure_logging": False}
    if config.workers.address:
        ray.init(address=config.workers.address, **kwargs)
    else:
        need = config.workers.count * config.workers.cpus_per_worker
        ray.init(num_cpus=max(math.ceil(need), os.cpu_count() or 1), include_dashboard=False,
                 dashboard_host=config.workers.dashboard_host,
                 object_store_memory=config.workers.object_store_memory or 256 * 2**20, **kwargs)
