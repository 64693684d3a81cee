"""The retrieval model's per-slot steps around its probed clusters, each kernel against its
reference and each reference against a per-item definition: the keep bits of the probed slots
(`silvertorch::probed_keep`), their scores (`silvertorch::probed_scores`) and the storage
positions of candidate slots (`silvertorch::probed_positions`). Run under TRITON_INTERPRET=1, where the CPU takes the Triton path."""

import pytest
import torch

from gpukernels_common import Backend
from gpukernels_common.testing import CanaryBuffer
from silvertorch.bloom.probed import probed_keep
from silvertorch.ivf.index import CLUSTER_MAJOR_MIN_QUERIES
from silvertorch.ivf.probed import probed_positions, probed_scores


def _clusters(n, n_clusters, seed):
    """Random cluster sizes over n items (some empty, the last one too when there are several), as
    the model stores them: starts clamped to the last item, sizes, the widest cluster's width."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randint(0, n + 1, (n_clusters - 1,), generator=g)).values
    if n_clusters > 1:
        cuts[-1] = n  # the last cluster empty
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.full((1,), n, dtype=torch.int64)])
    sizes = offsets.diff()
    return offsets[:-1].clamp(max=n - 1), sizes, max(int(sizes.max()), 1)


def _keep_args(q, p, n_clusters, n, seed):
    starts, sizes, width = _clusters(n, n_clusters, seed)
    n_words = (width + 62) // 64 + 1  # the model's words per cluster
    g = torch.Generator().manual_seed(seed + 1)
    clusters = torch.randint(0, n_clusters, (q, p), generator=g)
    words = ((starts[clusters] >> 6).unsqueeze(-1) + torch.arange(n_words)).clamp(max=(n - 1) // 64).reshape(q, p * n_words)
    passing = torch.randint(-2**63, 2**63 - 1, (q, p * n_words), generator=g, dtype=torch.int64)
    alive = torch.randint(-2**63, 2**63 - 1, ((n + 63) // 64,), generator=g, dtype=torch.int64)
    return passing, words, alive, clusters, starts, sizes, width


def _bit(words, index):
    """Bit index % 64 of words[index // 64] (int64 words)."""
    return ((words[index // 64] >> (index % 64)) & 1).bool()


KEEP_SHAPES = [(1, 1, 1, 1), (3, 2, 5, 97), (2, 4, 9, 700), (5, 3, 4, 130), (1, 6, 3, 64)]


@pytest.mark.parametrize("q, p, n_clusters, n", KEEP_SHAPES)
def test_keep_reference_is_each_slots_bits(q, p, n_clusters, n):
    """Slot j of a probed cluster: j inside the cluster, and its item's bit set in the probed words
    (counted from the word of the cluster's first item) and in the alive words."""
    passing, words, alive, clusters, starts, sizes, width = _keep_args(q, p, n_clusters, n, seed=n)
    got = probed_keep.run(Backend.REFERENCE, passing, words, alive, clusters, starts, sizes, width)
    n_words = passing.shape[1] // p
    want = torch.zeros(q, p, width, dtype=torch.bool)
    for i in range(q):
        for k in range(p):
            c = int(clusters[i, k])
            row = passing[i, k * n_words : (k + 1) * n_words]
            for j in range(int(sizes[c])):
                item = int(starts[c]) + j
                local = item // 64 - int(starts[c]) // 64
                want[i, k, j] = bool(_bit(row, torch.tensor(64 * local + item % 64))) and bool(_bit(alive, torch.tensor(item)))
    assert torch.equal(got, want)
    assert got.is_contiguous()


@pytest.mark.parametrize("q, p, n_clusters, n", KEEP_SHAPES)
def test_keep_kernel_matches_reference(q, p, n_clusters, n):
    args = _keep_args(q, p, n_clusters, n, seed=n + 2)
    assert torch.equal(probed_keep.run(Backend.INTERPRET, *args), probed_keep.run(Backend.REFERENCE, *args))


def test_keep_kernel_writes_every_slot_inside_its_output_only():
    """The launch on a poisoned, canary-padded buffer: every slot written (0 or 1), none past it."""
    import triton

    from silvertorch.bloom.kernels import keep_kernel

    passing, words, alive, clusters, starts, sizes, width = _keep_args(3, 5, 7, 333, seed=5)
    q, p = clusters.shape
    canary = CanaryBuffer((q, p, width), dtype=torch.int8)
    keep_kernel[(q * p, triton.cdiv(width, 32))](canary.tensor, passing, words, alive, clusters, starts, sizes,
                                                  passing.shape[1] // p, width, BS=32)
    canary.check("keep")
    want = probed_keep.run(Backend.REFERENCE, passing, words, alive, clusters, starts, sizes, width)
    assert torch.equal(canary.tensor, want.to(torch.int8))


def _score_args(q, p, n_clusters, n, d, filtered, seed):
    """probed_scores' arguments as the model passes them: random int8 codes and positive scales,
    the clusters of `_clusters` (empty ones included) as offsets and clamped positions, random probed
    clusters (shared between queries), keep off past each cluster's end (padding slots) and, filtered,
    on a random 60% of the slots inside it."""
    _, sizes, width = _clusters(n, n_clusters, seed)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    g = torch.Generator().manual_seed(seed + 5)
    codes = torch.randint(-127, 128, (n, d), dtype=torch.int8, generator=g)
    scales = torch.rand(n, generator=g) + 0.01
    cluster_positions = (offsets[:-1].unsqueeze(1) + torch.arange(width)).clamp(max=n - 1)
    clusters = torch.randint(0, n_clusters, (q, p), generator=g)
    keep = torch.arange(width) < sizes[clusters].unsqueeze(-1)
    if filtered:
        keep &= torch.rand(q, p, width, generator=g) < 0.6
    q_codes = torch.randint(-127, 128, (q, d), dtype=torch.int8, generator=g)
    q_scales = torch.rand(q, generator=g) + 0.01
    return codes, scales, cluster_positions, offsets, clusters, keep, q_codes, q_scales


# (q, p, n_clusters, n, d): one query and one item; odd widths and d (not powers of two, past one
# BD tile of either kernel); batches just below, at and past CLUSTER_MAJOR_MIN_QUERIES (query-major,
# then cluster-major with several blocks of pairs per cluster)
SCORE_SHAPES = [(1, 1, 1, 1, 1), (1, 4, 9, 700, 37), (3, 2, 5, 97, 130), (CLUSTER_MAJOR_MIN_QUERIES - 1, 3, 7, 250, 20),
                (CLUSTER_MAJOR_MIN_QUERIES, 3, 7, 250, 20), (CLUSTER_MAJOR_MIN_QUERIES + 1, 3, 4, 300, 65)]


@pytest.mark.parametrize("filtered", [False, True], ids=["unfiltered", "filtered"])
@pytest.mark.parametrize("q, p, n_clusters, n, d", SCORE_SHAPES)
def test_scores_reference_is_each_slots_scaled_dot(q, p, n_clusters, n, d, filtered):
    """Slot j of probed cluster c: the int8 dot of the query's and item offsets[c] + j's codes, times
    the item's then the query's scale, where keep is on; -inf elsewhere."""
    codes, scales, positions, offsets, clusters, keep, q_codes, q_scales = _score_args(q, p, n_clusters, n, d, filtered, seed=n)
    got = probed_scores.run(Backend.REFERENCE, codes, scales, positions, offsets, clusters, keep, q_codes, q_scales)
    width = positions.shape[1]
    want = torch.full((q, p, width), float("-inf"))
    for i, k, j in keep.nonzero().tolist():
        item = int(offsets[clusters[i, k]]) + j
        dot = int((codes[item].long() * q_codes[i].long()).sum())
        want[i, k, j] = float(dot) * (scales[item] * q_scales[i])
    assert torch.equal(got, want.view(q, -1))


@pytest.mark.parametrize("filtered", [False, True], ids=["unfiltered", "filtered"])
@pytest.mark.parametrize("q, p, n_clusters, n, d", SCORE_SHAPES)
def test_scores_kernels_match_reference(q, p, n_clusters, n, d, filtered):
    """Both scoring kernels (query-major below CLUSTER_MAJOR_MIN_QUERIES queries, cluster-major from
    there) bit for bit: the int8 dots are exact, the scales applied in the reference's order."""
    args = _score_args(q, p, n_clusters, n, d, filtered, seed=n + 6)
    want = probed_scores.run(Backend.REFERENCE, *args)
    assert torch.equal(probed_scores.run(Backend.INTERPRET, *args), want)
    # scored slots, and -inf ones (padding or filtered) unless every slot is kept (the one-item index)
    assert torch.isfinite(want).any() and (torch.isinf(want).any() or bool(args[5].all()))


@pytest.mark.parametrize("cluster_major", [False, True], ids=["query-major", "cluster-major"])
def test_scores_kernels_write_every_slot_inside_their_output_only(cluster_major):
    """The launches on a NaN-poisoned, canary-padded output, with tiles narrower than a cluster (a
    partial last tile): every slot written, none past the output."""
    import triton

    from silvertorch.ivf.index import _cluster_pairs
    from silvertorch.ivf.kernels import probed_score_kernel, score_cluster_major_kernel

    args = _score_args(5, 3, 6, 333, 45, True, seed=12)
    codes, scales, positions, offsets, clusters, keep, q_codes, q_scales = args
    (q, p), width = clusters.shape, positions.shape[1]
    canary = CanaryBuffer((q, p * width))
    if cluster_major:
        pairs, sorted_clusters, block_cluster, block_row, n_blocks = _cluster_pairs(clusters, offsets.numel() - 1, 4)
        score_cluster_major_kernel[(n_blocks, triton.cdiv(width, 32))](
            canary.tensor, codes, scales, q_codes, q_scales, offsets, pairs, sorted_clusters, block_cluster, block_row,
            keep.view(torch.int8), pairs.numel(), 45, p, width, 1, HAS_FILTER=True, KEEP_BYTES=True, INT8_DOT=False,
            FP16_DOT=False, BQ=4, BN=32, BD=32)
    else:
        probed_score_kernel[(q * p, triton.cdiv(width, 32))](canary.tensor, codes, scales, q_codes, q_scales, offsets,
                                                            clusters, keep.view(torch.int8), 45, p, width, BN=32, BD=32)
    canary.check("scores")
    assert torch.equal(canary.tensor, probed_scores.run(Backend.REFERENCE, *args))


def _positions_args(q, p, n_clusters, n, fresh, m, seed):
    starts, _, width = _clusters(n, n_clusters, seed)
    g = torch.Generator().manual_seed(seed + 3)
    clusters = torch.randint(0, n_clusters, (q, p), generator=g)
    slots = torch.randint(0, p * width + fresh, (q, m), generator=g)
    if m > 1:
        slots[:, 0], slots[:, -1] = p * width - 1, p * width + fresh - 1  # the last main slot; the last slot
    return slots, clusters, starts, width, n


POSITION_SHAPES = [(1, 1, 1, 1, 0, 1), (3, 2, 5, 97, 0, 7), (2, 4, 9, 700, 13, 130), (5, 3, 4, 130, 1, 33)]


@pytest.mark.parametrize("q, p, n_clusters, n, fresh, m", POSITION_SHAPES)
def test_positions_reference_is_the_cluster_positions_then_the_fresh_items(q, p, n_clusters, n, fresh, m):
    slots, clusters, starts, width, num_main = _positions_args(q, p, n_clusters, n, fresh, m, seed=n)
    got = probed_positions.run(Backend.REFERENCE, slots, clusters, starts, width, num_main)
    cluster_positions = (starts.unsqueeze(1) + torch.arange(width)).clamp(max=num_main - 1)  # as the model's
    for i in range(q):
        for k in range(m):
            j = int(slots[i, k])
            want = int(cluster_positions[clusters[i, j // width], j % width]) if j < p * width else num_main + j - p * width
            assert int(got[i, k]) == want


@pytest.mark.parametrize("q, p, n_clusters, n, fresh, m", POSITION_SHAPES)
def test_positions_kernel_matches_reference(q, p, n_clusters, n, fresh, m):
    args = _positions_args(q, p, n_clusters, n, fresh, m, seed=n + 4)
    assert torch.equal(probed_positions.run(Backend.INTERPRET, *args), probed_positions.run(Backend.REFERENCE, *args))


def test_positions_kernel_writes_every_slot_inside_its_output_only():
    import triton

    from silvertorch.ivf.kernels import slot_positions_kernel

    slots, clusters, starts, width, num_main = _positions_args(4, 3, 6, 250, 9, 77, seed=6)
    q, m = slots.shape
    canary = CanaryBuffer((q, m), dtype=torch.int64)
    slot_positions_kernel[(q, triton.cdiv(m, 32))](canary.tensor, slots, clusters, starts, m, clusters.shape[1], width,
                                                   num_main - 1, BM=32)
    canary.check("positions")
    assert torch.equal(canary.tensor, probed_positions.run(Backend.REFERENCE, slots, clusters, starts, width, num_main))


def test_no_queries():
    keep_args = _keep_args(1, 2, 3, 50, seed=7)
    passing, words, alive, clusters, starts, sizes, width = keep_args
    empty = (passing[:0], words[:0], alive, clusters[:0], starts, sizes, width)
    slots, pclusters, pstarts, pwidth, num_main = _positions_args(1, 2, 3, 50, 4, 5, seed=8)
    for backend in (Backend.REFERENCE, Backend.INTERPRET):
        assert probed_keep.run(backend, *empty).shape == (0, 2, width)
        assert probed_positions.run(backend, slots[:0], pclusters[:0], pstarts, pwidth, num_main).shape == (0, 5)
        assert probed_positions.run(backend, slots[:, :0], pclusters, pstarts, pwidth, num_main).shape == (1, 0)


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_ops_pass_opcheck(monkeypatch, backend):
    monkeypatch.setenv("GKC_BACKEND", backend)
    torch.library.opcheck(probed_keep.op, _keep_args(2, 3, 5, 150, seed=9))
    torch.library.opcheck(probed_positions.op, _positions_args(2, 3, 5, 150, 6, 20, seed=10))
    torch.library.opcheck(probed_scores.op, _score_args(2, 3, 5, 150, 9, True, seed=14))



def test_keep_reference_traced_or_on_fakes_keeps_no_fake_table(monkeypatch):
    """probed_keep's reference reads module-level word-mask tables (`device_constant`). Traced
    through it (an AOTInductor package's export under `inline_references`, a compile), with the tables
    kept or not yet made, or run on fake tensors by hand: the results equal the eager reference's,
    no table made then is kept, and a kept one is read only by real tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gpukernels_common import inline_references
    from silvertorch import filtering

    args = _keep_args(2, 3, 5, 150, seed=11)
    width = args[-1]
    want = probed_keep.run(Backend.REFERENCE, *args)

    class Keep(torch.nn.Module):
        def forward(self, passing, words, alive, clusters, starts, sizes):
            return probed_keep(passing, words, alive, clusters, starts, sizes, width)

    def kept():
        return {k[0]: v for k, v in filtering._CONSTANTS.items() if k[0].startswith("word_mask_")}

    for cold in (True, False):
        if cold:
            monkeypatch.setattr(filtering, "_CONSTANTS", {})
        else:
            probed_keep.run(Backend.REFERENCE, *args)
            assert len(kept()) == 2
        with inline_references():
            exported = torch.export.export(Keep(), args[:-1])
            compiled = torch.compile(Keep(), backend="aot_eager", fullgraph=True)(*args[:-1])
        with FakeTensorMode() as mode:
            fake = probed_keep.reference(*(mode.from_tensor(a) for a in args[:-1]), width)
        assert fake.shape == want.shape
        assert torch.equal(exported.module()(*args[:-1]), want) and torch.equal(compiled, want)
        assert all(type(t) is torch.Tensor for t in filtering._CONSTANTS.values())
        assert len(kept()) == (0 if cold else 2)
        torch._dynamo.reset()
