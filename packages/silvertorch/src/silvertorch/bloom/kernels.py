"""Triton kernels for Bloom-index search (imported only when a Triton backend runs).

The filter program runs as a stack machine with MAX_DEPTH (8) register slots, one 64-item
word per lane: TERM is the AND of the term's k rows in the item's bundle, EXACT_TERM reads the
exact side-table bitmap, AND/OR/NOT combine, and the live mask (existing, not deleted) is
applied last.
"""

import triton
import triton.language as tl

from . import parser

# the parser's opcodes; a compiled kernel reads module globals only when they are constexpr
TERM, EXACT_TERM, AND, OR, NOT, TRUE = (tl.constexpr(code) for code in (parser.TERM, parser.EXACT_TERM, parser.AND,
                                                                         parser.OR, parser.NOT, parser.TRUE))


@triton.jit
def _mix64(x):
    """hashing.mix64 (the splitmix64 finalizer) on uint64."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


@triton.jit
def _same(row, drawn, EARLIER: tl.constexpr, NOW: tl.constexpr):
    """Whether draw NOW's row equals draw EARLIER's, `drawn` (all false unless EARLIER < NOW: a static choice)."""
    if EARLIER < NOW:
        return row == drawn
    else:
        return row < 0


@triton.jit
def _kept(drawn, row, SLOT: tl.constexpr, NOW: tl.constexpr):
    """Draw SLOT's row after draw NOW: `row` when SLOT == NOW (a static choice), else `drawn` as it was."""
    if SLOT == NOW:
        return row
    else:
        return drawn


@triton.jit
def _bloom_rows(h, width, row0, bits_ptr, wib, mask, bit, K: tl.constexpr, SET: tl.constexpr):
    """Term hash h's K distinct rows in a bundle of `width` rows from `row0` (hashing.bloom_positions:
    Floyd's sampling with the 32-bit halves of mix64(h + i * golden)), rows of 32 words, word `wib`
    of each. SET: OR `bit` into those words (the build); else return their AND (masked lanes read
    all-ones). One helper for both, so that the build and the searches place a term alike."""
    tl.static_assert(K <= 10, "_bloom_rows keeps 10 draws (BloomIndex's k is in [1, 10])")
    w = width.to(tl.uint32)  # < 2^31 (bundle_widths): 32-bit remainders, far cheaper than 64-bit ones
    x = h
    test = tl.full(wib.shape, -1, tl.int64)
    none = tl.full(wib.shape, -1, tl.int64)  # the draws so far (set below; never compared before they are)
    p0, p1, p2, p3, p4, p5, p6, p7, p8 = none, none, none, none, none, none, none, none, none
    for j in tl.static_range(K):
        if j % 2 == 0:
            x = x + 0x9E3779B97F4A7C15  # h + (j // 2 + 1) * golden, wrapping as uint64
            r = _mix64(x)
            draw = (r & 0xFFFFFFFF).to(tl.uint32)
        else:
            draw = (r >> 32).to(tl.uint32)
        top = w - K + j  # above every earlier draw
        row = (draw % (top + 1)).to(tl.int64)
        # compared with the j earlier draws only (static), then kept as draw j
        taken = (_same(row, p0, 0, j) | _same(row, p1, 1, j) | _same(row, p2, 2, j) | _same(row, p3, 3, j)
                 | _same(row, p4, 4, j) | _same(row, p5, 5, j) | _same(row, p6, 6, j) | _same(row, p7, 7, j)
                 | _same(row, p8, 8, j))
        row = tl.where(taken, top.to(tl.int64), row)
        p0, p1, p2 = _kept(p0, row, 0, j), _kept(p1, row, 1, j), _kept(p2, row, 2, j)
        p3, p4, p5 = _kept(p3, row, 3, j), _kept(p4, row, 4, j), _kept(p5, row, 5, j)
        p6, p7, p8 = _kept(p6, row, 6, j), _kept(p7, row, 7, j), _kept(p8, row, 8, j)
        if SET:
            tl.atomic_or(bits_ptr + (row0 + row) * 32 + wib, bit, mask=mask)
        else:
            test = test & tl.load(bits_ptr + (row0 + row) * 32 + wib, mask=mask, other=-1)
    return test


