"""The SmolLM2 family's build, data, tasks and config, on a tiny GGUF (`support.gguf`) and
two-step LoRA plans: the 135M family itself is for the benchmarks and the example."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from support.gguf import hf_tensors, write_tiny_gguf

from mergesearch.config import load_config
from mergesearch.demo import smol
from mergesearch.demo.lora import LoraPlan
from mergesearch.demo.smol_skills import SKILLS, examples, retention_examples, task_data
from mergesearch.errors import ConfigError
from mergesearch.merging.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "mergesearch" / "demo" / "smol_tasks"
TINY_PLANS = {s: LoraPlan(steps=2, lr=1e-2, rank=2, alpha=4.0, batch=2, seed=i,
                          targets=("q_proj", "v_proj"))
              for i, s in enumerate(SKILLS)}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    write_tiny_gguf(root / "tiny.gguf", hf_tensors(tied=True))
    return root, smol.build_family(root / "cache" / "family", gguf=root / "tiny.gguf", plans=TINY_PLANS)


def test_family_is_a_base_and_one_lora_expert_per_skill(family):
    root, paths = family
    assert list(paths) == ["base", *SKILLS]
    base = Checkpoint.open(str(paths["base"])).load_tensors()
    for skill in SKILLS:
        expert = Checkpoint.open(str(paths[skill])).load_tensors()
        changed = {k for k in base if not torch.equal(base[k], expert[k])}
        assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), skill
        # the base's tokenizer and chat template, which lm-eval renders prompts with
        for name in ("tokenizer.json", "chat_template.jinja"):
            assert (paths[skill] / name).read_bytes() == (paths["base"] / name).read_bytes(), name
    assert sorted(p.name for p in (root / "cache").iterdir()) == [".family.lock", "family"]


def test_a_built_family_is_reused(family):
    root, paths = family
    stamp = (paths["add"] / "model.safetensors").stat().st_mtime_ns
    again = smol.build_family(root / "cache" / "family", gguf=root / "tiny.gguf", plans=TINY_PLANS)
    assert again == paths and (paths["add"] / "model.safetensors").stat().st_mtime_ns == stamp


def test_missing_gguf_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="make smol"):
        smol.gguf_file()


def test_references(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="unknown smol model 'smol:nope'; known: smol:base"):
        smol.resolve_model("smol:nope")
    assert smol.resolve_model("demo:add") == "demo:add"
    monkeypatch.setattr(smol, "build_family", lambda: {n: tmp_path / n for n in smol.NAMES})
    assert smol.resolve_model("smol:reverse") == str(tmp_path / "reverse")


def test_shipped_task_data_is_what_the_generator_writes():
    expected = task_data()
    assert sorted(p.name for p in TASKS.glob("*.jsonl")) == sorted(expected)
    for name, items in expected.items():
        assert [json.loads(line) for line in (TASKS / name).read_text().splitlines()] == items, name


def test_splits_are_disjoint_and_answers_exact():
    for skill in SKILLS:
        splits = examples(skill)
        prompts = [{ex["prompt"] for ex in split} for split in splits.values()]
        assert sum(map(len, prompts)) == len(set().union(*prompts))
    ex = examples("initials")["test"][0]
    assert ex["answer"] == "".join(w[0] for w in ex["prompt"].split(": ")[1].split()).upper()
    facts = retention_examples()
    assert all(ex["choices"][ex["label"]] for split in facts.values() for ex in split)


def test_config_names_the_family_and_local_tasks():
    from lm_eval.tasks import TaskManager

    cfg = load_config(ROOT / "configs" / "smol.yaml")
    assert cfg.models.base == "smol:base"
    known = set(TaskManager(include_path=cfg.include_paths(), include_defaults=False).all_tasks)
    for objective in [*cfg.objectives, *cfg.heldout]:
        assert set(objective.tasks) <= known, objective.name


def test_demo_command_refuses_an_unknown_family_and_a_missing_gguf(monkeypatch):
    from support import cli_error

    assert "--family: unknown family 'nope'; known: demo, smol" in cli_error("demo", "--family", "nope")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "make smol" in cli_error("demo", "--family", "smol")
