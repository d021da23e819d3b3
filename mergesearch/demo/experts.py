"""Build the demo's tiny base model and its three experts, offline and deterministically.

A ~1.3M-parameter Llama with a character tokenizer is first pretrained on the basic half
of every skill (sums without a carry, 4-letter words to reverse, words of a..h to sort):
it knows part of each skill. It is then copied and fine-tuned into one expert per skill
with a rank-8 LoRA adapter on every projection, merged into full weights, on that skill's
whole ``train`` split with the base's own data mixed back in: small, low-rank moves that
keep what the base knew, as users' fine-tunes of a capable base are. Merging such experts
works (`benchmarks/RESULTS.md`, "The demo family"). About 2.7 minutes of CPU, of which
the experts' part runs in two processes where two cores are free; cached on disk, in a
folder named for what builds it, and reused.

The result must not depend on the installed transformers' defaults (weight init, attention
kernel, dtype) nor on the machine's core count: the weights start from a seeded generator
of ours, attention is the eager kernel, everything is float32 and the build runs on a fixed
number of threads, so two builds agree bit for bit.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import os
import random
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mergesearch.demo.cache import cache_root, cached_build
from mergesearch.demo.skills import SKILLS, examples, is_basic
from mergesearch.demo.tokenizer import char_tokenizer
from mergesearch.errors import ConfigError
from mergesearch.quiet import quiet_libraries

NAMES = ("base", *SKILLS)
STEPS = {"base": 400, "add": 450, "reverse": 200, "sort": 200}  # carrying takes the longest
LR = {"base": 3e-3, "add": 3e-3, "reverse": 3e-3, "sort": 3e-3}
BATCH = 96  # examples a step
LORA_RANK = 8  # experts: an adapter of this rank on every projection (scale 1), then merged
# The share of each expert's examples that are the base's own (the other skills' basic
# halves): without it an expert forgets, and its task vector undoes the others' in a merge.
REPLAY = 0.7
# Fixed, not the core count: float sums depend on how the work is split. And one, because
# OpenMP threads on busy cores wait on each other: a build took 20x longer on 2 threads.
THREADS = 1
BUILD_SOURCES = ("experts.py", "skills.py", "tokenizer.py")  # what the cache key hashes
HERE = Path(__file__).resolve().parent


def cache_key(sources: Path = HERE, versions: tuple[str, ...] | None = None) -> str:
    """``demo-<12 hex>``: a hash of the build's own source and of the torch, transformers
    and peft versions, so that a changed build never reuses experts an older one cached."""
    if versions is None:
        versions = (torch.__version__, *map(importlib.metadata.version, ("transformers", "peft")))
    digest = hashlib.sha256()
    for name in BUILD_SOURCES:
        digest.update(name.encode() + b"\0" + (sources / name).read_bytes() + b"\0")
    digest.update("\0".join(versions).encode())
    return f"demo-{digest.hexdigest()[:12]}"


def cache_dir() -> Path:
    return cache_root() / cache_key()


def build_experts(cache: str | Path | None = None, force: bool = False,
                  steps: int | None = None, processes: int | None = None) -> dict[str, Path]:
    """Folders of the base and the experts (``base``, ``add``, ``reverse``, ``sort``),
    built on first use. The cache folder appears whole or not at all; processes that ask
    at the same time wait for one build (`cache.cached_build`). ``steps`` (tests only)
    trains every model that many steps instead of `STEPS`; ``processes`` (1 or 2; default
    `default_processes`) trains the experts in that many processes, with the same result."""

    def build(tmp: Path) -> None:
        with _reproducible(), quiet_libraries():
            _train_all(tmp, steps, processes or default_processes())

    with _terminate_raises():  # a build stopped by SIGTERM removes its temporary folder
        return cached_build(Path(cache) if cache else cache_dir(), NAMES, build,
                            "the demo experts", force)


def resolve_model(ref: str) -> str:
    """``demo:<name>`` -> the built folder; any other reference unchanged."""
    if not ref.startswith("demo:"):
        return ref
    name = ref.removeprefix("demo:")
    if name not in NAMES:
        raise ConfigError(f"models: unknown demo model {ref!r}; known: "
                          + ", ".join(f"demo:{n}" for n in NAMES))
    return str(build_experts()[name])


_terminated = threading.Event()  # SIGTERM came during a build (see _terminate_raises)


@contextmanager
def _terminate_raises() -> Iterator[None]:
    """SIGTERM raises `SystemExit` (exit status 143) so that the build's cleanup runs;
    the previous handler is restored after. Only the main thread may install handlers.
    The signal is also recorded: where it lands in a ``__del__`` (a collected object of
    a library), Python drops the exception, and the next training step raises it instead."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        _terminated.set()
        raise SystemExit(128 + signum)

    _terminated.clear()
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:  # None: a handler not installed from Python, which cannot be put back
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextmanager
def _reproducible() -> Iterator[None]:
    """A fixed thread count and float32 during the build; the caller's settings after."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(THREADS)
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)


@contextmanager
def _progress(steps: dict[str, int], elsewhere: list[str]) -> Iterator[Callable[[str, int], None]]:
    """One transient line on stderr, ``building demo experts (once): sort 120/200 steps``
    for the models trained here (``elsewhere``: those a second process trains, named after);
    yields ``advance(model, done)``. Where stderr is no terminal, one plain line instead."""
    from rich.console import Console
    from rich.progress import Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    also = f" ({', '.join(elsewhere)} beside, in a second process)" if elsewhere else ""
    if not console.is_interactive:
        print(f"building demo experts (once): {', '.join(steps)} ({sum(steps.values())} steps)"
              f"{also}", file=sys.stderr, flush=True)
        yield lambda name, done: None
        return
    columns = (TextColumn("building demo experts (once): {task.description} "
                          "{task.completed}/{task.total} steps" + also), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        first = next(iter(steps))
        task = bar.add_task(first, total=steps[first])
        yield lambda name, done: bar.update(task, description=name, completed=done, total=steps[name])


def _model(vocab: int, seed: int):
    """A fresh float32 Llama with eager attention, its weights drawn by a generator of ours:
    transformers' own init (and what it skips) differs between versions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
        rope_theta=10000.0, rms_norm_eps=1e-6, initializer_range=0.02, attention_dropout=0.0,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):  # transformers' init must not move the caller's RNG
        model = LlamaForCausalLM(config).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm scales
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02)
    return model


