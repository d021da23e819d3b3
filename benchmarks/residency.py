"""Candidate time per residency tier, against the all-resident worker, with each tier's bound.

The Llama-shaped random family of `merge_speed.py` (default 426M parameters, bf16 on disk,
base + 3 sources) is merged into a live model by engines whose budgets force each tier
(`mergesearch.merging.residency`): every input row on the device, every row in host
memory, every row read from the safetensors files, and a mix (a third of the inputs on
the device, a third in host memory, the rest from the files). What is kept across
candidates is off in every engine (``cache=False``), so that the tiers alone differ.

Per tier: the best candidate time of ``--repeat`` after a warm-up, its ratio to the
all-resident time, the bytes a candidate moves from that tier, and the bound on what
moving them should cost: those bytes at the copy bandwidth measured for the tier in the
same run (pinned host memory to the device; a file range in the page cache read into a
buffer). The time a candidate takes over the all-resident one is shown beside it: 0 when
the copy of the next tensor hides entirely behind the merge of this one, the copy time
when nothing overlaps (on a CPU, a merge that is itself bound by memory bandwidth shares
it with the copy). On a CPU, host memory is the device's: a row there is read in place and
nothing moves.

    python benchmarks/residency.py                       # 426M, task_arithmetic and ties
    python benchmarks/residency.py --layers 4 --vocab 4096 --methods linear   # a quick look
"""

from __future__ import annotations

import argparse
import gc
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import add_family_args, copy_bandwidth, make_family, recipe_for, timed  # noqa: E402

from mergesearch.merging.residency import gb  # noqa: E402


