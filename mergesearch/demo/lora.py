"""LoRA experts: a low-rank adapter trained with peft on (prompt, answer) pairs, merged into
the base's weights and saved as an ordinary checkpoint.

The merged expert differs from its base by ``B @ A * alpha / rank`` in the adapted
projections and nowhere else, which is the shape of most fine-tunes one merges: small
deltas on a shared base. Training is reproducible bit for bit: float32, eager attention,
a fixed thread count, no dropout, and every random draw (the adapters' initialisation, the
batches) from seeds of ours.

Prompts are rendered through the tokenizer's chat template, as lm-eval renders them with
``apply_chat_template``, so that an expert is trained on exactly what it is scored on; the
loss falls on the answer and the end-of-turn token only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

# Every linear map of a Llama block: attention and MLP. Embeddings and the head stay frozen
# (tied in small models: a delta there would change both).
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraPlan:
    """How one adapter is trained."""

    steps: int
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 16.0
    batch: int = 8
    seed: int = 0
    threads: int = 1  # fixed, not the core count: float sums depend on how work is split
    targets: tuple[str, ...] = LLAMA_PROJECTIONS


def build_lora_expert(base: str | Path, pairs: list[tuple[str, str]], out: str | Path,
                      plan: LoraPlan, advance: Callable[[int], None] | None = None) -> Path:
    """Train an adapter on ``pairs`` from the model folder ``base``, merge it and save the
    expert (weights and the base's tokenizer) into ``out``. ``advance(done)`` is called
    after each step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with reproducible(plan.threads):
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                     attn_implementation="eager")
        adapted = train_adapter(model, tokenizer, pairs, plan, advance)
        save_merged(adapted, tokenizer, Path(out))
    return Path(out)


def train_adapter(model, tokenizer, pairs: list[tuple[str, str]], plan: LoraPlan,
                  advance: Callable[[int], None] | None = None):
    """``model`` wrapped by peft with a LoRA adapter of ``plan.rank`` on ``plan.targets``,
    trained ``plan.steps`` AdamW steps on ``pairs``; everything else frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=plan.rank, lora_alpha=plan.alpha, lora_dropout=0.0, bias="none",
                        target_modules=list(plan.targets), task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):  # A's init draws from torch's global generator
        torch.manual_seed(plan.seed)
        adapted = get_peft_model(model, config)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=plan.lr, weight_decay=0.0, foreach=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=plan.lr, total_steps=plan.steps,
                                                pct_start=0.1)
    batches = answer_batches(tokenizer, pairs, random.Random(plan.seed), plan.batch)
    adapted.train()
    for step in range(plan.steps):
        ids, mask, labels = next(batches)
        loss = adapted(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if advance is not None:
            advance(step + 1)
    return adapted.eval()


def save_merged(adapted, tokenizer, out: Path) -> None:
    """Fold the adapter into the base weights (W + B @ A * alpha / rank) and save a plain
    model folder: no adapter files, no peft needed to load it."""
    merged = adapted.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def render_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it: through the chat template as one user turn with the
    assistant's turn opened (what lm-eval's ``apply_chat_template`` builds), or as is for a
    tokenizer without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per pair: labels are -100 on the prompt, so that the loss falls
    on the answer and the end-of-turn (EOS) token only."""
    encoded = []
    for prompt, answer in pairs:
        context = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
        target = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        encoded.append((context + target, [-100] * len(context) + target))
    return encoded


def answer_batches(tokenizer, pairs: list[tuple[str, str]], rng: random.Random,
                   batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless batches of (input ids, attention mask, labels), pairs drawn with ``rng`` and
    padded on the right."""
    encoded = encode_pairs(tokenizer, pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    while True:
        chosen = [encoded[rng.randrange(len(encoded))] for _ in range(batch)]
        width = max(len(ids) for ids, _ in chosen)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s, _ in chosen])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in chosen])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chosen])
        yield ids, mask, labels


@contextmanager
def reproducible(threads: int) -> Iterator[None]:
    """A fixed thread count and float32 in the block; the caller's settings after."""
    previous, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(threads)
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        torch.set_default_dtype(dtype)
