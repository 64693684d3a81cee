import pytest
import torch

from gpukernels_common.testing import CanaryBuffer
from silvertorch import BloomIndex, DenseMaskFilter, FlatIndex, IVFIndex, parse_filters
from silvertorch.filtering import count_bits, count_row_bits, pack_bits, unpack_bits
from silvertorch.ivf import index as ivf_index
from silvertorch.ivf.index import int8_matmul


def _data(n=4000, d=64, centers=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=g) * 3
    x = c[torch.randint(0, centers, (n,), generator=g)] + torch.randn(n, d, generator=g)
    return x, torch.randn(6, d, generator=g) * 2


def _gaussian_clusters(seed, n=6000, d=32, centers=64, n_queries=40):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=g)
    x = c[torch.randint(0, centers, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    q = c[torch.randint(0, centers, (n_queries,), generator=g)] + 0.5 * torch.randn(n_queries, d, generator=g)
    return x, q


INDEX_X, QUERIES = _data()
INDEX = IVFIndex.build(INDEX_X, ids=torch.arange(10_000, 14_000), n_clusters=16)


def _exact_over_probed(index, x, q, nprobe, k, mask=None):
    clusters = index.probe(q, nprobe)
    xs = x[index.order]
    out = []
    for i in range(q.shape[0]):
        allowed = torch.zeros(index.num_items, dtype=torch.bool)
        for c in clusters[i]:
            allowed[index.offsets[c] : index.offsets[c + 1]] = True
        if mask is not None:
            allowed &= mask[i]
        s = (xs @ q[i]).masked_fill(~allowed, float("-inf"))
        top = torch.topk(s, k).indices
        out.append(set(index.ids[top[torch.isfinite(s[top])]].tolist()))
    return out


@pytest.mark.parametrize("d", [64, 128])
def test_int8_recall_against_fp32_over_same_clusters(d):
    x, q = _gaussian_clusters(0, n=4000, d=d, centers=32, n_queries=6)  # queries drawn like the items
    index = IVFIndex.build(x, n_clusters=16)
    r = index.search_with_stats(q, k=100, nprobe=4)
    truth = _exact_over_probed(index, x, q, 4, 100)
    recall = sum(len(t & set(r.ids[i].tolist())) for i, t in enumerate(truth)) / sum(len(t) for t in truth)
    assert recall >= 0.99, recall
    assert (r.scores[:, :-1] >= r.scores[:, 1:]).all()
    # queries unlike any item (random directions) see flatter scores and more int8 rank swaps
    r = INDEX.search_with_stats(QUERIES, k=100, nprobe=4)
    truth = _exact_over_probed(INDEX, INDEX_X, QUERIES, 4, 100)
    assert sum(len(t & set(r.ids[i].tolist())) for i, t in enumerate(truth)) / sum(len(t) for t in truth) >= 0.98


@pytest.mark.parametrize("schedule", ["query", "cluster"])
@pytest.mark.parametrize("blocked", [False, True])  # the reference scales each cluster's block / the whole buffer
def test_kernel_and_reference_give_same_candidates(monkeypatch, schedule, blocked):
    if blocked:
        monkeypatch.setattr(ivf_index, "BLOCKED_SCORES_MIN_BYTES", 0)
    mask = torch.rand(6, INDEX.num_items, generator=torch.Generator().manual_seed(1)) < 0.3
    clusters = INDEX.probe(QUERIES, 3)
    clusters[1] = clusters[0]  # two queries probing the same clusters share a cluster-major block
    monkeypatch.setenv("GKC_BACKEND", "reference")
    ref, pos = INDEX.candidate_scores(QUERIES, clusters, DenseMaskFilter(mask))
    monkeypatch.setenv("GKC_BACKEND", "interpret")
    canary = CanaryBuffer(ref.shape)  # NaN-poisoned output inside canary padding
    tri, pos2 = INDEX.candidate_scores(QUERIES, clusters, DenseMaskFilter(mask), out=canary.tensor, schedule=schedule)
    canary.check("candidate scores")
    assert tri is canary.tensor and not tri.isnan().any()
    assert torch.equal(pos, pos2)
    assert torch.equal(torch.isfinite(ref), torch.isfinite(tri))
    torch.testing.assert_close(tri, ref, rtol=0, atol=0)
    kept = torch.isfinite(ref)
    assert mask.gather(1, pos.clamp(max=INDEX.num_items - 1))[kept].all()  # filtered items never scored


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_k_above_candidates_and_filter_matching_nothing(monkeypatch, backend):
    monkeypatch.setenv("GKC_BACKEND", backend)
    r = INDEX.search_with_stats(QUERIES[:2], k=5000, nprobe=2)
    assert (r.ids >= 0).sum(1).tolist() == r.found.tolist() and (r.ids[:, -1] == -1).all()
    none = DenseMaskFilter(torch.zeros(2, INDEX.num_items, dtype=torch.bool))
    absent = BloomIndex.build(torch.ones(INDEX.num_items, dtype=torch.long), torch.arange(INDEX.num_items + 1),
                              torch.zeros(INDEX.num_items, dtype=torch.long)).filter(parse_filters(["2:1", "1:7"]))
    flat = FlatIndex.build(INDEX_X[:300])
    for index, nprobe, filters in ((INDEX, 16, none), (INDEX, 4, absent), (flat, 1, DenseMaskFilter(torch.zeros(2, 300, dtype=torch.bool)))):
        r = index.search_with_stats(QUERIES[:2], k=10, nprobe=nprobe, filters=filters)
        assert (r.ids == -1).all() and torch.isinf(r.scores).all() and (r.found == 0).all()


def test_a_dense_mask_edited_in_place_filters_by_its_new_bits():
    flat = FlatIndex.build(INDEX_X[:300])
    allowed = DenseMaskFilter(torch.ones(2, 300, dtype=torch.bool))
    assert (flat.search(QUERIES[:2], k=5, filters=allowed)[1] >= 0).all()  # packs the mask
    allowed.mask[:] = False
    assert (flat.search(QUERIES[:2], k=5, filters=allowed)[1] == -1).all()
    allowed.mask = torch.zeros(2, 300, dtype=torch.bool)
    allowed.mask[:, 7] = True
    assert flat.search(QUERIES[:2], k=5, filters=allowed)[1][:, 0].tolist() == [7, 7]


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_index_emptied_by_compact_searches_its_fresh_items(monkeypatch, backend):
    monkeypatch.setenv("GKC_BACKEND", backend)
    x, q = _data(n=40, d=8, centers=2, seed=5)
    index = IVFIndex.build(x, n_clusters=2)
    index.remove(index.ids)
    index.compact()
    assert index.num_main == 0 and (index.search(q, k=3, nprobe=2)[1] == -1).all()
    index.add(x[:2], ids=torch.tensor([7, 8]))
    ids = index.search(q, k=3, nprobe=2)[1]
    assert (ids[:, :2].sort(1).values == torch.tensor([7, 8])).all() and (ids[:, 2] == -1).all()


def test_adaptive_probe_widens_for_selective_filters():
    mask = torch.zeros(6, INDEX.num_items, dtype=torch.bool)
    mask[:, ::997] = True  # 0.1% of the items pass
    fixed = INDEX.search_with_stats(QUERIES, k=4, nprobe=1, filters=DenseMaskFilter(mask))
    wide = INDEX.search_with_stats(QUERIES, k=4, nprobe=1, filters=DenseMaskFilter(mask), adaptive=True)
    assert (wide.found >= 4).all() and (wide.found >= fixed.found).all() and (wide.nprobe > 1).any()


@pytest.mark.parametrize("b_multiplier", [8, 1.2])  # a weak Bloom index: many false positives to replace
def test_bloom_filter_in_the_loop(b_multiplier):
    g = torch.Generator().manual_seed(2)
    cat = torch.randint(0, 5, (INDEX.num_items,), generator=g)  # attribute per stored position
    bloom = BloomIndex.build(torch.ones(INDEX.num_items, dtype=torch.long), torch.arange(INDEX.num_items + 1), cat, k=3,
                             b_multiplier=b_multiplier)
    plans = parse_filters(["1:2", "1:2", "NOT 1:2", "1:1 OR 1:2", "1:9", "1:3 AND NOT 1:4"])
    r = INDEX.search_with_stats(QUERIES, k=20, nprobe=4, filters=bloom.filter(plans))
    exact = torch.stack([cat == 2, cat == 2, cat != 2, (cat == 1) | (cat == 2), cat == 9, cat == 3])
    e = INDEX.search_with_stats(QUERIES, k=20, nprobe=4, filters=DenseMaskFilter(exact))
    # the Bloom words pass a superset; the winners are verified, so the results are the exact search's
    assert torch.equal(r.ids, e.ids) and torch.equal(r.scores, e.scores)
    assert (r.found >= e.found).all()


def test_empty_cluster_remove_save_load(tmp_path):
    x, q = _data(n=300, d=32, centers=4, seed=3)
    idx = IVFIndex.build(x, n_clusters=4)
    offsets = torch.cat([idx.offsets[:2], idx.offsets[1:]])  # insert an empty cluster
    centroids = torch.cat([idx.centroids[:1], torch.full_like(idx.centroids[:1], 100.0), idx.centroids[1:]])
    holed = IVFIndex(centroids, offsets, idx.codes, idx.scales, idx.ids, idx.order)
    r = holed.search_with_stats(q, k=10, nprobe=2)  # the empty cluster scores highest for some queries
    assert (r.found >= 0).all()
    best = idx.search(q, k=3, nprobe=4)[1][:, 0]
    assert idx.remove(best) >= 1
    after = idx.search(q, k=10, nprobe=4)[1]
    assert not torch.isin(after, best).any()
    back = IVFIndex.load(idx.save(tmp_path / "ivf.safetensors"))
    assert torch.equal(back.search(q, k=10, nprobe=4)[1], after)
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable"):
        IVFIndex.load(tmp_path / "x.safetensors")


def test_flat_index_is_exact_up_to_int8():
    x, q = _data(n=500, d=32, seed=4)
    flat = FlatIndex.build(x)
    ids = flat.search(q, k=10)[1]
    exact = torch.topk(q @ x.T, 10).indices
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, exact)) / exact.numel()
    assert overlap >= 0.9


