"""The retrieval model's scoring step as one custom op, `silvertorch::probed_scores`.

For each query, every slot of its probed clusters: the int8 dot product of the query's codes
with the item's codes, times the item's and the query's scale, or -inf where the filter's keep
bit is off (a padding slot, a deleted item, an item that fails the filter). `torch.compile` and
`torch.export` see one op, so a compiled or exported model keeps the fused kernels: on a Triton
backend one IVF scoring kernel reads the keep bools and the probed clusters' offsets as they are
(query-major, or cluster-major from `CLUSTER_MAJOR_MIN_QUERIES` queries on, as `IVFIndex.candidate_scores`);
the reference scores the union of the batch's probed clusters in one int8 matmul.

`silvertorch::probed_positions` maps slots of those rows (and of the fresh items scored after
them) back to storage positions: the candidates the model verifies and scores (one kernel on a
Triton backend, where the reference takes about ten small tensor ops).
"""

from __future__ import annotations

import torch

from gpukernels_common import env, register_op, tracing

from .index import (
    CLUSTER_MAJOR_MIN_QUERIES,
    _cluster_pairs,
    cluster_major_scores,
    int8_dot_supported,
    int8_matmul,
)

# eager on the CPU, beyond this size the union's dots cost more than a matmul per probed cluster
# (200k x 64 items, 256 clusters, nprobe 16: union 2.3 ms, loop 5.1 ms at 32 queries, 25.6 MB of
# dots; 20.7 and 6.0 ms at 64 queries, 51 MB: past glibc's largest mmap threshold, fresh pages)
UNION_MAX_BYTES = 32 << 20


