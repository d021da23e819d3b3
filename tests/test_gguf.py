"""`gguf_to_folder` on tiny Llama GGUF files the tests write (`support.gguf`): the real
conversion path, without the 93 MB SmolLM2 file."""

from __future__ import annotations

import json

import pytest
import torch
from support.gguf import HEADS, KV_HEADS, LAYERS, hf_tensors, tokens, write_tiny_gguf

from mergesearch.demo.gguf import gguf_to_folder
from mergesearch.errors import CheckpointError
from mergesearch.merging.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    weights = hf_tensors(tied=False)
    f16 = ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight")
    write_tiny_gguf(root / "tiny.gguf", weights, f16=f16)
    return weights, f16, gguf_to_folder(root / "tiny.gguf", root / "converted")


def test_weights_equal_the_written_ones(untied):
    weights, f16, folder = untied
    saved = Checkpoint.open(str(folder)).load_tensors()
    assert set(saved) == set(weights)
    for name, expected in weights.items():
        got = saved[name]
        assert got.dtype == torch.float32, name
        if name in f16:  # float16 in the file: equal to float16 precision
            torch.testing.assert_close(got, torch.from_numpy(expected), atol=1e-3, rtol=1e-3)
        else:
            assert torch.equal(got, torch.from_numpy(expected)), name


def test_checkpoint_opens_the_folder_as_a_plain_llama(untied):
    _, _, folder = untied
    ckpt = Checkpoint.open(str(folder))
    assert ckpt.architecture == ("llama", ("LlamaForCausalLM",))
    assert ckpt.num_layers == LAYERS
    assert not ckpt.tie_word_embeddings
    assert ckpt.vocab == {t: i for i, t in enumerate(tokens())}
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # a GGUF-loaded model would not save at all
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (HEADS, KV_HEADS)


def test_tokenizer_keeps_its_chat_template_and_merges(untied):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(untied[2])
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    text = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and tok.convert_ids_to_tokens(ids).count("he") == 1  # special kept, merge used
    assert tok.eos_token == "<|im_end|>"


def test_tied_embeddings_stay_tied(tmp_path):
    from transformers import AutoModelForCausalLM

    weights = hf_tensors(tied=True, seed=1)
    write_tiny_gguf(tmp_path / "tied.gguf", weights)
    folder = gguf_to_folder(tmp_path / "tied.gguf", tmp_path / "out")
    ckpt = Checkpoint.open(str(folder))
    assert ckpt.tie_word_embeddings
    assert "lm_head.weight" not in ckpt.tensor_shapes  # saved once, as the embedding
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(model.lm_head.weight, torch.from_numpy(weights["model.embed_tokens.weight"]))


def test_conversion_replaces_the_folder_whole(tmp_path, untied):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from before")
    write_tiny_gguf(tmp_path / "t.gguf", untied[0])
    gguf_to_folder(tmp_path / "t.gguf", out)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t.gguf"]  # no temporaries left


def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="GGUF file not found"):
        gguf_to_folder(tmp_path / "absent.gguf", tmp_path / "out")