@pytest.mark.parametrize("backend", ["reference", "interpret"])
@pytest.mark.parametrize("filtered", [False, True])
@pytest.mark.parametrize("removed", [False, True])
def test_found_counts_the_candidates_that_pass(monkeypatch, backend, filtered, removed):
    """`found` comes from the filter words (or the cluster lengths), not from the scores: it must
    equal the finite candidate scores of the same search, deleted items and fresh ones included."""
    monkeypatch.setenv("GKC_BACKEND", backend)
    x, q = _gaussian_clusters(8, n=1200, d=24, centers=8, n_queries=5)
    index = IVFIndex.build(x[:1100], n_clusters=8)
    index.add(x[1100:], ids=torch.arange(5000, 5100))
    if removed:
        index.remove(torch.cat([torch.arange(0, 1100, 3), torch.arange(5000, 5100, 4)]))
    mask = torch.rand(5, index.num_items, generator=torch.Generator().manual_seed(3)) < 0.4
    filters = DenseMaskFilter(mask) if filtered else None
    clusters = index.probe(q, 3)
    scores, _ = index.candidate_scores(q, clusters, filters)
    fresh = ~index.fresh_removed & (mask[:, index.num_main:] if filtered else True)
    r = index.search_with_stats(q, k=2000, nprobe=3, filters=filters)
    assert r.found.tolist() == (torch.isfinite(scores).sum(1) + fresh.sum(-1)).tolist()
    assert r.found.tolist() == (r.ids >= 0).sum(1).tolist()


@pytest.mark.parametrize("density", [0.02, 0.3, "bloom"])
def test_reference_scores_only_passing_items_as_the_padded_layout_would(monkeypatch, density):
    """Under a filter the reference scores only the passing items (compacted per query); forced
    on and off it must give the same search: scores, positions, ties (duplicated rows), found,
    with deleted and fresh items and adaptive widening; dense masks and Bloom filters."""
    import silvertorch.ivf.index as ivf_index

    monkeypatch.setenv("GKC_BACKEND", "reference")
    x, q = _gaussian_clusters(9, n=1500, d=20, centers=10, n_queries=7)
    x[100:140] = x[50]  # exact ties
    index = IVFIndex.build(x[:1400], n_clusters=10)
    index.add(x[1400:], ids=torch.arange(9000, 9100))
    index.remove(torch.cat([torch.arange(0, 1400, 11), torch.tensor([9003])]))
    if density == "bloom":  # one attribute (1, value 0..4) per stored position; query 3 matches nothing
        cat = torch.randint(0, 5, (index.num_items,), generator=torch.Generator().manual_seed(5))
        bloom = BloomIndex.build(torch.ones(index.num_items, dtype=torch.long), torch.arange(index.num_items + 1), cat,
                                 k=3, b_multiplier=8)
        filters = bloom.filter(parse_filters(["1:2", "1:{1,3}", "NOT 1:4", "1:7", "", "1:0 OR 1:2", "1:1"]))
    else:
        mask = torch.rand(7, index.num_items, generator=torch.Generator().manual_seed(5)) < density
        mask[:, index.order.argsort()[100:140]] = True  # the tied rows pass
        mask[3] = False  # a query that keeps nothing
        filters = DenseMaskFilter(mask)
    results = {}
    # the passing items' rows in one gather, and gathered per query
    for name, cost, gather_bytes in (("passing", 0, 2**62), ("passing, per query", 0, 0), ("padded", 10**9, 2**62)):
        monkeypatch.setattr(ivf_index, "PASSING_SLOT_COST", cost)
        monkeypatch.setattr(ivf_index, "PER_QUERY_GATHER_MIN_BYTES", gather_bytes)
        results[name] = [index.search_with_stats(q, k=k, nprobe=3, filters=filters, adaptive=adaptive)
                         for k, adaptive in ((5, False), (60, False), (400, True))]
    for passing in ("passing", "passing, per query"):
        for a, b in zip(results[passing], results["padded"]):
            for field in ("scores", "ids", "positions", "found", "nprobe", "fresh"):
                assert torch.equal(getattr(a, field), getattr(b, field)), (passing, field)
    if density != "bloom":  # (a Bloom filter may let a false positive through)
        assert (results["passing"][1].found[3] == 0) and (results["passing"][1].ids[3] == -1).all()


def test_dense_mask_range_masks():
    """Word w, bit b of range r is mask[q, starts[q, r] + 32 w + b] while inside the range (and
    the mask), else 0: odd starts and lengths, a range reaching the end, an empty one."""
    g = torch.Generator().manual_seed(6)
    mask = torch.rand(3, 203, generator=g) < 0.6
    starts = torch.tensor([[0, 31, 33, 190], [64, 1, 202, 203], [100, 7, 0, 150]])
    lengths = torch.tensor([[70, 1, 0, 13], [65, 96, 1, 0], [103, 32, 203, 53]])
    got = DenseMaskFilter(mask).range_masks(starts, lengths, 203)
    expected = torch.zeros(3, 4, 224, dtype=torch.bool)
    for q in range(3):
        for r in range(4):
            s, n = int(starts[q, r]), int(lengths[q, r])
            expected[q, r, :n] = mask[q, s:s + n]
    assert got.dtype == torch.int32 and got.shape == (3, 4, 7)
    assert torch.equal(got, pack_bits(expected))


