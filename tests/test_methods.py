"""Each merge method against a small case computed by hand (the arithmetic is in the
comments), and the reproducibility contract of the random methods."""

from __future__ import annotations

import math

import pytest
import torch
from support.methods import close, run

from mergesearch.merging import MergeEngine, load_live_model, sparsify
from mergesearch.merging.registry import MergeInputs
from mergesearch.recipe import Recipe

S = 1 / math.sqrt(2)


# ---- linear and task arithmetic --------------------------------------------------------


def test_linear_is_the_normalised_weighted_mean():
    # (1*[1,2] + 3*[5,6]) / 4 = [4, 5]
    assert close(run("linear", None, [[1, 2], [5, 6]], weight=[1.0, 3.0], normalize=True), [4, 5])


def test_linear_without_normalisation_is_the_weighted_sum():
    # 1*[1,2] + 3*[5,6] = [16, 20]
    assert close(run("linear", None, [[1, 2], [5, 6]], weight=[1.0, 3.0], normalize=False), [16, 20])


def test_task_arithmetic_adds_lambda_times_the_weighted_task_vectors():
    # base [1,1]; deltas [1,0] and [0,2]; 0.5*[1,0] + 1*[0,2] = [0.5, 2]; lambda 2 -> [1, 4]
    out = run("task_arithmetic", [1, 1], [[2, 1], [1, 3]], weight=[0.5, 1.0], **{"lambda": 2.0})
    assert close(out, [2, 5])


def test_task_arithmetic_normalize_divides_by_the_weight_sum():
    # deltas [2] and [4], weights 1 and 3: (2 + 12) / 4 = 3.5, plus the base 1
    assert close(run("task_arithmetic", [1], [[3], [5]], weight=[1.0, 3.0], normalize=True), [4.5])


# ---- TIES -----------------------------------------------------------------------------


def test_ties_keeps_the_largest_magnitudes():
    # density 0.5 of 4 entries keeps the 2 largest |x|: 3 and -4
    out = run("ties", [0, 0, 0, 0], [[3, -1, 0.5, -4]], weight=1.0, density=0.5)
    assert close(out, [3, 0, 0, -4])


def test_ties_elects_the_sign_of_the_sum_and_takes_the_disjoint_mean():
    # deltas: a = [3, -1, 2, 0.5], b = [-4, 2, 1, 0.1]; density 0.5 keeps the 2 largest:
    # a -> [3, 0, 2, 0], b -> [-4, 2, 0, 0]; weights 1: sums [-1, 2, 2, 0]
    # elected signs [-, +, +, +]: entry 0 keeps b only (-4 / 1), entry 1 b (2 / 1),
    # entry 2 a (2 / 1), entry 3 nothing (0, divisor set to 1)
    out = run("ties", [0, 0, 0, 0], [[3, -1, 2, 0.5], [-4, 2, 1, 0.1]], weight=1.0, density=0.5)
    assert close(out, [-4, 2, 2, 0])


def test_ties_divides_by_the_weights_of_the_agreeing_entries_only():
    # base [1,1]; deltas a = [2, -1], b = [-1, 3]; weights 1 and 2 -> weighted a = [2, -1],
    # b = [-2, 6]; sums [0, 5]: a zero sum elects +, so entry 0 keeps a: 2 / 1 = 2;
    # entry 1 keeps b: 6 / 2 = 3 (not 6 / 3). Plus the base: [3, 4]
    out = run("ties", [1, 1], [[3, 0], [0, 4]], weight=[1.0, 2.0], density=1.0)
    assert close(out, [3, 4])


def test_ties_without_normalize_sums_the_agreeing_entries():
    # same deltas, normalize off: entry 0 -> 2, entry 1 -> 6; plus the base: [3, 7]
    out = run("ties", [1, 1], [[3, 0], [0, 4]], weight=[1.0, 2.0], density=1.0, normalize=False)
    assert close(out, [3, 7])


# ---- DARE -----------------------------------------------------------------------------


def test_dare_with_density_one_is_task_arithmetic():
    base, models = [0.5, -1, 2], [[1, 0, 2], [0, -3, 5]]
    a = run("dare_linear", base, models, weight=[0.3, 0.7], density=1.0)
    b = run("task_arithmetic", base, models, weight=[0.3, 0.7])
    assert torch.equal(a, b)
    # and by hand: 0.3*[0.5, 1, 0] + 0.7*[-0.5, -2, 3] = [-0.2, -1.1, 2.1]; plus the base
    assert close(a, [0.3, -2.1, 4.1])


