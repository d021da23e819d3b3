"""A GGUF file (llama.cpp's format) to an ordinary Hugging Face model folder.

transformers reads a GGUF with ``gguf_file=`` and dequantises its tensors, but the model it
returns is marked as quantised and ``save_pretrained`` refuses it. Its config, less the
quantisation entry, builds a plain model of the same architecture; the dequantised state
dict loads into that one key for key, and that model saves like any other. The tokenizer
the GGUF carries (with its chat template) is saved beside it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from mergesearch.errors import CheckpointError


def gguf_to_folder(gguf_path: str | Path, out: str | Path) -> Path:
    """Convert ``gguf_path`` into the model folder ``out`` (float32 safetensors, config,
    generation config, tokenizer and chat template) and return ``out``. The folder appears
    whole or not at all: it is written beside ``out`` and renamed into place; an existing
    ``out`` is replaced."""
    gguf_path, out = Path(gguf_path), Path(out)
    if not gguf_path.is_file():
        raise CheckpointError(f"{gguf_path}: GGUF file not found")
    model, tokenizer = load_gguf(gguf_path)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plain_copy(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_gguf(gguf_path: Path):
    """``(model, tokenizer)`` as transformers reads them from a GGUF file: float32 weights
    dequantised from the file, the tokenizer from the file's own metadata."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def plain_copy(model):
    """A model of ``model``'s architecture, not marked as quantised, holding its weights.
    Tied embeddings stay tied: the fresh model ties them as its config says, and the
    state dict's two names for the one tensor both load into it."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):  # the fresh init must not move the caller's RNG
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain.eval()


def _replace(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; a previous ``out`` is renamed aside first, then removed,
    so that readers with its files open can finish."""
    aside = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, aside)
    os.replace(tmp, out)
    shutil.rmtree(aside, ignore_errors=True)
