"""Where a worker keeps its inputs (issue 17): the residency plan, merges that do not depend
on it, a worker's memory within its budget, and a search under a host budget."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import psutil
import pytest
import torch
from safetensors.torch import save_file
from support.recipes import recipe_for

from mergesearch.config import parse_config
from mergesearch.errors import ConfigError
from mergesearch.merging import Checkpoint, MergeEngine, all_methods, load_live_model
from mergesearch.merging.residency import (
    GiB,
    StackSpec,
    plan_residency,
    resolve_budgets,
    stack_specs,
    staging_bytes,
    work_bytes,
)
from mergesearch.search import Runner, SerialPool

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)

# ---- the plan, by hand ----------------------------------------------------------------------

# Four stacks of base + 2 sources with rows of 512 bytes (256 bf16 entries), and one with
# rows of 16 bytes.
SPECS = {**{f"w{i}": StackSpec((16, 16), torch.bfloat16, 3) for i in range(4)},
         "small": StackSpec((4,), torch.float32, 3)}
WORK = (2 * 3 + 4) * 256 * 4  # float32 work buffers, sized by the largest tensor: 10240
STAGING = 2 * 3 * 512  # two staging buffers of the largest stack: 3072
INPUTS = 4 * 3 * 512 + 3 * 16  # 6192


def test_work_and_staging_bytes_are_sized_by_the_largest_stack():
    assert work_bytes(SPECS) == WORK
    assert staging_bytes(SPECS) == STAGING


def test_everything_fits_the_device_so_nothing_is_staged():
    plan = plan_residency(SPECS, WORK + INPUTS, 0)
    assert set(plan.tiers.values()) == {("device",) * 3}
    assert (plan.bytes("device"), plan.staging_bytes, plan.spare_device()) == (INPUTS, 0, 0)


def test_base_rows_then_the_largest_tensors_take_the_fastest_tier_first():
    # 1100 bytes left on the device once staging is reserved: two big base rows, then
    # (first fit) the small rows; the host's 1536 bytes take the two other big base rows
    # and the first big source row; the other source rows are read from the files.
    plan = plan_residency(SPECS, WORK + STAGING + 1100, 1536)
    assert plan.tiers == {"w0": ("device", "host", "mmap"), "w1": ("device", "mmap", "mmap"),
                          "w2": ("host", "mmap", "mmap"), "w3": ("host", "mmap", "mmap"),
                          "small": ("device",) * 3}
    assert (plan.bytes("device"), plan.bytes("host"), plan.bytes("mmap")) == (1072, 1536, 3584)
    assert plan.staging_bytes == STAGING and plan.host_staging_bytes == 0
    assert plan.spare_device() == 1100 - 1072


def test_on_a_gpu_reading_files_reserves_pinned_staging_from_the_host_budget():
    plan = plan_residency(SPECS, WORK + STAGING + 512, 2 * STAGING, device_type="cuda")
    assert plan.tiers["w0"] == ("device", "host", "host")  # the base row first
    assert plan.host_staging_bytes == 0 and plan.bytes("mmap") == 0  # the rest fits the host
    plan = plan_residency(SPECS, WORK + STAGING + 512, STAGING + 512, device_type="cuda")
    assert plan.host_staging_bytes == STAGING
    assert plan.tiers["w0"] == ("device", "mmap", "mmap") and plan.tiers["w1"] == ("host", "mmap", "mmap")


def test_a_device_smaller_than_the_live_model_is_refused_with_the_numbers():
    with pytest.raises(ConfigError) as e:
        plan_residency(SPECS, 2 * GiB, 8 * GiB, live_bytes=3 * GiB)
    msg = str(e.value)
    assert msg.startswith("workers.device_memory_gb: the live model (3.00 GiB)")
    assert "need 3.00 GiB on each worker's device, which may use 2.00 GiB" in msg


def test_bin_checkpoints_cannot_be_read_from_their_files():
    with pytest.raises(ConfigError, match="only safetensors checkpoints"):
        plan_residency(SPECS, WORK + STAGING, 0, mmap_ok=False)
    plan_residency(SPECS, WORK + STAGING, INPUTS, mmap_ok=False)  # all in host memory: fine


def test_on_a_cpu_the_host_budget_covers_the_device_unless_it_has_its_own():
    cpu = torch.device("cpu")
    assert resolve_budgets(cpu, None, 100) == (100, 0)  # one memory: counted once
    assert resolve_budgets(cpu, 50, 100) == (50, 100)
    device, host = resolve_budgets(cpu)
    assert host == 0 and 0 < device < psutil.virtual_memory().total


def test_describe_gives_the_bytes_per_tier_in_one_line():
    # Eight tensors of 2**26 bf16 entries, base and three sources: 128 MiB a row, 4 GiB in
    # all; float32 work buffers of (2 * 4 + 4) rows (3 GiB) and two staging stacks (1 GiB)
    # leave the device no room; the host takes the base rows, the rest is read from files.
    specs = {f"w{i}": StackSpec((2**26,), torch.bfloat16, 4) for i in range(8)}
    plan = plan_residency(specs, 9 * GiB // 2, GiB, live_bytes=GiB // 2)
    assert plan.describe() == (
        "residency device 0 B · host 1.00 GiB · mmap 3.00 GiB (besides live model 512.0 MiB, "
        "work 4.00 GiB; budget device 4.50 GiB, host 1.00 GiB)")


# ---- merges do not depend on where the inputs live ----------------------------------------


def tier_budgets(paths: list[str]) -> dict[str, tuple[int, int]]:
    """(device, host) budgets that force each tier on ``paths`` (an engine without a live
    model): everything on the device, everything in host memory, everything read from the
    files, and a mix of the three."""
    specs = stack_specs([Checkpoint.open(p).locations for p in paths])
    floor = work_bytes(specs) + staging_bytes(specs)
    total = sum(s.nbytes for s in specs.values())
    return {"device": (floor + 4 * total, 0), "host": (floor, total), "mmap": (floor, 0),
            "mixed": (floor + total // 3, total // 3)}


@pytest.fixture(scope="module")
def engines(families):
    """An engine over the llama family per tier setting, with the same Fisher information."""
    f = families["llama"]
    paths = [f["base"], f["s0"], f["s1"], f["s2"]]
    out = {}
    for tier, (device, host) in tier_budgets(paths).items():
        engine = MergeEngine(paths[0], paths[1:], device="cpu", device_budget=device, host_budget=host)
        g = torch.Generator().manual_seed(0)
        engine.attach_fisher({m: {n: torch.rand(engine.shapes[n], generator=g) for n in engine.names}
                              for m in engine.models})
        out[tier] = engine
    return f, out


def test_the_budgets_force_every_tier(engines):
    _, by_tier = engines
    used = {t: {k: e.plan.bytes(k) > 0 for k in ("device", "host", "mmap")} for t, e in by_tier.items()}
    assert used == {"device": {"device": True, "host": False, "mmap": False},
                    "host": {"device": False, "host": True, "mmap": False},
                    "mmap": {"device": False, "host": False, "mmap": True},
                    "mixed": {"device": True, "host": True, "mmap": True}}
    for engine in by_tier.values():  # what the store holds is what the plan says, staging aside
        plan, held = engine.plan, engine.store.resident_bytes()
        assert plan.bytes("device") + plan.bytes("host") <= held <= plan.bytes("device") + plan.bytes("host") \
            + plan.staging_bytes


@pytest.mark.parametrize("method", sorted(all_methods()))
def test_every_method_merges_bit_identically_whatever_the_tier(engines, method):
    f, by_tier = engines
    recipe = recipe_for(method, f)
    want = dict(by_tier["device"].merged_tensors(recipe))
    for tier in ("host", "mmap", "mixed"):
        for _ in range(2):  # the second candidate reads what the first kept, where anything is
            got = dict(by_tier[tier].merged_tensors(recipe))
            assert got.keys() == want.keys()
            for name, tensor in want.items():
                assert torch.equal(got[name], tensor), (tier, name)


def test_a_live_model_gets_the_same_weights_from_every_tier(engines):
    f, by_tier = engines
    recipe = recipe_for("task_arithmetic", f)  # a weighted sum: written straight into the model
    weights = {}
    for tier, engine in by_tier.items():
        model = load_live_model(f["base"], "cpu")
        engine.merge_into(model, recipe)
        weights[tier] = {k: v.clone() for k, v in model.state_dict().items()}
        engine.restore_base(model)
        assert all(torch.equal(v, engine.stacks[k][0]) for k, v in model.state_dict().items()
                   if k in engine.shapes)
    for tier in ("host", "mmap", "mixed"):
        assert all(torch.equal(weights[tier][k], v) for k, v in weights["device"].items())


# ---- a worker's memory stays within its budget --------------------------------------------

# What a worker process holds beyond its budgets, over a process that only imported the same
# modules: the merge method's temporaries (TIES sorts and signs a few float32 copies of the
# largest tensor's inputs: 3 x 1 MiB each here), the reader thread's stack and malloc arena,
# and the allocator's slack on freed buffers.
RSS_OVERHEAD = 32 * 2**20  # measured: 16 MiB

CHILD = """
import sys, torch
torch.set_num_threads(1)
from mergesearch.merging import MergeEngine
from mergesearch.recipe import Recipe
paths, device, host = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
engine = MergeEngine(paths[0], paths[1:], device="cpu", device_budget=int(device), host_budget=int(host))
for method in ("task_arithmetic", "ties", "ties"):
    params = {"weight": 0.3} if method == "task_arithmetic" else {"weight": 0.3, "density": 0.5}
    recipe = Recipe(method=method, base_model=paths[0],
                    models=[{"model": p, "parameters": params} for p in paths[1:]])
    for name, tensor in engine.merged_tensors(recipe):
        del tensor
