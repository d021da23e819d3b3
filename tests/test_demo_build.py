"""Building the demo experts: their quality, their training data, the cache folder they
land in, one build across processes, cleanup on SIGTERM, progress and determinism."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.studies import ROOT, TASKS

from mergesearch.config import parse_config
from mergesearch.demo import build_experts, cache_dir, examples
from mergesearch.demo.experts import BUILD_SOURCES, HERE, NAMES, _training_mix, cache_key
from mergesearch.demo.skills import is_basic
from mergesearch.search import CandidateWorker

SKILLS = ("add", "reverse", "sort")


def scores(model: Path, limit: int | None) -> dict[str, float]:
    """Real lm-eval accuracy of ``model`` on each skill's test split (first ``limit`` examples)."""
    objectives = [{"name": s, "tasks": [f"demo_{s}"], "metric": "acc,none",
                   **({"limit": limit} if limit else {})} for s in SKILLS]
    cfg = parse_config({"models": {"base": "b", "sources": {"x": "x"}}, "objectives": objectives,
                        "lm_eval": {"include_path": TASKS, "include_defaults": False}}, root=ROOT)
    return CandidateWorker(cfg.snapshot(), str(model), {}).evaluate(None).values


def build_in_subprocess(cache: Path, steps: int, stderr, env: dict | None = None) -> subprocess.Popen:
    code = f"from mergesearch.demo import build_experts; build_experts({str(cache)!r}, steps={steps})"
    return subprocess.Popen([sys.executable, "-c", code], stderr=stderr, stdout=subprocess.DEVNULL,
                            cwd=ROOT, env={**os.environ, **(env or {})})


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("limit", [60, None], ids=["search-limit-60", "full-150"])
@pytest.mark.e2e  # real lm-eval on every demo expert, up to all 150 examples: minutes
def test_each_expert_scores_at_least_0_9_on_its_skill_and_the_base_partway(demo_experts, limit):
    base = scores(demo_experts["base"], limit)
    experts = {s: scores(demo_experts[s], limit)[s] for s in SKILLS}
    assert min(experts.values()) >= 0.9, experts
    # The base knows the basic half of every skill: well above chance, well below the expert.
    assert all(0.4 <= base[s] <= experts[s] - 0.1 for s in SKILLS), (base, experts)


def test_every_model_trains_on_the_train_split_only():
    mix = _training_mix()
    contexts = {name: {c for _, pairs in parts.values() for c, _ in pairs} for name, parts in mix.items()}
    train = {s: {ex["context"] for ex in examples(s)["train"]} for s in SKILLS}
    basic = {s: {c for c in train[s] if is_basic(s, c)} for s in SKILLS}
    unseen = {ex["context"] for s in SKILLS for split in ("test", "heldout") for ex in examples(s)[split]}
    assert contexts["base"] == set().union(*basic.values())  # the basic half of every skill
    for skill in SKILLS:  # its whole skill, and the base's data of the others
        assert contexts[skill] == train[skill] | set().union(*(basic[s] for s in SKILLS if s != skill))
    assert all(0 < len(basic[s]) < len(train[s]) for s in SKILLS)
    assert not unseen & set().union(*contexts.values())


def test_cache_folder_is_named_for_the_build_source_and_library_versions(tmp_path, monkeypatch):
    import peft
    import transformers

    for name in BUILD_SOURCES:
        shutil.copy(HERE / name, tmp_path / name)
    versions = (torch.__version__, transformers.__version__, peft.__version__)
    assert cache_key(tmp_path, versions) == cache_key() and cache_key().startswith("demo-")
    assert len(cache_key()) == len("demo-") + 12
    monkeypatch.setenv("MERGESEARCH_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache" / cache_key()
    assert cache_key(tmp_path, (torch.__version__, "4.57.0", peft.__version__)) != cache_key()
    assert cache_key(tmp_path, ("2.5.0", transformers.__version__, peft.__version__)) != cache_key()
    assert cache_key(tmp_path, (torch.__version__, transformers.__version__, "0.18.0")) != cache_key()
    for name in BUILD_SOURCES:
        changed = tmp_path / "changed"
        shutil.copytree(tmp_path, changed, ignore=shutil.ignore_patterns("changed", "cache"))
        (changed / name).write_text((changed / name).read_text() + "\n# changed\n")
        assert cache_key(changed, versions) != cache_key(), name
        shutil.rmtree(changed)


@pytest.mark.e2e
def test_processes_building_together_train_once_and_share_the_folder(tmp_path):
    cache = tmp_path / "demo-x"
    logs = [tmp_path / "first.err", tmp_path / "second.err"]
    with open(tmp_path / ".demo-x.lock", "a") as lock:  # hold the lock: both must queue behind it
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = [build_in_subprocess(cache, 2, open(log, "w")) for log in logs]
        wait_for(lambda: all("waiting for another process" in log.read_text() for log in logs), 180,
                 "both builds to wait for the lock")
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    errs = [log.read_text() for log in logs]
    assert sum("building demo experts (once)" in e for e in errs) == 1, errs
    assert all((cache / n / "model.safetensors").exists() for n in NAMES)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.e2e
def test_sigterm_mid_build_leaves_no_temporary_folder_and_no_cache(tmp_path):
    cache = tmp_path / "demo-x"
    proc = build_in_subprocess(cache, 400, subprocess.DEVNULL)
    temporary = lambda: [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # noqa: E731
    wait_for(lambda: any((t / "base" / "model.safetensors").exists() for t in temporary()), 240,
             "the base model to be saved")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert temporary() == []
    assert not cache.exists()


@pytest.mark.e2e
def test_build_shows_its_own_progress_line_and_no_transformers_bars(tmp_path):
    err = tmp_path / "err"
    env = {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "TERM": "xterm"}  # rich renders as on a terminal
    assert build_in_subprocess(tmp_path / "demo-x", 30, open(err, "w"), env).wait(timeout=300) == 0
    text = err.read_text()
    assert "building demo experts (once): sort" in text and "/30 steps" in text
    assert "Writing model shards" not in text and "Loading" not in text and "Warning" not in text


def test_one_process_and_two_process_builds_agree_bit_for_bit(tmp_path):
    first = build_experts(tmp_path / "a", steps=5, processes=1)
    second = build_experts(tmp_path / "b", steps=5, processes=2)  # an expert trained in a child
    for name in NAMES:
        a = load_file(first[name] / "model.safetensors")
        b = load_file(second[name] / "model.safetensors")
        assert a.keys() == b.keys() and len(a) == 57  # 6 layers of 9 tensors, embeddings, norm, head
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_build_restores_the_callers_threads_rng_and_sigterm_handler(tmp_path):
    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    torch.set_num_threads(1)
    try:
        rng = torch.random.get_rng_state()
        build_experts(tmp_path / "a", steps=1, processes=1)
        assert torch.get_num_threads() == 1
        assert torch.equal(torch.random.get_rng_state(), rng)
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        torch.set_num_threads(threads)


def test_leftovers_of_a_killed_build_are_removed_by_the_next(tmp_path):
    (tmp_path / ".demo-x.tmp-killed" / "base").mkdir(parents=True)
    build_experts(tmp_path / "demo-x", steps=1, processes=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo-x.lock", "demo-x"]
