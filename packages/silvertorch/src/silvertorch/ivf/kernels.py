"""Fused int8 IVF scoring (imported only when a Triton backend runs).

One program per (query, probed cluster, block of BN items): int8 dot products accumulated in
int32, the filter's int32 mask words tested in the tile (filtered items are never scored nor
written), scores scaled by the query's and each item's scale and written straight into the
query's candidate row; positions outside the cluster or filtered get -inf.
"""

import triton
import triton.language as tl


@triton.jit
def score_kernel(out_ptr, codes_ptr, scales_ptr, q_codes_ptr, q_scales_ptr, starts_ptr, lengths_ptr, words_ptr,
                 D, P, L, W32, HAS_FILTER: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    qp = tl.program_id(0)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    start = tl.load(starts_ptr + qp)
    length = tl.load(lengths_ptr + qp)
    keep = n < length
    if HAS_FILTER:
        word = tl.load(words_ptr + qp.to(tl.int64) * W32 + n // 32, mask=keep, other=0)
        keep = keep & (((word >> (n % 32)) & 1) != 0)
    _score_slots(out_ptr, codes_ptr, scales_ptr, q_codes_ptr, q_scales_ptr, qp, qp // P, n, start, keep, D, L, BN, BD)


@triton.jit
def probed_score_kernel(out_ptr, codes_ptr, scales_ptr, q_codes_ptr, q_scales_ptr, offsets_ptr, clusters_ptr, keep_ptr,
                        D, P, L, BN: tl.constexpr, BD: tl.constexpr):
    """score_kernel for `silvertorch::probed_scores`: the range of (query, slot) qp read from its
    probed cluster clusters[qp] and the cluster offsets, the filter from the bool keep [Q x P, L]
    (as int8), one byte per slot. The model's tensors as they are: no per-call ranges or packed
    words to build first (each a launch on a GPU)."""
    qp = tl.program_id(0)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    cluster = tl.load(clusters_ptr + qp)
    start = tl.load(offsets_ptr + cluster)
    keep = n < tl.load(offsets_ptr + cluster + 1) - start  # keep is off past the end too; no row past it is read
    keep = keep & (tl.load(keep_ptr + qp.to(tl.int64) * L + n, mask=keep, other=0) != 0)
    _score_slots(out_ptr, codes_ptr, scales_ptr, q_codes_ptr, q_scales_ptr, qp, qp // P, n, start, keep, D, L, BN, BD)


@triton.jit
def _score_slots(out_ptr, codes_ptr, scales_ptr, q_codes_ptr, q_scales_ptr, qp, q, n, start, keep, D, L,
                 BN: tl.constexpr, BD: tl.constexpr):
    """Row qp of out, slots n: query q's int8 dots with items start + n where keep (int32
    accumulation, both scales applied), -inf elsewhere."""
    rows = (start + n).to(tl.int64)
    acc = tl.zeros((BN,), dtype=tl.int32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dmask = d < D
        qv = tl.load(q_codes_ptr + q.to(tl.int64) * D + d, mask=dmask, other=0).to(tl.int32)
        c = tl.load(codes_ptr + rows[:, None] * D + d[None, :], mask=keep[:, None] & dmask[None, :], other=0).to(tl.int32)
        acc += tl.sum(c * qv[None, :], axis=1)
    scale = tl.load(scales_ptr + rows, mask=keep, other=0.0) * tl.load(q_scales_ptr + q)
    score = tl.where(keep, acc.to(tl.float32) * scale, float("-inf"))
    tl.store(out_ptr + qp.to(tl.int64) * L + n, score, mask=n < L)


@triton.jit
def score_cluster_major_kernel(out_ptr, codes_ptr, scales_ptr, q_codes_ptr, q_scales_ptr, offsets_ptr, pairs_ptr,
                               sorted_ptr, block_cluster_ptr, block_row_ptr, words_ptr, N, D, P, L, W32,
                               HAS_FILTER: tl.constexpr, KEEP_BYTES: tl.constexpr, INT8_DOT: tl.constexpr,
                               FP16_DOT: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """One program per (block of BQ (query, slot) pairs probing the same cluster, BN items): the
    cluster's rows are loaded once for the whole block and scored with tl.dot. INT8_DOT: int8
    operands accumulated in int32 (the integer tensor cores, exact at any D); otherwise fp32
    operands: int8 values are exact in fp32 (and TF32), their products and sums below 2^24 too.
    Either way the scores equal the query-major kernel's int32 accumulation bit for bit. The
    blocks come from `cluster_blocks_kernel`: a block's pairs are the sorted rows from its first
    on that still hold its cluster (at most BQ). The filter: int32 words [Q x P, W32], or with
    KEEP_BYTES one byte per slot [Q x P, L] (`probed_scores`' bool keep, no packing launches)."""
    b = tl.program_id(0)
    cluster = tl.load(block_cluster_ptr + b)
    if cluster >= 0:
        r = tl.load(block_row_ptr + b) + tl.arange(0, BQ)
        valid = (r < N) & (tl.load(sorted_ptr + r, mask=r < N, other=-1) == cluster)
        pair = tl.load(pairs_ptr + r, mask=valid, other=0).to(tl.int64)  # q * P + slot
        q = pair // P
        start = tl.load(offsets_ptr + cluster)
        length = tl.load(offsets_ptr + cluster + 1) - start
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        in_cluster = n < length
        rows = (start + n).to(tl.int64)
        acc = tl.zeros((BQ, BN), dtype=tl.int32 if INT8_DOT else tl.float32)
        for d0 in range(0, D, BD):
            d = d0 + tl.arange(0, BD)
            dmask = d < D
            qv = tl.load(q_codes_ptr + q[:, None] * D + d[None, :], mask=valid[:, None] & dmask[None, :], other=0)
            c = tl.load(codes_ptr + rows[:, None] * D + d[None, :], mask=in_cluster[:, None] & dmask[None, :], other=0)
            if INT8_DOT:
                acc += tl.dot(qv, tl.trans(c), out_dtype=tl.int32)
            elif FP16_DOT:
                acc += tl.dot(qv.to(tl.float16), tl.trans(c.to(tl.float16)), out_dtype=tl.float32)
            else:
                acc += tl.dot(qv.to(tl.float32), tl.trans(c.to(tl.float32)))
        keep = valid[:, None] & in_cluster[None, :]
        if HAS_FILTER and KEEP_BYTES:
            keep = keep & (tl.load(words_ptr + pair[:, None] * L + n[None, :], mask=keep, other=0) != 0)
        elif HAS_FILTER:
            word = tl.load(words_ptr + pair[:, None] * W32 + (n // 32)[None, :], mask=keep, other=0)
            keep = keep & (((word >> (n % 32)[None, :]) & 1) != 0)
        scale = tl.load(scales_ptr + rows, mask=in_cluster, other=0.0)[None, :] * tl.load(q_scales_ptr + q, mask=valid, other=0.0)[:, None]
        score = tl.where(keep, acc.to(tl.float32) * scale, float("-inf"))
        tl.store(out_ptr + pair[:, None] * L + n[None, :], score, mask=valid[:, None] & (n < L)[None, :])


@triton.jit
def _round_half_even(x):
    """round-half-to-even of |x| < 2**22 (torch.round's rule): adding and taking back 1.5 x 2**23
    leaves the fp32 sum's own rounding to the nearest integer, ties to even."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def prepare_queries_kernel(queries_ptr, clusters_ptr, cluster_starts_ptr, cluster_sizes_ptr, q_codes_ptr, q_scales_ptr,
                           starts_ptr, lengths_ptr, found_ptr, Q, D, P,
                           RANGES: tl.constexpr, BQ: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr):
    """One program per BQ queries: each query quantised as `quantize_rows` does (scale = max |x|,
    at least 1e-12, / 127; codes = x / scale rounded half to even, clamped to [-127, 127]; correctly
    rounded divisions), and its probed clusters' storage ranges (first position, items) with
    their items summed (`found` of an unfiltered search; RANGES only)."""
    q = tl.program_id(0) * BQ + tl.arange(0, BQ)
    valid = q < Q
    row = q.to(tl.int64) * D
    amax = tl.zeros((BQ,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        mask = valid[:, None] & (d < D)[None, :]
        x = tl.load(queries_ptr + row[:, None] + d[None, :], mask=mask, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    scale = tl.math.div_rn(tl.maximum(amax, 1e-12), tl.full((BQ,), 127.0, tl.float32))
    tl.store(q_scales_ptr + q, scale, mask=valid)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        mask = valid[:, None] & (d < D)[None, :]
        x = tl.load(queries_ptr + row[:, None] + d[None, :], mask=mask, other=0.0)
        codes = _round_half_even(tl.math.div_rn(x, tl.broadcast_to(scale[:, None], (BQ, BD))))
        codes = tl.minimum(tl.maximum(codes, -127.0), 127.0).to(tl.int8)
        tl.store(q_codes_ptr + row[:, None] + d[None, :], codes, mask=mask)
    if RANGES:
        _probed_ranges(q, valid, clusters_ptr, cluster_starts_ptr, cluster_sizes_ptr, starts_ptr, lengths_ptr, found_ptr,
                       P, BQ, BP)


@triton.jit
def _probed_ranges(q, valid, clusters_ptr, cluster_starts_ptr, cluster_sizes_ptr, starts_ptr, lengths_ptr, found_ptr, P,
                   BQ: tl.constexpr, BP: tl.constexpr):
    found = tl.zeros((BQ,), dtype=tl.int64)
    for p0 in range(0, P, BP):
        p = p0 + tl.arange(0, BP)
        mask = valid[:, None] & (p < P)[None, :]
        at = q.to(tl.int64)[:, None] * P + p[None, :]
        cluster = tl.load(clusters_ptr + at, mask=mask, other=0)
        start = tl.load(cluster_starts_ptr + cluster, mask=mask, other=0)
        size = tl.load(cluster_sizes_ptr + cluster, mask=mask, other=0)
        tl.store(starts_ptr + at, start, mask=mask)
        tl.store(lengths_ptr + at, size, mask=mask)
        found += tl.sum(size, axis=1)
    tl.store(found_ptr + q, found, mask=valid)


@triton.jit
def cluster_blocks_kernel(sorted_ptr, block_cluster_ptr, block_row_ptr, N, NB, SEARCH_STEPS,
                          BQ: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the cluster-major schedule from the (query, slot) pairs' clusters, sorted.
    Block i covers sorted rows block_row[i] .. (at most BQ, all of cluster block_cluster[i]); a
    block starts at every BQ-th row of each cluster's run, in row order (`_cluster_blocks_reference`).
    Blocks past the last get cluster -1, row 0. A row's run starts where a binary search of the
    sorted clusters finds its cluster first; the blocks are numbered by a running count."""
    carry = 0
    for i0 in range(0, N, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        valid = i < N
        cluster = tl.load(sorted_ptr + i, mask=valid, other=0)
        lo = tl.zeros((BLOCK,), dtype=tl.int32)
        hi = tl.zeros((BLOCK,), dtype=tl.int32) + N
        for _ in range(SEARCH_STEPS):  # lo: the first row of cluster >= this row's
            active = lo < hi
            mid = (lo + hi) // 2
            value = tl.load(sorted_ptr + mid, mask=active, other=0)
            lo = tl.where(active & (value < cluster), mid + 1, lo)
            hi = tl.where(active & (value >= cluster), mid, hi)
        first = valid & ((i - lo) % BQ == 0)
        at = carry + tl.cumsum(first.to(tl.int32), axis=0) - 1
        tl.store(block_cluster_ptr + at, cluster, mask=first)
        tl.store(block_row_ptr + at, i.to(tl.int64), mask=first)
        carry += tl.sum(first.to(tl.int32), axis=0)
    for j0 in range(0, NB, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        spare = (j >= carry) & (j < NB)
        tl.store(block_cluster_ptr + j, tl.full((BLOCK,), -1, tl.int64), mask=spare)
        tl.store(block_row_ptr + j, tl.zeros((BLOCK,), dtype=tl.int64), mask=spare)


@triton.jit
def search_results_kernel(top_ptr, order_ptr, starts_ptr, ids_ptr, fresh_ids_ptr, scores_out_ptr, positions_ptr,
                          ids_out_ptr, fresh_out_ptr, nprobe_out_ptr, Q, K, KK, P, L, MAIN_SLOTS, NUM_MAIN, NPROBE,
                          BLOCK: tl.constexpr):
    """The search's [Q, K] results from the selection's [Q, KK] (KK <= K) values and slots: slot s
    of the main part is storage position starts[q, s // L] + s % L, a fresh slot num_main + (s -
    main_slots); -1 (and slots KK.. of a row) is no result: score -inf, position and id -1. Ids
    read from the main or the fresh ids; `fresh` marks the fresh positions; nprobe_out[q] = NPROBE."""
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = at < Q * K
    q = at // K
    j = at % K
    picked = valid & (j < KK)
    src = q * KK + j
    top = tl.load(top_ptr + src, mask=picked, other=float("-inf"))
    slot = tl.load(order_ptr + src, mask=picked, other=-1)
    main = (slot >= 0) & (slot < MAIN_SLOTS)
    fresh = slot >= MAIN_SLOTS
    start = tl.load(starts_ptr + q * P + slot // L, mask=main, other=0)
    position = tl.where(main, start + slot % L, tl.where(fresh, NUM_MAIN + slot - MAIN_SLOTS, -1))
    main_id = tl.load(ids_ptr + position, mask=main, other=-1)
    fresh_id = tl.load(fresh_ids_ptr + (slot - MAIN_SLOTS), mask=fresh, other=-1)
    tl.store(scores_out_ptr + at, top, mask=valid)
    tl.store(positions_ptr + at, position, mask=valid)
    tl.store(ids_out_ptr + at, tl.where(fresh, fresh_id, main_id), mask=valid)
    tl.store(fresh_out_ptr + at, fresh, mask=valid)
    tl.store(nprobe_out_ptr + q, tl.zeros_like(q) + NPROBE, mask=valid & (j == 0))


@triton.jit
def slot_positions_kernel(out_ptr, slots_ptr, clusters_ptr, starts_ptr, M, P, S, LAST, BM: tl.constexpr):
    """out[q, m] = the storage position of candidate slot slots[q, m] of query q: slot j < P x S
    is item j % S of probed cluster clusters[q, j // S] (its first item starts[c] + j % S, clamped
    to LAST, the main index's last item); a slot past them is fresh item j - P x S, at LAST + 1 + that.
    As `probed.probed_positions_reference`, in one launch."""
    q = tl.program_id(0)
    m = tl.program_id(1) * BM + tl.arange(0, BM)
    mmask = m < M
    j = tl.load(slots_ptr + q.to(tl.int64) * M + m, mask=mmask, other=0)
    main = P * S
    slot = tl.minimum(j, main - 1)
    c = tl.load(clusters_ptr + q.to(tl.int64) * P + slot // S, mask=mmask, other=0)
    pos = tl.minimum(tl.load(starts_ptr + c, mask=mmask, other=0) + slot % S, LAST)
    pos = tl.where(j < main, pos, j - main + LAST + 1)
    tl.store(out_ptr + q.to(tl.int64) * M + m, pos, mask=mmask)
