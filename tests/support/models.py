"""Tiny model families (a random base and perturbed copies of it), and model folders whose
code would leave a marker file if anything imported it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mergesearch.demo.tokenizer import char_tokenizer

ARCHS = {
    # untied embeddings, Llama naming (model.layers.N.self_attn/mlp)
    "llama": lambda vocab: LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False)),
    # tied embeddings, GPT-2 naming (transformer.h.N.attn/mlp)
    "gpt2": lambda vocab: GPT2LMHeadModel(GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=64,
        tie_word_embeddings=True)),
}


def build_family(root: Path, arch: str, n_sources: int = 3, scale: float = 0.02, seed: int = 0) -> dict:
    """A random base and `n_sources` perturbed copies of it, saved as HF folders."""
    tok = char_tokenizer()
    torch.manual_seed(seed)
    base = ARCHS[arch](len(tok))
    paths = {"base": root / f"{arch}-base"}
    base.save_pretrained(paths["base"])
    tok.save_pretrained(paths["base"])
    for i in range(n_sources):
        src = ARCHS[arch](len(tok))
        src.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(seed * 100 + i + 1)
        with torch.no_grad():
            for p in src.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        paths[f"s{i}"] = root / f"{arch}-s{i}"
        src.save_pretrained(paths[f"s{i}"])
        tok.save_pretrained(paths[f"s{i}"])
    return {k: str(v) for k, v in paths.items()}


CUSTOM_CODE = '''import pathlib
pathlib.Path({marker!r}).write_text("custom code ran")
from transformers import LlamaConfig, LlamaForCausalLM

class CustomConfig(LlamaConfig):
    model_type = {model_type!r}

class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''


def custom_code_model(families, tmp_path: Path, model_type: str) -> tuple[Path, Path]:
    """The llama base with config.json pointing at Python files in the folder that would
    leave a marker file if imported."""
    folder, marker = tmp_path / f"custom-{model_type}", tmp_path / "MARKER"
    shutil.copytree(families["llama"]["base"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type=model_type, auto_map={
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(cfg))
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (folder / name).write_text(CUSTOM_CODE.format(marker=str(marker), model_type=model_type))
    return folder, marker


CUSTOM_TOKENIZER = '''import pathlib
pathlib.Path({marker!r}).write_text("custom tokenizer code ran")
from transformers import PreTrainedTokenizerFast

class CustomTokenizer(PreTrainedTokenizerFast):
    pass
'''


def custom_tokenizer_model(families, tmp_path: Path, name: str = "s0") -> tuple[Path, Path]:
    """A copy of a llama family model whose tokenizer_config.json maps its tokenizer to a
    Python file in the folder that would leave a marker file if imported."""
    folder, marker = tmp_path / f"custom-tokenizer-{name}", tmp_path / "TOKENIZER-MARKER"
    shutil.copytree(families["llama"][name], folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="CustomTokenizer",
               auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "tokenization_custom.py").write_text(CUSTOM_TOKENIZER.format(marker=str(marker)))
    return folder, marker