@pytest.mark.parametrize("kind", ["dense", "bloom"])
def test_adaptive_search_reruns_only_short_queries_as_alone(kind):
    """Adaptive widening re-runs only the queries short of k passing items, with their own rows of
    the filter (`select`): the batch's results equal each query searched alone."""
    x, q = _gaussian_clusters(10, n=2000, d=16, centers=12, n_queries=6)
    index = IVFIndex.build(x, n_clusters=12)
    g = torch.Generator().manual_seed(7)
    if kind == "bloom":
        cat = torch.randint(0, 40, (index.num_items,), generator=g)
        bloom = BloomIndex.build(torch.ones(index.num_items, dtype=torch.long), torch.arange(index.num_items + 1), cat, k=3,
                                 b_multiplier=8)
        filters = bloom.filter(parse_filters(["1:3", "", "1:{1,2,3,4}", "1:39", "NOT 1:0", "1:5 | 1:6"]))
    else:
        rate = torch.tensor([0.01, 1.0, 0.2, 0.003, 0.9, 0.05]).unsqueeze(1)
        filters = DenseMaskFilter(torch.rand(6, index.num_items, generator=g) < rate)
    batch = index.search_with_stats(q, k=40, nprobe=1, filters=filters, adaptive=True)
    assert len(set(batch.nprobe.tolist())) > 1  # some queries widened further than others
    for i in range(6):
        alone = index.search_with_stats(q[i:i + 1], k=40, nprobe=1, filters=filters.select(torch.tensor([i])), adaptive=True)
        for field in ("scores", "ids", "found", "nprobe"):
            assert torch.equal(getattr(batch, field)[i:i + 1], getattr(alone, field)), (i, field)


def test_filters_select_rows():
    g = torch.Generator().manual_seed(8)
    mask = torch.rand(5, 300, generator=g) < 0.5
    rows = torch.tensor([4, 1, 1])
    starts, lengths = torch.tensor([[3, 250]] * 5), torch.tensor([[40, 50]] * 5)
    dense = DenseMaskFilter(mask)
    assert torch.equal(dense.select(rows).range_masks(starts[:3], lengths[:3], 64), dense.range_masks(starts, lengths, 64)[rows])
    cat = torch.randint(0, 4, (300,), generator=g)
    bloom = BloomIndex.build(torch.ones(300, dtype=torch.long), torch.arange(301), cat, k=3, b_multiplier=8)
    filters = bloom.filter(parse_filters(["1:0", "1:1", "", "NOT 1:2", "1:{0,3}"]))
    picked = filters.select(rows)
    assert picked.num_queries == 3 and picked.plans.expressions == [filters.plans.expressions[i] for i in (4, 1, 1)]
    assert torch.equal(picked.range_masks(starts[:3], lengths[:3], 64), filters.range_masks(starts, lengths, 64)[rows])


@pytest.mark.parametrize("q, d, r", [(3, 1, 5), (1, 1, 1), (1, 2, 9), (4, 7, 1), (17, 128, 3)])
def test_int8_matmul_is_exact(q, d, r):
    """Exact int32 dot products at every shape, D = 1 included (where _int_mm on the CPU is not)."""
    g = torch.Generator().manual_seed(d)
    a = torch.randint(-127, 128, (q, d), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (r, d), dtype=torch.int8, generator=g)
    got = int8_matmul(a, b)
    assert got.dtype == torch.int32 and torch.equal(got.long(), a.long() @ b.long().T)


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_one_dimensional_embeddings_search_exactly(monkeypatch, backend):
    monkeypatch.setenv("GKC_BACKEND", backend)
    x, q = torch.randn(300, 1, generator=torch.Generator().manual_seed(9)), torch.tensor([[1.0], [-0.5]])
    index = IVFIndex.build(x, n_clusters=3)
    scores, ids = index.search(q, k=5, nprobe=3)
    exact = (q @ x.T).topk(5)
    torch.testing.assert_close(scores, exact.values, rtol=0.02, atol=0.02)  # int8: scales to 1/127


def test_count_bits():
    m = torch.rand(4, 3, 100) < 0.5
    m[0, 0] = True  # every bit of a word set, the sign bit included
    assert torch.equal(count_bits(pack_bits(m)), m.sum(-1))


def test_pack_unpack_roundtrip():
    m = torch.rand(3, 70) < 0.5
    assert torch.equal(unpack_bits(pack_bits(m), 70), m)


def test_pack_bits_layout():
    """LSB first, 32 items a word, bit 31 as the int32 sign bit; what the kernels read."""
    m = torch.zeros(2, 33, dtype=torch.bool)
    m[0, [0, 5, 16, 31, 32]] = True
    m[1] = True
    expected = torch.tensor([[1 + 2**5 + 2**16 - 2**31, 1], [-1, 1]], dtype=torch.int32)
    assert torch.equal(pack_bits(m), expected)
    assert torch.equal(unpack_bits(expected, 33), m)
    assert torch.equal(pack_bits(torch.zeros(4, 0, dtype=torch.bool)), torch.zeros(4, 1, dtype=torch.int32))


def test_default_nprobe_fits_an_index_of_few_clusters():
    # the default (8) used to exceed a 4-cluster index and raise; it is capped at n_clusters, so
    # it probes every cluster there
    x, q = INDEX_X[:400], QUERIES
    index = IVFIndex.build(x, n_clusters=4)
    r = index.search_with_stats(q, k=5)
    assert (r.nprobe == 4).all()
    assert torch.equal(r.ids, index.search_with_stats(q, k=5, nprobe=4).ids)
    exact = torch.topk(q @ x.T, 5, dim=1).indices
    assert torch.isin(r.ids[:, 0], exact[:, :2]).all()  # every item was scored (int8 may swap near ties)
    scores, ids = index.search(q, 5)
    assert torch.equal(ids, r.ids) and torch.equal(scores, r.scores)
    assert (index.search_with_stats(q, k=5, adaptive=True).nprobe == 4).all()
    # an explicit nprobe beyond the clusters stays an error naming it (as RetrievalModel.build)
    with pytest.raises(ValueError, match=r"nprobe must be in \[1, n_clusters=4\], got 5"):
        index.search(q, 5, nprobe=5)
    # the default on a larger index is still 8
    assert (INDEX.search_with_stats(QUERIES, k=5).nprobe == 8).all()


def test_max_nprobe_below_nprobe_is_refused():
    # it was taken silently: the widening never ran and nprobe clusters were probed
    with pytest.raises(ValueError, match=r"max_nprobe must be >= nprobe=8 .*got 2"):
        INDEX.search_with_stats(QUERIES, k=5, nprobe=8, adaptive=True, max_nprobe=2)
    r = INDEX.search_with_stats(QUERIES, k=5, nprobe=2, adaptive=True, max_nprobe=2)
    assert (r.nprobe == 2).all()


