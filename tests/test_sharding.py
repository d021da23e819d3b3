"""A live model sharded over a worker's devices (gpus_per_worker > 1): the placement by whole
layers, by hand; and on the CPU, two "devices" with budgets of their own running the whole
path (placement, a plan and store per device, the dispatched model, scoring), whose merges
and scores equal the one-device engine's."""

from __future__ import annotations

import pytest
import torch
from support.recipes import recipe_for
from support.studies import task_config

from mergesearch.config import parse_config
from mergesearch.errors import ConfigError
from mergesearch.evaluators import build_evaluators
from mergesearch.merging import Checkpoint, MergeEngine, all_methods, load_live_model
from mergesearch.merging.build import check_fits, dispatch_live, open_live
from mergesearch.merging.placement import place, split_units
from mergesearch.merging.residency import StackSpec, stack_specs, staging_bytes, work_bytes
from mergesearch.search.worker import device_budget, worker_devices

# ---- the placement, by hand -----------------------------------------------------------------

# Float32 stacks of base + 1 source. Embeddings: 128 entries (512 B a row); each of 4 layers
# 256 entries (1 KiB a row); final norm 16 entries (64 B); lm_head as the embeddings. A
# unit's bytes are its live tensors (one row) and its stacks (two rows): embeddings 1536,
# each layer 3072, final norm and lm_head 192 + 1536 = 1728; 15552 in all.
SPECS = {"lm_head.weight": StackSpec((8, 16), torch.float32, 2),
         "model.embed_tokens.weight": StackSpec((8, 16), torch.float32, 2),
         **{f"model.layers.{i}.mlp.up_proj.weight": StackSpec((16, 16), torch.float32, 2) for i in range(4)},
         "model.norm.weight": StackSpec((16,), torch.float32, 2)}
LIVE = {n: s.row_bytes for n, s in SPECS.items()}
GPUS = ["cuda:0", "cuda:1"]
BIG = 2**30


