"""Every config in mergekit's own `examples/` folder (arcee-ai/mergekit), written again here
for the tiny test models: `mergesearch merge` either writes mergekit 0.1.5's tensors or
refuses it in one line naming what it does not support."""

from __future__ import annotations

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file
from support import build_family, cli_error
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mergesearch.cli import app


def examples(f: dict) -> dict[str, dict]:
    """mergekit's examples, their models replaced by ours (4 layers for 40)."""
    return {
        "bio-merge.yml": {
            "merge_method": "ties", "base_model": f["base"], "dtype": "float16",
            "parameters": {"normalize": False, "int8_mask": True},
            "models": [{"model": f["s0"], "parameters": {"density": 0.5, "weight": 0.5}},
                       {"model": f["s1"], "parameters": {"density": 0.5, "weight": 0.5}}]},
        "gradient-slerp.yml": {
            "merge_method": "slerp", "base_model": f["s0"], "dtype": "float16",
            "slices": [{"sources": [{"model": f["s0"], "layer_range": [0, 4]},
                                    {"model": f["s1"], "layer_range": [0, 4]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                 {"value": 0.5}]}},
        "linear.yml": {
            "merge_method": "linear", "dtype": "float16",
            "models": [{"model": f["s0"], "parameters": {"weight": 1.0}},
                       {"model": f["s1"], "parameters": {"weight": 0.3}},
                       {"model": f["s2"], "parameters": {"weight": 0.5}}]},
        "ties.yml": {
            "merge_method": "ties", "base_model": f["base"], "dtype": "float16",
            "parameters": {"normalize": True, "int8_mask": True},
            "models": [
                {"model": f["s0"], "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                {"model": f["s1"], "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
                {"model": f["s2"], "parameters": {"density": 0.33, "weight": [
                    {"filter": "mlp", "value": 0.5}, {"value": 0}]}}]},
        "arcee_fusion.yml": {
            "merge_method": "arcee_fusion", "base_model": f["s0"], "dtype": "bfloat16",
            "models": [{"model": f["s0"]}, {"model": f["s1"]}]},
        "orcamini-platy-44layer.yml": {
            "merge_method": "passthrough", "dtype": "float16",
            "slices": [{"sources": [{"model": f["s0"], "layer_range": [0, 3]}]},
                       {"sources": [{"model": f["s1"], "layer_range": [1, 4]}]}]},
    }


REPRODUCED = ["bio-merge.yml", "gradient-slerp.yml", "linear.yml", "ties.yml"]
REFUSED = {"arcee_fusion.yml": "unknown merge method 'arcee_fusion'",
           "orcamini-platy-44layer.yml": "frankenmerge"}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The Llama family stored in bfloat16, as the examples' models are."""
    f = build_family(tmp_path_factory.mktemp("examples"), "llama")
    for path in f.values():
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(path)
    return f


@pytest.mark.parametrize("name", REPRODUCED)
def test_mergekit_example_merges_to_mergekits_tensors(name, family, tmp_path):
    config = examples(family)[name]
    (tmp_path / name).write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["merge", str(tmp_path / name), str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mk"),
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    ours, theirs = load_file(tmp_path / "ours" / "model.safetensors"), {}
    for f in (tmp_path / "mk").glob("*.safetensors"):
        theirs.update(load_file(f))
    assert set(ours) == set(theirs)
    assert {t.dtype for t in ours.values()} == {t.dtype for t in theirs.values()} == {torch.float16}
    off = sum(int((ours[k].float() - theirs[k].float()).abs().gt(
        2 * torch.finfo(torch.float16).eps * theirs[k].float().abs().clamp_min(1e-4)).sum()) for k in theirs)
    assert off / sum(t.numel() for t in theirs.values()) < 0.002


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_mergekit_example_we_cannot_build_is_refused_in_one_line(name, family, tmp_path):
    (tmp_path / name).write_text(yaml.safe_dump(examples(family)[name]))
    assert REFUSED[name] in cli_error("merge", tmp_path / name, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()