"""


def big_family(root: Path, layers: int = 24) -> list[str]:
    """A base and three sources of 24 MiB each (float32, one 1 MiB tensor per layer)."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers}
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(4):
        folder = root / f"m{i}"
        folder.mkdir()
        tensors = {f"model.layers.{k}.mlp.up_proj.weight": torch.randn(512, 512, generator=g)
                   for k in range(layers)}
        save_file(tensors, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(config))
        paths.append(str(folder))
    return paths


# Starts the worker process and reports its peak RSS (kilobytes on Linux) and exit code.
# A forked process starts with its parent's resident pages counted in its peak, and pytest
# holds hundreds of MiB: the worker is forked from this small launcher instead.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-c", *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def peak_rss(paths: list[str], device: str, host: str) -> int:
    """The peak resident memory of a worker process, in bytes, as its parent sees it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", LAUNCHER, CHILD, ",".join(paths), device, host],
                         env=env, capture_output=True, text=True, check=True).stdout
    maxrss, code = map(int, out.split())
    assert code == 0
    return maxrss * 1024


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in kilobytes, as Linux gives it")
def test_a_worker_process_stays_within_its_budget(tmp_path):
    paths = big_family(tmp_path)
    specs = stack_specs([Checkpoint.open(p).locations for p in paths])
    total = sum(s.nbytes for s in specs.values())  # 96 MiB of inputs
    device = work_bytes(specs) + staging_bytes(specs) + 8 * 2**20
    host = 16 * 2**20
    # The baseline runs the same merges on a one-layer family: the same imports and the same
    # kernels' code pages, which count in RSS (by 80 MiB more in a fresh clone than here).
    (tmp_path / "small").mkdir()
    baseline = peak_rss(big_family(tmp_path / "small", layers=1), str(device), str(host))
    budgeted = peak_rss(paths, str(device), str(host))
    resident = peak_rss(paths, str(device + total + 2**20), "0")
    assert budgeted <= baseline + device + host + RSS_OVERHEAD, (baseline, budgeted)
    assert resident > baseline + device + host + RSS_OVERHEAD  # the bound would tell


# ---- a search under a host budget ---------------------------------------------------------


def search(families, tmp_path: Path, name: str, **workers) -> list[tuple[str, list[float]]]:
    """A 4-trial search over the llama family's base and 3 sources, scored by perplexity
    in this process: each trial's recipe hash and values."""
    f = families["llama"]
    (tmp_path / "text.jsonl").write_text("".join(
        json.dumps({"text": t}) + "\n" for t in ("12+7=19", "abcd>dcba", "hello world", "3*4=12")))
    config = parse_config({
        "models": {"base": f["base"], "sources": {k: f[k] for k in ("s0", "s1", "s2")}},
        "objectives": [{"name": "ppl", "evaluator": "perplexity", "seq_len": 8, "max_tokens": 32,
                        "batch_size": 4, "dataset": {"path": "json", "data_files": "text.jsonl"}}],
        "space": {"methods": ["ties", "dare_linear", "task_arithmetic"], "layer_groups": 2},
        "sampler": {"name": "random", "seed": 1}, "budget": {"n_trials": 4}, "seed": 5,
        "study": {"name": name, "run_dir": str(tmp_path / name)},
        "workers": {"count": 1, **workers}}, root=tmp_path)
    study = Runner(config, pool=SerialPool).run()
    trials = sorted(study.trials, key=lambda t: t.number)
    return [(t.user_attrs.get("recipe_hash"), t.values) for t in trials]