def layer_devices(placed) -> list[int]:
    return [placed.tensors[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(4)]


def test_equal_budgets_split_the_layers_in_half():
    # Middle bytes of the layers: 3072, 6144, 9216, 12288; half of 15552 is 7776.
    placed = place(SPECS, LIVE, GPUS, [BIG, BIG], tied=False)
    assert layer_devices(placed) == [0, 0, 1, 1]
    assert placed.tensors["model.embed_tokens.weight"] == 0
    assert placed.tensors["model.norm.weight"] == placed.tensors["lm_head.weight"] == 1
    assert placed.live == [512 + 2 * 1024, 2 * 1024 + 64 + 512]


def test_unequal_budgets_shift_the_split():
    # 3:1, the first device's share ends at 11664 bytes; 1:3 at 3888.
    assert layer_devices(place(SPECS, LIVE, GPUS, [3 * BIG, BIG], tied=False)) == [0, 0, 0, 1]
    assert layer_devices(place(SPECS, LIVE, GPUS, [BIG, 3 * BIG], tied=False)) == [0, 1, 1, 1]


def test_embeddings_stay_first_and_the_head_last_whatever_the_budgets():
    assert split_units([10, 100, 100, 10], [1, 1000]) == [0, 1, 1, 1]
    assert split_units([10, 100, 100, 10], [1000, 1]) == [0, 0, 0, 1]


def test_an_untied_lm_head_goes_with_the_last_device():
    placed = place(SPECS, LIVE, GPUS, [BIG, BIG], tied=False)
    assert placed.device_map(["lm_head.weight", "model.rotary_emb.inv_freq"]) == {
        "lm_head": "cuda:1", "model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0",
        "model.layers.1": "cuda:0", "model.layers.2": "cuda:1", "model.layers.3": "cuda:1",
        "model.norm": "cuda:1", "model.rotary_emb": "cuda:0"}


def test_a_tied_lm_head_stays_with_the_embeddings_on_the_first_device():
    untied = {n: s for n, s in SPECS.items() if n != "lm_head.weight"}  # a tied checkpoint
    placed = place(untied, LIVE, GPUS, [BIG, BIG], tied=True)
    device_map = placed.device_map(["lm_head.weight", "model.layers.3.self_attn.rotary.inv_freq"])
    assert device_map["lm_head"] == device_map["model.embed_tokens"] == "cuda:0"
    assert device_map["model.norm"] == "cuda:1"
    assert "model.layers.3.self_attn.rotary" not in device_map  # its layer covers it
    # A tied checkpoint that still holds the lm_head: its tensor goes with the embeddings.
    both = place(SPECS, {**LIVE, "lm_head.weight": 0}, GPUS, [BIG, BIG], tied=True)
    assert both.tensors["lm_head.weight"] == 0 and both.tensors["model.norm.weight"] == 1


def test_devices_too_small_for_the_live_model_and_work_buffers_are_refused_with_the_numbers():
    # Each device: its live tensors (2560 and 2624 B) and float32 work buffers sized by a
    # layer's 256 entries over 2 rows, (2 * 2 + 4) * 256 * 4 = 8192 B.
    with pytest.raises(ConfigError) as e:
        place(SPECS, LIVE, GPUS, [8192, 8192], tied=False)
    assert str(e.value) == (
        "workers.device_memory_gb, workers.gpus_per_worker: the live model (5.1 KiB) and the merge's "
        "work buffers (16.0 KiB) need 21.1 KiB over the worker's 2 devices, which may use 16.0 KiB; "
        "placed by whole layers: cuda:0 needs 10.5 KiB of its 8.0 KiB, cuda:1 needs 10.6 KiB of its 8.0 KiB")


def test_a_search_sharding_over_gpus_is_checked_against_each_gpu_before_it_starts(families):
    f = families["llama"]
    cfg = parse_config({"models": {"base": f["base"], "sources": {"s0": f["s0"]}},
                        "objectives": [{"name": "c", "evaluator": "cost"}],
                        "workers": {"gpus_per_worker": 2, "device_memory_gb": 1e-4}})
    assert device_budget(cfg) == [int(1e-4 * 2**30)] * 2
    with pytest.raises(ConfigError, match=r"^workers.device_memory_gb, workers.gpus_per_worker: .* device 0 needs"):
        check_fits(Checkpoint.open(f["base"]), [Checkpoint.open(f["s0"])], None, device_budget(cfg))


# ---- the config and the worker's devices ----------------------------------------------------


def test_more_than_one_gpu_per_worker_must_be_a_whole_number():
    data = {"models": {"base": "b", "sources": {"x": "x"}}, "objectives": [{"name": "c", "evaluator": "cost"}]}
    with pytest.raises(ConfigError, match=r"workers.gpus_per_worker: 1.5 GPUs: above 1, a whole number"):
        parse_config({**data, "workers": {"gpus_per_worker": 1.5}})
    assert parse_config({**data, "workers": {"gpus_per_worker": 2}}).workers.gpus_per_worker == 2
    assert parse_config({**data, "workers": {"gpus_per_worker": 0.5}}).workers.gpus_per_worker == 0.5


def test_a_worker_asking_for_more_gpus_than_it_sees_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"workers.gpus_per_worker: 2 GPUs asked for each worker, 1 visible"):
        worker_devices(2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert worker_devices(2) == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert worker_devices(2, "cpu") == [torch.device("cpu")]  # a device given: that one


# ---- two CPU "devices": the same merges and scores as one device ------------------------------


def sharded_budgets(paths: list[str]) -> tuple[list[int], int]:
    """Budgets for two "devices" (an engine without a live model) where the first, at a
    quarter of the second, cannot hold its share of the inputs, nor can the host hold the
    rest: the first device's plan uses all three tiers, the second's only the device."""
    specs = stack_specs([Checkpoint.open(p).locations for p in paths])
    floor = work_bytes(specs) + staging_bytes(specs)
    total = sum(s.nbytes for s in specs.values())
    first = floor + total // 8
    return [first, 4 * first], total // 32


@pytest.fixture(scope="module")
def engines(families):
    """The llama family on one device, all resident, and on two tight ones, with the same
    Fisher information."""
    f = families["llama"]
    paths = [f["base"], f["s0"], f["s1"], f["s2"]]
    budgets, host = sharded_budgets(paths)
    one = MergeEngine(paths[0], paths[1:], device="cpu")
    two = MergeEngine(paths[0], paths[1:], devices=["cpu", "cpu"], device_budget=budgets, host_budget=host)
    g = torch.Generator().manual_seed(0)
    fisher = {m: {n: torch.rand(one.shapes[n], generator=g) for n in one.names} for m in one.models}
    for engine in (one, two):
        engine.attach_fisher(fisher)
    return f, one, two


def test_the_budgets_force_every_tier_on_the_first_device(engines):
    _, _, two = engines
    first, second = two.plan.plans
    assert all(first.bytes(t) > 0 for t in ("device", "host", "mmap"))
    assert second.bytes("host") == second.bytes("mmap") == 0
    assert two.placement.tensors["model.embed_tokens.weight"] == 0
    assert two.placement.tensors["lm_head.weight"] == 1
    assert set(two.placement.tensors.values()) == {0, 1}
    line = two.plan.describe()
    assert line.startswith("residency over 2 devices: cpu#0: device ") and " | cpu#1: device " in line
    assert "\n" not in line


@pytest.mark.parametrize("method", sorted(all_methods()))
def test_every_method_merges_bit_identically_on_two_devices(engines, method):
    f, one, two = engines
    recipe = recipe_for(method, f)
    want = dict(one.merged_tensors(recipe))
    for _ in range(2):  # the second candidate reads what the first kept, where anything is
        got = dict(two.merged_tensors(recipe))
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), name


