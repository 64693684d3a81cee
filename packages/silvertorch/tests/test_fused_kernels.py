"""The small kernels that stand in for chains of eager ops around the IVF scoring kernel and in
`select_topk` (fewer launches per search), each against its PyTorch reference on odd shapes.
Run under TRITON_INTERPRET=1, where the CPU takes the Triton path."""

import pytest
import torch

from silvertorch import DenseMaskFilter, IVFIndex
from silvertorch.ivf.index import (
    _cluster_blocks_reference,
    _cluster_pairs,
    _prepare_queries,
    _prepare_queries_reference,
    _search_results,
    _search_results_reference,
)
from silvertorch.ivf.quantize import quantize_queries, quantize_rows
from silvertorch.topk import _select_two_level, select_topk_reference


def _same(got, want):
    """Equal values, dtypes and shapes, and the same sign of every zero."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)
    if got.is_floating_point():
        assert torch.equal(torch.signbit(got), torch.signbit(want))


def _queries(q, d, seed):
    """Random rows of mixed magnitudes, an all-zero row, tiny and huge values, and a row whose
    values / scale land exactly halfway between two codes (round half to even)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(q, d, generator=g) * torch.logspace(-3, 3, q).unsqueeze(1)
    if q > 1:
        x[1] = 0.0
    if q > 2:
        x[2] = 1e-30 * torch.randn(d, generator=g)
        x[2, 0] = 1e30 if d > 1 else x[2, 0]
    if q > 3 and d >= 6:  # scale 1: codes of x.5 values round to even
        x[3, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5])
    return x


@pytest.mark.parametrize("q, d, p", [(1, 1, 1), (3, 5, 2), (17, 130, 3), (33, 6, 70)])
def test_prepared_queries_equal_the_reference(q, d, p):
    x = _queries(q, d, q)
    n_clusters = 80
    sizes = torch.randint(0, 50, (n_clusters,), generator=torch.Generator().manual_seed(d))
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    clusters = torch.randint(0, n_clusters, (q, p), generator=torch.Generator().manual_seed(p))
    got = _prepare_queries(x, clusters, starts, sizes)
    want = _prepare_queries_reference(x, clusters, starts, sizes)
    for a, b in zip(got, want):
        _same(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_quantized_queries_equal_quantize_rows_in_any_dtype_and_layout(dtype):
    x = _queries(7, 40, 5).clamp(-6e4, 6e4).to(dtype).t().contiguous().t()  # Fortran-ordered
    for a, b in zip(quantize_queries(x), quantize_rows(x)):
        _same(a, b)
        assert a.is_contiguous()


@pytest.mark.parametrize("q, p, n_clusters", [(1, 1, 1), (1, 5, 9), (16, 4, 32), (17, 3, 2), (150, 10, 40)])
def test_cluster_major_schedule_equals_the_reference(q, p, n_clusters):
    """The schedule kernel's blocks (one program; 1,500 pairs span two of its chunks) are the
    PyTorch reference's: each cluster's run of the sorted pairs cut every 16 rows, spare blocks -1."""
    g = torch.Generator().manual_seed(q * p)
    clusters = torch.stack([torch.randperm(n_clusters, generator=g)[:p] for _ in range(q)]) if p <= n_clusters else None
    if clusters is None:
        clusters = torch.randint(0, n_clusters, (q, p), generator=g)
    pairs, sorted_clusters, block_cluster, block_row, n_blocks = _cluster_pairs(clusters, n_clusters, 16)
    want_cluster, want_row = _cluster_blocks_reference(sorted_clusters, n_clusters, 16, n_blocks)
    _same(block_cluster, want_cluster)
    _same(block_row, want_row)
    used = block_cluster >= 0  # every pair in exactly one block of its cluster
    covered = torch.zeros(q * p, dtype=torch.int64)
    for c, r in zip(block_cluster[used].tolist(), block_row[used].tolist()):
        rows = torch.arange(r, min(r + 16, q * p))
        rows = rows[sorted_clusters[rows] == c]
        covered[rows] += 1
    assert covered.eq(1).all()


@pytest.mark.parametrize("num_main, num_fresh, k, kk", [(50, 0, 7, 7), (50, 6, 9, 5), (0, 6, 4, 4), (20, 0, 30, 12)])
def test_search_results_equal_the_reference(num_main, num_fresh, k, kk):
    """Slots to positions and ids (main and fresh parts, -1 for none), padding past kk to k."""
    g = torch.Generator().manual_seed(k)
    q, p, L = 3, 2, 17
    starts = torch.randint(0, max(num_main - L, 1), (q, p), generator=g)
    main_slots = p * L if num_main else 1
    order = torch.randint(-1, main_slots + num_fresh, (q, kk), generator=g)
    if not num_main:  # no main item: its one (padding) slot is never selected
        order[order == 0] = -1
    top = torch.randn(q, kk, generator=g)
    ids = torch.randperm(1000, generator=g)[:num_main]
    fresh_ids = torch.arange(2000, 2000 + num_fresh)
    got = _search_results(top, order, starts, L, main_slots, ids, fresh_ids, num_main, k, 5)
    want = _search_results_reference(top, order, starts, L, main_slots, ids, fresh_ids, num_main, k, 5)
    for a, b in zip(got, want):
        _same(a, b)


def _tie_rows(seed, columns=3000):
    """Few distinct values (ties everywhere, signed zeros), a row short of candidates, one all ties."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-3, 3, (5, columns), generator=g).float()
    scores[0, ::3] = -0.0
    scores[1, 40:] = float("-inf")
    scores[2] = 1.0
    scores[3, ::5] = 7.0
    return scores


@pytest.mark.parametrize("tile_width", [None, 97, 1000])
@pytest.mark.parametrize("k", [1, 7, 39, 600, 3000])
def test_two_level_kernels_equal_the_fixed_shape_reference(monkeypatch, k, tile_width):
    """The two-level selection's keys and decode kernels give the PyTorch fixed-shape selection's
    values (zero signs included) and indices, and the stable sort's (k = M: no tie fix-up)."""
    scores = _tie_rows(k)
    got = _select_two_level(scores, k, tile_width=tile_width, fixed_shapes=True)
    monkeypatch.setenv("GKC_BACKEND", "reference")
    want = _select_two_level(scores, k, tile_width=tile_width, fixed_shapes=True)
    for a, b in zip(got, want):
        _same(a, b)
    reference = select_topk_reference(scores, k)
    assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1])