@pytest.mark.parametrize(
    "call, match",
    [(lambda: INDEX.search(torch.full((1, 64), float("nan")), 5), "NaN"),
     (lambda: INDEX.search(torch.randn(1, 63), 5), r"\[num_queries, 64\]"),
     (lambda: INDEX.search(torch.randn(1, 64), 0), "k must be"),
     (lambda: INDEX.search(torch.randn(1, 64), 5, nprobe=99), "nprobe"),
     (lambda: INDEX.search(torch.randn(2, 64), 5, filters=DenseMaskFilter(torch.ones(1, INDEX.num_items, dtype=torch.bool))), "filters cover"),
     (lambda: IVFIndex.build(torch.randn(10, 4), n_clusters=11), "n_clusters"),
     (lambda: IVFIndex.build(torch.randn(10, 4), n_clusters=2.5), "n_clusters must be an int"),  # were TypeErrors
     (lambda: IVFIndex.build(torch.randn(10, 4), n_clusters=True), "n_clusters must be an int"),  # naming no argument
     (lambda: IVFIndex.build(torch.randn(10, 4), n_clusters=2, iters=2.5), "iters must be an int"),
     (lambda: IVFIndex.build(torch.randn(10, 4), dtype="fp8"), "int8"),
     (lambda: IVFIndex.build(torch.randn(10, 4), ids=torch.zeros(10), n_clusters=2), "ids must be 10 integers"),
     (lambda: IVFIndex.build(torch.randn(10, 4), ids=torch.arange(10) % 9, n_clusters=2), "distinct"),
     (lambda: FlatIndex.build(torch.randn(10, 4), ids=torch.arange(10) - 1), "non-negative"),
     (lambda: FlatIndex.build(torch.randn(10, 4), ids=torch.arange(3)), r"ids must be 10 integers .* \(3,\)"),
     (lambda: INDEX.search(QUERIES[:1], 5, filters=DenseMaskFilter(torch.ones(1, 10, dtype=torch.bool))), "cover 10 item positions")],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_file_loads_as_the_index_class_that_wrote_it(tmp_path):
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    FlatIndex.build(x, dtype="bfloat16").save(tmp_path / "flat.safetensors")
    IVFIndex.build(x, n_clusters=3).save(tmp_path / "ivf.safetensors")
    with pytest.raises(ValueError, match="not a silvertorch IVFIndex file"):
        IVFIndex.load(tmp_path / "flat.safetensors")
    with pytest.raises(ValueError, match="not a silvertorch FlatIndex file"):
        FlatIndex.load(tmp_path / "ivf.safetensors")
    assert FlatIndex.load(tmp_path / "flat.safetensors").codes.dtype == torch.bfloat16


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_kmeans_assigns_each_point_its_best_centroid(metric):
    from silvertorch.ivf import kmeans

    x, _ = _gaussian_clusters(3, n=1500, d=16, centers=20)
    centroids, assign = kmeans(x, 10, iters=30, metric=metric)
    assert centroids.shape == (10, 16) and assign.shape == (1500,)
    s = x @ centroids.T if metric == "ip" else -torch.cdist(x, centroids)
    assert torch.equal(s.argmax(1), assign)
    assert torch.bincount(assign, minlength=10).min() > 0  # no empty cluster left
    if metric == "ip":
        torch.testing.assert_close(centroids.norm(dim=1), torch.ones(10))


@pytest.mark.parametrize("seed", [0, 1])
def test_ip_partition_keeps_top_items_in_the_probed_clusters(seed):
    """Clusters formed by inner product hold each query's top items in the few clusters its
    centroid inner products rank first; L2 clusters probed that way do not (0.83-0.88 here)."""
    from silvertorch.ivf import kmeans

    x, q = _gaussian_clusters(seed)
    top = torch.topk(q @ x.T, 50, dim=1).indices

    def coverage(metric):
        centroids, assign = kmeans(x, 32, metric=metric, seed=seed)
        probed = torch.topk(q @ centroids.T, 2, dim=1).indices
        return float((assign[top].unsqueeze(-1) == probed.unsqueeze(1)).any(-1).float().mean())

    ip, l2 = coverage("ip"), coverage("l2")
    assert ip >= 0.98 and ip > l2 + 0.05, (ip, l2)
    index = IVFIndex.build(x, n_clusters=32, seed=seed)  # the index clusters by inner product
    centroids, _ = kmeans(x, 32, metric="ip", seed=seed)
    torch.testing.assert_close(index.centroids, centroids)


def test_kmeans_bad_arguments():
    from silvertorch.ivf import kmeans

    with pytest.raises(ValueError, match="metric"):
        kmeans(torch.randn(10, 4), 2, metric="cosine")
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans(torch.randn(10, 4), 11)


@pytest.mark.parametrize("cls", [IVFIndex, FlatIndex])
def test_fresh_items_are_merged_tagged_filtered_saved_and_compacted(cls, tmp_path):
    x, q = _gaussian_clusters(4, n=600, d=32, centers=12, n_queries=8)
    index = cls.build(x[:500], ids=torch.arange(500), n_clusters=8) if cls is IVFIndex else cls.build(x[:500], ids=torch.arange(500))
    index.remove([3])
    index.add(x[500:], ids=torch.arange(1000, 1100))
    assert (index.num_main, index.num_fresh, index.num_items) == (500, 100, 600)
    everyone = torch.cat([torch.arange(500), torch.arange(1000, 1100)])
    nprobe = index.n_clusters  # every cluster + the fresh part = exhaustive int8 search
    r = index.search_with_stats(q, k=50, nprobe=nprobe)
    truth = everyone[torch.topk((q @ x.T).masked_fill(torch.arange(600) == 3, float("-inf")), 50, dim=1).indices]
    assert sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(r.ids, truth)) / truth.numel() >= 0.97
    assert torch.equal(r.fresh, r.ids >= 1000) and not (r.ids == 3).any()
    near = index.search_with_stats(x[550:560], k=1, nprobe=nprobe)  # queries next to added items
    best = everyone[(x[550:560] @ x.T).masked_fill(torch.arange(600) == 3, float("-inf")).argmax(1)]
    assert (near.ids[:, 0] == best).float().mean() >= 0.9 and near.fresh.any()
    # a filter over positions covers the fresh ones (num_main + j): keep fresh items with even ids only
    mask = torch.zeros(8, 600, dtype=torch.bool)
    mask[:, 500:] = torch.arange(1000, 1100) % 2 == 0
    f = index.search_with_stats(q, k=60, nprobe=nprobe, filters=DenseMaskFilter(mask))
    kept = f.ids[f.ids >= 0]
    assert (f.found == 50).all() and ((kept >= 1000) & (kept % 2 == 0)).all() and kept.numel() == 8 * 50
    assert torch.equal(f.fresh, f.ids >= 0)  # the 10 empty slots past the 50 found are not tagged fresh
    assert index.remove([1000, 3, 4]) == 2  # 3 was removed already
    assert not (index.search(q, k=600, nprobe=nprobe)[1] == 1000).any()
    index.save(tmp_path / "ivf.safetensors")
    again = cls.load(tmp_path / "ivf.safetensors")
    assert again.num_fresh == 100 and torch.equal(again.search(q, k=50, nprobe=nprobe)[1], index.search(q, k=50, nprobe=nprobe)[1])
    before = index.search_with_stats(q, k=50, nprobe=nprobe)
    index.compact()
    assert (index.num_main, index.num_fresh) == (597, 0) and int(index.offsets[-1]) == 597
    after = index.search_with_stats(q, k=50, nprobe=nprobe)
    assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(before.ids, after.ids)) and not after.fresh.any()
    with pytest.raises(ValueError, match="ids must be new"):
        index.add(x[:2], ids=[1001, 5000])
    with pytest.raises(ValueError, match="embeddings must be"):
        index.add(torch.randn(2, 7), ids=[7000, 7001])


def test_bf16_flat_index_is_exact_up_to_bf16(tmp_path):
    x, q = _gaussian_clusters(5, n=800, d=48, centers=10, n_queries=10)
    flat = FlatIndex.build(x, ids=torch.arange(800) + 50, dtype="bfloat16")
    assert flat.codes.dtype == torch.bfloat16 and flat.bytes_per_item() == 48 * 2 + 4 + 8
    exact = torch.topk(q @ x.T, 20, dim=1)
    scores, ids = flat.search(q, k=20)

    def recall(found):
        return sum(len(set(a.tolist()) & set((b + 50).tolist())) for a, b in zip(found, exact.indices)) / exact.indices.numel()

    assert recall(ids) >= 0.99 and recall(ids) >= recall(FlatIndex.build(x, ids=torch.arange(800) + 50).search(q, k=20)[1])
    torch.testing.assert_close(scores, exact.values, rtol=2e-2, atol=2e-2)
    mask = torch.rand(10, 800, generator=torch.Generator().manual_seed(2)) < 0.3
    r = flat.search_with_stats(q, k=10, filters=DenseMaskFilter(mask))
    assert mask.gather(1, r.positions).all() and (r.found == mask.sum(1)).all()
    flat.remove([50])
    flat.add(x[:3] * 2, ids=[5000, 5001, 5002])  # twice as long: they win their own queries
    r = flat.search_with_stats(x[:3], k=1)
    assert r.ids[:, 0].tolist() == [5000, 5001, 5002] and r.fresh.all()
    flat.save(tmp_path / "flat.safetensors")
    again = FlatIndex.load(tmp_path / "flat.safetensors")
    assert again.codes.dtype == torch.bfloat16 and torch.equal(again.search(q, k=20)[1], flat.search(q, k=20)[1])
    with pytest.raises(ValueError, match="dtype must be one of"):
        FlatIndex.build(x, dtype="fp8")


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_flat_index_without_main_items_searches_as_int8_and_bf16(monkeypatch, backend):
    """A FlatIndex with no main item (built empty, or every item removed and compacted): the
    bf16 one failed with "k must be >= 1, got k=0" (no column to select from) where the int8 one
    returned no results; both return none, and the fresh items once added."""
    monkeypatch.setenv("GKC_BACKEND", backend)
    for dtype in ("int8", "bfloat16"):
        compacted = FlatIndex.build(torch.randn(3, 4), dtype=dtype)
        compacted.remove([0, 1, 2])
        compacted.compact()
        for index in (FlatIndex.build(torch.empty(0, 4), dtype=dtype), compacted):
            r = index.search_with_stats(torch.randn(2, 4), 3)
            assert (r.scores == float("-inf")).all() and (r.ids == -1).all() and (r.found == 0).all() and not r.fresh.any()
            index.add(torch.ones(1, 4), ids=[7])
            r = index.search_with_stats(torch.ones(2, 4), 3)
            assert r.ids[:, 0].tolist() == [7, 7] and (r.ids[:, 1:] == -1).all() and r.fresh[:, 0].all()
            assert r.found.tolist() == [1, 1]