@pytest.fixture(scope="module")
def live(families):
    """The llama family opened with its live model on one device, and sharded over two."""
    f = families["llama"]
    paths = [f["base"], f["s0"], f["s1"], f["s2"]]
    budgets, host = sharded_budgets(paths)
    live_model = sum(Checkpoint.open(paths[0]).locations[n].nbytes for n in Checkpoint.open(paths[0]).locations)
    sharded = open_live(paths[0], paths[1:], devices=["cpu", "cpu"],
                        device_budget=[b + live_model for b in budgets], host_budget=host)
    return f, open_live(paths[0], paths[1:], device="cpu"), sharded


def test_the_sharded_live_model_follows_the_placement_and_gets_the_same_weights(live):
    f, (one, model_one), (two, model_two) = live
    device_map = model_two.hf_device_map
    assert device_map["model.embed_tokens"] == device_map["model.layers.0"] == "cpu"
    covered = lambda key: any(key == m or key.startswith(m + ".") for m in device_map)  # noqa: E731
    assert all(covered(k) for k in [*model_two.state_dict(), *dict(model_two.named_buffers())])
    recipe = recipe_for("ties", f)
    for engine, model in ((one, model_one), (two, model_two)):
        engine.merge_into(model, recipe)
    merged = {k: v.clone() for k, v in model_two.state_dict().items()}
    assert all(torch.equal(merged[k], v) for k, v in model_one.state_dict().items())
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model_one(x).logits, model_two(x).logits)
    two.restore_base(model_two)
    assert all(torch.equal(v, two.stacks[k][0]) for k, v in model_two.state_dict().items() if k in two.shapes)


def test_a_live_model_on_two_tight_devices_gets_the_same_weights_and_its_base_back(engines):
    f, one, two = engines  # the first device's inputs in all three tiers
    recipe = recipe_for("task_arithmetic", f)  # a weighted sum: written straight into the model
    model = dispatch_live(two, load_live_model(f["base"], "cpu"))
    two.merge_into(model, recipe)
    want = dict(one.merged_tensors(recipe))
    assert all(torch.equal(v, want[k].to(v.dtype)) for k, v in model.state_dict().items() if k in want)
    two.restore_base(model)
    assert all(torch.equal(v, two.stacks[k][0]) for k, v in model.state_dict().items() if k in two.shapes)


def test_lm_eval_scores_the_sharded_model_as_the_one_device_model(live):
    from transformers import AutoTokenizer

    f, (one, model_one), (two, model_two) = live
    cfg = task_config([{"name": "add", "tasks": ["demo_add"], "metric": "acc,none", "limit": 8,
                        "batch_size": 4}])
    tokenizer = AutoTokenizer.from_pretrained(f["base"])
    recipe = recipe_for("task_arithmetic", f)
    scores = []
    for engine, model in ((one, model_one), (two, model_two)):
        engine.merge_into(model, recipe)
        ev = build_evaluators(cfg)[0]
        ev.setup(model, tokenizer, engine)
        score = ev.score(recipe)
        assert score.ok, score.error
        scores.append((score.value, score.metrics))
    assert scores[0] == scores[1]
