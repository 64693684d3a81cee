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