def tier_budgets(specs, live: int, device: str) -> dict[str, tuple[int, int]]:
    """(device, host) bytes that force each tier (on a GPU, reading files also takes two
    pinned staging buffers of host memory)."""
    from mergesearch.merging.residency import staging_bytes, work_bytes

    floor = live + work_bytes(specs) + staging_bytes(specs)
    total = sum(s.nbytes for s in specs.values())
    pinned = 0 if device == "cpu" else staging_bytes(specs)
    return {"device": (floor + 2 * total, 0), "host": (floor, total),
            "mmap": (floor, pinned), "mixed": (floor + total // 3, total // 3 + pinned)}


def moved_bytes(engine, rows: list[int]) -> dict[str, int]:
    """Bytes a candidate reading ``rows`` copies, by where they come from: rows kept apart
    in memory (device or host; host memory on a GPU) and rows read from the files."""
    store = engine.store
    out = {"memory": 0, "file": 0}
    for (_, r), row in store.apart.items():
        if r in rows:
            out["memory"] += row.numel() * row.element_size()
    for (_, r), loc in store.files.items():
        if r in rows:
            out["file"] += loc.nbytes
    return out


def file_bandwidth(engine) -> float:
    """Bytes per second reading the base's tensors from its file (page cache warm) into a
    buffer, as the mmap tier does."""
    locs = list(engine.base.locations.values())
    buf = torch.empty(max(loc.nbytes for loc in locs), dtype=torch.uint8)

    def read_all():
        for loc in locs:
            loc.read_into(buf[:loc.nbytes].view(loc.dtype).view(loc.shape))

    read_all()  # warm the page cache
    return sum(loc.nbytes for loc in locs) / min(timed(read_all) for _ in range(3))


def host_to_device_bandwidth(device: str) -> float:
    """Bytes per second of a pinned host -> device copy of 256 MiB (a CPU reads in place)."""
    if device == "cpu":
        return float("inf")
    src = torch.ones(2**26, dtype=torch.float32, pin_memory=True)
    dst = torch.empty_like(src, device=device)
    dst.copy_(src, non_blocking=True)
    return src.numel() * src.element_size() / min(timed(lambda: dst.copy_(src, non_blocking=True)) for _ in range(5))


def measure_tiers(paths: dict[str, str], names: list[str], specs, live: int, args,
                  say=print) -> tuple[list[tuple], dict[str, float]]:
    """Per tier and method: (tier, method, best time, / all-resident, bytes moved by
    origin, their copy time at the tier's bandwidth, time over all-resident); and the
    bandwidths measured."""
    from mergesearch.merging import MergeEngine, load_live_model

    model = load_live_model(paths["base"], args.device)
    bandwidth = {"memory": copy_bandwidth(args.device, 3) / 2 if args.device == "cpu"
                 else host_to_device_bandwidth(args.device)}
    engines = {}
    for tier, (device, host) in tier_budgets(specs, live, args.device).items():
        t0 = time.perf_counter()
        engines[tier] = MergeEngine(names[0], names[1:], device=args.device, cache=False,
                                    device_budget=device, host_budget=host, live_bytes=live)
        say(f"{tier}: {engines[tier].plan.describe()}; loaded in {time.perf_counter() - t0:.1f}s")
    bandwidth["file"] = file_bandwidth(engines["device"])
    rows = []
    for method in args.methods:
        recipe = recipe_for(method, paths, args.sources, args.layers)
        needed = [engines["device"].row(m.model) for m in recipe.models] + ([0] if recipe.base_model else [])
        best = {}
        # Round robin over the tiers, the best of each: a shared machine's load then
        # weighs on every tier alike.
        for engine in engines.values():
            engine.merge_into(model, recipe)  # warm-up: work buffers allocated
        for _ in range(args.repeat):
            for tier, engine in engines.items():
                t = timed(lambda r=recipe, e=engine: e.merge_into(model, r))
                best[tier] = min(best.get(tier, t), t)
        for tier, engine in engines.items():
            moved = moved_bytes(engine, needed)
            copy_s = sum(moved[k] / bandwidth[k] for k in moved)
            extra = best[tier] - best["device"]
            rows.append((tier, method, best[tier], best[tier] / best["device"], moved, copy_s, extra))
            say(f"  {tier} {method}: {best[tier]:.3f}s, x{best[tier] / best['device']:.2f} of all-resident; "
                f"moved {gb(moved['memory'])} from memory + {gb(moved['file'])} from files: {copy_s:.3f}s at "
                f"the tier's bandwidth; {extra:+.3f}s over all-resident")
    del engines
    gc.collect()
    return rows, bandwidth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_family_args(ap)
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from mergesearch.merging import Checkpoint
    from mergesearch.merging.build import live_bytes
    from mergesearch.merging.residency import stack_specs

    root = Path(args.workdir or tempfile.mkdtemp(prefix="residency-"))
    if (root / "base").exists():  # a family written by an earlier run with --workdir
        paths = {"base": str(root / "base"), **{f"src{i}": str(root / f"src{i}") for i in range(1, args.sources + 1)}}
    else:
        paths, _ = make_family(root, args)
    names = [paths["base"], *(paths[f"src{i}"] for i in range(1, args.sources + 1))]
    specs = stack_specs([Checkpoint.open(p).locations for p in names])
    n_params = sum(math.prod(s.shape) for s in specs.values())
    live = live_bytes(Checkpoint.open(paths["base"]))
    print(f"model: Llama-shaped, {n_params / 1e6:.0f}M params, bf16, base + {args.sources} sources, "
          f"inputs {gb(sum(s.nbytes for s in specs.values()))}; device {args.device}, "
          f"threads {torch.get_num_threads()}")
    rows, bandwidth = measure_tiers(paths, names, specs, live, args, say=lambda line: print(line, flush=True))
    print(f"bandwidth: memory -> device {bandwidth['memory'] / 2**30:.1f} GiB/s"
          f"{' (a CPU reads host memory in place; a copy of split rows)' if args.device == 'cpu' else ''}, "
          f"file (page cache) -> buffer {bandwidth['file'] / 2**30:.1f} GiB/s")
    print("\n| tier | method | candidate (s) | / all-resident | moved from memory | moved from files "
          "| bound: copy at tier bandwidth (s) | over all-resident (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for tier, method, best, ratio, moved, copy_s, extra in rows:
        print(f"| {tier} | {method} | {best:.3f} | {ratio:.2f}x | {gb(moved['memory'])} | {gb(moved['file'])} "
              f"| {copy_s:.3f} | {extra:+.3f} |")
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