def test_dare_keeps_about_density_of_the_entries():
    torch.manual_seed(0)
    delta = torch.randn(200_000)
    u = MergeInputs("t", None, delta.unsqueeze(0), seed=1).uniform(0)
    kept = sparsify.bernoulli(delta, 0.3, u)
    assert abs((kept != 0).float().mean().item() - 0.3) < 0.005
    assert torch.equal(kept[kept != 0], delta[kept != 0])  # kept entries unchanged


def test_dare_keeps_the_entries_whose_uniform_number_is_below_density():
    # uniform [0.1, 0.2, 0.9, 0.8] < 0.5 keeps entries 0 and 1
    out = sparsify.bernoulli(torch.tensor([1.0, -2, 3, 4]), 0.5, torch.tensor([0.1, 0.2, 0.9, 0.8]))
    assert close(out, [1, -2, 0, 0])


def test_dare_rescale_restores_the_l1_norm_as_mergekit_does():
    # kept [1, -2, 0, 0]: L1 3 of 10, so times 10/3 (not 1/density = 2)
    out = sparsify.bernoulli(torch.tensor([1.0, -2, 3, 4]), 0.5, torch.tensor([0.1, 0.2, 0.9, 0.8]),
                             rescale=True)
    assert close(out, [10 / 3, -20 / 3, 0, 0])


def test_dare_rescale_keeps_the_l1_norm_on_a_large_tensor():
    torch.manual_seed(0)
    delta = torch.randn(10_000)
    u = MergeInputs("t", None, delta.unsqueeze(0)).uniform(0)
    kept = sparsify.bernoulli(delta, 0.4, u, rescale=True)
    assert math.isclose(kept.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-5)


# ---- breadcrumbs and DELLA ------------------------------------------------------------


def test_breadcrumbs_drops_the_top_outliers_and_the_smallest():
    # |x| sorted: 1..10; density 0.5 keeps 5, gamma 0.2 drops the top 2 -> keeps 4..8
    x = torch.tensor([10, 1, 9, 2, 8, 3, 7, 4, 6, 5], dtype=torch.float32)
    out = sparsify.magnitude_outliers(x, density=0.5, gamma=0.2)
    assert torch.equal(out, torch.tensor([0, 0, 0, 0, 8, 0, 7, 4, 6, 5], dtype=torch.float32))


def test_breadcrumbs_shrinks_the_outlier_cut_to_keep_the_density():
    # density 0.8 keeps 8 of 10; gamma 0.5 would drop 5 of the top: only 2 can go -> 1..8
    x = torch.tensor([10, 1, 9, 2, 8, 3, 7, 4, 6, 5], dtype=torch.float32)
    out = sparsify.magnitude_outliers(x, density=0.8, gamma=0.5)
    assert torch.equal(out, torch.tensor([0, 1, 0, 2, 8, 3, 7, 4, 6, 5], dtype=torch.float32))


def test_breadcrumbs_method_sparsifies_then_adds_weighted_task_vectors():
    # delta [10, 1, 9, 2, 8, 3, 7, 4, 6, 5] -> [0,0,0,0,8,0,7,4,6,5] (as above); weight 0.5
    out = run("breadcrumbs", [0.0] * 10, [[10, 1, 9, 2, 8, 3, 7, 4, 6, 5]], weight=0.5,
              density=0.5, gamma=0.2)
    assert close(out, [0, 0, 0, 0, 4, 0, 3.5, 2, 3, 2.5])


def test_della_keep_probability_follows_the_magnitude_rank_within_a_row():
    # row [1, -3, 2]: ranks 1, 3, 2 -> probabilities d-e, d+e, d = 0.3, 0.7, 0.5
    # uniform [0.35, 0.65, 0.45]: 0.35 >= 0.3 drops; 0.65 < 0.7 and 0.45 < 0.5 keep
    out = sparsify.della_magprune(torch.tensor([[1.0, -3, 2]]), 0.5, 0.2,
                                  torch.tensor([[0.35, 0.65, 0.45]]))
    assert close(out, [[0, -3, 2]])