@pytest.mark.parametrize("int8_dot", [True, False])
def test_cluster_major_schedule_splits_busy_clusters_into_blocks(monkeypatch, int8_dot):
    import silvertorch.ivf.index as ivf_index

    monkeypatch.setattr(ivf_index, "int8_dot_supported", lambda device: int8_dot)  # int8 x int8 -> int32, or fp32 tiles
    x, q = _gaussian_clusters(6, n=1500, d=40, centers=8, n_queries=40)  # odd d; 160 pairs on 8 clusters: > 16 per cluster
    index = IVFIndex.build(x, n_clusters=8)
    index.remove(torch.arange(0, 1500, 7))
    clusters = index.probe(q, 4)
    monkeypatch.setenv("GKC_BACKEND", "reference")
    ref, _ = index.candidate_scores(q, clusters)
    monkeypatch.setenv("GKC_BACKEND", "interpret")
    canary = CanaryBuffer(ref.shape)
    tri, _ = index.candidate_scores(q, clusters, out=canary.tensor)  # auto: 40 queries -> cluster-major
    canary.check("cluster-major scores")
    torch.testing.assert_close(tri, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="schedule"):
        index.candidate_scores(q, clusters, schedule="tiles")


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["query", "cluster"])
def test_compiled_scoring_kernels_match_reference_on_gpu(monkeypatch, schedule):
    x, q = _gaussian_clusters(7, n=3000, d=96, centers=16, n_queries=48)
    index = IVFIndex.build(x.cuda(), n_clusters=16)
    index.remove(torch.arange(0, 3000, 5))
    queries = q.cuda()
    clusters = index.probe(queries, 4)
    monkeypatch.setenv("GKC_BACKEND", "reference")
    ref, _ = index.candidate_scores(queries, clusters)
    monkeypatch.setenv("GKC_BACKEND", "triton")
    tri, _ = index.candidate_scores(queries, clusters, schedule=schedule)  # cluster: int8 tl.dot on sm80+
    torch.testing.assert_close(tri, ref, rtol=0, atol=0)


def test_indexes_and_filters_made_under_inference_mode(tmp_path):
    """Serving code often builds or loads under `torch.inference_mode()`; inference tensors have
    no version counter, so state derived from them is made afresh rather than cached (it crashed)."""
    mask = torch.rand(QUERIES.shape[0], INDEX.num_items, generator=torch.Generator().manual_seed(3)) < 0.3
    want = INDEX.search(QUERIES, k=10, nprobe=4, filters=DenseMaskFilter(mask))
    INDEX.save(tmp_path / "ivf.safetensors")
    with torch.inference_mode():
        index = IVFIndex.load(tmp_path / "ivf.safetensors")
        masked = DenseMaskFilter(mask.clone())
        got = index.search(QUERIES, k=10, nprobe=4, filters=masked)
        masked.mask[:, :] = False  # changed in place: no stale packed words
        empty = index.search(QUERIES, k=10, nprobe=4, filters=masked)
        index.remove(want[1][:, 0])  # the best hit of each query, removed in place
        after = index.search(QUERIES, k=10, nprobe=4, filters=DenseMaskFilter(mask))
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert (empty[1] == -1).all()
    assert torch.equal(after[1][:, :9], want[1][:, 1:])


