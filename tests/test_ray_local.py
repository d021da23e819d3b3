"""The local Ray that start_ray starts: it prints nothing, and nothing of it outlives its
driver, however the driver ends (ray.shutdown(), Ctrl-C, SIGKILL); a cluster it joins is
never touched."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.e2e

START = """
import os, sys, time, ray
from mergesearch.config import parse_config
from mergesearch.search.cluster import start_ray
workers = {"address": sys.argv[1]} if len(sys.argv) > 1 else {}
start_ray(parse_config({"models": {"base": "b", "sources": {"x": "x"}}, "workers": workers,
                        "objectives": [{"name": "c", "evaluator": "cost"}]}))
"""

# The raylet's children that used to outlive a killed driver by a minute.
AGENTS = {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}


def driver(script: str, *args: str) -> subprocess.Popen:
    """A driver in a session of its own, so that a Ctrl-C sent to it reaches nothing else."""
    return subprocess.Popen([sys.executable, "-c", START + script, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def ray_processes_once_started(process: subprocess.Popen) -> list[psutil.Process]:
    """The driver's descendants once Ray's agents are up, and a second later (the reaper's
    round), so that all of them are known to whatever cleans up."""
    assert process.stdout.readline() == "ready\n", process.stderr.read()[-2000:]
    deadline = time.monotonic() + 60
    while not AGENTS <= {p.name() for p in psutil.Process(process.pid).children(recursive=True)}:
        assert time.monotonic() < deadline, "Ray's agents never started"
        time.sleep(0.5)
    time.sleep(1.5)
    return psutil.Process(process.pid).children(recursive=True)


def running(processes: list[psutil.Process]) -> list[str]:
    """Names of those still running (a zombie has ended: only its exit status is left)."""
    names = []
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):  # ended between the two calls
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                names.append(p.name())
    return names


def gone_within(processes: list[psutil.Process], seconds: float) -> list[str]:
    """Names of those still running after the given time (an empty list as soon as none is)."""
    deadline = time.monotonic() + seconds
    while running(processes) and time.monotonic() < deadline:
        time.sleep(0.25)
    return running(processes)


def kill_all(processes: list[psutil.Process]) -> None:
    """Clean up after a failed test: only the processes this test's driver started."""
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):  # already gone: nothing to clean
            p.kill()


def test_local_ray_prints_nothing_and_keeps_token_authentication():
    """Ray announced its (default) token authentication on every start; the user sees nothing,
    and the authentication stays on."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    script = "print(os.environ['RAY_AUTH_MODE'])\nray.shutdown()\n"
    result = subprocess.run([sys.executable, "-c", START + script], capture_output=True, text=True,
                            timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (result.stdout, result.stderr) == ("token\n", "")


def test_killing_the_driver_leaves_no_ray_process_behind():
    process = driver("print('ready', flush=True)\ntime.sleep(600)\n")
    ray_processes = ray_processes_once_started(process)
    try:
        assert AGENTS <= {p.name() for p in ray_processes}
        process.kill()
        process.wait()
        assert gone_within(ray_processes, 10) == []
    finally:
        kill_all(ray_processes)


def test_ray_shutdown_leaves_no_ray_process_behind_while_the_driver_lives():
    process = driver("""print('ready', flush=True)
sys.stdin.readline()  # the test has noted Ray's processes
ray.shutdown()
print('stopped', flush=True)
time.sleep(600)
""")
    ray_processes = ray_processes_once_started(process)
    try:
        process.stdin.write("stop\n")
        process.stdin.flush()
        assert process.stdout.readline() == "stopped\n"
        assert gone_within(ray_processes, 10) == []
        assert process.poll() is None  # the driver lives on
    finally:
        process.kill()
        kill_all(ray_processes)


def test_ctrl_c_stops_the_driver_and_its_ray():
    # Ctrl-C handled as in a process a terminal starts, whatever this test process passes on
    # (a child inherits an ignored SIGINT, and Python then never raises KeyboardInterrupt).
    process = driver("""import signal
signal.signal(signal.SIGINT, signal.default_int_handler)
print('ready', flush=True)
try:
    time.sleep(600)
except KeyboardInterrupt:  # as the CLI does; Ray's exit hook stops Ray
    sys.exit(130)
""")
    ray_processes = ray_processes_once_started(process)
    try:
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C at a terminal sends: the whole group
        assert process.wait(timeout=60) == 130, process.stderr.read()[-2000:]
        assert gone_within(ray_processes, 10) == []
    finally:
        process.kill()
        kill_all(ray_processes)


def test_killing_a_driver_that_joined_a_cluster_leaves_the_cluster_running(ray_session):
    """A cluster start_ray joins (workers.address) is not its to stop: here the suite's own."""
    cluster = [p for p in psutil.Process().children(recursive=True)
               if p.name() in {"gcs_server", "raylet"} | AGENTS]
    assert len(cluster) == 4
    process = driver("print('ready', flush=True)\ntime.sleep(600)\n",
                     ray_session.get_runtime_context().gcs_address)
    try:
        assert process.stdout.readline() == "ready\n", process.stderr.read()[-2000:]
        assert psutil.Process(process.pid).children() == []  # no Ray, and no reaper, of its own
        process.kill()
        process.wait()
        time.sleep(3)  # longer than a reaper takes
        assert len(running(cluster)) == 4
        assert ray_session.get(ray_session.put(7)) == 7
    finally:
        process.kill()
