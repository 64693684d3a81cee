"""The Triton path of the IVF search and of select_topk reads nothing back on the host past its
argument checks (each read is a device synchronisation on a GPU) and stays within a bound of
dispatched ops (a CPU stand-in for kernel launches). Run under TRITON_INTERPRET=1, where the
CPU takes the Triton path."""

import pytest
import torch

from gpukernels_common import env
from gpukernels_common.testing import LaunchCounter
from silvertorch import DenseMaskFilter, IVFIndex
from silvertorch.ivf import index as ivf_index
from silvertorch.ivf.index import CLUSTER_MAJOR_MIN_QUERIES
from silvertorch.topk import (
    _radix_columns,
    _radix_columns_fixed_shapes,
    _radix_threshold_torch,
    _select_two_level,
    order_preserving_keys,
    select_topk_checked,
    select_topk_reference,
)

pytestmark = pytest.mark.skipif(not env.triton_interpret(), reason="the Triton path runs on the CPU only with TRITON_INTERPRET=1")

@pytest.fixture
def counter(monkeypatch):
    return LaunchCounter().count_triton_launches(monkeypatch)


def _counted(counter, fn):
    fn()  # first call: kernels built, per-index tables made
    counter.ops.clear()
    with counter:
        fn()
    return counter


@pytest.fixture(scope="module")
def index():
    x = torch.randn(4000, 32, generator=torch.Generator().manual_seed(0))
    return IVFIndex.build(x, n_clusters=32, iters=3)


# (queries, filtered, most ops per search): 16 queries take the cluster-major kernel, one query the
# query-major one. The bounds sit a little above today's counts (24, 29, 17 ops; 82, 98, 35 before the
# queries' preparation, the cluster-major schedule, the two-level selection, the results' ids and the
# mask filter's range words were each made one kernel).
@pytest.mark.parametrize("num_queries, filtered, max_ops", [(16, False, 26), (16, True, 31), (1, False, 19)],
                         ids=["16q", "16q-mask", "1q"])
