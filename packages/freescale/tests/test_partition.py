import pytest
import torch

from freescale import CostModel, cap_lengths, oversized, partition
from freescale.data import zipf_lengths
from freescale.partition import METHODS


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n, world", [(37, 4), (64, 8), (9, 3), (5, 5)])
def test_partition_is_a_permutation_and_beats_contiguous(method, n, world):
    costs = CostModel(a=16.0, b=1.0)(zipf_lengths(n, seed=n + world, max_len=512))
    part = partition(costs, world, method=method)
    ids = torch.cat(part.assignments)
    assert sorted(ids.tolist()) == list(range(n))
    torch.testing.assert_close(part.loads.sum(), costs.sum())
    if method.endswith("equal") or method == "contiguous":
        assert max(part.counts()) - min(part.counts()) <= 1
    base = partition(costs, world, method="contiguous")
    assert float(part.loads.max()) <= float(base.loads.max()) + 1e-9


@pytest.mark.parametrize("method", METHODS)
def test_fewer_samples_than_ranks_leave_ranks_empty(method):
    part = partition([3.0, 1.0], 4, method=method)  # e.g. a final partial batch
    assert sorted(torch.cat(part.assignments).tolist()) == [0, 1] and sum(part.counts()) == 2
    assert float(part.loads.max()) == 3.0
    empty = partition([], 2, method=method)
    assert empty.counts() == [0, 0] and empty.bubble() == 0.0


def test_kk_follows_largest_differencing():
    # LDM by hand: 10-7=3, 5-3=2, then {3,2,2,1} -> 1, {2,1,1} -> 1, {1,1} -> 0: a perfect split
    assert sorted(partition([10, 7, 5, 3, 2, 1], 2, method="kk", refine=False).loads.tolist()) == [14.0, 14.0]
    # and the textbook case where differencing is not optimal: {8,7,6,5,4} -> difference 2
    assert sorted(partition([8, 7, 6, 5, 4], 2, method="kk", refine=False).loads.tolist()) == [14.0, 16.0]


@pytest.mark.parametrize("method", ["lpt_equal", "kk_equal"])
@pytest.mark.parametrize("refine", [False, True])
def test_equal_count_methods_keep_counts_equal_when_one_sample_dominates(method, refine):
    """The greedy fills the light rank first: only the count caps keep it from taking more than
    its share of samples (8 samples on 2 ranks: 4 each)."""
    part = partition([2.0, 20.0, 2.0, 5.0, 20.0, 20.0, 50.0, 3.0], 2, method=method, refine=refine)
    assert part.counts() == [4, 4]


def test_refinement_only_improves():
    costs = torch.tensor([10.0, 9, 8, 7, 1, 1, 1, 1])
    a = partition(costs, 2, method="lpt_equal", refine=False)
    b = partition(costs, 2, method="lpt_equal", refine=True)
    assert float(b.loads.max()) <= float(a.loads.max()) and b.counts() == a.counts()


def test_lpt_places_the_longest_first():
    # 5, 4 apart; the 3s each to the lighter rank: 4+3, 5+3, 7+3 -> (8, 10), where {5,4}/{3,3,3} is 9
    assert sorted(partition([3, 5, 3, 4, 3], 2, method="lpt", refine=False).loads.tolist()) == [8.0, 10.0]


@pytest.mark.parametrize("costs, world, unrefined, best", [
    ([10, 11, 2, 4, 2, 8, 7, 2, 2], 2, [26.0, 22.0], 24.0),  # a perfect split, one swap away
    ([1, 5, 9, 8, 7, 5, 8, 6], 3, [19.0, 16.0, 14.0], 17.0),  # ceil(49 / 3): the swap pairs the most and least loaded
])
def test_refinement_reaches_the_optimum_a_swap_gives(costs, world, unrefined, best):
    assert sorted(partition(costs, world, method="lpt_equal", refine=False).loads.tolist()) == sorted(unrefined)
    refined = partition(costs, world, method="lpt_equal")
    assert float(refined.loads.max()) == best and max(refined.counts()) - min(refined.counts()) <= 1


def test_oversized_and_capping():
    costs = torch.tensor([100.0, 1, 1, 1])
    assert oversized(costs, 2).tolist() == [0]
    assert oversized(torch.tensor([2.0, 1, 1]), 2).numel() == 0  # exactly the fair share (4 / 2) fits a rank
    model = CostModel(a=0.0, b=1.0)
    capped = cap_lengths(torch.tensor([100, 10, 10, 10]), model, 2)
    assert oversized(model(capped), 2).numel() == 0 and capped[1:].tolist() == [10, 10, 10]


def test_partition_bad_inputs():
    with pytest.raises(ValueError, match="method"):
        partition([1.0, 2.0], 2, method="magic")
    with pytest.raises(ValueError, match=r"costs must be 1-D \(one cost per sample\), got shape \(2, 2\)"):
        partition([[1, 2], [3, 4]], 2)
    for world in (2.0, 0, True, "2"):
        with pytest.raises(ValueError, match="world_size must be an int >= 1"):
            partition([1.0, 2.0], world)
    with pytest.raises(ValueError, match="finite"):
        partition([1.0, float("nan")], 2)


