"""Checkpoint loading (single, sharded, .bin) and layer indices by architecture."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from mergesearch.merging import Checkpoint, CheckpointError, layer_index


@pytest.mark.parametrize("name,layer", [
    ("model.layers.12.self_attn.q_proj.weight", 12),          # Llama, Mistral, Qwen2/3, Gemma, Phi-3
    ("transformer.h.3.mlp.c_fc.weight", 3),                   # GPT-2
    ("gpt_neox.layers.7.attention.query_key_value.weight", 7),  # GPT-NeoX
    ("model.decoder.layers.0.fc1.weight", 0),
    ("blocks.5.attn.weight", 5),
    ("model.embed_tokens.weight", None),
    ("model.norm.weight", None),
    ("lm_head.weight", None),
    ("transformer.ln_f.bias", None),
])
def test_layer_index_by_architecture(name, layer):
    assert layer_index(name) == layer


def test_sharded_safetensors_load_like_a_single_file(families, tmp_path):
    f = families["llama"]
    model = AutoModelForCausalLM.from_pretrained(f["s0"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    single = Checkpoint.open(f["s0"]).load_tensors()
    sharded = Checkpoint.open(str(tmp_path / "sharded")).load_tensors()
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)


def test_bin_checkpoints_load_without_unpickling_code(families, tmp_path):
    f = families["llama"]
    folder = tmp_path / "bin"
    shutil.copytree(f["s0"], folder)
    tensors = Checkpoint.open(str(folder)).load_tensors()
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    loaded = Checkpoint.open(str(folder)).load_tensors()
    assert all(torch.equal(tensors[k], loaded[k]) for k in tensors)


def test_pickled_code_in_a_bin_file_is_refused(families, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(families["llama"]["s0"], folder)
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1), "payload": shutil.rmtree}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot read weights"):
        Checkpoint.open(str(folder)).load_tensors()


def test_missing_shard_is_named(families, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(families["llama"]["s0"])
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    victim = sorted((tmp_path / "m").glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: shard listed in model.safetensors.index.json is missing"):
        Checkpoint.open(str(tmp_path / "m")).weight_files()