def test_della_keep_probability_rises_with_magnitude_rank():
    # ranks 1..n map linearly to keep probabilities (d - e) .. (d + e) = 0.2 .. 0.8
    x = torch.arange(1, 2001, dtype=torch.float32).repeat(200, 1)
    u = MergeInputs("t", None, x.unsqueeze(0)).uniform(0)
    kept = (sparsify.della_magprune(x, 0.5, 0.3, u) != 0).float().mean(dim=0)
    assert abs(kept[:200].mean().item() - 0.23) < 0.02  # ranks 1-200: mean p ~ 0.23
    assert abs(kept[-200:].mean().item() - 0.77) < 0.02  # ranks 1801-2000: ~ 0.77


def test_della_refuses_an_epsilon_that_leaves_the_unit_interval():
    with pytest.raises(ValueError, match="epsilon"):
        sparsify.della_magprune(torch.ones(2, 2), 0.9, 0.2, torch.zeros(2, 2))


# ---- spherical ------------------------------------------------------------------------


def test_slerp_at_zero_is_the_base_and_at_one_the_other_model():
    a, b = [1.0, 0.0], [0.0, 1.0]
    assert close(run("slerp", a, [b], t=0.0), a)
    assert close(run("slerp", a, [b], t=1.0), b)


def test_slerp_halfway_between_orthogonal_unit_vectors_is_their_normalised_sum():
    # (a + b) / sqrt(2): halfway along the quarter circle
    assert close(run("slerp", [1.0, 0.0], [[0.0, 1.0]], t=0.5), [S, S])


def test_slerp_of_near_parallel_vectors_is_linear():
    # cos ~ 1 - 1e-9 > 0.9995: 0.75*[1, 0] + 0.25*[2, 1e-4]
    assert close(run("slerp", [1.0, 0.0], [[2.0, 1e-4]], t=0.25), [1.25, 0.25e-4])


def test_nuslerp_uses_the_weight_ratio_as_t():
    # weights 1 and 3 -> t = 0.75 along the quarter circle: [cos 67.5deg, sin 67.5deg]
    out = run("nuslerp", None, [[1.0, 0.0], [0.0, 1.0]], weight=[1.0, 3.0])
    assert close(out, [math.cos(math.radians(67.5)), math.sin(math.radians(67.5))])


def test_nuslerp_with_a_base_interpolates_the_task_vectors():
    # deltas [1,0] and [0,1], t = 0.5 -> [S, S]; plus the base [1, 1]
    out = run("nuslerp", [1.0, 1.0], [[2.0, 1.0], [1.0, 2.0]], weight=[1.0, 1.0])
    assert close(out, [1 + S, 1 + S])


