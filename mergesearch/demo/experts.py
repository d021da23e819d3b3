"""Build the demo's tiny base model and its three experts, offline and deterministically.

A ~0.4M-parameter Llama with a character tokenizer is first trained on all three formats
with random answers (it learns the formats, not the skills), then copied and fine-tuned
into one expert per skill. About a minute on 2 CPU cores; cached on disk and reused.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from mergesearch.demo.skills import SKILLS, examples, random_answer
from mergesearch.demo.tokenizer import char_tokenizer

VERSION = "demo-v1"
NAMES = ("base", *SKILLS)
STEPS = {"base": 150, "expert": 260}


def cache_dir() -> Path:
    root = os.environ.get("MERGESEARCH_CACHE") or Path.home() / ".cache" / "mergesearch"
    return Path(root) / VERSION


def build_experts(cache: str | Path | None = None, force: bool = False) -> dict[str, Path]:
    """Folders of the base and the experts (``base``, ``add``, ``reverse``, ``sort``),
    built on first use. The cache folder appears whole or not at all."""
    root = Path(cache) if cache else cache_dir()
    paths = {name: root / name for name in NAMES}
    if not force and all((p / "model.safetensors").exists() for p in paths.values()):
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _train_all(tmp)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return paths


def resolve_model(ref: str) -> str:
    """``demo:<name>`` -> the built folder; any other reference unchanged."""
    if not ref.startswith("demo:"):
        return ref
    name = ref.removeprefix("demo:")
    if name not in NAMES:
        from mergesearch.config import ConfigError

        raise ConfigError(f"models: unknown demo model {ref!r}; known: "
                          + ", ".join(f"demo:{n}" for n in NAMES))
    return str(build_experts()[name])


def _model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=96, intermediate_size=192, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _batches(tok, pairs: list[tuple[str, str]], rng: random.Random, batch: int):
    """Endless batches of (input_ids, labels): the loss falls on the answer and EOS only."""
    encoded = []
    for context, answer in pairs:
        c = tok(context, add_special_tokens=False).input_ids
        a = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        encoded.append((c + a, [-100] * len(c) + a))
    while True:
        chosen = [encoded[rng.randrange(len(encoded))] for _ in range(batch)]
        seqs, labels = [s for s, _ in chosen], [lab for _, lab in chosen]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
        yield ids, lab


def _train(model, tok, pairs, steps: int, lr: float, seed: int) -> None:
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    batches = _batches(tok, pairs, rng, batch=96)
    for _ in range(steps):
        ids, labels = next(batches)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


def _train_all(out: Path) -> None:
    torch.manual_seed(0)
    tok = char_tokenizer()
    data = {s: examples(s) for s in SKILLS}
    rng = random.Random(0)
    # The base sees every format with random answers: it knows the formats, not the skills.
    generic = [(ex["context"], random_answer(s, ex["context"], rng))
               for s in SKILLS for split in ("train", "test") for ex in data[s][split]]
    base = _model(len(tok))
    _train(base, tok, generic, STEPS["base"], lr=3e-3, seed=1)
    _save(base, tok, out / "base")
    for i, skill in enumerate(SKILLS):
        expert = _model(len(tok))
        expert.load_state_dict(base.state_dict())
        pairs = [(ex["context"], ex["answer"]) for split in ("train", "test") for ex in data[skill][split]]
        _train(expert, tok, pairs, STEPS["expert"], lr=4e-3, seed=10 + i)
        _save(expert, tok, out / skill)


def _save(model, tok, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
