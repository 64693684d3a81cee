import numpy as np
import pytest
import torch

from gpukernels_common import env
from silvertorch.topk import (
    _radix_threshold_torch,
    _radix_threshold_triton,
    _select_two_level,
    order_preserving_keys,
    select_topk,
    select_topk_reference,
)

METHODS = ["sort", "two_level", "radix", "auto"]
NEG_INF = float("-inf")


def _random(rows, columns, seed=0):
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))


def _few_values(rows, columns, seed=1):
    """Many exact ties: scores rounded to five values, signed zeros included."""
    scores = torch.randint(-2, 3, (rows, columns), generator=torch.Generator().manual_seed(seed)).float() * 0.5
    scores[0, ::7] = -0.0
    return scores


def _with_missing(rows, columns, seed=2):
    """Half the scores missing (-inf), one row with none at all, one +inf."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, columns, generator=g)
    scores[torch.rand(rows, columns, generator=g) < 0.5] = NEG_INF
    scores[1] = NEG_INF
    scores[0, 3] = float("inf")
    return scores


def _assert_same_as_reference(scores, k, method):
    values, indices = select_topk(scores, k, method)
    ref_values, ref_indices = select_topk_reference(scores, k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == indices.shape == (scores.shape[0], k)
    assert torch.equal(values, ref_values)
    assert torch.equal(indices, ref_indices)
    return values, indices


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "make, rows, columns, k",
    [
        (_random, 3, 1000, 1),
        (_random, 3, 1000, 37),
        (_random, 3, 4097, 4097),  # k = M
        (_random, 2, 9000, 300),  # auto picks two_level (tiles: test_two_level_tiles)
        (_random, 2, 9000, 5000),  # auto picks radix
        (_few_values, 3, 4097, 1),
        (_few_values, 3, 4097, 1000),
        (_few_values, 2, 9000, 4500),
        (_with_missing, 3, 1000, 700),  # k above the finite count of every row
        (_with_missing, 3, 4097, 5),
    ],
    ids=["rand-k1", "rand-k37", "rand-kM", "rand-tiles", "rand-bigk", "ties-k1", "ties-k1000", "ties-bigk",
         "missing-k700", "missing-k5"],
)
def test_matches_reference(method, make, rows, columns, k):
    _assert_same_as_reference(make(rows, columns), k, method)


def test_reference_semantics():
    scores = torch.tensor([[1.0, 3.0, NEG_INF, 3.0, -0.0, 0.0], [NEG_INF] * 6])
    values, indices = select_topk_reference(scores, 5)
    assert values[0].tolist() == [3.0, 3.0, 1.0, 0.0, 0.0]
    assert indices.tolist() == [[1, 3, 0, 4, 5], [-1] * 5]
    assert torch.isneginf(values[1]).all()


@pytest.mark.parametrize("method", ["two_level", "radix"])
def test_missing_slots_and_ties_at_threshold(method):
    scores = torch.full((2, 3000), NEG_INF)
    scores[0, 100:200] = 2.0  # 100 ties, only some fit
    scores[0, 2500] = 5.0
    scores[1, 1:2999:2] = 1.0
    values, indices = _assert_same_as_reference(scores, 40, method)
    assert indices[0].tolist() == [2500] + list(range(100, 139))
    values, indices = _assert_same_as_reference(scores, 1600, method)
    assert (indices[1, 1499:] == -1).all() and (indices[1, :1499] >= 0).all()


@pytest.mark.parametrize("method", ["two_level", "radix"])
def test_rows_short_of_candidates_beside_rows_with_ties(method):
    """A row with fewer than k candidates (its k-th value is -inf) in one batch with rows whose
    k-th value is a finite tie spread over every tile: those ties still come in index order."""
    scores = torch.full((3, 5000), NEG_INF)
    scores[0, ::7] = 1.0  # 715 ties, about 146 per 1024-column tile, more than k
    scores[0, 4999] = 3.0
    scores[1, 10:30] = torch.arange(20.0)  # 20 candidates for k = 50
    scores[2] = torch.randn(5000, generator=torch.Generator().manual_seed(1)).round()  # ties at every integer
    values, indices = _assert_same_as_reference(scores, 50, method)
    assert indices[0].tolist() == [4999] + list(range(0, 49 * 7, 7))
    assert indices[1, :20].tolist() == list(range(29, 9, -1)) and (indices[1, 20:] == -1).all()


@pytest.mark.parametrize("tile_width", [5, 64, 1000])
@pytest.mark.parametrize("make", [_random, _few_values, _with_missing], ids=["rand", "ties", "missing"])
@pytest.mark.parametrize("k", [1, 4, 63, 300])
def test_two_level_tiles(make, k, tile_width):
    """The GPUs' tiled two-level selection, run on the CPU (which uses one tile per row): a tile
    whose k + 1 winners are all ties at T, rows short of candidates, a ragged last tile."""
    scores = make(3, 1003)
    scores[2, :400] = 1.25  # a tie spanning tiles, ahead of the row's other scores for small k
    values, indices = _select_two_level(scores, k, tile_width=tile_width)
    ref_values, ref_indices = select_topk_reference(scores, k)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)


def test_accepts_half_precision_and_empty_batch():
    scores = _random(2, 500).half()
    _assert_same_as_reference(scores, 50, "radix")
    values, indices = select_topk(torch.empty(0, 10), 3)
    assert values.shape == indices.shape == (0, 3)


def test_order_preserving_keys():
    scores = torch.tensor([[NEG_INF, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf")]])
    keys = order_preserving_keys(scores)[0].tolist()
    assert keys[3] == keys[4]  # -0.0 and 0.0 tie
    distinct = keys[:4] + keys[5:]
    assert all(a < b for a, b in zip(distinct, distinct[1:]))


@pytest.mark.skipif(not env.triton_interpret(), reason="the Triton histogram runs on CPU only with TRITON_INTERPRET=1")
@pytest.mark.parametrize("make", [_random, _few_values, _with_missing])
def test_triton_histogram_threshold_matches_torch(make):
    keys = order_preserving_keys(make(3, 5000))
    for k in (1, 777, 5000):
        expected = _radix_threshold_torch(keys, k)
        got = _radix_threshold_triton(keys, k)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "scores, k, match",
    [
        (torch.zeros(2, 10), 0, "k must be >= 1"),
        (torch.zeros(2, 10), 11, r"k=11 .*M=10"),
        (torch.tensor([[0.0, float("nan"), 1.0]]), 1, "scores contain NaN"),
        (torch.zeros(10), 1, "scores must be 2-D"),
        (torch.zeros(2, 10, dtype=torch.int32), 1, "scores must be a float"),
        (torch.zeros(2, 10, dtype=torch.float64), 1, "scores must be a float"),
        ([[1.0, 2.0]], 1, "scores must be a torch.Tensor"),
        (torch.zeros(2, 10), 2.0, "k must be an int"),
    ],
    ids=["k0", "k-above-M", "nan", "1-d", "int", "float64", "list", "float-k"],
)
@pytest.mark.parametrize("method", METHODS)
def test_invalid_arguments(scores, k, match, method):
    with pytest.raises(ValueError, match=match):
        select_topk(scores, k, method)


@pytest.mark.parametrize("method", METHODS)
def test_k_as_numpy_int_matches_python_int(method):
    """k arrives as a numpy integer from array code (np.int64 from a config array): the same
    selection as the Python int; bools are refused like floats."""
    scores = _random(3, 600)
    want = select_topk(scores, 17, method)
    got = select_topk(scores, np.int64(17), method)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="k must be an int, got bool"):
        select_topk(scores, True, method)


def test_unknown_method():
    with pytest.raises(ValueError, match="method must be one of"):
        select_topk(torch.zeros(1, 4), 1, "heap")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_methods_on_device_match_cpu_reference(device):
    """Every method on `device` (on CUDA: torch.topk tiles and the compiled Triton histogram
    kernel) against the CPU reference, on ties, missing candidates and long rows."""
    for make, rows, columns in ((_random, 3, 20_000), (_few_values, 2, 9000), (_with_missing, 3, 5000)):
        scores = make(rows, columns)
        for k in (1, 100, 4096, columns // 2):
            want = select_topk_reference(scores, k)
            for method in ("two_level", "radix", "auto"):
                got = select_topk(scores.to(device), k, method)
                assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1]), (make.__name__, k, method)
