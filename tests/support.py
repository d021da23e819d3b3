"""Tiny model families for the tests: a random base and perturbed copies of it."""

from __future__ import annotations

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


def cli_error(*args) -> str:
    """Run the CLI in-process on ``args``, expecting a user error: exit code 2, no
    traceback, one ``error:`` line, which is returned."""
    from typer.testing import CliRunner

    from mergesearch.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    errors = [ln for ln in output.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: "), output  # one message
    return errors[0]