def all_resident_bytes(f: dict) -> tuple[int, int, int, int]:
    """The live model, work buffers, staging buffers and inputs of a worker on ``f``."""
    paths = [f["base"], f["s0"], f["s1"], f["s2"]]
    specs = stack_specs([Checkpoint.open(p).locations for p in paths])
    live = sum(math.prod(s.shape) * 4 for s in specs.values())  # the tiny models are float32
    return live, work_bytes(specs), staging_bytes(specs), sum(s.nbytes for s in specs.values())


def test_a_search_below_the_all_resident_need_scores_the_same(families, tmp_path, capfd):
    live, work, staging, inputs = all_resident_bytes(families["llama"])
    resident = search(families, tmp_path, "resident")
    assert "worker 0: residency device" in capfd.readouterr().err
    host_gb = (live + work + staging + inputs // 3) / GiB  # a CPU worker: one budget
    assert host_gb * GiB < live + work + inputs
    tight = search(families, tmp_path, "tight", host_memory_gb=host_gb)
    line = capfd.readouterr().err
    assert "worker 0: residency device" in line and "mmap 0 B" not in line
    assert len(resident) == 4 and all(values for _, values in resident)
    assert tight == resident


def test_a_search_whose_live_model_cannot_fit_is_refused_before_any_trial(families, tmp_path):
    with pytest.raises(ConfigError, match=r"the live model \(\d+\.\d KiB\)") as e:
        search(families, tmp_path, "refused", device_memory_gb=1e-6)
    assert "which may use 1.0 KiB" in str(e.value)
    assert not (tmp_path / "refused").exists()  # no study, no trial


# ---- the GPU check, on a machine without one ----------------------------------------------


def test_gpu_check_without_a_gpu_says_so_in_one_line_and_fails(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 1
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert len(lines) == 1 and "no NVIDIA GPU" in lines[0]
    assert not any(ch.isdigit() for ch in lines[0])


# ---- several workers on one node share its host memory --------------------------------------


def test_a_ray_worker_plans_on_its_share_of_the_nodes_cpus_of_the_host_memory(ray_session):
    from mergesearch.search.worker import node_share

    class Probe:  # a Ray actor, as a worker is
        def share(self, cpus: float, gpus: float) -> float:
            return node_share(cpus, gpus)

    assert ray_session.cluster_resources()["CPU"] == 2  # the test session's Ray
    probe = ray_session.remote(num_cpus=1)(Probe).remote()
    assert ray_session.get(probe.share.remote(1, 0)) == 0.5  # two such workers fit the node
    assert ray_session.get(probe.share.remote(2, 0)) == 1.0
    ray_session.kill(probe)
    assert node_share(1, 0) == 1.0  # the driver, or a worker in process, has the node to itself


def test_host_budget_is_the_share_of_the_available_memory():
    cpu = torch.device("cpu")
    whole, _ = resolve_budgets(cpu)
    half, _ = resolve_budgets(cpu, host_share=0.5)
    assert abs(half - whole / 2) < 0.05 * whole  # the free memory moves a little in between
