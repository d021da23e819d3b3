"""Each merge method against a small case computed by hand (numbers in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from mergesearch.merging import sparsify
from mergesearch.merging.registry import MergeInputs, get_method


def run(method: str, base, models, **params) -> torch.Tensor:
    m = get_method(method)
    defaults = {p.name: p.default for p in m.params if not p.required}
    n = len(models)
    kwargs = {k: ([v] * n if m.param(k).per_model and not isinstance(v, list) else v)
              for k, v in {**defaults, **params}.items()}
    x = MergeInputs("model.layers.0.mlp.up_proj.weight",
                    None if base is None else torch.tensor(base, dtype=torch.float32),
                    torch.tensor(models, dtype=torch.float32), seed=7)
    return m.fn(x, **kwargs)


def close(a: torch.Tensor, b) -> bool:
    return torch.allclose(a, torch.tensor(b, dtype=torch.float32), atol=1e-6)


def test_linear_is_the_normalised_weighted_mean():
    # (1*[1,2] + 3*[5,6]) / 4 = [4, 5]
    assert close(run("linear", None, [[1, 2], [5, 6]], weight=[1.0, 3.0], normalize=True), [4, 5])


def test_linear_without_normalisation_is_the_weighted_sum():
    assert close(run("linear", None, [[1, 2], [5, 6]], weight=[1.0, 3.0], normalize=False), [16, 20])


def test_task_arithmetic_adds_scaled_task_vectors():
    # base [1,1]; deltas [1,0] and [0,2]; 0.5*[1,0] + 1*[0,2] = [0.5, 2]; lambda 2 -> [1, 4]
    out = run("task_arithmetic", [1, 1], [[2, 1], [1, 3]], weight=[0.5, 1.0], **{"lambda": 2.0})
    assert close(out, [2, 5])


def test_ties_trims_elects_sign_and_takes_the_disjoint_mean():
    # deltas: a = [3, -1, 2, 0.5], b = [-4, 2, 1, 0.1]; density 0.5 keeps the 2 largest:
    # a -> [3, 0, 2, 0], b -> [-4, 2, 0, 0]; weights 1: sums [-1, 2, 2, 0]
    # elected signs [-, +, +, +]: entry 0 keeps b only (-4 / 1), entry 1 b (2 / 1),
    # entry 2 a (2 / 1), entry 3 nothing (0, divisor set to 1)
    out = run("ties", [0, 0, 0, 0], [[3, -1, 2, 0.5], [-4, 2, 1, 0.1]], weight=1.0, density=0.5)
    assert close(out, [-4, 2, 2, 0])


def test_ties_disjoint_mean_divides_by_the_agreeing_weights():
    # deltas a = [2], b = [4], weights 1 and 3: weighted [2, 12]; both agree: 14 / 4 = 3.5
    assert close(run("ties", [1], [[3], [5]], weight=[1.0, 3.0], density=1.0), [4.5])


def test_dare_with_density_one_is_task_arithmetic():
    base, models = [0.5, -1, 2], [[1, 0, 2], [0, -3, 5]]
    a = run("dare_linear", base, models, weight=[0.3, 0.7], density=1.0)
    b = run("task_arithmetic", base, models, weight=[0.3, 0.7])
    assert torch.equal(a, b)


def test_dare_keeps_about_density_of_the_entries():
    torch.manual_seed(0)
    delta = torch.randn(200_000)
    u = MergeInputs("t", None, delta.unsqueeze(0), seed=1).uniform(0)
    kept = sparsify.bernoulli(delta, 0.3, u)
    assert abs((kept != 0).float().mean().item() - 0.3) < 0.005


def test_dare_rescale_keeps_the_l1_norm():
    torch.manual_seed(0)
    delta = torch.randn(10_000)
    u = MergeInputs("t", None, delta.unsqueeze(0)).uniform(0)
    kept = sparsify.bernoulli(delta, 0.4, u, rescale=True)
    assert math.isclose(kept.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-5)


def test_breadcrumbs_drops_the_top_outliers_and_the_smallest():
    # |x| sorted: 1..10; density 0.5 keeps 5, gamma 0.2 drops the top 2 -> keeps 4..8
    x = torch.tensor([10, 1, 9, 2, 8, 3, 7, 4, 6, 5], dtype=torch.float32)
    out = sparsify.magnitude_outliers(x, density=0.5, gamma=0.2)
    assert torch.equal(out, torch.tensor([0, 0, 0, 0, 8, 0, 7, 4, 6, 5], dtype=torch.float32))


def test_della_keep_probability_rises_with_magnitude_rank():
    # ranks 1..n map linearly to keep probabilities (d - e) .. (d + e) = 0.2 .. 0.8
    x = torch.arange(1, 2001, dtype=torch.float32).repeat(200, 1)
    u = MergeInputs("t", None, x.unsqueeze(0)).uniform(0)
    kept = (sparsify.della_magprune(x, 0.5, 0.3, u) != 0).float().mean(dim=0)
    assert abs(kept[:200].mean().item() - 0.23) < 0.02  # ranks 1-200: mean p ~ 0.23
    assert abs(kept[-200:].mean().item() - 0.77) < 0.02


def test_slerp_endpoints_and_midpoint_of_orthogonal_vectors():
    a, b = [1.0, 0.0], [0.0, 1.0]
    assert close(run("slerp", a, [b], t=0.0), a)
    assert close(run("slerp", a, [b], t=1.0), b)
    s = 1 / math.sqrt(2)  # halfway along the quarter circle
    assert close(run("slerp", a, [b], t=0.5), [s, s])


def test_slerp_of_near_parallel_vectors_is_linear():
    assert close(run("slerp", [1.0, 0.0], [[2.0, 1e-4]], t=0.25), [1.25, 0.25e-4])


def test_nuslerp_uses_the_weight_ratio_as_t():
    # weights 1 and 3 -> t = 0.75 along the quarter circle: [cos 67.5deg, sin 67.5deg]
    out = run("nuslerp", None, [[1.0, 0.0], [0.0, 1.0]], weight=[1.0, 3.0])
    assert close(out, [math.cos(math.radians(67.5)), math.sin(math.radians(67.5))])


def test_multislerp_of_two_orthogonal_unit_vectors_at_equal_weights():
    # tangent-space mean of two orthogonal unit vectors, mapped back: the unit bisector
    s = 1 / math.sqrt(2)
    out = run("multislerp", None, [[1.0, 0.0], [0.0, 1.0]], weight=[1.0, 1.0])
    assert close(out, [s, s])


def test_model_stock_interpolates_by_the_task_vector_angle():
    # deltas [1,0] and [0,1]: cos 0 -> t = 0 -> the base
    assert close(run("model_stock", [1, 1], [[2, 1], [1, 2]]), [1, 1])
    # deltas [1,0] and [1,0]: cos 1 -> t = 2*1/(1+1) = 1 -> the average [2, 1]
    assert close(run("model_stock", [1, 1], [[2, 1], [2, 1]]), [2, 1])


def test_sce_weights_task_vectors_by_their_energy():
    # deltas a = [1, 1], b = [3, 3]: energies 1 and 9 -> weights 0.1, 0.9
    # (0.1*1 + 0.9*3) / (0.1 + 0.9) = 2.8
    assert close(run("sce", [0, 0], [[1, 1], [3, 3]]), [2.8, 2.8])


def test_passthrough_scales_its_single_input():
    assert close(run("passthrough", None, [[2, -4]], scale=[0.5]), [1, -2])


def test_uniform_numbers_are_identical_for_the_same_key_and_order_free():
    x = MergeInputs("model.layers.3.mlp.up_proj.weight", None, torch.zeros(1, 300, 7), seed=5)
    first = x.uniform(1)
    MergeInputs("other.tensor", None, torch.zeros(1, 50), seed=5).uniform(1)  # another tensor in between
    again = MergeInputs("model.layers.3.mlp.up_proj.weight", None, torch.zeros(1, 300, 7), seed=5).uniform(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, x.uniform(2))
    assert not torch.equal(first, MergeInputs(x.name, None, x.models, seed=6).uniform(1))
    assert 0 <= first.min() and first.max() < 1 and abs(first.mean().item() - 0.5) < 0.02


@pytest.mark.parametrize("n,start,stop", [(10, 0, 3), (70_000, 35_000, 70_000), (3_000_001, 1_000_000, 2_500_000)])
def test_exact_rank_selection_matches_a_full_sort(n, start, stop):
    g = torch.Generator().manual_seed(n)
    values = torch.randn(n, generator=g).abs().to(torch.bfloat16).float()  # many ties
    mask = sparsify.select_range(values, start, stop)
    assert int(mask.sum()) == stop - start
    order = torch.sort(values, stable=True).values
    assert values[mask].min() >= order[start] and values[mask].max() <= order[stop - 1]