@triton.jit
def _stack_step(op, pushed, s0, s1, s2, s3, s4, s5, s6, s7):
    """One step of a plan on the register stack (top in s0; values all-ones or all-zeros bit
    patterns): a push (TERM, EXACT_TERM with `pushed`, TRUE with ones) shifts the stack down,
    AND/OR pop two and push one, NOT flips the top, NOP leaves it."""
    is_push = (op == TERM) | (op == EXACT_TERM) | (op == TRUE)
    is_bin = (op == AND) | (op == OR)
    combined = tl.where(op == AND, s0 & s1, s0 | s1)
    n0 = tl.where(is_push, pushed, tl.where(is_bin, combined, tl.where(op == NOT, ~s0, s0)))
    n1 = tl.where(is_push, s0, tl.where(is_bin, s2, s1))
    n2 = tl.where(is_push, s1, tl.where(is_bin, s3, s2))
    n3 = tl.where(is_push, s2, tl.where(is_bin, s4, s3))
    n4 = tl.where(is_push, s3, tl.where(is_bin, s5, s4))
    n5 = tl.where(is_push, s4, tl.where(is_bin, s6, s5))
    n6 = tl.where(is_push, s5, tl.where(is_bin, s7, s6))
    n7 = tl.where(is_push, s6, tl.where(is_bin, tl.zeros_like(s7), s7))
    return n0, n1, n2, n3, n4, n5, n6, n7


@triton.jit
def _eval_words(w, wmask, q, bits_ptr, row_off_ptr, width_ptr, live_ptr, ops_ptr, args_ptr, h1_ptr,
                exact_ptr, exact_row_ptr, exact_col, exact_stride, L, T, K: tl.constexpr, BW: tl.constexpr,
                HAS_LIVE: tl.constexpr):
    """The plan of query q on words w; an EXACT_TERM of slot s reads exact_ptr[exact_row[q, s] * exact_stride + exact_col]."""
    bundle = w // 32
    wib = w % 32
    width = tl.load(width_ptr + bundle, mask=wmask, other=K + 1)  # masked lanes: a width every draw fits
    roff = tl.load(row_off_ptr + bundle, mask=wmask, other=0)
    ones = tl.full((BW,), -1, tl.int64)
    # an empty stack reads as "everything", as the tensor-op evaluator's (an empty program passes all)
    s0, s1, s2, s3, s4, s5, s6, s7 = ones, ones, ones, ones, ones, ones, ones, ones
    for i in range(L):
        op = tl.load(ops_ptr + q * L + i) + tl.zeros((BW,), tl.int32)  # as a vector: masks need tensor operands
        slot = tl.load(args_ptr + q * L + i)
        # the value a push would bring: a Bloom term, an exact term, or TRUE
        h1 = tl.load(h1_ptr + q * T + slot).to(tl.uint64, bitcast=True)
        term = _bloom_rows(h1, width, roff, bits_ptr, wib, wmask & (op == TERM), 0, K, False)
        erow = tl.load(exact_row_ptr + q * T + slot)
        exact = tl.load(exact_ptr + erow.to(tl.int64) * exact_stride + exact_col, mask=wmask & (op == EXACT_TERM), other=0)
        pushed = tl.where(op == TERM, term, tl.where(op == EXACT_TERM, exact, ones))
        s0, s1, s2, s3, s4, s5, s6, s7 = _stack_step(op, pushed, s0, s1, s2, s3, s4, s5, s6, s7)
    if HAS_LIVE:
        s0 = s0 & tl.load(live_ptr + w, mask=wmask, other=0)
    return s0


@triton.jit
def search_kernel(out_ptr, bits_ptr, row_off_ptr, width_ptr, live_ptr, ops_ptr, args_ptr, h1_ptr,
                  exact_ptr, exact_row_ptr, L, T, n_words, K: tl.constexpr, BW: tl.constexpr):
    q = tl.program_id(0)
    w = tl.program_id(1) * BW + tl.arange(0, BW)
    wmask = w < n_words
    res = _eval_words(w, wmask, q, bits_ptr, row_off_ptr, width_ptr, live_ptr, ops_ptr, args_ptr, h1_ptr,
                      exact_ptr, exact_row_ptr, w, n_words, L, T, K, BW, True)
    tl.store(out_ptr + q.to(tl.int64) * n_words + w, res, mask=wmask)