def _small_index(n=200, d=8, n_clusters=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, IVFIndex.build(x, n_clusters=n_clusters), torch.randn(d, 3, generator=g).T  # queries: a transposed view


@pytest.mark.parametrize("schedule", ["query", "cluster"])
def test_non_contiguous_queries_and_stored_rows_score_as_row_major(monkeypatch, schedule):
    """The int8 kernels index codes as row * D + d: transposed query views, Fortran-ordered numpy
    queries, a FlatIndex built from a transposed view and a hand-made index over column-major codes
    score as their contiguous copies do (on the interpreter, against the reference)."""
    import numpy as np

    from silvertorch.ivf.quantize import quantize_rows

    x, index, q_view = _small_index()
    assert not q_view.is_contiguous() and all(t.is_contiguous() for t in quantize_rows(q_view))
    clusters = index.probe(q_view, 4)
    monkeypatch.setenv("GKC_BACKEND", "reference")
    want_scores = index.candidate_scores(q_view.contiguous(), clusters)[0]
    want = index.search(q_view.contiguous(), 5, nprobe=4)
    flat_want = FlatIndex.build(x).search(q_view.contiguous(), 5)
    monkeypatch.setenv("GKC_BACKEND", "interpret")
    assert torch.equal(index.candidate_scores(q_view, clusters, schedule=schedule)[0], want_scores)
    fortran = np.asfortranarray(q_view.contiguous().numpy())
    for queries in (q_view, torch.from_numpy(fortran), fortran):
        got = index.search(queries, 5, nprobe=4)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    flat = FlatIndex.build(x.T.contiguous().T)  # embeddings as a column-major view
    assert flat.codes.is_contiguous() and torch.equal(flat.search(q_view, 5)[1], flat_want[1])
    column_major = IVFIndex(index.centroids, index.offsets, index.codes.T.contiguous().T, index.scales, index.ids, index.order)
    assert torch.equal(column_major.candidate_scores(q_view, clusters, schedule=schedule)[0], want_scores)


def test_adaptive_search_widens_until_k_verified_results_under_a_bloom_filter(monkeypatch):
    """Bloom false positives count in `found`, not in the (verified) results: adaptive search widens
    until each query has k results, as probing every cluster gives."""
    monkeypatch.setenv("GKC_BACKEND", "reference")
    g = torch.Generator().manual_seed(0)
    n, k = 4000, 5
    index = IVFIndex.build(torch.randn(n, 8, generator=g), n_clusters=32, iters=5)
    schema = {"tag": 1, "x": 2}
    items = [{"tag": [7] if i % 250 == 0 else [], "x": torch.randint(0, 10**6, (9,), generator=g).tolist()} for i in range(n)]
    from silvertorch import FilterSchema

    bloom = BloomIndex.build(*FilterSchema(schema).encode_items([items[i] for i in index.order.tolist()]), k=1, b_multiplier=1.5)
    q = torch.randn(8, 8, generator=g)
    plans = parse_filters(["tag:7"] * 8, schema=schema)
    r = index.search_with_stats(q, k=k, nprobe=2, filters=bloom.filter(plans), adaptive=True)
    full = index.search_with_stats(q, k=k, nprobe=32, filters=bloom.filter(plans))
    assert ((full.ids >= 0).sum(1) == k).all()  # the premise: k true matches in the index
    assert ((r.ids >= 0).sum(1) == k).all()
    assert (r.found[r.nprobe < 32] > k).any() or (r.nprobe > 2).all()  # stopping on `found` would have stopped short
    assert all((index.order[p] % 250 == 0).all() for p in r.positions)  # tag:7 only


def test_a_filter_made_before_a_compact_that_moved_items_is_refused(tmp_path):
    """add() + compact() without removals keeps the item count: the layout tells a stale filter."""
    from silvertorch import FilterSchema

    g = torch.Generator().manual_seed(0)
    index = IVFIndex.build(torch.randn(300, 8, generator=g), ids=torch.arange(300), n_clusters=4)
    schema = FilterSchema({"cat": 1})
    items = [{"cat": "music" if i % 3 == 0 else "news"} for i in range(300)]
    bloom = BloomIndex.build(*schema.encode_items([items[i] for i in index.order.tolist()]))
    index.compact()  # nothing moves: the layout stays
    assert index.layout == 0
    index.add(torch.randn(20, 8, generator=g), ids=torch.arange(1000, 1020))
    bloom.append(*schema.encode_items([{"cat": "news"}] * 20))
    index.compact()
    assert index.layout == 1 and index.num_items == bloom.num_items
    plans = parse_filters(["cat:music"], schema=schema)
    q = torch.randn(1, 8, generator=g)
    for stale in (bloom.filter(plans), DenseMaskFilter(torch.ones(1, 320, dtype=torch.bool))):
        with pytest.raises(ValueError, match="layout 0, the index is at layout 1.*layout=index.layout"):
            index.search(q, 10, nprobe=4, filters=stale)
    all_items = items + [{"cat": "news"}] * 20  # build-input rows, the added ones after them (index.order numbers them so)
    rebuilt = BloomIndex.build(*schema.encode_items([all_items[i] for i in index.order.tolist()]), layout=index.layout)
    ids = index.search(q, 10, nprobe=4, filters=rebuilt.filter(plans))[1][0]
    assert (ids >= 0).all() and (ids % 3 == 0).all() and (ids < 300).all()
    again = IVFIndex.load(index.save(tmp_path / "ivf.safetensors"))
    assert again.layout == 1 and BloomIndex.load(rebuilt.save(tmp_path / "bloom.safetensors")).layout == 1
    assert torch.equal(again.search(q, 10, nprobe=4, filters=DenseMaskFilter(torch.ones(1, 320, dtype=torch.bool), layout=1))[1],
                       index.search(q, 10, nprobe=4)[1])


@pytest.mark.parametrize("cls", [IVFIndex, FlatIndex])
def test_rows_added_after_a_compacted_away_last_row_get_new_numbers(cls, tmp_path):
    """compact() numbered fresh items from the largest stored row + 1: with the last build row
    removed and compacted away, the next added item took its number, and a filter rebuilt over
    index.order gave it the removed item's attributes (cat:music found a news item). Rows are now
    numbered from every row numbered before, across save/load too."""
    from silvertorch import FilterSchema

    g = torch.Generator().manual_seed(3)
    index = cls.build(torch.randn(300, 8, generator=g), ids=torch.arange(300), **({"n_clusters": 4} if cls is IVFIndex else {}))
    schema = FilterSchema({"cat": 1})
    items = [{"cat": "music" if i == 299 else "news"} for i in range(300)]
    assert index.remove([299]) == 1
    index.compact()
    index = cls.load(index.save(tmp_path / "index.safetensors"))
    index.add(torch.randn(2, 8, generator=g), ids=torch.tensor([5000, 5001]))
    index.remove([5000])  # removed before compact(): still numbered (rows follow the add order)
    index.compact()
    all_items = items + [{"cat": "news"}, {"cat": "news"}]  # build rows, then the added ones in order
    assert sorted(index.order.tolist()) == list(range(299)) + [301]
    assert index.ids[index.order == 301].tolist() == [5001]
    rebuilt = BloomIndex.build(*schema.encode_items([all_items[i] for i in index.order.tolist()]), layout=index.layout)
    q = torch.randn(2, 8, generator=g)
    ids = index.search(q, 5, nprobe=4, filters=rebuilt.filter(parse_filters(["cat:music"] * 2, schema=schema)))[1]
    assert (ids == -1).all(), ids  # the only music item is gone
    index.add(torch.randn(1, 8, generator=g), ids=torch.tensor([5002]))
    index.compact()  # a second compact numbers after the first one's rows
    assert sorted(index.order.tolist()) == list(range(299)) + [301, 302]
    assert index.ids[index.order == 302].tolist() == [5002]


def test_bloom_verification_widens_its_pool_in_few_rounds(monkeypatch):
    """True matches much rarer than Bloom false positives: the verified pool grows geometrically (a
    few exact_mask calls, not one per k rejections) and the results are the exact filter's."""
    monkeypatch.setenv("GKC_BACKEND", "reference")
    from silvertorch import FilterSchema

    g = torch.Generator().manual_seed(0)
    n = 4000
    index = IVFIndex.build(torch.randn(n, 8, generator=g), n_clusters=4, iters=5)
    schema = {"tag": 1, "x": 2}
    items = [{"tag": [7] if i % 400 == 0 else [], "x": torch.randint(0, 10**6, (9,), generator=g).tolist()} for i in range(n)]
    # a small multiplier: ~2% false positives, 9 of them to each true match
    bloom = BloomIndex.build(*FilterSchema(schema).encode_items([items[i] for i in index.order.tolist()]), b_multiplier=3.0)
    plans = parse_filters(["tag:7"] * 3, schema=schema)
    q = torch.randn(3, 8, generator=g)
    calls = []

    class Counting(type(bloom.filter(plans))):
        def exact_mask(self, positions):
            calls.append(positions.shape[1])
            return super().exact_mask(positions)

    exact = DenseMaskFilter(bloom.verify(plans, torch.arange(n).expand(3, -1)))
    for k in (1, 4):
        calls.clear()
        got = index.search_with_stats(q, k=k, nprobe=4, filters=Counting(bloom, plans))
        want = index.search_with_stats(q, k=k, nprobe=4, filters=exact)
        assert (got.found >= 3 * (n // 400)).all()  # the premise: more Bloom false positives than true matches
        assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores) and (got.ids >= 0).all()
        assert len(calls) <= 3, calls


def test_ties_come_in_probe_rank_then_position_order():
    """As the module docs say: equal scores in slot order, the best centroid's cluster first."""
    _, index, _ = _small_index()
    q = torch.zeros(1, 8)  # every item scores 0
    r = index.search_with_stats(q, k=4, nprobe=4)
    first = int(index.offsets[index.probe(q, 4)[0, 0]])
    assert r.positions[0].tolist() == list(range(first, first + 4))


def test_numpy_counts_and_clear_errors_for_wrong_arguments():
    import numpy as np

    from silvertorch import FilterSchema

    _, index, q = _small_index()
    q = q.contiguous()
    want = index.search(q, 5, nprobe=4)
    got = index.search(q.numpy(), np.int64(5), nprobe=np.int32(4))
    assert torch.equal(got[1], want[1])
    schema = FilterSchema({"cat": 1})
    bloom = BloomIndex.build(*schema.encode_items([{"cat": "a"}] * 200))
    plans = parse_filters(["cat:a"] * 3, schema=schema)
    for wrong, hint in ((plans, "FilterPlans .*bloom_index.filter"), (bloom, "BloomIndex .*bloom_index.filter")):
        with pytest.raises(TypeError, match=f"filters must be a range filter.*{hint}"):
            index.search(q, 5, nprobe=4, filters=wrong)
    for kw, match in ((dict(k=5.0), "k must be an int, got float"), (dict(k=True), "k must be an int, got bool"),
                      (dict(k=5, nprobe=2.5), "nprobe must be an int, got float"),
                      (dict(k=5, nprobe=4, max_nprobe=8.0), "max_nprobe must be an int")):
        with pytest.raises(ValueError, match=match):
            index.search_with_stats(q, adaptive=True, **kw)
    with pytest.raises(ValueError, match="queries must be a float tensor or array"):
        index.search("queries", 5)
    with pytest.raises(ValueError, match="ids must be integers, got torch.float32"):
        index.remove(torch.tensor([1.5, 2.0]))
    # ids past int64: named (a Python int failed with torch's unnamed overflow; uint64 ones wrapped negative)
    with pytest.raises(ValueError, match=r"ids must be integers \(int64\), got \[1180591620717411303424\]"):
        index.remove([2**70])
    with pytest.raises(ValueError, match="ids must be integers within int64, got uint64 values past"):
        index.remove(np.array([2**64 - 1], dtype=np.uint64))
    assert index.remove(np.array([1, 2])) == 2
    assert index.remove(np.array([3], dtype=np.uint64)) == 1


def test_dense_mask_filter_answers_ranges_given_on_another_device():
    """The search hands a filter its ranges on the index's device and moves the words it gets back
    (as a Bloom filter's, on the Bloom index's device): a mask on one device takes ranges from
    another (meta stands in for it: a CPU tensor beside a meta one raises as beside a CUDA one)."""
    mask = torch.rand(3, 500, generator=torch.Generator().manual_seed(4)) < 0.5
    starts, lengths = torch.tensor([[0, 37], [100, 460], [5, 0]]), torch.tensor([[40, 9], [64, 40], [33, 0]])
    got = DenseMaskFilter(mask.to("meta")).range_masks(starts, lengths, 64)
    assert got.device.type == "meta" and got.shape == (3, 2, 2) and got.dtype == torch.int32


@pytest.mark.gpu
def test_filters_on_the_cpu_filter_a_search_on_the_gpu():
    """Filters built from CPU tensors (a Bloom index from the attribute table, a boolean mask) stay
    on the CPU; a search on an index built from GPU embeddings takes their answers, the Bloom
    filter's exact mask too (its winners' verification)."""
    index = IVFIndex.build(INDEX_X.cuda(), n_clusters=16)
    cat = torch.randint(0, 5, (index.num_items,), generator=torch.Generator().manual_seed(2))  # per stored position
    bloom = BloomIndex.build(torch.ones(index.num_items, dtype=torch.long), torch.arange(index.num_items + 1), cat, k=3,
                             b_multiplier=1.2)
    plans = parse_filters(["1:2", "1:2", "NOT 1:2", "1:1 OR 1:2", "1:9", "1:3 AND NOT 1:4"])
    exact = torch.stack([cat == 2, cat == 2, cat != 2, (cat == 1) | (cat == 2), cat == 9, cat == 3])
    r = index.search_with_stats(QUERIES.cuda(), k=20, nprobe=4, filters=bloom.filter(plans))
    e = index.search_with_stats(QUERIES.cuda(), k=20, nprobe=4, filters=DenseMaskFilter(exact))
    assert torch.equal(r.ids, e.ids) and torch.equal(r.scores, e.scores)


@pytest.mark.parametrize("cls", [IVFIndex, FlatIndex])
def test_numpy_embeddings_build_and_add(cls):
    """build and add took tensors only (AttributeError: 'numpy.ndarray' object has no attribute 'dim'),
    where the searches take numpy queries."""
    import numpy as np

    rng = np.random.default_rng(0)
    x, fresh = rng.standard_normal((40, 8), dtype=np.float32), rng.standard_normal((2, 8), dtype=np.float32)
    index = cls.build(x, ids=np.arange(40) + 100, **({"n_clusters": 2} if cls is IVFIndex else {}))
    index.add(fresh, ids=np.array([1, 2]))
    want = cls.build(torch.from_numpy(x), ids=torch.arange(40) + 100, **({"n_clusters": 2} if cls is IVFIndex else {}))
    want.add(torch.from_numpy(fresh), ids=torch.tensor([1, 2]))
    q = torch.from_numpy(fresh)
    assert torch.equal(index.search(q, k=5, nprobe=2)[1], want.search(q, k=5, nprobe=2)[1])
    assert set(index.search(q, k=1, nprobe=2)[1][:, 0].tolist()) == {1, 2}  # each fresh item finds itself
    with pytest.raises(ValueError, match="embeddings must be a float tensor or array"):
        cls.build(object())


def test_flat_index_build_refuses_unknown_options():
    # FlatIndex.build took **_: a misspelled ids= or dtype= was dropped (ids 0..n-1, int8 codes), silently
    with pytest.raises(TypeError, match="unexpected keyword argument 'idx'"):
        FlatIndex.build(torch.randn(10, 4), idx=torch.arange(10) + 100)
    with pytest.raises(TypeError, match="unexpected keyword argument 'dtyp'"):
        FlatIndex.build(torch.randn(10, 4), dtyp="bfloat16")
    # IVFIndex.build's clustering options are still taken (and unused): code may build either index
    assert FlatIndex.build(torch.randn(10, 4), n_clusters=3, iters=5, seed=1).num_items == 10


def test_dense_mask_filter_takes_a_numpy_mask():
    import numpy as np

    mask = np.zeros((1, 300), dtype=bool)  # was refused: "must be a bool tensor ..., got bool"
    mask[0, [7, 9]] = True
    index = FlatIndex.build(INDEX_X[:300])
    _, ids = index.search(QUERIES[:1], 3, filters=DenseMaskFilter(mask))
    assert sorted(ids[0, :2].tolist()) == [7, 9] and ids[0, 2] == -1


def test_removing_no_ids_removes_nothing():
    # [] reads as float32: the fraction check refused it ("ids must be integers, got torch.float32")
    index = IVFIndex.build(INDEX_X[:100], n_clusters=2)
    assert index.remove([]) == 0 and index.remove(()) == 0 and not bool(index.removed.any())


def test_quantize_rows_uses_the_full_int8_range_within_half_a_step():
    """Each row's largest magnitude maps to +-127 exactly and every value is within half a
    quantization step of codes * scale (a smaller divisor would saturate the largest values)."""
    from silvertorch.ivf.quantize import quantize_rows

    x = torch.randn(37, 19, generator=torch.Generator().manual_seed(5)) * torch.rand(37, 1) * 10
    x[3] = 0.0  # an all-zero row: zero codes, a tiny positive scale
    codes, scale = quantize_rows(x.t().contiguous().t())
    assert codes.dtype == torch.int8 and scale.shape == (37,) and (scale > 0).all()
    live = torch.arange(37) != 3
    assert torch.equal(codes[live].abs().amax(1), torch.full((36,), 127, dtype=torch.int8))
    assert not codes[3].any()
    err = (codes.float() * scale.unsqueeze(1) - x).abs()
    assert (err <= scale.unsqueeze(1) * (0.5 + 1e-4)).all()


def test_dense_mask_exact_mask_refuses_padding_positions():
    """Position -1 (a padding slot) never passes, even where item 0 does."""
    mask = torch.tensor([[True, False, True], [True, True, False]])
    got = DenseMaskFilter(mask).exact_mask(torch.tensor([[-1, 0, 2, -1], [1, -1, 2, 0]]))
    assert got.tolist() == [[False, True, True, False], [True, False, False, True]]


def test_capture_refuses_an_index_off_cuda():
    with pytest.raises(RuntimeError, match="capture needs the index on a CUDA device"):
        INDEX.capture(torch.randn(4, INDEX_X.shape[1]), k=5)


class _EagerGraph:
    """Stands in for a GraphedCall: the eager search at exactly the captured batch size."""

    def __init__(self, index, example, k, nprobe):
        self.inputs, self.index, self.k, self.nprobe, self.sizes = [example], index, k, nprobe, []

    def __call__(self, queries):
        self.sizes.append(queries.shape[0])
        return self.index.search(queries, self.k, self.nprobe)


def test_captured_search_pads_cuts_checks_and_refuses_a_changed_index():
    from silvertorch.ivf.index import CapturedSearch

    index = IVFIndex.build(INDEX_X, ids=torch.arange(10_000, 14_000), n_clusters=16)
    g = torch.Generator().manual_seed(3)
    queries = torch.randn(6, INDEX_X.shape[1], generator=g)
    graph = _EagerGraph(index, queries, 7, 4)
    captured = CapturedSearch(index, graph, 7)
    for q in (1, 4, 6):
        scores, ids = captured(queries[:q].double())  # converted to the captured dtype
        want_scores, want_ids = index.search(queries[:q], 7, 4)
        assert graph.sizes[-1] == 6 and ids.shape == (q, 7)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(scores, want_scores)
    with pytest.raises(ValueError, match="1 to batch_size=6"):
        captured(torch.randn(7, INDEX_X.shape[1]))
    with pytest.raises(ValueError, match="NaN or inf"):
        captured(torch.full((2, INDEX_X.shape[1]), float("nan")))
    with pytest.raises(ValueError, match=r"queries must be \[num_queries, "):
        captured(torch.randn(2, 3))
    index.remove([10_000])
    with pytest.raises(RuntimeError, match="the index changed .* capture it again"):
        captured(queries)


@pytest.mark.gpu
def test_captured_search_matches_the_eager_search():
    x, q = INDEX_X.cuda(), torch.randn(20, INDEX_X.shape[1], device="cuda")
    for index in (IVFIndex.build(x, ids=torch.arange(10_000, 14_000, device="cuda"), n_clusters=16),
                  FlatIndex.build(x, dtype="bfloat16")):
        index.remove(index.ids[:7])
        captured = index.capture(q, k=25, nprobe=4)
        for batch in (q, q[:3]):
            scores, ids = captured(batch)
            want_scores, want_ids = index.search(batch, 25, 4)
            assert torch.equal(ids, want_ids)
            torch.testing.assert_close(scores, want_scores)


def test_a_filtered_search_of_no_queries_is_empty():
    """Zero queries under a filter: the empty result of the unfiltered search, not a reshape error
    from the range masks or the per-row bit counts (which have no row to size their views by)."""
    index = IVFIndex.build(INDEX_X[:500], n_clusters=8, iters=2)
    queries = torch.empty(0, INDEX_X.shape[1])
    for filters in (DenseMaskFilter(torch.zeros(0, index.num_items, dtype=torch.bool)), None):
        scores, ids = index.search(queries, 5, 2, filters=filters)
        assert scores.shape == ids.shape == (0, 5)
    assert count_row_bits(torch.zeros(0, 3, 2, dtype=torch.int32)).shape == (0,)
    words = torch.randint(-2**31, 2**31 - 1, (4, 3, 2), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(count_row_bits(words), count_bits(words).sum(1))


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_a_search_of_no_queries_after_remove_is_empty(monkeypatch, backend):
    """Zero queries over an index with removed items: the empty result, not a `found.max()` of
    no rows from the PyTorch reference's passing-items path (0 passing <= any fraction of 0 slots)."""
    monkeypatch.setenv("GKC_BACKEND", backend)
    for cls in (IVFIndex, FlatIndex):
        index = cls.build(INDEX_X[:300], n_clusters=4, iters=2)
        index.remove([3])
        r = index.search_with_stats(torch.empty(0, INDEX_X.shape[1]), 5)
        assert r.scores.shape == r.ids.shape == r.fresh.shape == (0, 5) and r.found.shape == r.nprobe.shape == (0,)


def test_captured_search_checks_queries_in_the_captured_dtype():
    """float64 queries past float32's range become inf in the captured float32 buffer: refused as
    the eager search refuses inf, before the graph runs (which does not check its values)."""
    from silvertorch.ivf.index import CapturedSearch

    class Graph:
        def __init__(self, example):
            self.inputs, self.calls = [example], 0

        def __call__(self, queries):
            self.calls += 1
            return torch.zeros(queries.shape[0], 3), torch.zeros(queries.shape[0], 3, dtype=torch.int64)

    graph = Graph(torch.zeros(4, INDEX_X.shape[1]))
    captured = CapturedSearch(INDEX, graph, 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        captured(torch.full((2, INDEX_X.shape[1]), 1e39, dtype=torch.float64))
    assert graph.calls == 0
    captured(torch.ones(2, INDEX_X.shape[1], dtype=torch.float64))
    assert graph.calls == 1


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_float64_queries_past_float32_range_are_refused(monkeypatch, backend):
    """The search scores in float32: a float64 query past its range became inf there, unchecked,
    and came back as NaN and inf scores over arbitrary ids; refused as an inf query is."""
    monkeypatch.setenv("GKC_BACKEND", backend)
    queries = torch.ones(2, INDEX_X.shape[1], dtype=torch.float64)
    queries[0, 1] = 1e39
    for index in (INDEX, FlatIndex.build(INDEX_X[:200]), FlatIndex.build(INDEX_X[:200], dtype="bfloat16")):
        with pytest.raises(ValueError, match="NaN or inf"):
            index.search(queries, 3)
    scores, ids = INDEX.search(queries[1:], 3)  # in range: searched
    assert torch.isfinite(scores).all() and (ids >= 0).all()


def test_float64_embeddings_past_float32_range_are_refused():
    """Items are quantised (and clustered) in float32: a float64 value past its range became an inf
    scale or a NaN centroid, unchecked, and every search then returned NaN scores; refused as inf is."""
    x = INDEX_X[:100].double()
    x[5, 0] = 1e39
    for build in (lambda: IVFIndex.build(x, n_clusters=4, iters=2), lambda: FlatIndex.build(x)):
        with pytest.raises(ValueError, match="NaN or inf"):
            build()
    index = FlatIndex.build(x[:5])
    with pytest.raises(ValueError, match="NaN or inf"):
        index.add(x[5:7], ids=[100, 101])
    assert index.num_fresh == 0


def test_device_constants_made_under_inference_mode_are_kept():
    """A constant first asked for under inference_mode is kept (made outside it): otherwise it is
    made afresh inside a CUDA graph capture, a host-to-device copy that a capture refuses."""
    from silvertorch import filtering

    filtering._CONSTANTS.pop(("test_inference_table", torch.device("cpu")), None)
    made = []

    def make(device):
        made.append(device)
        return torch.arange(5, device=device)

    with torch.inference_mode():
        first = filtering.device_constant("test_inference_table", torch.device("cpu"), make)
    second = filtering.device_constant("test_inference_table", torch.device("cpu"), make)
    assert len(made) == 1 and second is first and not first.is_inference()
    filtering._CONSTANTS.pop(("test_inference_table", torch.device("cpu")))


@pytest.mark.parametrize("kw, match", [({"nprobe": 0}, "nprobe must be >= 1"), ({"nprobe": 2.5}, "nprobe must be an int"),
                                       ({"max_nprobe": -1}, "max_nprobe must be >= 1"), ({"nprobe": True}, "nprobe must be an int")])
def test_flat_index_refuses_a_malformed_nprobe(kw, match):
    # nprobe was dropped unread: nprobe=0 or 2.5 (a typo) searched as if it had not been given
    with pytest.raises(ValueError, match=match):
        FlatIndex.build(INDEX_X[:300]).search_with_stats(QUERIES[:2], 3, **kw)


def test_flat_index_takes_any_nprobe_and_scores_every_item():
    flat = FlatIndex.build(INDEX_X[:300])
    want = flat.search_with_stats(QUERIES[:3], 5)
    for kw in ({"nprobe": 1}, {"nprobe": 64}, {"adaptive": True, "max_nprobe": 7}):
        got = flat.search_with_stats(QUERIES[:3], 5, **kw)
        assert torch.equal(got.scores, want.scores) and torch.equal(got.ids, want.ids), kw


def test_filtered_search_of_one_query_over_one_word_of_fresh_items(monkeypatch):
    """One query, a filter, at most 32 fresh items: the filter's words for the fresh part are one
    [1, 1, 1] word, which `contiguous()` left as a strided view of the 64-bit words and unpack_bits
    could not view as bytes (a RuntimeError on the PyTorch path)."""
    monkeypatch.setenv("GKC_BACKEND", "reference")
    g = torch.Generator().manual_seed(0)
    index = IVFIndex.build(torch.randn(600, 12, generator=g), n_clusters=5, iters=3)
    index.add(torch.randn(9, 12, generator=g), torch.arange(900, 909))
    queries = torch.randn(1, 12, generator=g)
    mask = torch.zeros(1, index.num_items, dtype=torch.bool)
    mask[0, -3:] = True  # three fresh items pass
    scores, ids = index.search(queries, 5, 2, DenseMaskFilter(mask))
    assert sorted(ids[0, :3].tolist()) == [906, 907, 908] and ids[0, 3:].eq(-1).all()