def test_triton_search_reads_nothing_back_past_its_argument_checks(counter, index, num_queries, filtered, max_ops):
    queries = torch.randn(num_queries, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(num_queries, index.num_items, generator=torch.Generator().manual_seed(2)) < 0.3
    filters = DenseMaskFilter(mask) if filtered else None
    checks = dict(_counted(counter, lambda: ivf_index._check_queries(queries, 32, 10)).syncs)  # NaN in the queries
    assert checks == {"_local_scalar_dense": 1}
    search = _counted(counter, lambda: index.search_with_stats(queries, k=10, nprobe=4, filters=filters))
    assert search.syncs == checks, dict(search.ops)
    assert search.launches <= max_ops, dict(search.ops)


@pytest.mark.parametrize("method, k", [("two_level", 50), ("radix", 3000)])
def test_triton_select_topk_reads_nothing_back(counter, method, k):
    scores = torch.randn(4, 20000, generator=torch.Generator().manual_seed(3))
    scores[:, 100:5000:3] = 2.5  # ties at the k-th value, past the winners
    ops = _counted(counter, lambda: select_topk_checked(scores, k, method))
    assert ops.syncs == {}, dict(ops.ops)
    got, want = select_topk_checked(scores, k, method), select_topk_reference(scores, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _tie_rows(seed):
    """Rows of few distinct values (ties everywhere), one short of candidates, one all ties."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-3, 3, (5, 3000), generator=g).float()
    scores[1, 40:] = float("-inf")
    scores[2] = 1.0
    scores[3, ::5] = 7.0
    return scores


@pytest.mark.parametrize("tile_width", [None, 97, 1000])
@pytest.mark.parametrize("k", [1, 7, 39, 600])
@pytest.mark.parametrize("fixed_shapes", [True, False])
def test_two_level_tie_fix_ups_agree_with_the_reference(k, tile_width, fixed_shapes):
    """The fixed-shape tie fix-up (Triton backends) and the one gathering the rows that need it
    (plain CPU tensors) both give the stable sort's selection."""
    scores = _tie_rows(k)
    got = _select_two_level(scores, k, tile_width=tile_width, fixed_shapes=fixed_shapes)
    want = select_topk_reference(scores, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("k", [1, 40, 601, 3000])
def test_radix_column_selections_agree(k):
    scores = _tie_rows(k)
    keys = order_preserving_keys(scores)
    threshold, count_above, count_at = _radix_threshold_torch(keys, k)
    signed_threshold = (threshold - 2**31).to(torch.int32).unsqueeze(1)
    fixed = _radix_columns_fixed_shapes(keys, signed_threshold, count_above, k)
    gathered = _radix_columns(keys, signed_threshold, count_above, count_at, k)
    assert torch.equal(fixed, gathered)


def _small_model():
    """A Bloom-filtered RetrievalModel of 600 items in 6 clusters (nprobe 3, K = 40, N = 5)."""
    from silvertorch import EmbeddingTower, OverArch, RetrievalModel, ValueModel

    g = torch.Generator().manual_seed(4)
    n, d = 600, 16
    emb = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    values = torch.randint(0, 5, (n,), generator=g)
    attrs = (torch.ones(n, dtype=torch.int64), torch.arange(n + 1), values)
    torch.manual_seed(4)
    model = RetrievalModel.build(EmbeddingTower([10], d, normalize=True), OverArch(d, 2, [8]), ValueModel(2, [1.0, 0.5]),
                                 emb, torch.arange(n), attrs, {"cat": 1}, n_clusters=6, nprobe=3, k_candidates=40,
                                 num_results=5, max_ops=4, max_exact_terms=2)
    return model


def test_model_forward_stays_within_its_ops(counter):
    """One eager `RetrievalModel` forward at batch 1 (unfiltered plans, a Bloom-filtered build):
    launch-bound on a GPU, so its dispatched ops are bounded too, the custom ops' own included.
    The bound sits a little above today's count (78, of which 10 read the plans' extent on the
    CPU only; 77 before empty result slots' task probabilities were set to 0 (one `where`); 81
    before the -inf and -1 fills were cached device scalars (`device_scalar`, one launch each
    instead of two); 88 before the scoring kernel read the keep bools and the cluster
    offsets as they are;
    counted without the custom ops' own ops, 81 then and 133 before the probed slots' keep bits and
    the candidates' storage positions were each one kernel and per-model tables, finiteness in two
    ops and the task probabilities computed once; 244 before the user vector's quantisation, the
    exact verification of the pool and the fresh items, and the exact words were each one kernel)."""
    model = _small_model()
    users = torch.tensor([[3]])
    plans = model.prepare_filters(["cat:1"])
    with torch.no_grad():
        ops = _counted(counter, lambda: model(users, *plans))
    assert ops.launches <= 79, dict(ops.ops)


def test_model_forward_on_the_traced_path_stays_within_its_ops(counter, monkeypatch):
    """The same forward on the path a CUDA graph capture (and torch.compile or export) takes, where
    `tracing()` is true: static bounds, no value read back, the alive bits packed in the graph on
    every call; the device constants kept by the eager call before it, as a capture's warm-up keeps
    them. The bound sits a little above today's count, the custom ops' own ops included (74; 73
    before empty result slots' task probabilities were set to 0; 77 before the fills were cached
    device scalars; 84 before the scoring kernel read the keep bools and the cluster offsets as
    they are; counted without the custom ops' own ops, 77 then and 88
    when the traced path worked out each probed slot's keep bit with a dozen [Q, P, S] int64 ops
    in place of `probed_keep`)."""
    import silvertorch.model
    import silvertorch.scoring
    from silvertorch.ivf import probed, quantize

    model = _small_model()
    model.delete_items(torch.tensor([1, 2, 3]))
    users = torch.tensor([[3]])
    plans = model.prepare_filters(["cat:1"])
    with torch.no_grad():
        eager = model(users, *plans)
        for module in (silvertorch.model, silvertorch.scoring, probed, quantize):
            monkeypatch.setattr(module, "tracing", lambda: True)
        traced = []
        ops = _counted(counter, lambda: traced.append(model(users, *plans)))
    assert "probed_keep" in ops.ops and not ops.syncs, dict(ops.ops)
    assert ops.launches <= 75, dict(ops.ops)
    for a, b in zip(eager, traced[-1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("queries, max_ops", [(1, 2), (CLUSTER_MAJOR_MIN_QUERIES + 1, 5)], ids=["query-major", "cluster-major"])
def test_probed_scores_launches_its_kernels_only(counter, queries, max_ops):
    """The model's scoring op on the Triton path: its output and the scoring kernel, which reads the
    keep bools and the probed clusters' offsets as they are; cluster-major, the schedule's sort,
    blocks and kernel too (9 and 8 ops when the keep bits were packed into words first and, query-
    major, each slot's range gathered)."""
    from silvertorch.ivf.probed import probed_scores

    model = _small_model()
    g = torch.Generator().manual_seed(5)
    clusters = torch.randint(0, model.cluster_positions.shape[0], (queries, 3), generator=g)
    keep = model.cluster_valid[clusters] & (torch.rand(*clusters.shape, model.cluster_positions.shape[1], generator=g) < 0.5)
    q_codes = torch.randint(-127, 128, (queries, model.codes.shape[1]), dtype=torch.int8, generator=g)
    args = (model.codes, model.scales, model.cluster_positions, model.cluster_offsets, clusters, keep, q_codes,
            torch.rand(queries, generator=g) + 0.01)
    ops = _counted(counter, lambda: probed_scores(*args))
    kernel = "probed_score_kernel" if queries < CLUSTER_MAJOR_MIN_QUERIES else "score_cluster_major_kernel"
    assert ops.ops["triton:" + kernel] == 1 and not ops.syncs, dict(ops.ops)
    assert ops.launches <= max_ops, dict(ops.ops)
