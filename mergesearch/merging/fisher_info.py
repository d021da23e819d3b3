"""Diagonal Fisher information of a causal LM, computed once and cached as safetensors.

F_j = mean over examples x of (d log p(x) / d theta_j)^2, where log p(x) is the summed
log-likelihood of the example's tokens (the empirical Fisher, as the paper's
implementation for language models and FusionBench use). Each example is differentiated
on its own: the square of a batch's mean gradient is not the mean of the squares.

The cache file is named by what determines its content: the model's weight files (path,
size, modification time) and the exact token ids of the calibration examples. Tied
parameters (GPT-2's ``lm_head.weight``) are stored once per name they are known by.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mergesearch.merging.checkpoint import Checkpoint

FORMAT = "mergesearch-fisher-1"


def diagonal_fisher(model: torch.nn.Module, examples: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher of ``model`` over token-id ``examples`` (float32, on
    the model's device), keyed by every name a parameter is known by."""
    if not examples:
        raise ValueError("fisher: no calibration examples")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model that is merged
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in params}
    used = 0
    for ids in examples:
        if len(ids) < 2:
            continue  # nothing to predict
        x = torch.tensor([list(ids)], device=device)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=x).logits[0, :-1].float()
        log_likelihood = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None]).sum()
        log_likelihood.backward()
        for n, p in params:
            if p.grad is not None:
                sums[n].addcmul_(p.grad, p.grad)
        used += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if not used:
        raise ValueError("fisher: every calibration example is shorter than two tokens")
    by_param = {id(p): sums[n].div_(used) for n, p in params}
    return {n: by_param[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if id(p) in by_param}


def cache_key(model: str | Path, examples: Sequence[Sequence[int]]) -> str:
    ckpt = Checkpoint.open(str(model))
    h = hashlib.sha256(FORMAT.encode())
    for f in ckpt.weight_files():
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    h.update(json.dumps([list(e) for e in examples]).encode())
    return h.hexdigest()[:20]


def cached_fisher(model: str | Path, examples: Sequence[Sequence[int]], cache_dir: str | Path,
                  device: str | torch.device = "cpu", trust_remote_code: bool = False) -> Path:
    """The cache file holding ``model``'s Fisher over ``examples``, computed if missing."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{Path(str(model)).name}-{cache_key(model, examples)}.safetensors"
    if path.exists():
        return path
    from transformers import AutoModelForCausalLM

    live = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32,
                                                trust_remote_code=trust_remote_code).to(device)
    fisher = diagonal_fisher(live, examples)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=cache_dir)
    os.close(fd)
    try:
        # safetensors refuses shared storage: tied names get their own copy on disk.
        save_file({n: t.contiguous().cpu().clone() for n, t in fisher.items()}, tmp,
                  metadata={"format": FORMAT, "model": str(model), "examples": str(len(examples))})
        os.replace(tmp, path)  # concurrent writers each write whole files: last one wins
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def load_fisher(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))
