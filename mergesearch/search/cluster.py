"""The local or remote Ray cluster that runs the workers, and what they inherit from
the driver's environment."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
import sys
import threading
from typing import Any

from mergesearch.config import Config

ENV_PASSTHROUGH = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM",
                   "HF_ALLOW_CODE_EVAL", "PYTHONPATH")

# Kills a local Ray's processes when the driver that started it dies, however it dies. Ray's
# head processes (GCS, raylet, ...) die with the driver (Ray starts them with PR_SET_PDEATHSIG),
# but the raylet's children, the dashboard agent and the runtime-env agent, notice the raylet's
# death and then wait 60 s to report it to the dead GCS (a fixed timeout in Ray 2.60) before they
# exit; no Ray setting shortens that. The reaper reads the driver's end of a pipe, which the kernel
# closes when the driver dies, even by SIGKILL; meanwhile it notes, once a second, the processes
# descended from the given ones (pid:create_time, so that a reused pid is never taken for one).
# It exits by itself once all of them are gone (a normal ray.shutdown()).
_REAPER = """# mergesearch: stops a local Ray when the driver that started it dies
import contextlib, os, select, sys, psutil

def alive(p):
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False

def started(arg):
    pid, created = arg.split(":")
    try:
        p = psutil.Process(int(pid))
        return [p] if repr(p.create_time()) == created else []
    except psutil.Error:
        return []

def descendants(roots):
    children = {}
    for p in psutil.process_iter(["ppid"]):
        children.setdefault(p.info["ppid"], []).append(p)
    found, todo = [], [r.pid for r in roots]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found

roots = [p for arg in sys.argv[1:] for p in started(arg)]
known = set(roots)
while True:
    known = {p for p in known if alive(p)} | set(descendants([r for r in roots if alive(r)]))
    if not known:
        break
    if select.select([sys.stdin], [], [], 1.0)[0] and not os.read(sys.stdin.fileno(), 1):
        for p in known | set(descendants([r for r in roots if alive(r)])):
            with contextlib.suppress(psutil.Error):  # it ended by itself meanwhile
                p.kill()
        break
"""


def worker_env() -> dict[str, str]:
    """The driver's variables that workers need: Hugging Face settings and MERGESEARCH_*."""
    return {k: v for k, v in os.environ.items() if k in ENV_PASSTHROUGH or k.startswith("MERGESEARCH_")}


def start_ray(config: Config) -> None:
    """Join the cluster at workers.address, or start a local Ray that prints nothing and
    dies with this process."""
    import psutil
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": worker_env()}, "log_to_driver": False,
                              "configure_logging": False}
    if config.workers.address:  # a cluster someone else runs: never reaped from here
        ray.init(address=config.workers.address, **kwargs)
        return
    need = config.workers.count * config.workers.cpus_per_worker
    before = set(psutil.Process().children())
    with _ray_start_up_notices_hidden():
        ray.init(num_cpus=max(math.ceil(need), os.cpu_count() or 1), include_dashboard=False,
                 dashboard_host=config.workers.dashboard_host,
                 object_store_memory=config.workers.object_store_memory or 256 * 2**20, **kwargs)
    _reap_with_this_process(set(psutil.Process().children()) - before)


@contextlib.contextmanager
def _ray_start_up_notices_hidden():
    """Ray logs notices to the terminal as it starts (the token-authentication banner on every
    run, resource detection): not the user's concern, so only errors show while it starts.
    Nothing else changes: token authentication stays on, as Ray's default makes it."""
    ray_logger = logging.getLogger("ray")
    level = ray_logger.level
    ray_logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        ray_logger.setLevel(level)


def _reap_with_this_process(ray_processes: set) -> None:
    """Start the reaper (see _REAPER) for the processes this process's ray.init started."""
    if not ray_processes:  # ray.init joined a Ray it did not start (RAY_ADDRESS)
        return
    reaper = subprocess.Popen(
        [sys.executable, "-c", _REAPER, *(f"{p.pid}:{p.create_time()!r}" for p in ray_processes)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # Ctrl-C at the terminal is the driver's to handle, not the reaper's
    # The thread holds the pipe's write end open for as long as the reaper lives, and collects
    # its exit status so that no zombie is left once it has finished.
    threading.Thread(target=reaper.wait, name="ray-reaper", daemon=True).start()