def test_cost_model_fit_recovers_coefficients():
    true = CostModel(a=3.0, b=0.5)
    ranks = [[10, 20], [5, 50, 7], [100], [1, 2, 3, 4], [64, 64]]
    times = [float(true(r).sum()) for r in ranks]
    fitted = CostModel().fit(ranks, times)
    assert fitted.a == pytest.approx(3.0, rel=1e-6) and fitted.b == pytest.approx(0.5, rel=1e-6)
    shape = CostModel.from_model_shape(d_model=64, n_heads=2, n_layers=2)
    # the documented FLOPs, x3 for the backward: per token 10 d^2 + 4 d d_ff (d_ff = 4d), per pair 4 d
    assert shape.a == 2 * (10 * 64 * 64 + 4 * 64 * 256) * 3 and shape.b == 2 * 4 * 64 * 3
    with pytest.raises(ValueError):
        CostModel(a=0, b=0)


def test_cost_model_fit_is_the_best_non_negative_fit():
    """Times that fall with the linear term (a < 0 unconstrained): the fit is the best one with
    a = 0, i.e. b fitted to the quadratic term alone, not the unconstrained b with a clamped."""
    ranks = [[10, 20], [5, 50, 7], [100], [1, 2, 3, 4], [64, 64], [30]]
    sum_l = torch.tensor([float(sum(r)) for r in ranks], dtype=torch.float64)
    sum_l2 = torch.tensor([float(sum(v * v for v in r)) for r in ranks], dtype=torch.float64)
    times = 0.5 * sum_l2 - 4.0 * sum_l + 200.0 * torch.tensor([1.0, -1, 1, -1, 1, -1], dtype=torch.float64)
    fitted = CostModel().fit(ranks, times.tolist())
    assert fitted.a == 0.0
    assert fitted.b == pytest.approx(float(sum_l2 @ times / (sum_l2 @ sum_l2)), rel=1e-9)
    # no non-negative pair on a grid around it fits better
    def residual(a, b):
        return float((a * sum_l + b * sum_l2 - times).square().sum())
    best = residual(fitted.a, fitted.b)
    for a in torch.linspace(0, 1, 21).tolist():
        for b in torch.linspace(0.3, 0.7, 41).tolist():
            assert residual(a, b) >= best - 1e-6
    # times that fall with both terms cannot be fitted
    with pytest.raises(ValueError, match="do not grow with length"):
        CostModel().fit(ranks, (-times).tolist())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1", True, None])
def test_cost_model_coefficients_must_be_finite_numbers(bad):
    with pytest.raises(ValueError, match="cost coefficient a must be a finite real number"):
        CostModel(a=bad)
    with pytest.raises(ValueError, match="cost coefficient b must be a finite real number"):
        CostModel(b=bad)


def test_cost_model_fit_refuses_non_finite_times():
    with pytest.raises(ValueError, match="step_times must be finite"):
        CostModel().fit([[1, 2], [3]], [float("nan"), 1.0])
    with pytest.raises(ValueError, match="step_times must be finite"):
        CostModel().fit([[1, 2], [3]], [float("inf"), 1.0])


@pytest.mark.parametrize("bad", [-1, 2.5, float("nan")])
def test_cost_model_fit_checks_each_length(bad):
    """A negative length was fitted when its rank's sum stayed non-negative ([-1, 5] counted as a
    sum of 4 and squares of 26), a fractional one was truncated in the squares only, a NaN one
    failed in int() without naming the argument."""
    with pytest.raises(ValueError, match=r"rank_lengths\[1\] must hold non-negative integer lengths"):
        CostModel().fit([[3], [bad, 5], [4, 4]], [1.0, 2.0, 3.0])
    fitted = CostModel().fit([[3], [4.0, 5], [4, 4]], [1.0, 2.0, 3.0])  # integral floats are counts
    assert fitted.a >= 0 and fitted.b >= 0


def test_oversized_and_cost_model_check_their_arguments():
    """oversized(costs, 0) named no sample; negative lengths cost like positive ones
    (cost(-3) = cost(2) for a=b=1); from_model_shape's error named coefficients, not the argument."""
    with pytest.raises(ValueError, match="world_size must be an int >= 1, got 0"):
        oversized([1.0, 2.0], 0)
    with pytest.raises(ValueError, match="lengths must be non-negative"):
        CostModel(a=1.0, b=1.0)([-3, 2])
    with pytest.raises(ValueError, match="d_model must be an integer >= 1, got -4"):
        CostModel.from_model_shape(d_model=-4, n_heads=1, n_layers=1)
    assert CostModel.from_model_shape(d_model=4, n_heads=1, n_layers=1, d_ff=0).a > 0  # no feed-forward block