def rows_of(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for an index of any shape, through index_select (on the CPU about ten times
    faster than advanced indexing for the [Q, M] gathers of the forward)."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])


def _union_rows(codes, cluster_positions, q: int, p: int) -> int:
    """Rows `_probed_dots` scores for a batch of q queries x p probes: the union's padded rows, or
    every item when those would be more."""
    n_clusters, width = cluster_positions.shape
    return min(min(n_clusters, q * p) * width, codes.shape[0])


def _probed_dots(codes, cluster_positions, clusters, q_codes):
    """float32 [Q, P, S]: exact integer dot products of the int8 query codes with the int8 codes of
    every slot of their probed clusters. Cluster-major: the rows of the batch's probed clusters
    (the union, at most Q x P of them) are scored against every query in one int8 matmul and each
    query reads its own clusters' scores back, instead of gathering and converting a padded
    [Q, P x S, D] block per query. When that union's padded rows would outnumber the main index,
    every main item is scored instead (no gather at all). Static shapes: the union is padded to
    min(n_clusters, Q x P) clusters with unprobed ones that nobody reads."""
    q, p = clusters.shape
    n_clusters, width = cluster_positions.shape
    # builtin min on ints: torch 2.11's dynamo refuses torch.sym_min on plain ints under fullgraph
    union_size = min(n_clusters, q * p) if isinstance(q * p, int) else torch.sym_min(n_clusters, q * p)
    # a batch size left symbolic (an export for any batch) takes the union path: one graph for all
    if isinstance(q, int) and _union_rows(codes, cluster_positions, q, p) == codes.shape[0]:
        rows, row_of_slot = codes, rows_of(cluster_positions, clusters)
    else:
        probed = torch.zeros(n_clusters, dtype=torch.int32, device=clusters.device).index_fill(0, clusters.reshape(-1), 1)
        union = torch.argsort(1 - probed, stable=True)[:union_size]  # probed clusters first, in cluster order
        rows = rows_of(codes, cluster_positions[union]).reshape(-1, codes.shape[1])
        rank = probed.cumsum(0) - 1  # a probed cluster's place in the union
        row_of_slot = (rows_of(rank, clusters) * width).unsqueeze(-1) + torch.arange(width, device=clusters.device)
    dots = int8_matmul(q_codes, rows)  # [Q, R]
    index = row_of_slot + (torch.arange(q, device=clusters.device) * rows.shape[0])[:, None, None]
    return rows_of(dots.reshape(-1), index).float()


def probed_scores_reference(codes: torch.Tensor, scales: torch.Tensor, cluster_positions: torch.Tensor,
                            cluster_offsets: torch.Tensor, clusters: torch.Tensor, keep: torch.Tensor,
                            q_codes: torch.Tensor, q_scales: torch.Tensor) -> torch.Tensor:
    """float32 [Q, P x S] (see the module docs): the int8 dots of the union of the batch's probed
    clusters (`_probed_dots`, static shapes: what a trace holds), or, run eagerly (inside the custom
    op) where that union's [Q, rows] int32 dots would exceed UNION_MAX_BYTES, each probed cluster's
    rows scored against the queries that probe it only (`cluster_major_scores`, a loop over the
    clusters, reading `cluster_offsets`)."""
    q, p = clusters.shape
    width = cluster_positions.shape[1]
    eager = isinstance(q, int) and not tracing()
    if eager and q * _union_rows(codes, cluster_positions, q, p) * 4 > UNION_MAX_BYTES:
        scores = cluster_major_scores(codes, scales, cluster_offsets, q_codes, q_scales, clusters, width)
        return scores.masked_fill_(~keep.reshape(q * p, width), float("-inf")).view(q, -1)
    dots = _probed_dots(codes, cluster_positions, clusters, q_codes)
    scale = rows_of(scales, rows_of(cluster_positions, clusters)) * q_scales[:, None, None]  # as the kernels: item x query first
    return torch.where(keep, dots * scale, float("-inf")).reshape(q, -1)


def probed_scores_triton(codes: torch.Tensor, scales: torch.Tensor, cluster_positions: torch.Tensor,
                         cluster_offsets: torch.Tensor, clusters: torch.Tensor, keep: torch.Tensor,
                         q_codes: torch.Tensor, q_scales: torch.Tensor) -> torch.Tensor:
    import triton

    from .kernels import probed_score_kernel, score_cluster_major_kernel

    q, p = clusters.shape
    n_clusters, width = cluster_positions.shape
    d = codes.shape[1]
    # the kernels index every tensor as row-major: a column-major tower output or buffer is copied once
    # (each a no-op, no launch, on the contiguous tensors the model passes)
    codes, scales, cluster_offsets = codes.contiguous(), scales.contiguous(), cluster_offsets.contiguous()
    q_codes, q_scales, clusters = q_codes.contiguous(), q_scales.contiguous(), clusters.contiguous()
    keep = keep.contiguous().view(torch.int8)  # [Q, P, S] bools read a byte a slot: no packing into words first
    out = torch.empty(q, p * width, dtype=torch.float32, device=codes.device)
    if q >= CLUSTER_MAJOR_MIN_QUERIES:
        bq, bn = 16, 64
        pairs, sorted_clusters, block_cluster, block_row, n_blocks = _cluster_pairs(clusters, n_clusters, bq)
        score_cluster_major_kernel[(n_blocks, triton.cdiv(width, bn))](
            out, codes, scales, q_codes, q_scales, cluster_offsets, pairs, sorted_clusters, block_cluster, block_row,
            keep, pairs.numel(), d, p, width, 1, HAS_FILTER=True, KEEP_BYTES=True, INT8_DOT=int8_dot_supported(codes.device),
            FP16_DOT=env.gpu_launch_shapes(codes.device), BQ=bq, BN=bn, BD=min(64, max(32, triton.next_power_of_2(d))))
    else:
        # each (query, slot)'s range read from its cluster's offsets in the kernel: no gathers before it
        bn = 64
        probed_score_kernel[(q * p, triton.cdiv(width, bn))](
            out, codes, scales, q_codes, q_scales, cluster_offsets, clusters, keep, d, p, width,
            BN=bn, BD=min(128, triton.next_power_of_2(d)))
    return out


def _probed_scores_fake(codes, scales, cluster_positions, cluster_offsets, clusters, keep, q_codes, q_scales):
    return q_codes.new_empty(clusters.shape[0], clusters.shape[1] * cluster_positions.shape[1], dtype=torch.float32)


probed_scores = register_op("silvertorch::probed_scores", reference=probed_scores_reference,
                            triton=probed_scores_triton, fake=_probed_scores_fake)


def probed_positions_reference(slots: torch.Tensor, clusters: torch.Tensor, cluster_starts: torch.Tensor, width: int,
                               num_main: int) -> torch.Tensor:
    """int64 [Q, M]: the storage position of slot slots[q, m] of a [Q, P x width (+ F)] candidate
    row (`probed_scores`' rows, then F fresh items): slot j < P x width is item j % width of probed
    cluster clusters[q, j // width], at cluster_starts[c] + j % width clamped to the main index's
    last item num_main - 1 (as the model's cluster_positions); a slot past them is fresh item
    j - P x width, at num_main + that. cluster_starts [C] int64: each cluster's first item."""
    main_slots = clusters.shape[1] * width
    slot = slots.clamp(max=main_slots - 1)
    start = rows_of(cluster_starts, clusters)
    cand = (start.gather(1, slot // width) + slot % width).clamp(max=num_main - 1)
    return torch.where(slots < main_slots, cand, slots - main_slots + num_main)


def probed_positions_triton(slots: torch.Tensor, clusters: torch.Tensor, cluster_starts: torch.Tensor, width: int,
                            num_main: int) -> torch.Tensor:
    import triton

    from .kernels import slot_positions_kernel

    q, m = slots.shape
    out = torch.empty(q, m, dtype=torch.int64, device=slots.device)
    if out.numel() == 0:
        return out
    slots, clusters, cluster_starts = slots.contiguous(), clusters.contiguous(), cluster_starts.contiguous()
    bm = min(1024, triton.next_power_of_2(m))
    slot_positions_kernel[(q, triton.cdiv(m, bm))](out, slots, clusters, cluster_starts, m, clusters.shape[1], width,
                                                   num_main - 1, BM=bm)
    return out


def _probed_positions_fake(slots, clusters, cluster_starts, width, num_main):
    return slots.new_empty(slots.shape, dtype=torch.int64)


probed_positions = register_op("silvertorch::probed_positions", reference=probed_positions_reference,
                               triton=probed_positions_triton, fake=_probed_positions_fake)
