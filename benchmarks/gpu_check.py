"""Everything a GPU machine must show, in one command and one table (under 5 minutes).

    python benchmarks/gpu_check.py

* merge parity, CPU against GPU, for every registered method on a small random family:
  the random methods' numbers (DARE, DELLA, ...) must be bit-identical on both devices,
  and every method's merged tensors equal within float tolerance;
* candidate time per residency tier (all on the GPU, all in pinned host memory, all read
  from the files, a mix) against the all-resident worker, at the largest shape that fits
  (426M, or 1.1B parameters where memory, disk and the time left allow), as
  `benchmarks/residency.py` measures it;
* a two-worker search sharing one GPU (``gpus_per_worker: 0.5``, on Ray), its trials'
  scores against the same search scored on the CPU;
* a live model sharded over two GPUs (``gpus_per_worker`` > 1), where two are present: a
  few methods merged into it against the same model on one GPU, a candidate's perplexity
  both ways, each GPU's bytes and merge seconds.

It needs nothing but the project's install. Without a GPU it says so in one line and exits
with code 1, having measured nothing. Every check that fails or cannot run says why in
its row; the exit code is 0 only when every check that ran passed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Merged tensors of the small family (weights near 0.02) from CPU and GPU agree to this.
ATOL, RTOL = 1e-5, 1e-4
# The shapes tried for the tier timings, largest first: (name, hidden, intermediate, layers).
SHAPES = [("1.1B", 2048, 5632, 24), ("426M", 1024, 2816, 32)]
# The device checked against the CPU, and the workers of the shared-GPU search.
DEVICE = "cuda"
SHARED_GPU_WORKERS = {"count": 2, "gpus_per_worker": 0.5, "cpus_per_worker": 1}
# The methods merged into the sharded live model; those whose merge must be bit-identical to
# the one-GPU merge (the same kernels on the same inputs, whatever GPU holds them); the
# others within ATOL / RTOL.
SHARDED_METHODS = ("task_arithmetic", "ties", "dare_ties", "della", "slerp", "model_stock")
EXACT_METHODS = ("task_arithmetic", "ties", "dare_ties", "della")


def main(argv: list[str] | None = None) -> int:
    """Run every check and print the table; 1 without a GPU or when a check fails."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=270, help="time to stay within (default 270)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no NVIDIA GPU is visible (torch.cuda.is_available() is False); nothing was measured")
        return 1
    deadline = time.monotonic() + args.seconds
    root = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    rows: list[tuple[str, str, str]] = []  # (check, result, ok / FAIL / n/a)
    try:
        family = tiny_family(root / "tiny")
        for check in (parity, search_on_one_gpu, tier_times, sharded):
            if time.monotonic() > deadline - 20:
                rows.append((check.__name__, "not run: out of time", "n/a"))
                continue
            try:
                rows.extend(check(family, root, deadline))
            except Exception as e:  # noqa: BLE001 - one failed check still prints the table
                rows.append((check.__name__, f"{e.__class__.__name__}: {e}".splitlines()[0], "FAIL"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"gpu_check on {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| check | result | status |")
    print("|---|---|---|")
    for check, result, status in rows:
        print(f"| {check} | {result} | {status} |")
    return 0 if all(status != "FAIL" for _, _, status in rows) else 1


def tiny_family(root: Path, sources: int = 3) -> dict[str, str]:
    """A small random Llama base, perturbed sources and a text file for perplexity."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergesearch.demo.tokenizer import char_tokenizer

    tok = char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    base = LlamaForCausalLM(config)
    paths = {"base": str(root / "base")}
    base.save_pretrained(paths["base"])
    tok.save_pretrained(paths["base"])
    for i in range(sources):
        src = LlamaForCausalLM(config)
        src.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in src.parameters():
                p.add_(torch.randn(p.shape) * 0.02)
        paths[f"s{i}"] = str(root / f"s{i}")
        src.save_pretrained(paths[f"s{i}"])
        tok.save_pretrained(paths[f"s{i}"])
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                            ("12+7=19", "abcd>dcba", "hello world", "3*4=12", "sort: dcba -> abcd")))
    paths["text"] = str(text)
    return paths


def recipe_for(method: str, family: dict[str, str]):
    """A recipe of ``method`` over the family, drawn from the search space."""
    import optuna

    from mergesearch.config import Space
    from mergesearch.merging import Checkpoint
    from mergesearch.spaces import SearchSpace

    sources = {k: v for k, v in family.items() if k.startswith("s")}
    space = SearchSpace(Space(methods=[method], layer_groups=2), family["base"], sources,
                        Checkpoint.open(family["base"]).num_layers, seed=9)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return space.sample(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3)).ask())


def parity(family: dict[str, str], root: Path, deadline: float) -> list[tuple[str, str, str]]:
    """Every method merged on the CPU and on the GPU, from the same inputs."""
    import torch

    from mergesearch.merging import MergeEngine, MergeInputs, all_methods

    paths = [family["base"], *(v for k, v in family.items() if k.startswith("s"))]
    engines = {"cpu": MergeEngine(paths[0], paths[1:], device="cpu"),
               "cuda": MergeEngine(paths[0], paths[1:], device=DEVICE)}
    g = torch.Generator().manual_seed(0)
    fisher = {m: {n: torch.rand(engines["cpu"].shapes[n], generator=g) for n in engines["cpu"].names}
              for m in engines["cpu"].models}
    for e in engines.values():
        e.attach_fisher(fisher)
    rows = []
    for name, method in sorted(all_methods().items()):
        recipe = recipe_for(name, family)
        cpu = dict(engines["cpu"].merged_tensors(recipe))
        gpu = {k: v.cpu() for k, v in engines["cuda"].merged_tensors(recipe)}
        diff = max((cpu[k] - gpu[k]).abs().max().item() for k in cpu)
        close = all(torch.allclose(cpu[k], gpu[k], atol=ATOL, rtol=RTOL) for k in cpu)
        result = "bit-identical" if all(torch.equal(cpu[k], gpu[k]) for k in cpu) else f"max |diff| {diff:.1e}"
        ok = close
        if method.random:  # the numbers behind its random choices: the same bits everywhere
            tensor = engines["cpu"].names[-1]
            shape = engines["cpu"].shapes[tensor]
            draws = [MergeInputs(tensor, None, torch.zeros((1, *shape), device=d), seed=recipe.seed).uniform(0).cpu()
                     for d in ("cpu", DEVICE)]
            same = torch.equal(*draws)
            result += "; random numbers " + ("bit-identical" if same else "DIFFER")
            ok = ok and same
        rows.append((f"parity {name}", result, "ok" if ok else "FAIL"))
    return rows


def search_on_one_gpu(family: dict[str, str], root: Path, deadline: float) -> list[tuple[str, str, str]]:
    """Two Ray workers sharing one GPU search; the same search scored on the CPU in-process."""
    import ray

    from mergesearch.config import parse_config
    from mergesearch.search import Runner, SerialPool

    def config(name: str, workers: dict):
        return parse_config({
            "models": {"base": family["base"], "sources": {k: v for k, v in family.items() if k.startswith("s")}},
            "objectives": [{"name": "ppl", "evaluator": "perplexity", "seq_len": 8, "max_tokens": 64,
                            "batch_size": 4, "dataset": {"path": "json", "data_files": family["text"]}}],
            "space": {"methods": ["ties", "dare_linear", "task_arithmetic"], "layer_groups": 2},
            "sampler": {"name": "random", "seed": 1}, "budget": {"n_trials": 6}, "seed": 5,
            "study": {"name": name, "run_dir": str(root / name)}, "workers": workers}, root=root)

    started = time.perf_counter()
    runner = Runner(config("gpu", SHARED_GPU_WORKERS))
    try:
        gpu = runner.run()
    finally:
        if ray.is_initialized():
            ray.shutdown()
    seconds = time.perf_counter() - started
    devices = sorted({info.get("device", "?") for info in runner.pool.info})
    cpu = Runner(config("cpu", {"count": 1}), pool=lambda c, b, s: SerialPool(c, b, s, device="cpu")).run()
    by_hash = {t.user_attrs.get("recipe_hash"): t.values for t in cpu.trials if t.values}
    done = [t for t in gpu.trials if t.values]
    diffs = [abs(t.values[0] - by_hash[h][0]) / abs(by_hash[h][0])
             for t in done if (h := t.user_attrs.get("recipe_hash")) in by_hash]
    ok = len(done) == 6 and len(runner.pool.info) == 2 and all(d.startswith(DEVICE) for d in devices) \
        and len(diffs) == len(done) and max(diffs) < 1e-3
    worst = f"{max(diffs):.1e}" if diffs else "-"
    return [("two workers on one GPU (gpus_per_worker 0.5)",
             f"{len(done)}/6 trials in {seconds:.0f}s on {', '.join(devices)}; "
             f"perplexity vs the CPU run: max relative diff {worst}", "ok" if ok else "FAIL")]


def tier_times(family: dict[str, str], root: Path, deadline: float) -> list[tuple[str, str, str]]:
    """Candidate time per tier at the largest shape that fits (see `residency.py`)."""
    import psutil
    import torch
    from merge_speed import make_family
    from residency import measure_tiers

    from mergesearch.merging import Checkpoint
    from mergesearch.merging.build import live_bytes
    from mergesearch.merging.residency import gb, stack_specs

    free_gpu = torch.cuda.mem_get_info()[0] if DEVICE == "cuda" else psutil.virtual_memory().available
    for name, hidden, intermediate, layers in SHAPES:
        params = layers * (4 * hidden * hidden + 3 * hidden * intermediate) + 2 * 32000 * hidden
        files = 4 * 2 * params  # bf16, base + 3 sources
        # The engine (inputs, work, staging) and the live model on the GPU, the family's
        # files on disk and in the page cache, a float32 copy of a model while it is written;
        # the larger shape only with most of the time left (writing it takes a minute).
        fits = (2 * files < free_gpu and 2 * files < shutil.disk_usage(root).free
                and 2 * files < psutil.virtual_memory().available)
        if fits and (name == SHAPES[-1][0] or deadline - time.monotonic() > 200):
            break
    args = argparse.Namespace(hidden=hidden, intermediate=intermediate, layers=layers, vocab=32000,
                              sources=3, methods=["task_arithmetic", "ties"], device=DEVICE, repeat=2)
    paths, _ = make_family(root / "tiers", args)
    names = [paths["base"], *(paths[f"src{i}"] for i in range(1, 4))]
    specs = stack_specs([Checkpoint.open(p).locations for p in names])
    rows, bandwidth = measure_tiers(paths, names, specs, live_bytes(Checkpoint.open(paths["base"])), args,
                                    say=lambda line: None)
    out = []
    for tier, method, best, ratio, moved, copy_s, extra in rows:
        out.append((f"tier {tier}, {method}, {name}",
                    f"{best * 1000:.1f} ms, {ratio:.2f}x all-resident ({extra * 1000:+.1f} ms); moved "
                    f"{gb(moved['memory'])} from host + {gb(moved['file'])} from files, bound "
                    f"{copy_s * 1000:.1f} ms at the tier's bandwidth", "ok"))
    out.append(("tier bandwidths", f"pinned host -> GPU {bandwidth['memory'] / 2**30:.1f} GiB/s, "
                f"file (page cache) -> buffer {bandwidth['file'] / 2**30:.1f} GiB/s", "ok"))
    return out


def sharded(family: dict[str, str], root: Path, deadline: float) -> list[tuple[str, str, str]]:
    """The family's live model sharded over cuda:0 and cuda:1 against it on cuda:0 alone:
    a few methods merged both ways, and a candidate's perplexity; each GPU's bytes and
    merge seconds."""
    import torch

    if torch.cuda.device_count() < 2:
        return [("sharded live model", "not run: one GPU", "n/a")]
    from mergesearch.merging.build import open_live
    from mergesearch.merging.residency import device_labels, gb

    paths = [family["base"], *(v for k, v in family.items() if k.startswith("s"))]
    one = open_live(paths[0], paths[1:], device="cuda:0")
    two = open_live(paths[0], paths[1:], devices=["cuda:0", "cuda:1"])
    engine = two[0]
    held = [f"{label} {len(engine.placement.names(i))} tensors, {gb(torch.cuda.memory_allocated(d))} allocated"
            for i, (label, d) in enumerate(zip(device_labels(engine.devices), engine.devices))]
    rows = [("sharded live model", f"{'; '.join(held)}; {engine.plan.describe()}", "ok")]
    for method in SHARDED_METHODS:
        if time.monotonic() > deadline - 10:
            rows.append((f"sharded {method}", "not run: out of time", "n/a"))
            continue
        rows.append(sharded_merge(method, family, one, two))
    rows.append(sharded_score(family, root, one, two))
    return rows


def sharded_merge(method: str, family: dict[str, str], one, two) -> tuple[str, str, str]:
    """``method``'s candidate merged into the one-GPU and the sharded live models: the
    weights compared, the merge timed (per GPU where sharded)."""
    import torch

    recipe = recipe_for(method, family)
    seconds = [merge_seconds(engine, model, recipe) for engine, model in (one, two)]
    want, got = one[1].state_dict(), two[1].state_dict()
    same = all(torch.equal(v, got[k].to(v.device)) for k, v in want.items())
    close = all(torch.allclose(v.float(), got[k].to(v.device).float(), atol=ATOL, rtol=RTOL)
                for k, v in want.items())
    diff = max((v.float() - got[k].to(v.device).float()).abs().max().item() for k, v in want.items())
    ok = same if method in EXACT_METHODS else close
    per_gpu = " + ".join(f"{t * 1000:.1f}" for t in seconds[1])
    return (f"sharded {method}", f"{'bit-identical' if same else f'max |diff| {diff:.1e}'} to one GPU; "
            f"merge {seconds[0][0] * 1000:.1f} ms on one GPU, {per_gpu} ms on cuda:0 + cuda:1",
            "ok" if ok else "FAIL")


def merge_seconds(engine, model, recipe) -> list[float]:
    """Seconds merging ``recipe`` into ``model`` on each of the engine's devices in turn
    (the engine merges device by device, each device's tensors in one sweep)."""
    import torch

    counts = [len(shard.store.plan.specs) for shard in engine.shards]
    ends = {sum(counts[:i + 1]): d for i, d in enumerate(engine.devices) if counts[i]}
    marks = [time.perf_counter()]

    def progress(i: int, n: int) -> None:
        if i in ends:
            torch.cuda.synchronize(ends[i])
            marks.append(time.perf_counter())

    engine.merge_into(model, recipe, progress=progress)
    return [b - a for a, b in zip(marks, marks[1:])]


def sharded_score(family: dict[str, str], root: Path, one, two) -> tuple[str, str, str]:
    """A task-arithmetic candidate's perplexity on the one-GPU and the sharded live models."""
    from transformers import AutoTokenizer

    from mergesearch.config import parse_config
    from mergesearch.evaluators import build_evaluators

    config = parse_config({
        "models": {"base": family["base"], "sources": {k: v for k, v in family.items() if k.startswith("s")}},
        "objectives": [{"name": "ppl", "evaluator": "perplexity", "seq_len": 8, "max_tokens": 64,
                        "batch_size": 4, "dataset": {"path": "json", "data_files": family["text"]}}]}, root=root)
    tokenizer = AutoTokenizer.from_pretrained(family["base"])
    recipe = recipe_for("task_arithmetic", family)
    values = []
    for engine, model in (one, two):
        engine.merge_into(model, recipe)
        ev = build_evaluators(config)[0]
        ev.setup(model, tokenizer, engine)
        started = time.perf_counter()
        score = ev.score(recipe)
        if not score.ok:
            return ("sharded perplexity", f"scoring failed: {score.error}", "FAIL")
        values.append((score.value, time.perf_counter() - started))
    (a, ta), (b, tb) = values
    rel = abs(a - b) / abs(a)
    return ("sharded perplexity", f"one GPU {a:.6g} in {ta:.2f}s, sharded {b:.6g} in {tb:.2f}s "
            f"(relative diff {rel:.1e})", "ok" if rel < RTOL else "FAIL")


if __name__ == "__main__":
    sys.exit(main())