M0, M1 = [[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]


def test_nuslerp_flattened_interpolates_the_whole_tensor():
    # a = [1,0,1,0], b = [0,1,1,0]: cos 1/2, theta = pi/3; at t = 0.5 each coefficient is
    # sin(pi/6) / sin(pi/3) = 1/sqrt(3): (a + b) / sqrt(3)
    r = 1 / math.sqrt(3)
    assert close(run("nuslerp", None, [M0, M1], weight=[1.0, 1.0]), [[r, r], [2 * r, 0]])


def test_nuslerp_unflattened_interpolates_each_row():
    # row 0: orthogonal unit vectors -> [S, S]; row 1: parallel -> linear -> [1, 0]
    out = run("nuslerp", None, [M0, M1], weight=[1.0, 1.0], nuslerp_flatten=False)
    assert close(out, [[S, S], [1, 0]])


def test_nuslerp_row_wise_interpolates_each_column():
    # column 0: [1,1] and [0,1], cos 1/sqrt(2), theta = pi/4; coefficient
    # sin(pi/8) / sin(pi/4) = 0.5411961 -> [0.5411961, 1.0823922];
    # column 1: [0,0] and [1,0] (a zero vector: cos 0, theta = pi/2) -> sin(pi/4)*[1,0]
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    out = run("nuslerp", None, [M0, M1], weight=[1.0, 1.0], nuslerp_flatten=False,
              nuslerp_row_wise=True)
    assert close(out, [[c, S], [2 * c, 0]])


def test_multislerp_of_two_orthogonal_unit_vectors_at_equal_weights():
    # tangent-space mean of two orthogonal unit vectors, mapped back: the unit bisector
    out = run("multislerp", None, [[1.0, 0.0], [0.0, 1.0]], weight=[1.0, 1.0])
    assert close(out, [S, S])


def test_multislerp_rescales_to_the_weighted_mean_norm():
    # directions [1,0] and [0,1] -> bisector [S, S]; norms 2 and 1, weights 1/2 -> 1.5
    out = run("multislerp", None, [[2.0, 0.0], [0.0, 1.0]], weight=[1.0, 1.0])
    assert close(out, [1.5 * S, 1.5 * S])


def test_multislerp_with_a_base_works_on_task_vectors():
    # deltas [1,0] and [0,1] -> [S, S]; plus the base [1, 2]
    out = run("multislerp", [1.0, 2.0], [[2.0, 2.0], [1.0, 3.0]], weight=[2.0, 2.0])
    assert close(out, [1 + S, 2 + S])


# ---- model stock, SCE, passthrough ----------------------------------------------------


def test_model_stock_orthogonal_task_vectors_give_the_base():
    # deltas [1,0] and [0,1]: cos 0 -> t = 0 -> the base
    assert close(run("model_stock", [1, 1], [[2, 1], [1, 2]]), [1, 1])


def test_model_stock_parallel_task_vectors_give_their_average():
    # deltas [1,0] and [1,0]: cos 1 -> t = 2*1/(1+1) = 1 -> the average [2, 1]
    assert close(run("model_stock", [1, 1], [[2, 1], [2, 1]]), [2, 1])


def test_model_stock_interpolates_by_n_cos_over_one_plus_n_minus_one_cos():
    # deltas [1,0] and [1/2, sqrt(3)/2]: cos 1/2 -> t = 2*(1/2) / (1 + 1/2) = 2/3;
    # mean delta [3/4, sqrt(3)/4] -> base + 2/3 * mean = [0.5, sqrt(3)/6]
    out = run("model_stock", [0.0, 0.0], [[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    assert close(out, [0.5, math.sqrt(3) / 6])


def test_model_stock_filter_wise_uses_one_angle_per_row():
    # row 0: deltas [1,0] and [0,1] -> t = 0 -> base row [0, 0];
    # row 1: deltas [1,0] and [1,0] -> t = 1 -> average [1, 0]
    out = run("model_stock", [[0.0, 0.0], [0.0, 0.0]], [[[1.0, 0.0], [1.0, 0.0]],
                                                       [[0.0, 1.0], [1.0, 0.0]]],
              filter_wise=True)
    assert close(out, [[0, 0], [1, 0]])


def test_sce_weights_task_vectors_by_their_energy():
    # deltas a = [1, 1], b = [3, 3]: energies 1 and 9 -> weights 0.1, 0.9
    # (0.1*1 + 0.9*3) / (0.1 + 0.9) = 2.8
    assert close(run("sce", [0, 0], [[1, 1], [3, 3]]), [2.8, 2.8])


def test_sce_erases_minority_signs():
    # a = [1, 2, -3], b = [3, -1, 1]: energies 14/3 and 11/3 -> weights 14/25, 11/25;
    # signs of the sum [4, 1, -2]: +, +, -. Entry 0: (14*1 + 11*3) / 25 = 1.88;
    # entry 1: only a agrees -> 2; entry 2: only a agrees -> -3
    assert close(run("sce", [0, 0, 0], [[1, 2, -3], [3, -1, 1]]), [1.88, 2, -3])


def test_sce_select_topk_keeps_the_entries_of_highest_variance():
    # variances across models: [1, 2.25, 4]; select_topk 0.7 keeps int(3 * 0.7) = 2:
    # entries 1 and 2. a = [0, 2, -3], b = [0, -1, 1]; entry 0 is 0 everywhere;
    # entries 1 and 2 keep a only (signs +, -) -> [0, 2, -3]
    assert close(run("sce", [0, 0, 0], [[1, 2, -3], [3, -1, 1]], select_topk=0.7), [0, 2, -3])


def test_passthrough_scales_its_single_input():
    assert close(run("passthrough", None, [[2, -4]], scale=[0.5]), [1, -2])
    assert close(run("passthrough", None, [[2, -4]], scale=[None]), [2, -4])


# ---- exact rank selection -------------------------------------------------------------


@pytest.mark.parametrize("n,start,stop", [(10, 0, 3), (70_000, 35_000, 70_000), (3_000_001, 1_000_000, 2_500_000)])
def test_exact_rank_selection_matches_a_full_sort(n, start, stop):
    g = torch.Generator().manual_seed(n)
    values = torch.randn(n, generator=g).abs().to(torch.bfloat16).float()  # many ties
    mask = sparsify.select_range(values, start, stop)
    assert int(mask.sum()) == stop - start
    order = torch.sort(values, stable=True).values
    assert values[mask].min() >= order[start] and values[mask].max() <= order[stop - 1]


def test_cached_ranks_select_the_entries_rank_selection_does():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(70_000, generator=g).to(torch.bfloat16).float()  # many ties
    ranks = sparsify.magnitude_ranks(values)
    values = values.abs()
    assert torch.equal(ranks.sort().values, torch.arange(70_000, dtype=torch.int32))
    for start, stop in [(0, 700), (35_000, 70_000), (1_000, 69_000)]:
        picked = (ranks >= start) & (ranks < stop)
        assert torch.equal(picked, sparsify.select_range(values, start, stop))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "della", "consensus_ties"])
def test_a_worker_keeping_ranks_merges_what_one_recomputing_them_does(method, families):
    f = families["llama"]
    knobs = {"density": 0.4, **({"epsilon": 0.1} if method == "della" else {})}
    recipe = Recipe(method=method, base_model=f["base"], seed=2, models=[
        {"model": f["s0"], "parameters": {"weight": 0.7, **knobs}},
        {"model": f["s1"], "parameters": {"weight": 0.4, **knobs, "density": 0.7}}])
    fresh = dict(MergeEngine(f["base"], [f["s0"], f["s1"]], device="cpu", cache=False)
                 .merged_tensors(recipe))
    keeping = MergeEngine(f["base"], [f["s1"], f["s0"]], device="cpu", cache=True)
    swapped = recipe.model_copy(update={"models": recipe.models[::-1]})
    dict(keeping.merged_tensors(swapped))  # ranks computed for the other order first
    kept = dict(keeping.merged_tensors(recipe))
    assert keeping.derived_cache  # ranks were kept
    assert fresh.keys() == kept.keys() and all(torch.equal(fresh[k], kept[k]) for k in fresh)


def test_what_a_worker_keeps_stays_within_its_budget_and_changes_no_tensor(families):
    f = families["llama"]
    recipe = Recipe(method="dare_ties", base_model=f["base"], seed=4, models=[
        {"model": f["s0"], "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": f["s1"], "parameters": {"weight": 0.6, "density": 0.5}}])
    ties = recipe.model_copy(update={"method": "ties"})
    nbytes = lambda cache: sum(t.numel() * t.element_size() for t in cache.values())  # noqa: E731
    fresh = MergeEngine(f["base"], [f["s0"], f["s1"]], device="cpu", cache=False)
    everything = MergeEngine(f["base"], [f["s0"], f["s1"]], device="cpu")
    for r in (recipe, ties):
        dict(everything.merged_tensors(r))
    uniforms, ranks = nbytes(everything.random_cache), nbytes(everything.derived_cache)
    assert uniforms == ranks > 0  # 4 bytes an entry and source, each
    assert everything.random_cache.used == uniforms + ranks  # one budget for both
    budget = uniforms + ranks // 2  # room for every uniform and half the ranks
    tight = MergeEngine(f["base"], [f["s0"], f["s1"]], device="cpu", cache_bytes=budget)
    for r in (recipe, ties, recipe, ties):
        kept = dict(tight.merged_tensors(r))
        assert all(torch.equal(kept[k], v) for k, v in fresh.merged_tensors(r))
    assert nbytes(tight.random_cache) == uniforms
    assert 0 < nbytes(tight.derived_cache) <= ranks // 2
    assert tight.derived_cache.used == nbytes(tight.random_cache) + nbytes(tight.derived_cache) <= budget


@pytest.mark.parametrize("method,knobs,lines", [
    ("task_arithmetic", {"lambda": 0.8}, None),
    ("task_arithmetic", {"normalize": True}, {"alpha": 0.5, "beta": 0.3}),
    ("linear", {}, None),
    ("linear", {"normalize": False}, None),
])
def test_weighted_sums_from_resident_weights_equal_the_methods_own_arithmetic(
        method, knobs, lines, families, monkeypatch):
    from dataclasses import replace

    from mergesearch.merging.registry import METHODS

    f = families["llama"]
    recipe = Recipe(method=method, base_model=None if method == "linear" else f["base"],
                    parameters=knobs, lines=lines, models=[
                        {"model": f["s0"], "parameters": {"weight": [0.2, 0.9]}},
                        {"model": f["s1"], "parameters": {"weight": 0.5}},
                        *([{"model": f["base"], "parameters": {"weight": 0.3}}] if method == "linear" else [])])
    tv = MergeEngine(f["base"], [f["s0"], f["s1"]], device="cpu")
    monkeypatch.setattr("mergesearch.merging.engine.COMBINE_BLOCK", 1000)  # many blocks a tensor
    summed = dict(tv.merged_tensors(recipe))
    live = load_live_model(f["base"], tv.device, dtype="float32")
    tv.merge_into(live, recipe)  # written block by block straight into the parameters
    monkeypatch.setitem(METHODS._entries, method, replace(METHODS.get(method), combination=None))
    reference = dict(tv.merged_tensors(recipe))
    assert summed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.allclose(summed[name], tensor, atol=1e-7, rtol=1e-6), name
    for name, param in live.named_parameters():
        assert torch.allclose(param, reference[name], atol=1e-7, rtol=1e-6), name


# ---- reproducibility ------------------------------------------------------------------

NAME = "model.layers.3.mlp.up_proj.weight"


def uniform(name: str = NAME, seed: int = 5, stream: int = 1, shape=(300, 7), cache=None) -> torch.Tensor:
    return MergeInputs(name, None, torch.zeros(1, *shape), seed=seed, random_cache=cache).uniform(stream)


def test_uniform_numbers_are_bit_identical_for_the_same_seed_name_and_stream():
    first = uniform()
    uniform("model.embed_tokens.weight", shape=(50,))  # another tensor drawn in between
    assert torch.equal(first, uniform())
    assert torch.equal(first, uniform(cache={}))  # cached or not


def test_uniform_numbers_differ_across_seeds_names_and_streams():
    first = uniform()
    for other in (uniform(seed=6), uniform(name="model.layers.2.mlp.up_proj.weight"), uniform(stream=2)):
        assert (first == other).float().mean() < 0.01


def test_uniform_numbers_lie_in_the_unit_interval_and_are_uniform():
    u = uniform(shape=(1000, 100))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    assert abs((u < 0.25).float().mean().item() - 0.25) < 0.005


def test_dare_ties_is_bit_identical_across_runs_tensor_order_and_load_order(families):
    f = families["llama"]
    recipe = Recipe(method="dare_ties", base_model=f["base"], seed=11, models=[
        {"model": f["s0"], "parameters": {"weight": 0.5, "density": 0.4}},
        {"model": f["s2"], "parameters": {"weight": 0.5, "density": 0.7}}])
    tv = MergeEngine(f["base"], [f["s0"], f["s1"], f["s2"]], device="cpu")
    a = dict(tv.merged_tensors(recipe))
    assert all(torch.equal(a[k], v) for k, v in tv.merged_tensors(recipe))  # merged twice
    other = MergeEngine(f["base"], [f["s2"], f["s0"]], device="cpu", cache=False)
    other.names.reverse()  # tensors processed in the opposite order
    b = dict(other.merged_tensors(recipe))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dare_ties_differs_with_the_seed(families):
    f = families["llama"]
    recipe = Recipe(method="dare_ties", base_model=f["base"], seed=11, models=[
        {"model": f["s0"], "parameters": {"weight": 0.5, "density": 0.4}}])
    tv = MergeEngine(f["base"], [f["s0"]], device="cpu")
    name = "model.layers.0.mlp.up_proj.weight"
    a = dict(tv.merged_tensors(recipe))[name]
    b = dict(tv.merged_tensors(recipe.model_copy(update={"seed": 12})))[name]
    assert not torch.equal(a, b)