@triton.jit
def range_kernel(out_ptr, starts_ptr, lengths_ptr, bits_ptr, row_off_ptr, width_ptr, live_ptr, ops_ptr, args_ptr,
                 h1_ptr, exact_ptr, exact_row_ptr, L, T, n_words, R, W32, K: tl.constexpr, BW: tl.constexpr):
    """int32 words aligned to each range's start: bit b of word o = item start + 32*o + b."""
    qr = tl.program_id(0)
    q = qr // R
    o = tl.program_id(1) * BW + tl.arange(0, BW)
    start = tl.load(starts_ptr + qr)
    length = tl.load(lengths_ptr + qr)
    omask = o < W32
    first = start + 32 * o
    valid = omask & (32 * o < length)
    w0 = first // 64
    shift = (first % 64).to(tl.uint64)
    back_shift = ((64 - first % 64) % 64).to(tl.uint64)  # in signed ints: Triton 3.1 refuses uint64 % int32
    m0 = valid & (w0 < n_words)
    m1 = valid & (w0 + 1 < n_words)
    e0 = _eval_words(w0, m0, q, bits_ptr, row_off_ptr, width_ptr, live_ptr, ops_ptr, args_ptr, h1_ptr,
                     exact_ptr, exact_row_ptr, w0, n_words, L, T, K, BW, True)
    e1 = _eval_words(w0 + 1, m1, q, bits_ptr, row_off_ptr, width_ptr, live_ptr, ops_ptr, args_ptr, h1_ptr,
                     exact_ptr, exact_row_ptr, w0 + 1, n_words, L, T, K, BW, True)
    lo = e0.to(tl.uint64, bitcast=True) >> shift
    hi = tl.where(shift == 0, tl.zeros_like(lo), e1.to(tl.uint64, bitcast=True) << back_shift)
    word = (lo | hi) & 0xFFFFFFFF
    remaining = length - 32 * o
    keep = tl.where(remaining >= 32, 0xFFFFFFFF, (tl.full(remaining.shape, 1, tl.uint64) << tl.maximum(remaining, 0).to(tl.uint64)) - 1)
    word = tl.where(valid, word & keep, 0)
    tl.store(out_ptr + qr.to(tl.int64) * W32 + o, word.to(tl.uint32).to(tl.int32, bitcast=True), mask=omask)


@triton.jit
def words_kernel(out_ptr, words_ptr, bits_ptr, row_off_ptr, width_ptr, ops_ptr, args_ptr, h1_ptr,
                 exact_ptr, exact_row_ptr, L, T, M, n_words, K: tl.constexpr, BW: tl.constexpr):
    """out[q, m] = plan q on word words[q, m] (the retrieval model's probed words); exact terms come
    per position m from exact_ptr [Q * E, M]; no live mask (the model applies liveness per slot)."""
    q = tl.program_id(0)
    m = tl.program_id(1) * BW + tl.arange(0, BW)
    mmask = m < M
    w = tl.load(words_ptr + q.to(tl.int64) * M + m, mask=mmask, other=0)
    wmask = mmask & (w >= 0) & (w < n_words)
    res = _eval_words(w, wmask, q, bits_ptr, row_off_ptr, width_ptr, bits_ptr, ops_ptr, args_ptr, h1_ptr,
                      exact_ptr, exact_row_ptr, m, M, L, T, K, BW, False)
    tl.store(out_ptr + q.to(tl.int64) * M + m, res, mask=mmask)