Mix = dict[str, tuple[float, list[tuple[str, str]]]]  # part -> (share of examples, pairs)


def _batches(tok, mix: Mix, rng: random.Random, batch: int):
    """Endless batches of (input_ids, labels), each example drawn from a part of ``mix``
    with that part's share: the loss falls on the answer and EOS only."""
    parts, shares, encoded = list(mix), [share for share, _ in mix.values()], {}
    for part, (_, pairs) in mix.items():
        encoded[part] = []
        for context, answer in pairs:
            c = tok(context, add_special_tokens=False).input_ids
            a = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
            encoded[part].append((c + a, [-100] * len(c) + a))
    while True:
        chosen = []
        for _ in range(batch):
            rows = encoded[rng.choices(parts, shares)[0]]
            chosen.append(rows[rng.randrange(len(rows))])
        seqs, labels = [s for s, _ in chosen], [lab for _, lab in chosen]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
        yield ids, lab


def _train(model, tok, mix: Mix, steps: int, lr: float, seed: int,
           advance: Callable[[int], None]) -> None:
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, foreach=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    batches = _batches(tok, mix, rng, batch=BATCH)
    for step in range(steps):
        ids, labels = next(batches)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        advance(step + 1)
        if _terminated.is_set():
            raise SystemExit(128 + signal.SIGTERM)
    model.eval()


def _training_mix() -> dict[str, Mix]:
    """What each model trains on, from the ``train`` splits only: ``test`` is what the
    search scores and ``heldout`` is seen by nobody. The base sees the basic half of every
    skill, in equal shares; an expert sees its whole skill, and the other skills' basic
    halves for a `REPLAY` share."""
    train = {s: [(ex["context"], ex["answer"]) for ex in examples(s)["train"]] for s in SKILLS}
    basic = {s: [(c, a) for c, a in pairs if is_basic(s, c)] for s, pairs in train.items()}
    mix = {"base": {s: (1 / len(SKILLS), basic[s]) for s in SKILLS}}
    for skill in SKILLS:
        others = [s for s in SKILLS if s != skill]
        mix[skill] = {skill: (1 - REPLAY, train[skill]),
                      **{f"basic {s}": (REPLAY / len(others), basic[s]) for s in others}}
    return mix