@pytest.mark.parametrize("n, max_length", [(1, 1), (100, 31), (1000, 70), (64, 64)])
def test_dense_mask_range_words_equal_the_reference(n, max_length):
    """Ranges anywhere (starting before 0 or past the end, empty, running past the mask's end)."""
    g = torch.Generator().manual_seed(n)
    q, r = 3, 5
    mask = torch.rand(q, n, generator=g) < 0.5
    starts = torch.randint(-40, n + 40, (q, r), generator=g)
    lengths = torch.randint(0, max_length + 1, (q, r), generator=g)
    got = DenseMaskFilter(mask).range_masks(starts, lengths, max_length)
    words = DenseMaskFilter(mask)
    want = words._range_masks_reference(words._packed_words(max(-(-max_length // 32), 1)), starts, lengths,
                                        max(-(-max_length // 32), 1))
    _same(got, want)


@pytest.mark.parametrize("num_queries", [1, 17])
def test_search_on_the_kernels_equals_the_reference_search(monkeypatch, num_queries):
    """End to end, fresh and removed items, filtered and not, nprobe 1 and all clusters, k past the
    candidates: the Triton path's results are the PyTorch reference's, bit for bit."""
    g = torch.Generator().manual_seed(num_queries)
    index = IVFIndex.build(torch.randn(600, 12, generator=g), n_clusters=5, iters=3)
    index.remove(torch.arange(0, 600, 11))
    index.add(torch.randn(9, 12, generator=g), torch.arange(900, 909))
    queries = torch.randn(num_queries, 12, generator=g)
    mask = torch.rand(num_queries, index.num_items, generator=g) < 0.2
    for nprobe, k, filters in [(1, 5, None), (5, 700, None), (2, 40, DenseMaskFilter(mask))]:
        results = []
        for backend in ("interpret", "reference"):
            monkeypatch.setenv("GKC_BACKEND", backend)
            results.append(index.search_with_stats(queries, k, nprobe, filters))
        for name in ("scores", "ids", "positions", "found", "nprobe", "fresh"):
            _same(getattr(results[0], name), getattr(results[1], name))