@triton.jit
def build_kernel(bits_ptr, h1_ptr, item_ptr, width_ptr, row_off_ptr, n_terms, row_base,
                 K: tl.constexpr, BLOCK: tl.constexpr):
    """Set each term's k rows for its item: one lane per (item, term) pair; OR is order-free,
    so the atomics give a deterministic result."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tmask = t < n_terms
    item = tl.load(item_ptr + t, mask=tmask, other=0)
    bundle = item // 2048
    width = tl.load(width_ptr + bundle, mask=tmask, other=K + 1)
    roff = tl.load(row_off_ptr + bundle, mask=tmask, other=0) - row_base
    h = tl.load(h1_ptr + t, mask=tmask, other=0).to(tl.uint64, bitcast=True)
    bit = tl.full((BLOCK,), 1, tl.int64) << (item % 64)
    _bloom_rows(h, width, roff, bits_ptr, (item % 2048) // 64, tmask, bit, K, True)


@triton.jit
def verify_kernel(out_ptr, pos_ptr, terms_ptr, counts_ptr, ops_ptr, args_ptr, hashes_ptr, M, L, T, A,
                  BM: tl.constexpr, BA: tl.constexpr):
    """out[q, m] = plan q on item pos[q, m], every term tested exactly against the item's stored
    attribute hashes (terms [N, A], the first counts[item] of a row real): one lane per item, its
    attributes held in registers for every step of the program."""
    q = tl.program_id(0)
    m = tl.program_id(1) * BM + tl.arange(0, BM)
    mmask = m < M
    pos = tl.load(pos_ptr + q.to(tl.int64) * M + m, mask=mmask, other=0)
    a = tl.arange(0, BA)
    count = tl.load(counts_ptr + pos, mask=mmask, other=0)
    present = (a[None, :] < count[:, None]) & (a[None, :] < A) & mmask[:, None]
    terms = tl.load(terms_ptr + pos[:, None] * A + a[None, :], mask=present, other=0)
    ones = tl.full((BM,), -1, tl.int32)
    zero = tl.zeros((BM,), tl.int32)
    # an empty stack reads as "everything", as the tensor-op evaluator's (an empty program passes all)
    s0, s1, s2, s3, s4, s5, s6, s7 = ones, ones, ones, ones, ones, ones, ones, ones
    for i in range(L):
        op = tl.load(ops_ptr + q * L + i) + tl.zeros((BM,), tl.int32)  # as a vector: masks need tensor operands
        slot = tl.minimum(tl.load(args_ptr + q * L + i), T - 1)  # steps that push no term carry slot 0
        h = tl.load(hashes_ptr + q * T + slot)
        hit = tl.max(((terms == h) & present).to(tl.int32), axis=1)
        pushed = tl.where((op == TERM) | (op == EXACT_TERM), tl.where(hit != 0, ones, zero), ones)
        s0, s1, s2, s3, s4, s5, s6, s7 = _stack_step(op, pushed, s0, s1, s2, s3, s4, s5, s6, s7)
    tl.store(out_ptr + q.to(tl.int64) * M + m, (s0 != 0).to(tl.int8), mask=mmask)


@triton.jit
def exact_words_kernel(out_ptr, words_ptr, terms_ptr, counts_ptr, hashes_ptr, ops_ptr, args_ptr, M, L, T, E, A, last_item,
                       BW: tl.constexpr):
    """out[q * E + e, m]: bit b set when item 64 * words[q, m] + b (clamped to last_item) really has
    term hashes[q, e], for the slots e an EXACT_TERM step of plan q reads; 0 for the others, which
    no step reads (no attribute is loaded for them)."""
    q = tl.program_id(0)
    m = tl.program_id(1) * BW + tl.arange(0, BW)
    mmask = m < M
    w = tl.load(words_ptr + q.to(tl.int64) * M + m, mask=mmask, other=0)
    bit = tl.arange(0, 64)
    items = tl.minimum(w[:, None] * 64 + bit[None, :], last_item)
    count = tl.load(counts_ptr + items, mask=mmask[:, None], other=0)
    for e in range(E):
        used = 0
        for i in range(L):
            used = used | ((tl.load(ops_ptr + q * L + i) == EXACT_TERM) & (tl.load(args_ptr + q * L + i) == e)).to(tl.int32)
        word = tl.zeros((BW,), tl.int64)
        if used != 0:
            h = tl.load(hashes_ptr + q * T + e)
            hit = tl.zeros((BW, 64), tl.int64)
            for a in range(A):
                present = mmask[:, None] & (a < count)
                hit = hit | (tl.load(terms_ptr + items * A + a, mask=present, other=0) == h).to(tl.int64) & present.to(tl.int64)
            word = tl.sum(hit << bit[None, :].to(tl.int64), axis=1)  # distinct bits: the sum is the OR
        tl.store(out_ptr + (q * E + e).to(tl.int64) * M + m, word, mask=mmask)


@triton.jit
def keep_kernel(out_ptr, passing_ptr, words_ptr, alive_ptr, clusters_ptr, starts_ptr, sizes_ptr, NW, S,
                BS: tl.constexpr):
    """out[q, p, j] = slot j of probed cluster clusters[q, p] passes: bit start % 64 + j of the
    row's NW probed words (passing [Q, P * NW], counted from the word holding the cluster's first
    item `start`) ANDed with the alive word of the same item, and j < the cluster's size. One
    lane per slot; as `probed.probed_keep_reference` (shift, join, mask and unpack), in one launch."""
    qp = tl.program_id(0)  # q * P + p
    j = tl.program_id(1) * BS + tl.arange(0, BS)
    jmask = j < S
    c = tl.load(clusters_ptr + qp)
    start = tl.load(starts_ptr + c)
    size = tl.load(sizes_ptr + c)
    b = start % 64 + j
    local = b // 64
    lmask = jmask & (local < NW)  # past the row's words: 0 (the reference's zero word after the last)
    at = qp.to(tl.int64) * NW + local
    w = tl.load(words_ptr + at, mask=lmask, other=0)
    word = tl.load(passing_ptr + at, mask=lmask, other=0) & tl.load(alive_ptr + w, mask=lmask, other=0)
    keep = lmask & (j < size) & (((word >> (b % 64)) & 1) != 0)
    tl.store(out_ptr + qp.to(tl.int64) * S + j, keep.to(tl.int8), mask=jmask)