def _train_all(out: Path, steps: int | None = None, processes: int = 1) -> None:
    """The base, then the experts: with ``processes`` 2, those of `_expert_split`'s second
    group in a second process (one thread each, so the result is the same either way)."""
    tok = char_tokenizer()
    plan = {name: steps or STEPS[name] for name in NAMES}
    mine, theirs = _expert_split(plan) if processes > 1 else (list(SKILLS), [])
    shown = {name: plan[name] for name in ("base", *mine)}
    with _progress(shown, theirs) as progress:
        base = _model(len(tok), seed=0)
        _train(base, tok, _training_mix()["base"], plan["base"], LR["base"], seed=1,
               advance=lambda done: progress("base", done))
        _save(base, tok, out / "base")
        with _second_process(out, theirs, steps):
            _train_experts(base, tok, out, mine, plan, progress)


def _train_experts(base, tok, out: Path, skills: list[str], plan: dict[str, int],
                   progress: Callable[[str, int], None]) -> None:
    """Each of ``skills``' expert: ``base`` with a seeded LoRA adapter, trained, merged, saved."""
    mix = _training_mix()
    for skill in skills:
        i = SKILLS.index(skill)
        adapted = _with_adapter(copy.deepcopy(base), seed=20 + i)
        _train(adapted, tok, mix[skill], plan[skill], LR[skill], seed=10 + i,
               advance=lambda done, s=skill: progress(s, done))
        _save(adapted.merge_and_unload(), tok, out / skill)


def _expert_split(plan: dict[str, int]) -> tuple[list[str], list[str]]:
    """The experts in two groups of about equal steps: the largest alone in the second
    process (which starts a few seconds late, importing torch), the rest here."""
    largest = max(SKILLS, key=lambda s: plan[s])
    return [s for s in SKILLS if s != largest], [largest]


@contextmanager
def _second_process(out: Path, skills: list[str], steps: int | None) -> Iterator[None]:
    """Train ``skills``' experts in a spawned process while the body runs; wait for it
    after, and stop it if the body fails (or SIGTERM ends the build)."""
    if not skills:
        yield
        return
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(
        target=_train_elsewhere, args=(str(out), skills, steps, os.getpid()), daemon=True)
    child.start()
    try:
        yield
        child.join()
    finally:
        if child.is_alive():
            child.terminate()
            child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"building the demo experts {', '.join(skills)} in a second process "
                           f"failed (exit status {child.exitcode})")


def _train_elsewhere(out: str, skills: list[str], steps: int | None, parent: int) -> None:
    """A spawned process's part of the build: the saved base, reloaded bit for bit, then
    ``skills``' experts; it stops when the building process is gone."""
    from safetensors.torch import load_file

    def advance(name: str, done: int) -> None:
        if os.getppid() != parent:
            raise SystemExit("the process building the demo experts has ended")

    tok = char_tokenizer()
    plan = {name: steps or STEPS[name] for name in NAMES}
    with _reproducible(), quiet_libraries():
        base = _model(len(tok), seed=0)
        base.load_state_dict(load_file(Path(out) / "base" / "model.safetensors"))
        base.eval()
        _train_experts(base, tok, Path(out), skills, plan, advance)


def default_processes() -> int:
    """Two where two cores are ours and this process may start children, else one."""
    import multiprocessing

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 2 if cores >= 2 and not multiprocessing.current_process().daemon else 1


def _with_adapter(model, seed: int):
    """``model`` wrapped by peft with a rank-`LORA_RANK` LoRA adapter on every projection,
    its initial weights drawn from a seeded generator (the caller's RNG is left as it was)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0, bias="none",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                        "gate_proj", "up_proj", "down_proj"],
                        task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def _save(model, tok, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
