"""Triton kernel of `DenseMaskFilter.range_masks` (imported only when a Triton backend runs)."""

import triton
import triton.language as tl


@triton.jit
def range_words_kernel(packed_ptr, starts_ptr, lengths_ptr, out_ptr, TOTAL, N, R, W, PACKED_WIDTH,
                       BLOCK: tl.constexpr):
    """Word w of range r of query q, flat over [Q, R, W]: the mask's bits start + 32w.. (start
    clamped to [0, N]), from two packed words (unsigned 32-bit words held in int64, zero words
    past the mask's end) joined into 64 bits and shifted right by start % 32; bits at or past the
    range's length are 0. As `DenseMaskFilter._range_masks_reference`, in one launch."""
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = at < TOTAL
    qr = at // W
    w = at % W
    q = qr // R
    start = tl.minimum(tl.maximum(tl.load(starts_ptr + qr, mask=valid, other=0), 0), N)
    length = tl.load(lengths_ptr + qr, mask=valid, other=0)
    first = q * PACKED_WIDTH + start // 32 + w
    low = tl.load(packed_ptr + first, mask=valid, other=0)
    high = tl.load(packed_ptr + first + 1, mask=valid, other=0)
    word = (low | (high << 32)) >> (start % 32)
    bits = tl.minimum(tl.maximum(length - 32 * w, 0), 32)
    word = word & ((tl.full((BLOCK,), 1, tl.int64) << bits) - 1)
    tl.store(out_ptr + at, word.to(tl.int32), mask=valid)
