"""Time to turn a recipe into a live candidate model, against mergekit and the bandwidth bound.

For a Llama-shaped random model (default ~0.5B parameters, bf16 on disk) with a base and
three sources, per method:

* ours: `MergeEngine.merge_into` on the resident weights (warm: the resident load is
  once per worker, so it is timed separately);
* mergekit 0.1.5 in memory: `MergePlanner.plan_in_memory` + `Executor`, writing into the
  live model as mergekit-evolve's in-memory mode does (its loader cache warm);
* mergekit on disk (``--disk``): `run_merge` to a folder plus loading the result with
  `from_pretrained`, what mergekit-evolve's on-disk mode pays per candidate;
* the bandwidth bound: the bytes of the inputs and the output, read and written once at
  the bandwidth of a plain memory copy measured in the same run.

Each is printed as a ratio to ours, with peak memory (RSS). Example:

    python benchmarks/merge_speed.py --methods ties dare_ties
    python benchmarks/merge_speed.py --layers 32 --hidden 4096 --intermediate 14336 --device cuda  # 7B shape
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def make_family(root: Path, args) -> dict[str, str]:
    """Write a random Llama-shaped base and perturbed sources as safetensors folders."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.hidden, "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers, "num_attention_heads": max(1, args.hidden // 64),
        "num_key_value_heads": max(1, args.hidden // 64 // 4), "vocab_size": args.vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "hidden_act": "silu",
    }
    h, i, kv = args.hidden, args.intermediate, cfg["num_key_value_heads"] * 64
    shapes = {"model.embed_tokens.weight": (args.vocab, h), "model.norm.weight": (h,),
              "lm_head.weight": (args.vocab, h)}
    for layer in range(args.layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    paths = {}
    for idx in range(args.sources + 1):
        name = "base" if idx == 0 else f"src{idx}"
        folder = root / name
        folder.mkdir(parents=True)
        tensors = base if idx == 0 else {
            k: (v.float() + torch.randn(v.shape, generator=g) * 0.002).to(torch.bfloat16)
            for k, v in base.items()}
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(cfg))
        paths[name] = str(folder)
        del tensors
    n_params = sum(v.numel() for v in base.values())
    return paths, n_params


def recipe_for(method: str, paths: dict[str, str], n: int, layers: int = 32):
    from mergesearch.recipe import Recipe

    srcs = [paths[f"src{i}"] for i in range(1, n + 1)]
    per = {"weight": round(1 / n, 4)}
    if method in ("ties", "dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties"):
        per["density"] = 0.5
    if method == "della":
        per["epsilon"] = 0.1
    params = {}
    if method == "slerp":
        srcs, per, params = srcs[:1], {}, {"t": 0.5}
    if method == "nuslerp":
        srcs = srcs[:2]
    if method in ("sce", "model_stock"):
        per = {}
    if method in ("pcb", "consensus_ta", "consensus_ties"):
        per["density"] = 0.5
    if method == "layer_swap":
        srcs, per, params = srcs[:2], {}, {"n_bottom": layers // 4, "n_top": layers // 4,
                                              "transition": max(1, layers // 16)}
    if method == "passthrough":
        srcs, per = srcs[:1], {}
    models = [{"model": s, "parameters": dict(per)} for s in srcs]
    base = None if method in ("linear", "passthrough", "fisher", "layer_swap") else paths["base"]
    return Recipe(method=method, base_model=base, models=models, parameters=params)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def timeit(fn, repeat: int) -> float:
    """The best of ``repeat`` runs after a warm-up."""
    fn()
    return min(timed(fn) for _ in range(repeat))


def copy_bandwidth(device: str, repeat: int) -> float:
    """Bytes per second read + written by a warm copy of 1 GiB between two buffers."""
    src = torch.ones(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / timeit(lambda: dst.copy_(src), repeat)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def add_family_args(ap: argparse.ArgumentParser) -> None:
    """The family's shape (default: the 426M one) and number of sources, for `make_family`."""
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--sources", type=int, default=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_family_args(ap)
    ap.add_argument("--methods", nargs="+", default=["ties", "dare_ties"],
                    help="merge methods, or 'all'")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--disk", action="store_true", help="also time mergekit-yaml to disk + load")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    if args.methods == ["all"]:
        from mergesearch.merging.registry import all_methods

        args.methods = sorted(all_methods())

    from transformers import AutoModelForCausalLM

    from mergesearch.merging import MergeEngine

    root = Path(args.workdir or tempfile.mkdtemp(prefix="merge_speed-"))
    t0 = time.perf_counter()
    paths, n_params = make_family(root, args)
    print(f"model: Llama-shaped, {n_params / 1e6:.0f}M params, bf16, base + {args.sources} sources "
          f"(written in {time.perf_counter() - t0:.1f}s); device {args.device}, threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    tv = MergeEngine(paths["base"], [paths[f"src{i}"] for i in range(1, args.sources + 1)], device=args.device)
    load_s = time.perf_counter() - t0
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.bfloat16).to(args.device)
    print(f"resident load (once per worker): {load_s:.2f}s, {tv.resident_bytes() / 2**30:.2f} GiB")

    # Bandwidth bound: the time to read every input once and write the output once at the
    # memory bandwidth a plain copy reaches on this device (a warm copy of 1 GiB between
    # two buffers, counted as read + write), measured in the same run.
    bandwidth = copy_bandwidth(args.device, max(3, args.repeat))
    moved = sum(s.numel() * s.element_size() for s in tv.stacks.values()) \
        + sum(p.numel() * p.element_size() for p in model.parameters())
    bound = moved / bandwidth
    print(f"bandwidth bound: {moved / 2**30:.2f} GiB read + written at {bandwidth / 2**30:.1f} GiB/s "
          f"(a plain copy) = {bound:.3f}s")

    from mergesearch.merging import get_method

    if any("fisher" in get_method(m).needs for m in args.methods):
        # The time to merge does not depend on the Fisher's values: random positive ones
        # stand in for a computed Fisher here (computing it is timed by nothing below).
        g = torch.Generator().manual_seed(0)
        tv.attach_fisher({m: {n: torch.rand(tv.stacks[n].shape[1:], generator=g) for n in tv.names}
                          for m in tv.models[1:]})

    rows = []
    for method in args.methods:
        recipe = recipe_for(method, paths, args.sources, args.layers)
        # The first candidate of a method on a worker also computes what the engine keeps
        # across candidates (magnitude ranks, DELLA rank fractions, DARE's uniforms).
        first = timed(lambda r=recipe: tv.merge_into(model, r))
        ours = min(timed(lambda r=recipe: tv.merge_into(model, r)) for _ in range(args.repeat))
        row = {"method": method, "ours_s": ours, "bound_x": ours / bound, "ours_first_s": first}
        if not args.no_mergekit and get_method(method).mergekit:
            row["mergekit_mem_s"] = mergekit_in_memory(recipe, model, args)
            row["mergekit_mem_x"] = row["mergekit_mem_s"] / ours
            if args.disk:
                row["mergekit_disk_s"] = mergekit_disk(recipe, root, args)
                row["mergekit_disk_x"] = row["mergekit_disk_s"] / ours
        rows.append(row)
        print("  " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
        gc.collect()
    print(f"peak RSS: {peak_rss_gb():.2f} GiB")
    print(f"resident after the runs (weights and what is kept across candidates): "
          f"{tv.resident_bytes() / 2**30:.2f} GiB")
    print("\n| method | ours (s) | ours, first candidate (s) | ours / bound | mergekit in-memory (s) | mergekit / ours |"
          + (" mergekit disk+load (s) | disk / ours |" if args.disk else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if args.disk else ""))
    for r in rows:
        line = f"| {r['method']} | {r['ours_s']:.3f} | {r['ours_first_s']:.3f} | {r['bound_x']:.1f}x |"
        if "mergekit_mem_s" not in r:  # a method mergekit lacks, or --no-mergekit
            line += " - | - |" + (" - | - |" if args.disk else "")
        else:
            line += f" {r['mergekit_mem_s']:.3f} | {r['mergekit_mem_x']:.1f}x |"
            if args.disk:
                line += f" {r['mergekit_disk_s']:.2f} | {r['mergekit_disk_x']:.1f}x |"
        print(line)
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


def mergekit_in_memory(recipe, model, args) -> float:
    """mergekit-evolve's in-memory path: plan_in_memory + Executor, copied into the model."""
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache, ReturnTensor
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner
    from transformers import AutoConfig

    options = MergeOptions(device=args.device, quiet=True, read_to_gpu=args.device != "cpu")
    config = MergeConfiguration.model_validate(mergekit_config(recipe))
    arch = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    cfg = AutoConfig.from_pretrained(recipe.base_model or recipe.models[0].model)
    params = dict(model.named_parameters())

    def once():
        cfg_copy = MergeConfiguration.model_validate(mergekit_config(recipe))
        planner = MergePlanner(cfg_copy, arch, options, cfg)
        # plan_in_memory() itself fails pydantic validation in mergekit 0.1.5 (ReturnTensor's
        # tensor_task is typed Task[Tensor], the merge task is Task[Optional[Tensor]]), so
        # build the same ReturnTensor tasks without re-validation.
        planner._plan()
        tasks = [ReturnTensor.model_construct(weight_info=w, tensor_task=t, dtype=w.force_dtype or cfg_copy.out_dtype)
                 for w, t in planner._tensors]
        device = args.device
        for task, value in Executor(tasks, math_device=device, storage_device=device).run(quiet=True):
            name = task.weight_info.name
            if name in params:
                params[name].data.copy_(value)

    return timeit(once, args.repeat)


def mergekit_config(recipe) -> dict:
    """The recipe's mergekit config with mergekit's default arithmetic: the checkpoints'
    bf16 (ours computes in float32; see RESULTS.md). Export would write `dtype: float32`."""
    from mergesearch.merging.mergekit import to_mergekit

    config = to_mergekit(recipe)
    config.pop("dtype", None)
    return config


def mergekit_disk(recipe, root: Path, args) -> float:
    """`mergekit-yaml` to disk, then `from_pretrained` of the result."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM

    out = root / "mk-out"

    def once():
        shutil.rmtree(out, ignore_errors=True)
        run_merge(MergeConfiguration.model_validate(mergekit_config(recipe)), str(out),
                  MergeOptions(device=args.device, quiet=True, copy_tokenizer=False,
                               write_model_card=False))
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)

    return timeit(once, 1)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
