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
    q = qp // P
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    start = tl.load(starts_ptr + qp)
    length = tl.load(lengths_ptr + qp)
    keep = n < length
    if HAS_FILTER:
        word = tl.load(words_ptr + qp.to(tl.int64) * W32 + n // 32, mask=keep, other=0)
        keep = keep & (((word >> (n % 32)) & 1) != 0)
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
                               pair_ends_ptr, block_cluster_ptr, block_row_ptr, words_ptr, D, P, L, W32,
                               HAS_FILTER: tl.constexpr, INT8_DOT: tl.constexpr, FP16_DOT: tl.constexpr,
                               BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """One program per (block of BQ (query, slot) pairs probing the same cluster, BN items): the
    cluster's rows are loaded once for the whole block and scored with tl.dot. INT8_DOT: int8
    operands accumulated in int32 (the integer tensor cores, exact at any D); otherwise fp32
    operands: int8 values are exact in fp32 (and TF32), their products and sums below 2^24 too.
    Either way the scores equal the query-major kernel's int32 accumulation bit for bit."""
    b = tl.program_id(0)
    cluster = tl.load(block_cluster_ptr + b)
    if cluster >= 0:
        r = tl.load(block_row_ptr + b) + tl.arange(0, BQ)
        valid = r < tl.load(pair_ends_ptr + cluster)
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
        if HAS_FILTER:
            word = tl.load(words_ptr + pair[:, None] * W32 + (n // 32)[None, :], mask=keep, other=0)
            keep = keep & (((word >> (n % 32)[None, :]) & 1) != 0)
        scale = tl.load(scales_ptr + rows, mask=in_cluster, other=0.0)[None, :] * tl.load(q_scales_ptr + q, mask=valid, other=0.0)[:, None]
        score = tl.where(keep, acc.to(tl.float32) * scale, float("-inf"))
        tl.store(out_ptr + pair[:, None] * L + n[None, :], score, mask=valid[:, None] & (n < L)[None, :])
