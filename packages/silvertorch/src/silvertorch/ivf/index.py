"""IVFIndex and FlatIndex: int8 inverted-file search with filters applied while scoring.

    index = silvertorch.IVFIndex.build(embeddings, ids=None, n_clusters=256)
    scores, ids = index.search(queries, k=100, nprobe=16, filters=bloom.filter(plans))

Items are stored in cluster order (CSR `offsets`; `order[i]` = original row of stored item i,
`ids` = user ids in stored order), as symmetric int8 codes with a per-item scale. A search
probes the nprobe best centroids per query, scores only those clusters' items (a Triton kernel
or the PyTorch reference: int8 dot products in int32, filtered items skipped) into a
[Q, nprobe x max_cluster] candidate buffer — never a query x corpus matrix — and selects the
top k. Equal scores come in slot order: probe rank first (the best centroid's cluster first), then
storage position inside a cluster, the fresh part after the probed clusters. Missing results are
id -1 with score -inf.

Filters over storage positions are tied to a layout: `IVFIndex.layout` counts the times
`compact()` moved items, and a filter made for another layout is refused (see `_check_filters`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from gpukernels_common import capturing, env, grouped_blocks, select_backend
from gpukernels_common.graphs import GraphedCall, padded_batch

from ..filtering import count_row_bits, derived_from, device_arange, device_scalar, pack_bits, unpack_bits
from ..topk import as_count, as_integers, select_topk, select_topk_checked
from .kmeans import kmeans
from .quantize import launch_quantize, quantize_queries, quantize_rows

FORMAT_VERSION = 1


@dataclasses.dataclass
class SearchResult:
    scores: torch.Tensor  # [Q, k] float32, -inf where missing
    ids: torch.Tensor  # [Q, k] int64, -1 where missing
    positions: torch.Tensor  # [Q, k] storage positions, -1 where missing
    found: torch.Tensor  # [Q] candidates that passed the filter in the probed clusters
    nprobe: torch.Tensor  # [Q] clusters finally probed (after adaptive widening)
    fresh: torch.Tensor  # [Q, k] bool: the item comes from the fresh part (added since the last build)


# clusters probed when `nprobe` is not given, capped at the index's clusters (as RetrievalModel.build
# does): the default must work on any index, however few clusters it has
DEFAULT_NPROBE = 8
SCHEDULES = ("auto", "query", "cluster")
CLUSTER_MAJOR_MIN_QUERIES = 16  # auto: from this batch size on, queries share cluster tiles
# the PyTorch reference scores only the passing items once they number at most 1/PASSING_SLOT_COST
# of the probed slots: per item, gathering its row and a matmul per query cost about that many
# times what a slot of the padded, cluster-major scoring costs (200k x 128, 128 queries on two
# CPU cores: even at 6 slots per item for nprobe 16, at 11 for nprobe 64)
PASSING_SLOT_COST = 10
# an approximate (Bloom) filter's winners are verified in pools of VERIFY_POOL x k, each round's pool
# VERIFY_POOL times the last (as the model's one pool of VERIFY_POOL x K)
VERIFY_POOL = 4


# the passing-items path gathers each query's rows apart from this many bytes of rows on (200k x
# 128, 128 queries, nprobe 64: 41 MB at a 10% filter, 41.6 -> 28.2 ms; at 1%, 4 MB, one gather is
# 6-10% faster)
PER_QUERY_GATHER_MIN_BYTES = 8 << 20


def int8_dot_supported(device: torch.device) -> bool:
    """Whether the cluster-major kernel multiplies int8 tiles into int32 (`tl.dot` on the integer
    tensor cores, sm80 and newer; the interpreter too) rather than fp32 copies of them."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def _cluster_pairs(clusters: torch.Tensor, n_clusters: int, block_q: int):
    """The (query, slot) pairs q*P + p grouped by the cluster they probe, and a schedule of blocks
    of at most block_q pairs of one cluster, from device tensors only: (pairs, their clusters
    sorted, block_cluster, block_row, n_blocks). The grid is the upper bound
    ceil(Q*P / block_q) + min(n_clusters, Q*P) blocks; surplus blocks carry cluster -1. One sort
    and one single-program kernel (`cluster_blocks_kernel`) on a Triton backend, else
    `_cluster_blocks_reference`."""
    sorted_clusters, pairs = torch.sort(clusters.reshape(-1), stable=True)
    n = sorted_clusters.numel()
    n_blocks = max(1, -(-n // block_q) + min(n_clusters, n))
    if not select_backend(clusters).uses_triton:
        block_cluster, block_row = _cluster_blocks_reference(sorted_clusters, n_clusters, block_q, n_blocks)
        return pairs, sorted_clusters, block_cluster, block_row, n_blocks
    from .kernels import cluster_blocks_kernel

    blocks = torch.empty(2, n_blocks, dtype=torch.int64, device=clusters.device)
    cluster_blocks_kernel[(1,)](sorted_clusters, blocks[0], blocks[1], n, n_blocks, max(n, 1).bit_length(),
                                BQ=block_q, BLOCK=1024)
    return pairs, sorted_clusters, blocks[0], blocks[1], n_blocks


def _cluster_blocks_reference(sorted_clusters: torch.Tensor, n_clusters: int, block_q: int, n_blocks: int):
    """`cluster_blocks_kernel` in PyTorch: (block_cluster [n_blocks], block_row [n_blocks]) int64,
    each cluster's run of the sorted clusters cut into blocks of block_q rows, cluster -1 and row 0
    past the last block. Each cluster's pairs are found by a binary search of the sorted clusters
    (bincount reads its input's largest value back on the host to size its output: a
    synchronisation)."""
    cluster_ids = device_arange(n_clusters, sorted_clusters.device)
    pair_starts = torch.searchsorted(sorted_clusters, cluster_ids)
    pair_ends = torch.searchsorted(sorted_clusters, cluster_ids, right=True)
    cluster, first, _ = grouped_blocks(pair_starts, pair_ends - pair_starts, sorted_clusters.numel(), block_q)
    # grouped_blocks' bound (ceil(total / block) + n_clusters) is at least n_blocks, and its blocks past
    # the used ones are spare
    return cluster[:n_blocks].long(), first[:n_blocks].long()


def _prepare_queries(queries: torch.Tensor, clusters: torch.Tensor, cluster_starts: torch.Tensor,
                     cluster_sizes: torch.Tensor):
    """(q_codes [Q, D] int8, q_scales [Q], starts [Q, P], lengths [Q, P], found [Q]): the queries
    quantised (`quantize_rows`), their probed clusters' storage ranges and the items in them. One
    kernel (`prepare_queries_kernel`) on a Triton backend, else `_prepare_queries_reference`."""
    if not select_backend(queries).uses_triton or queries.shape[0] == 0:
        return _prepare_queries_reference(queries, clusters, cluster_starts, cluster_sizes)
    q, p = clusters.shape
    ranges = torch.empty(2 * q * p + q, dtype=torch.int64, device=queries.device)  # starts, lengths, found: one allocation
    starts, lengths, found = ranges[:q * p].view(q, p), ranges[q * p:2 * q * p].view(q, p), ranges[2 * q * p:]
    q_codes, q_scales = launch_quantize(queries, (clusters.contiguous(), cluster_starts, cluster_sizes, starts, lengths, found))
    return q_codes, q_scales, starts, lengths, found


def _prepare_queries_reference(queries, clusters, cluster_starts, cluster_sizes):
    q_codes, q_scales = quantize_rows(queries)
    lengths = cluster_sizes[clusters]
    return q_codes, q_scales, cluster_starts[clusters], lengths, lengths.sum(1)


def _search_results(top, order, starts, L, main_slots, ids, fresh_ids, num_main, k, nprobe):
    """(scores, positions, ids, fresh, nprobe) of a search from its selection: top / order [Q, kk]
    (kk <= k; order a slot of the candidates or -1), the main slots' storage ranges (starts [Q, P],
    L slots each), then the fresh part's slots. One kernel (`search_results_kernel`) on a Triton
    backend, else `_search_results_reference`."""
    q, kk = order.shape
    if not select_backend(order).uses_triton or q == 0:
        return _search_results_reference(top, order, starts, L, main_slots, ids, fresh_ids, num_main, k, nprobe)
    import triton

    from .kernels import search_results_kernel

    scores = top.contiguous() if kk == k else torch.empty(q, k, dtype=torch.float32, device=top.device)
    out = torch.empty(2 * q * k + q, dtype=torch.int64, device=top.device)  # positions, ids, nprobe: one allocation
    positions, out_ids, probed = out[:q * k].view(q, k), out[q * k:2 * q * k].view(q, k), out[2 * q * k:]
    fresh = torch.empty(q, k, dtype=torch.bool, device=top.device)
    block = min(1024, triton.next_power_of_2(q * k))
    # an empty table is never read (no slot maps to it) but must be a valid pointer: another one stands in
    ids = ids if ids.numel() else out
    fresh_ids = fresh_ids if fresh_ids.numel() else ids
    search_results_kernel[(triton.cdiv(q * k, block),)](
        top.contiguous(), order.contiguous(), starts.contiguous(), ids, fresh_ids, scores, positions, out_ids, fresh,
        probed, q, k, kk, starts.shape[1], L, main_slots, num_main, nprobe, BLOCK=block)
    return scores, positions, out_ids, fresh, probed


def _search_results_reference(top, order, starts, L, main_slots, ids, fresh_ids, num_main, k, nprobe):
    pos = _selected_positions(order, lambda slots: starts.gather(1, slots // L) + slots % L, main_slots, num_main,
                              fresh_ids.numel() > 0)
    top, pos = _padded_to_k(top, pos, k)
    return (top, pos, _ids_of(pos, ids, fresh_ids, num_main), pos >= num_main,
            torch.full((pos.shape[0],), nprobe, dtype=torch.int64, device=pos.device))


def _selected_positions(order, positions_of, main_slots: int, num_main: int, with_fresh: bool) -> torch.Tensor:
    """Storage positions of selected slots `order` (-1 stays -1): main slots through
    `positions_of`, fresh slot main_slots + f at position num_main + f."""
    if not with_fresh:  # main slots only
        return torch.where(order >= 0, positions_of(order.clamp(min=0)), -1)
    slot = order.clamp(0, max(main_slots - 1, 0))
    pos = torch.where(order < main_slots, positions_of(slot), num_main + order - main_slots)
    return torch.where(order >= 0, pos, -1)


def _padded_to_k(top: torch.Tensor, pos: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A selection of fewer than k candidates padded to k: score -inf, position -1."""
    pad = k - top.shape[1]
    if pad <= 0:
        return top, pos
    return (torch.cat([top, top.new_full((top.shape[0], pad), float("-inf"))], 1),
            torch.cat([pos, pos.new_full((pos.shape[0], pad), -1)], 1))


def _ids_of(positions: torch.Tensor, ids: torch.Tensor, fresh_ids: torch.Tensor, num_main: int) -> torch.Tensor:
    """User ids of storage positions: main (`ids`), then fresh (`fresh_ids`); -1 stays -1."""
    main = ids[positions.clamp(0, max(num_main - 1, 0))] if num_main else torch.full_like(positions, -1)
    if fresh_ids.numel():
        fresh = fresh_ids[(positions - num_main).clamp(0, fresh_ids.numel() - 1)]
        main = torch.where(positions >= num_main, fresh, main)
    return torch.where(positions >= 0, main, device_scalar(-1, main))


def _check_embeddings(embeddings, dim: int | None = None) -> torch.Tensor:
    """Embeddings as a finite float tensor [num_items, dim] (numpy arrays converted), or a ValueError."""
    try:
        embeddings = torch.as_tensor(embeddings)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"embeddings must be a float tensor or array [num_items, {dim or 'dim'}], got "
                         f"{type(embeddings).__name__}") from err
    if embeddings.dim() != 2 or not embeddings.dtype.is_floating_point or (dim is not None and embeddings.shape[1] != dim):
        raise ValueError(f"embeddings must be a float tensor [num_items, {dim or 'dim'}], got {embeddings.dtype} {tuple(embeddings.shape)}")
    # as float32, the precision items are clustered and quantised in: float64 past its range turns inf there
    if not torch.isfinite(embeddings.float()).all():
        raise ValueError("embeddings contain NaN or inf")
    return embeddings


def _checked_ids(ids, n: int, device) -> torch.Tensor:
    """int64 [n] ids, distinct and non-negative (-1 marks a missing result in every search)."""
    if ids is None:
        return torch.arange(n, device=device)
    ids = torch.as_tensor(ids, device=device)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.shape != (n,):
        raise ValueError(f"ids must be {n} integers (one per embedding), got {ids.dtype} {tuple(ids.shape)}")
    ids = ids.long()
    if n and (int(ids.min()) < 0 or ids.unique().numel() != n):
        raise ValueError("ids must be distinct and non-negative (-1 marks a missing result)")
    return ids


def _encode(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored rows: symmetric int8 codes + scales, or bf16 rows with unit scales."""
    if dtype == "int8":
        return quantize_rows(x)
    return x.to(torch.bfloat16).contiguous(), torch.ones(x.shape[0], device=x.device)


def _int8_dots(q_codes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[Q, M] exact integer dot products of int8 codes, as float32 (what the kernels accumulate in
    int32). Sums stay below 2^24 when D <= 1040, so an fp32 matmul is exact and fast."""
    if rows.shape[1] * 127 * 127 < 2**24:
        return q_codes.float() @ rows.float().T
    return (q_codes.to(torch.int32).unsqueeze(1) * rows.to(torch.int32).unsqueeze(0)).sum(-1).float()


def int8_matmul(q_codes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """int32 [Q, R] exact integer dot products of int8 codes: one int8 x int8 -> int32 matmul on
    the CPU (torch._int_mm, oneDNN), no float copy of the rows; elsewhere `_int8_dots` (fp32, exact
    while sums stay below 2^24), as _int_mm's CUDA shape rules do not fit every batch."""
    if rows.device.type == "cpu" and q_codes.shape[1] > 1:  # (torch 2.13's _int_mm returns garbage for D = 1)
        return torch._int_mm(q_codes, rows.T)
    return _int8_dots(q_codes, rows).to(torch.int32)


# eager scoring (`cluster_major_scores`): from this many bytes of [pairs, width] scores on, each
# cluster's block is scaled as it is scored, the result written once; below it, fewer ops per
# cluster win. 200k x 128 items, 512 clusters, 128 queries on 2 cores: 7.8 MB (nprobe 16) 22.7 ms
# in passes, 23.6 in blocks; 31 MB (nprobe 64) 69 and 41 ms.
BLOCKED_SCORES_MIN_BYTES = 16 << 20


def cluster_major_scores(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, q_codes: torch.Tensor,
                         q_scales: torch.Tensor, clusters: torch.Tensor, width: int) -> torch.Tensor:
    """float32 [Q*P, width]: row q*P + p holds query q's scores of the items of its probed cluster
    clusters[q, p] (CSR `offsets` over `codes`): int8 dot x (item scale x query scale), as the
    kernels, and -inf from the cluster's end on. Eager PyTorch, cluster-major: each probed
    cluster's rows (contiguous) are scored against every query that probes it in one int8 matmul,
    so no row is read or scored twice and no query scores a cluster it does not probe. From
    BLOCKED_SCORES_MIN_BYTES of result on, each cluster's scores are scaled in a block that stays
    in cache and the block's rows copied into their (query, probe) rows: the result is written
    once. Below it, the dots are placed first and scaled in passes over the whole result."""
    q, p = clusters.shape
    if codes.shape[0] == 0:  # every item removed and compacted away: nothing to score
        return torch.full((q * p, width), float("-inf"), device=codes.device)
    flat = clusters.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (query, probe) pairs grouped by cluster
    uniq, counts = torch.unique_consecutive(flat[order], return_counts=True)
    firsts, sizes = offsets[uniq], offsets[uniq + 1] - offsets[uniq]
    slots = torch.arange(width, device=codes.device)
    item_scales = scales.index_select(0, (firsts.unsqueeze(1) + slots).clamp_(max=max(codes.shape[0] - 1, 0)).view(-1))
    item_scales = item_scales.view(-1, width)
    item_scales.masked_fill_(slots >= sizes.unsqueeze(1), float("-inf"))  # [probed clusters, width]
    query = order // p
    if q * p * width * 4 < BLOCKED_SCORES_MIN_BYTES:
        # the int32 dots placed first (1 past a cluster's end, so that 1 x -inf = -inf), then the
        # scales in whole-buffer passes: fewer ops per cluster
        dots = torch.ones(q * p, width, dtype=torch.int32, device=codes.device)
        split = counts.tolist()  # per-cluster views from one split call each, not a slice each
        for lo, size, pairs, queries in zip(firsts.tolist(), sizes.tolist(), order.split(split),
                                            q_codes.index_select(0, query).split(split)):
            if size:
                dots[:, :size].index_copy_(0, pairs, int8_matmul(queries, codes[lo:lo + size]))
        rank = torch.empty_like(order)
        rank[order] = torch.repeat_interleave(torch.arange(uniq.numel(), device=codes.device), counts)
        return item_scales.index_select(0, rank).mul_(q_scales.repeat_interleave(p).unsqueeze(1)).mul_(dots)
    scores = torch.empty(q * p, width, dtype=torch.float32, device=codes.device)
    # per-cluster views made by a few split calls, not by a slice each (the loop's cost is its ops)
    counts = counts.tolist()
    for lo, size, pairs, queries, q_scale, item_scale in zip(
            firsts.tolist(), sizes.tolist(), order.split(counts), q_codes.index_select(0, query).split(counts),
            q_scales.index_select(0, query).unsqueeze(1).split(counts), item_scales):
        block = item_scale * q_scale  # -inf past the cluster's end
        if size:
            block[:, :size].mul_(int8_matmul(queries, codes[lo:lo + size]))
        scores.index_copy_(0, pairs, block)
    return scores


def _as_queries(queries) -> torch.Tensor:
    """Queries as a tensor: numpy arrays (and nested lists) are converted, anything else refused."""
    if isinstance(queries, torch.Tensor):
        return queries
    try:
        return torch.as_tensor(queries)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"queries must be a float tensor or array [num_queries, dim], got {type(queries).__name__}") from err


def _range_masks(filters, starts, lengths, max_length: int) -> torch.Tensor:
    """`filters.range_masks` of the search's own ranges (inside the index by construction): a
    filter's unchecked variant where it has one (a BloomFilter's checks read the ranges back)."""
    return getattr(filters, "_range_masks_unchecked", filters.range_masks)(starts, lengths, max_length)


def _check_queries(queries: torch.Tensor, dim: int, k: int) -> None:
    if queries.dim() != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must be [num_queries, {dim}], got {tuple(queries.shape)}")
    if not queries.dtype.is_floating_point:
        raise ValueError(f"queries must be floating point, got {queries.dtype}")
    # a captured graph cannot read values (its caller checks). Finite values times 0 sum to 0, inf and NaN
    # to NaN: three ops (isfinite().all() takes five). Checked as float32, the precision every path
    # scores in: float64 past its range turns inf there (float32 queries are not copied)
    if not capturing() and float((queries.float() * 0).sum()) != 0:
        raise ValueError("queries contain NaN or inf")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


class IVFIndex:
    def __init__(self, centroids, offsets, codes, scales, ids, order, max_cluster: int | None = None):
        self.centroids, self.offsets, self.codes, self.scales, self.ids, self.order = centroids, offsets, codes, scales, ids, order
        sizes = offsets.diff()
        self.max_cluster = int(sizes.max()) if max_cluster is None and sizes.numel() else int(max_cluster or 0)
        self.removed = torch.zeros(codes.shape[0], dtype=torch.bool, device=codes.device)
        # the fresh part: items added since the last build, scored exhaustively beside the probed
        # clusters; storage positions num_main + j (filters must cover them: e.g. BloomIndex.append)
        self.fresh_codes = codes.new_zeros(0, codes.shape[1])
        self.fresh_scales, self.fresh_ids = scales.new_zeros(0), ids.new_zeros(0)
        self.fresh_removed = torch.zeros(0, dtype=torch.bool, device=codes.device)
        # storage layout generation: compact() moves items and counts up; filters over positions
        # carry the layout they were made for (`layout`, 0 when absent) and must match it
        self.layout = 0
        # add / remove / compact calls so far: a captured search refuses an index changed since
        self._mutations = 0
        # build-input rows numbered so far (the build's, then every added item's, removed ones
        # too): compact() numbers the fresh items from here, never reusing a compacted-away row
        self.rows_numbered = int(order.max()) + 1 if order.numel() else 0

    @classmethod
    def build(cls, embeddings: torch.Tensor, ids: torch.Tensor | None = None, n_clusters: int = 256, dtype: str = "int8",
              iters: int = 20, seed: int = 0) -> IVFIndex:
        if dtype != "int8":
            raise ValueError(f"IVFIndex stores int8 codes (dtype='int8'); use FlatIndex for dtype={dtype!r}")
        # ints (numpy's too): 2.5 or True failed inside k-means with a TypeError naming no argument
        n_clusters, iters = as_count(n_clusters, "n_clusters"), as_count(iters, "iters")
        embeddings = _check_embeddings(embeddings)
        n = embeddings.shape[0]
        ids = _checked_ids(ids, n, embeddings.device)
        centroids, assign = kmeans(embeddings, n_clusters, iters=iters, seed=seed)
        order = torch.argsort(assign, stable=True)
        counts = torch.bincount(assign, minlength=n_clusters)
        offsets = torch.zeros(n_clusters + 1, dtype=torch.int64, device=embeddings.device)
        offsets[1:] = torch.cumsum(counts, 0)
        codes, scales = quantize_rows(embeddings[order])
        return cls(centroids, offsets, codes, scales, ids[order], order)

    @property
    def num_items(self) -> int:
        """Main + fresh items (tombstoned ones included): the positions a filter must cover."""
        return self.codes.shape[0] + self.fresh_codes.shape[0]

    @property
    def num_main(self) -> int:
        return self.codes.shape[0]

    @property
    def num_fresh(self) -> int:
        return self.fresh_codes.shape[0]

    @property
    def n_clusters(self) -> int:
        return self.centroids.shape[0]

    def bytes_per_item(self) -> float:
        """Stored bytes per item: code (int8, or bf16 for a bf16 FlatIndex), fp32 scale, int64 id."""
        return self.codes.shape[1] * self.codes.element_size() + self.scales.element_size() + self.ids.element_size()

    @property
    def dtype(self) -> str:
        """How rows are stored: "int8" (IVFIndex, FlatIndex) or "bfloat16" (FlatIndex)."""
        return "bfloat16" if self.codes.dtype == torch.bfloat16 else "int8"

    def _exhaustive_scores(self, queries, codes, scales, removed, first_position, filters) -> torch.Tensor:
        """[Q, M] scores of every row of `codes` (storage positions first_position..; -inf: filtered
        or removed): int8 rows against quantized queries as the kernels score them, bf16 rows
        against fp32 queries."""
        if codes.dtype == torch.bfloat16:
            scores = queries.float() @ codes.float().T
        else:
            q_codes, q_scales = quantize_queries(queries)  # one kernel on a Triton backend
            scores = int8_matmul(q_codes, codes) * (scales.unsqueeze(0) * q_scales.unsqueeze(1))
        keep = ~removed.unsqueeze(0).expand_as(scores)
        if filters is not None and codes.shape[0]:
            q, m = scores.shape
            starts = torch.full((q, 1), first_position, dtype=torch.int64, device=scores.device)
            lengths = torch.full((q, 1), m, dtype=torch.int64, device=scores.device)
            keep = keep & unpack_bits(_range_masks(filters, starts, lengths, m).to(scores.device), m)[:, 0]
        return scores.masked_fill(~keep, float("-inf"))

    def _ids_at(self, positions: torch.Tensor) -> torch.Tensor:
        """User ids of storage positions (main, then fresh; -1 stays -1)."""
        if not self.num_fresh:  # one lookup: position -1 reads the -1 kept after the ids
            return derived_from(self, "_ids_then_missing", self.ids, lambda ids: torch.cat([ids, ids.new_full((1,), -1)]))[positions]
        return _ids_of(positions, self.ids, self.fresh_ids, self.num_main)

    # -- search ------------------------------------------------------------------------------
    def probe(self, queries: torch.Tensor, nprobe: int) -> torch.Tensor:
        """[Q, nprobe] best clusters by centroid inner product."""
        return torch.topk(queries.float() @ self.centroids.T, nprobe, dim=1).indices

    def candidate_scores(self, queries: torch.Tensor, clusters: torch.Tensor, filters=None, *,
                         out: torch.Tensor | None = None, schedule: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [Q, P*L] of every item of the probed clusters (-inf: outside/filtered/removed) and
        positions; L is the largest cluster. `out`: a preallocated float32 [Q, P*L] to write into.
        `schedule` (Triton backends): "query" (one program per query × cluster × items), "cluster"
        (queries grouped by the cluster they probe, tl.dot on a shared row tile), "auto": cluster-
        major from CLUSTER_MAJOR_MIN_QUERIES queries on."""
        queries = _as_queries(queries)
        if filters is not None:
            self._check_filters(filters, queries.shape[0])
        scores, starts, L, _ = self._slot_scores(queries, clusters, filters, out=out, schedule=schedule)
        return scores, (starts.unsqueeze(-1) + torch.arange(L, device=starts.device)).reshape(scores.shape)

    def _any_removed(self) -> bool:
        """Whether any main item is tombstoned, read again only after `removed` changed (a scan of
        every item per search otherwise: 70 us of a 1 ms batch-1 search at 200k items)."""
        return derived_from(self, "_removed_seen", self.removed, lambda removed: bool(removed.any()))

    def _cluster_extents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first storage position [n_clusters], items [n_clusters]) of each cluster, kept until
        `offsets` is replaced or edited (two ops fewer per search than slicing the offsets)."""
        return derived_from(self, "_extents", self.offsets, lambda offsets: (offsets[:-1].contiguous(), offsets.diff()))

    def _probed_ranges(self, queries, clusters, filters, extents=None):
        """(starts [Q, P], lengths [Q, P], L, words): the probed clusters' storage ranges, L the
        largest cluster, and their keep words [Q, P, ceil(L/32)] (passes the filter and not
        deleted; bits past a cluster's end 0), or None when every item of every range is kept.
        `extents`: (starts, lengths), if already taken."""
        if extents is None:
            cluster_starts, cluster_sizes = self._cluster_extents()
            starts, lengths = cluster_starts[clusters], cluster_sizes[clusters]
        else:
            starts, lengths = extents
        L = max(self.max_cluster, 1)
        words = None
        if filters is not None:
            words = _range_masks(filters, starts, lengths, L).to(self.codes.device)
        if self._any_removed():
            slots = torch.arange(L, device=starts.device)
            alive = ~self.removed[(starts.unsqueeze(-1) + slots).clamp(max=max(self.num_main - 1, 0))]
            alive = pack_bits(alive & (slots < lengths.unsqueeze(-1)))  # bits past a cluster's end are 0, as a filter's
            words = alive if words is None else words & alive
        return starts, lengths, L, words

    def _slot_scores(self, queries, clusters, filters=None, *, out=None, schedule="auto", ranges=None):
        """`candidate_scores` without the positions: (scores [Q, P*L], starts [Q, P], L, found [Q]);
        slot j of a row holds storage position starts[j // L] + j % L (search reads it only for the
        k kept); `found` counts the slots that passed (from the filter words, not the scores).
        `ranges`: `_probed_ranges` of the same arguments, if already taken."""
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if ranges is None and self.codes.dtype == torch.int8:
            # the queries quantised and the probed ranges taken together (one kernel on a Triton backend)
            q_codes, q_scales, starts, lengths, found = _prepare_queries(queries, clusters, *self._cluster_extents())
            starts, lengths, L, words = self._probed_ranges(queries, clusters, filters, extents=(starts, lengths))
        else:
            starts, lengths, L, words = ranges or self._probed_ranges(queries, clusters, filters)
            q_codes, q_scales = quantize_rows(queries)
            found = None
        q, p = clusters.shape
        if words is not None:
            found = count_row_bits(words)
        elif found is None:
            found = lengths.sum(1)
        if out is not None and (tuple(out.shape) != (q, p * L) or out.dtype != torch.float32 or out.device != self.codes.device
                                or not out.is_contiguous()):  # the kernels write it row-major
            raise ValueError(f"out must be a contiguous float32 ({q}, {p * L}) on {self.codes.device}, got {out.dtype} "
                             f"{tuple(out.shape)} on {out.device}{'' if out.is_contiguous() else ' (not contiguous)'}")
        if select_backend(self.codes).uses_triton:
            import triton

            from .kernels import score_cluster_major_kernel, score_kernel

            out = torch.empty(q, p * L, dtype=torch.float32, device=self.codes.device) if out is None else out
            # the kernels index every tensor as row-major (row * D + d): a transposed or Fortran-ordered
            # input, or a hand-made index, is copied once rather than read wrongly
            codes, scales, offsets = self.codes.contiguous(), self.scales.contiguous(), self.offsets.contiguous()
            q_codes, q_scales = q_codes.contiguous(), q_scales.contiguous()
            w32 = words.shape[-1] if words is not None else 1
            flat_words = words.reshape(-1).contiguous() if words is not None else starts
            d = self.codes.shape[1]
            if schedule == "cluster" or (schedule == "auto" and q >= CLUSTER_MAJOR_MIN_QUERIES):
                bq, bn = 16, 64
                pairs, sorted_clusters, block_cluster, block_row, n_blocks = _cluster_pairs(clusters, self.n_clusters, bq)
                score_cluster_major_kernel[(n_blocks, triton.cdiv(L, bn))](
                    out, codes, scales, q_codes, q_scales, offsets, pairs, sorted_clusters, block_cluster, block_row,
                    flat_words, pairs.numel(), d, p, L, w32, HAS_FILTER=words is not None, KEEP_BYTES=False, INT8_DOT=int8_dot_supported(self.codes.device),
                    FP16_DOT=env.gpu_launch_shapes(self.codes.device),
                    BQ=bq, BN=bn, BD=min(64, max(32, triton.next_power_of_2(d))))
            else:
                bn = 64
                score_kernel[(q * p, triton.cdiv(L, bn))](
                    out, codes, scales, q_codes, q_scales, starts.reshape(-1).contiguous(), lengths.reshape(-1).contiguous(),
                    flat_words, d, p, L, w32, HAS_FILTER=words is not None, BN=bn, BD=min(128, triton.next_power_of_2(d)))
            return out, starts, L, found
        result = self._scores_reference(q_codes, q_scales, clusters, starts, lengths, words, L).view(q, p * L)
        return (result if out is None else out.copy_(result)), starts, L, found

    def _scores_reference(self, q_codes, q_scales, clusters, starts, lengths, words, L):
        q, p = starts.shape
        scores = cluster_major_scores(self.codes, self.scales, self.offsets, q_codes, q_scales, clusters, L)
        if words is not None:
            scores.masked_fill_(~unpack_bits(words, L).reshape(q * p, L), float("-inf"))
        return scores

    def search_with_stats(self, queries: torch.Tensor, k: int, nprobe: int | None = None, filters=None, adaptive: bool = False,
                          max_nprobe: int | None = None) -> SearchResult:
        """Search; with `adaptive`, queries that returned fewer than k results are re-run with
        twice the clusters until they have k or reach `max_nprobe` (default: all clusters; a larger
        value is capped there, as it only bounds the widening). Only those queries are re-run (with
        `filters.select` of them); each query's result does not depend on the others in the batch.
        "Fewer than k results" counts the verified results, not `found`: under a Bloom filter
        `found` counts its false positives too, which the results drop. `queries` may be a numpy
        array; k, nprobe and max_nprobe Python or numpy ints; max_nprobe below nprobe is a ValueError
        (as RetrievalModel.build refuses it).

        nprobe: clusters probed per query, default min(8, n_clusters). An explicit nprobe must be
        in [1, n_clusters] (a ValueError otherwise, as RetrievalModel.build refuses it; FAISS
        would cap it): asking for more clusters than the index has is a mistake to report, not
        to round away."""
        queries = _as_queries(queries)
        k = as_count(k, "k")
        nprobe = min(DEFAULT_NPROBE, self.n_clusters) if nprobe is None else as_count(nprobe, "nprobe")
        _check_queries(queries, self.codes.shape[1], k)
        if not 1 <= nprobe <= self.n_clusters:
            raise ValueError(f"nprobe must be in [1, n_clusters={self.n_clusters}], got {nprobe}")
        max_nprobe = self.n_clusters if max_nprobe is None else as_count(max_nprobe, "max_nprobe")
        if max_nprobe < nprobe:  # widening that could only narrow
            raise ValueError(f"max_nprobe must be >= nprobe={nprobe} (the clusters the first pass probes), got {max_nprobe}")
        max_nprobe = min(max_nprobe, self.n_clusters)
        if filters is not None:
            self._check_filters(filters, queries.shape[0])
            if queries.shape[0] == 0:  # nothing to filter: the unfiltered search's empty result (the filtered
                filters = None         # path's range masks and counts have no row to size their views by)
        queries = queries.to(self.codes.device)
        result = self._search_once(queries, k, nprobe, filters)
        while adaptive and nprobe < max_nprobe:
            short = ((result.ids >= 0).sum(1) < k).nonzero().squeeze(1)
            if not short.numel():
                break
            nprobe = min(2 * nprobe, max_nprobe)
            if short.numel() < queries.shape[0]:
                wider = self._search_once(queries[short], k, nprobe, None if filters is None else filters.select(short))
            else:  # every query is short (a selective filter): no subset to take
                wider = self._search_once(queries, k, nprobe, filters)
            for name in ("scores", "ids", "positions", "found", "nprobe", "fresh"):
                getattr(result, name)[short] = getattr(wider, name)
        return result

    def _check_filters(self, filters, num_queries: int) -> None:
        """At the entry points (search_with_stats, candidate_scores), before anything runs."""
        if not all(hasattr(filters, name) for name in ("num_queries", "range_masks")):
            hint = {"FilterPlans": " (plans: pass bloom_index.filter(plans))",
                    "BloomIndex": " (a Bloom index: pass bloom_index.filter(plans))"}.get(type(filters).__name__, "")
            raise TypeError(f"filters must be a range filter, bloom_index.filter(plans) or DenseMaskFilter(mask), got "
                            f"{type(filters).__name__}{hint}")
        if filters.num_queries != num_queries:
            raise ValueError(f"filters cover {filters.num_queries} queries, queries has {num_queries}")
        items = getattr(filters, "num_items", None)  # a filter over too few positions would drop the rest silently
        if items is not None and items != self.num_items:
            raise ValueError(f"filters cover {items} item positions, the index has {self.num_items} (main and fresh)")
        layout = getattr(filters, "layout", 0)
        if layout != self.layout:  # same item count, other positions: the filter would pass the wrong items
            raise ValueError(f"filters were made for storage layout {layout}, the index is at layout {self.layout}: compact() "
                             f"moved its items. Rebuild the filter over the items in index.order and tag it with "
                             f"layout=index.layout (BloomIndex.build(..., layout=) or DenseMaskFilter(mask, layout=))")

    def _search_candidates(self, queries, clusters, filters):
        """(scores [Q, M], positions_of, found [Q], slots) for one search: `positions_of(slots)` maps
        slots of `scores` to storage positions. The PyTorch reference under a selective filter
        scores only the items that pass (`_passing_scores`; slots None); otherwise every slot of
        the probed clusters (`_slot_scores`; slots = (starts, L): slot j is position
        starts[j // L] + j % L)."""
        ranges = None
        if self.codes.dtype == torch.int8 and not select_backend(self.codes).uses_triton:
            ranges = self._probed_ranges(queries, clusters, filters)
            starts, _, L, words = ranges
            if words is not None:
                found = count_row_bits(words)
                if int(found.sum()) * PASSING_SLOT_COST <= words.shape[0] * words.shape[1] * L:
                    scores, positions = self._passing_scores(queries, starts, L, words, found)
                    return scores, (lambda slots: positions.gather(1, slots)), found, None
        scores, starts, L, found = self._slot_scores(queries, clusters, filters, ranges=ranges)
        return scores, (lambda slots: starts.gather(1, slots // L) + slots % L), found, (starts, L)

    def _passing_scores(self, queries, starts, L, words, found):
        """Scores of the items whose keep bit is set, compacted per query: (scores [Q, W], storage
        positions [Q, W]), W the most any query kept, -inf / -1 past a query's own count. A
        query's items keep their slot order (probe, then position), so ties break as in the
        padded layout. One int8 matmul per query over its gathered rows."""
        q_codes, q_scales = quantize_rows(queries)
        q, p, w = words.shape
        # the set bits, query-major: first the nonzero words (few under a selective filter), then their
        # bits; flat word indices and index_select (advanced indexing costs several times more here)
        flat_words = words.reshape(-1)
        nonzero = (flat_words != 0).nonzero().squeeze(1)
        hit, bit = unpack_bits(flat_words.index_select(0, nonzero).unsqueeze(1), 32).nonzero(as_tuple=True)
        word_at = nonzero.index_select(0, hit)  # flat (query, probe, word) index of each passing item
        query = torch.div(word_at, p * w, rounding_mode="floor")
        positions = starts.reshape(-1).index_select(0, torch.div(word_at, w, rounding_mode="floor")) + (word_at % w) * 32 + bit
        padded_queries = q_codes.new_zeros(q, 8, q_codes.shape[1])  # _int_mm's smallest right-hand side
        padded_queries[:, 0] = q_codes
        device = positions.device
        dots = torch.empty(positions.numel(), dtype=torch.int32, device=device)
        # many rows: each query's rows gathered apart, a block that stays in cache, not one
        # [items, D] copy; few: one gather (a call per query costs more than it saves)
        rows = None if positions.numel() * self.codes.shape[1] >= PER_QUERY_GATHER_MIN_BYTES else self.codes.index_select(0, positions)
        at = 0
        for i, n in enumerate(found.tolist()):
            if n:
                block = self.codes.index_select(0, positions[at:at + n]) if rows is None else rows[at:at + n]
                dots[at:at + n] = int8_matmul(block, padded_queries[i])[:, 0]
            at += n
        scores = dots * (self.scales.index_select(0, positions) * q_scales.index_select(0, query))  # item x query, as the kernels
        width = max(int(found.max()), 1) if q else 1  # zero queries: no row to take a max of
        rank = torch.arange(positions.numel(), device=device) - (found.cumsum(0) - found).index_select(0, query)
        at = query * width + rank
        grid = torch.full((q, width), float("-inf"), device=device).view(-1).index_copy_(0, at, scores)
        grid_positions = torch.full((q, width), -1, dtype=torch.int64, device=device).view(-1).index_copy_(0, at, positions)
        return grid.view(q, width), grid_positions.view(q, width)

    def _search_once(self, queries, k, nprobe, filters) -> SearchResult:
        clusters = self.probe(queries, nprobe)
        scores, positions_of, found, slots = self._search_candidates(queries, clusters, filters)
        main_slots = scores.shape[1]
        if self.num_fresh:  # merged into the same selection, so one top-k covers both parts
            fresh_scores = self._exhaustive_scores(queries, self.fresh_codes, self.fresh_scales, self.fresh_removed,
                                                   self.num_main, filters)
            scores = torch.cat([scores, fresh_scores], 1)
            found = found + (fresh_scores > float("-inf")).sum(1)  # scores are finite or -inf
        kk = min(k, scores.shape[1])

        # int8 scores are finite (finite codes and scales, the queries checked): no NaN scan, which
        # would read a flag back on the host; bf16 rows' fp32 products may overflow to inf - inf
        select_topk_of = select_topk_checked if self.codes.dtype == torch.int8 else select_topk

        def select(m):
            top, order = select_topk_of(scores, m)  # exact, ties in slot order; two-level / radix for long rows
            # storage positions of the m kept only
            return top, order, _selected_positions(order, positions_of, main_slots, self.num_main, bool(self.num_fresh))

        approximate = getattr(filters, "approximate", False)
        if not approximate and slots is not None and select_backend(scores).uses_triton:
            # positions, ids, padding and flags of the k kept in one kernel
            top, order = select_topk_of(scores, kk)
            top, pos, ids, fresh, probed = _search_results(top, order, *slots, main_slots, self.ids, self.fresh_ids,
                                                           self.num_main, k, nprobe)
            return SearchResult(top, ids, pos, found, probed, fresh)
        if not approximate:
            top, _, pos = select(kk)
        else:
            # a Bloom filter passes a superset: a pool of the best VERIFY_POOL x k is checked against the
            # stored attributes, and while a row has fewer than k true matches in its pool and more
            # candidates past it, the false positives are taken out and a pool VERIFY_POOL times larger
            # checked (a few rounds, however rare the true matches). The first k verified of a pool are
            # the exact filter's top k: a match outside it scores lower, or equal in a later slot.
            m = min(VERIFY_POOL * kk, scores.shape[1])
            while True:
                top, order, pos = select(m)
                ok = filters.exact_mask(pos).to(pos.device) & (pos >= 0)  # a filter's answer is on its own device
                rejected = ~ok & (pos >= 0)
                exhausted = (pos < 0).any(1) if m < scores.shape[1] else torch.ones_like(ok[:, 0])  # no candidate past the pool
                if bool(((ok.sum(1) >= kk) | exhausted).all()):
                    break
                rows, cols = rejected.nonzero(as_tuple=True)
                scores = scores.index_put((rows, order[rows, cols]), scores.new_tensor(float("-inf")))
                m = min(VERIFY_POOL * m, scores.shape[1])
            first = torch.sort((~ok).to(torch.int8), dim=1, stable=True).indices[:, :kk]  # verified first, in pool order
            ok = ok.gather(1, first)
            top = torch.where(ok, top.gather(1, first), device_scalar(float("-inf"), top))
            pos = torch.where(ok, pos.gather(1, first), device_scalar(-1, pos))
        top, pos = _padded_to_k(top, pos, k)
        return SearchResult(top, self._ids_at(pos), pos, found, torch.full_like(found, nprobe), pos >= self.num_main)

    def search(self, queries: torch.Tensor, k: int, nprobe: int | None = None, filters=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [Q, k], ids [Q, k]) of `search_with_stats` (nprobe: default min(8, n_clusters))."""
        r = self.search_with_stats(queries, k, nprobe, filters)
        return r.scores, r.ids

    def capture(self, queries: torch.Tensor, k: int, nprobe: int | None = None) -> CapturedSearch:
        """`search(queries, k, nprobe)` (unfiltered) recorded as one CUDA graph
        (`gpukernels_common.graphs.GraphedCall`) for batches of 1 to `queries.shape[0]` queries
        (a smaller batch is padded and its results cut back): a search replays its kernels with
        one launch, where an eager search launches each (about 115 at nprobe 16 before the small
        ops around the scoring kernel were fused; it is bound by that host work on a GPU). `queries`: an example batch (its dtype and count; any finite
        values). The graph is a snapshot of the index: after `add`, `remove` or `compact` the
        captured search raises; capture again (edits of its tensors in place, outside those
        methods, are not seen). One caller at a time: the graph's buffers are shared. Needs the
        index on a CUDA device."""
        if self.codes.device.type != "cuda":
            raise RuntimeError(f"capture needs the index on a CUDA device (CUDA graphs), it is on {self.codes.device}")
        queries = _as_queries(queries).to(self.codes.device)
        self.search(queries, k, nprobe)  # every argument checked, as search checks them
        graphed = GraphedCall(lambda q: self.search(q, k, nprobe), queries)
        return CapturedSearch(self, graphed, k)

    # -- mutation and persistence ------------------------------------------------------------
    def add(self, embeddings: torch.Tensor, ids) -> None:
        """Add items to the fresh part (no re-clustering, O(new items)): searched exhaustively beside
        the probed clusters and merged in the same top-k, results tagged `fresh`. Their storage
        positions follow the main ones (`num_main + j`), so a filter over positions must cover
        them (`BloomIndex.append` with the same items). `compact()` folds them into the clusters."""
        embeddings = _check_embeddings(embeddings, self.codes.shape[1])
        ids = _checked_ids(ids, embeddings.shape[0], self.ids.device)  # integers, distinct, non-negative
        live = torch.cat([self.ids[~self.removed], self.fresh_ids[~self.fresh_removed]])
        if torch.isin(ids, live).any():
            raise ValueError("ids must be new and non-negative: each id may be live in the index once")
        codes, scales = _encode(embeddings.to(self.codes.device), self.dtype)
        self.fresh_codes = torch.cat([self.fresh_codes, codes])
        self.fresh_scales = torch.cat([self.fresh_scales, scales])
        self.fresh_ids = torch.cat([self.fresh_ids, ids])
        self.fresh_removed = torch.cat([self.fresh_removed, torch.zeros(ids.numel(), dtype=torch.bool, device=ids.device)])
        self._mutations += 1

    def compact(self) -> None:
        """Fold the fresh part into the clusters (each item joins the cluster of largest centroid
        inner product; the storage is re-laid in cluster order, one O(N) copy) and drop
        tombstoned items. Storage positions change: `order` maps them to build-input rows, the
        fresh items numbered after every row numbered before (the build's, then each added item in
        the order added, removed ones included: `rows_numbered`, saved with the index). When an item moved, `layout` counts up and
        filters made for the old positions are refused: rebuild them over `order` with
        layout=index.layout."""
        device = self.codes.device
        main_clusters = torch.repeat_interleave(torch.arange(self.n_clusters, device=device), self.offsets.diff())
        fresh_clusters = (self.fresh_codes.float() * self.fresh_scales.unsqueeze(1)) @ self.centroids.T
        clusters = torch.cat([main_clusters, fresh_clusters.argmax(1) if self.num_fresh else main_clusters[:0]])
        next_rows = torch.arange(self.num_fresh, device=device) + self.rows_numbered
        self.rows_numbered += self.num_fresh
        keep = ~torch.cat([self.removed, self.fresh_removed])
        perm = torch.argsort(clusters[keep], stable=True)  # surviving items keep their relative order
        if not (bool(keep.all()) and torch.equal(perm, torch.arange(perm.numel(), device=device))):
            self.layout += 1  # an item moved (or went): positions mean other items now
        self.codes = torch.cat([self.codes, self.fresh_codes])[keep][perm]
        self.scales = torch.cat([self.scales, self.fresh_scales])[keep][perm]
        self.ids = torch.cat([self.ids, self.fresh_ids])[keep][perm]
        self.order = torch.cat([self.order, next_rows])[keep][perm]
        counts = torch.bincount(clusters[keep], minlength=self.n_clusters)
        self.offsets = torch.cat([self.offsets.new_zeros(1), torch.cumsum(counts, 0)])
        self.max_cluster = int(counts.max()) if counts.numel() else 0
        self.removed = torch.zeros(self.codes.shape[0], dtype=torch.bool, device=device)
        self.fresh_codes, self.fresh_scales, self.fresh_ids = self.fresh_codes[:0], self.fresh_scales[:0], self.fresh_ids[:0]
        self.fresh_removed = self.fresh_removed[:0]
        self._mutations += 1

    def remove(self, ids) -> int:
        """Tombstone items by user id; returns how many were removed."""
        ids = as_integers(ids, "ids", self.ids.device)  # as add/build: 1.5 is no id
        hit, fresh_hit = torch.isin(self.ids, ids) & ~self.removed, torch.isin(self.fresh_ids, ids) & ~self.fresh_removed
        self.removed |= hit
        self.fresh_removed |= fresh_hit
        self._mutations += 1
        return int(hit.sum() + fresh_hit.sum())

    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"centroids": self.centroids, "offsets": self.offsets, "codes": self.codes, "scales": self.scales,
                   "ids": self.ids, "order": self.order, "removed": self.removed, "fresh_codes": self.fresh_codes,
                   "fresh_scales": self.fresh_scales, "fresh_ids": self.fresh_ids, "fresh_removed": self.fresh_removed}
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path),
                  metadata={"format": f"silvertorch.{type(self).__name__}", "format_version": str(FORMAT_VERSION),
                            "config": json.dumps({"dim": self.codes.shape[1], "n_clusters": self.n_clusters,
                                                  "layout": self.layout, "rows_numbered": self.rows_numbered})})
        return path

    @classmethod
    def load(cls, path, device="cpu") -> IVFIndex:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta, t = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path}: not a readable safetensors IVFIndex file ({err})") from err
        # FlatIndex files written before the class was recorded say IVFIndex: a flat index reads those too
        formats = {f"silvertorch.{cls.__name__}"} | ({"silvertorch.IVFIndex"} if cls is FlatIndex else set())
        if meta.get("format") not in formats or meta.get("format_version") != str(FORMAT_VERSION):
            raise ValueError(f"{path}: not a silvertorch {cls.__name__} file of format version {FORMAT_VERSION} "
                             f"({meta.get('format')}, {meta.get('format_version')})")
        removed = t.pop("removed")
        fresh = {k: t.pop(k) for k in ("fresh_codes", "fresh_scales", "fresh_ids", "fresh_removed") if k in t}
        idx = cls(**t)
        if idx.codes.shape[0] != int(idx.offsets[-1]) or idx.ids.shape[0] != idx.codes.shape[0]:
            raise ValueError(f"{path}: inconsistent shapes")
        if cls is FlatIndex and idx.n_clusters != 1:
            raise ValueError(f"{path}: not a silvertorch FlatIndex file (an IVFIndex of {idx.n_clusters} clusters)")
        if cls is not FlatIndex and idx.codes.dtype != torch.int8:
            raise ValueError(f"{path}: an IVFIndex stores int8 codes, this file holds {idx.codes.dtype}")
        idx.removed = removed.bool()
        config = json.loads(meta.get("config") or "{}")
        idx.layout = int(config.get("layout", 0))  # absent before layouts were recorded
        # absent before it was recorded: the largest stored row + 1 (a compacted-away last row is not known)
        idx.rows_numbered = max(int(config.get("rows_numbered", 0)), idx.rows_numbered)
        if fresh:
            n = fresh["fresh_ids"].shape[0]
            if fresh["fresh_codes"].shape != (n, idx.codes.shape[1]) or fresh["fresh_scales"].shape != (n,) or fresh["fresh_removed"].shape != (n,):
                raise ValueError(f"{path}: inconsistent fresh-part shapes")
            idx.fresh_codes, idx.fresh_scales, idx.fresh_ids = fresh["fresh_codes"], fresh["fresh_scales"], fresh["fresh_ids"]
            idx.fresh_removed = fresh["fresh_removed"].bool()
        return idx


class CapturedSearch:
    """An index's unfiltered search as a CUDA graph (`IVFIndex.capture`): `captured(queries)`
    returns (scores [Q, k], ids [Q, k]) as `index.search` does, for 1 to `batch_size` queries,
    each checked as `search` checks them (the finiteness check reads one value back)."""

    def __init__(self, index: IVFIndex, graphed: GraphedCall, k: int):
        self.index, self.graphed, self.k = index, graphed, k
        self.example = graphed.inputs[0]
        self.batch_size = self.example.shape[0]
        self.mutations = index._mutations

    def __call__(self, queries) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index._mutations != self.mutations:
            raise RuntimeError("the index changed (add, remove or compact) since it was captured: capture it again")
        queries = _as_queries(queries)
        if queries.is_floating_point():  # checked in the captured dtype: float64 past float32's range turns inf
            queries = queries.to(self.example.dtype)
        _check_queries(queries, self.example.shape[1], self.k)
        q = queries.shape[0]
        if not 1 <= q <= self.batch_size:
            raise ValueError(f"queries must hold 1 to batch_size={self.batch_size} queries (as captured), got {q}")
        scores, ids = self.graphed(padded_batch(queries.to(self.example.device), self.batch_size))
        return scores[:q], ids[:q]


class FlatIndex(IVFIndex):
    """Brute force over all items (one cluster); same search API (nprobe is checked, then unused).

    dtype="int8": symmetric int8 codes, scored by the IVF kernel/reference over the one cluster.
    dtype="bfloat16": bf16 rows and fp32 queries, fp32 accumulation (twice the bytes of int8, no
    quantization of the query; for small corpora where recall matters more than memory)."""

    DTYPES = ("int8", "bfloat16")

    @classmethod
    def build(cls, embeddings: torch.Tensor, ids: torch.Tensor | None = None, dtype: str = "int8", n_clusters: int | None = None,
              iters: int | None = None, seed: int | None = None) -> FlatIndex:
        """Every item scored by every query. `n_clusters`, `iters` and `seed` (IVFIndex.build's) are
        accepted and unused, so code can build either index; any other keyword is an error (a
        misspelled `ids=` or `dtype=` was dropped silently)."""
        if dtype not in cls.DTYPES:
            raise ValueError(f"FlatIndex dtype must be one of {cls.DTYPES}, got {dtype!r}")
        embeddings = _check_embeddings(embeddings)
        n = embeddings.shape[0]
        ids = _checked_ids(ids, n, embeddings.device)
        codes, scales = _encode(embeddings, dtype)
        centroids = torch.zeros(1, embeddings.shape[1], device=embeddings.device)
        offsets = torch.tensor([0, n], device=embeddings.device)
        return cls(centroids, offsets, codes, scales, ids, torch.arange(n, device=embeddings.device))

    def _slot_scores(self, queries, clusters, filters=None, *, out=None, schedule="auto", ranges=None):
        if self.dtype == "int8":
            return super()._slot_scores(queries, clusters, filters, out=out, schedule=schedule, ranges=ranges)
        scores = self._exhaustive_scores(queries, self.codes, self.scales, self.removed, 0, filters)
        if not self.num_main:  # one -inf slot, as the int8 path's: a selection needs a column
            scores = scores.new_full((scores.shape[0], 1), float("-inf"))
        starts = torch.zeros(scores.shape[0], 1, dtype=torch.int64, device=scores.device)  # one block: slot j is item j
        found = (scores > float("-inf")).sum(1)
        return (scores if out is None else out.copy_(scores)), starts, max(self.num_main, 1), found

    def search_with_stats(self, queries, k, nprobe=None, filters=None, adaptive=False, max_nprobe=None):
        """IVFIndex's search over every item: `nprobe`, `adaptive` and `max_nprobe` are accepted, so
        code can search either index, and unused (one cluster holds every item); a given nprobe
        or max_nprobe must still be a count >= 1 (a typo such as nprobe=0 or 2.5 is refused, not
        ignored)."""
        for name, value in (("nprobe", nprobe), ("max_nprobe", max_nprobe)):
            if value is not None and as_count(value, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        return super().search_with_stats(queries, k, 1, filters)
