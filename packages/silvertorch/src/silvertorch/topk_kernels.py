"""Triton kernel of the radix top-K selection (imported only when a Triton backend runs)."""

import triton
import triton.language as tl


@triton.jit
def digit_histogram_kernel(keys_ptr, prefix_ptr, histogram_ptr, num_columns,
                           DIGIT_SHIFT: tl.constexpr, DIGIT_BITS: tl.constexpr, HAS_PREFIX: tl.constexpr,
                           NUM_BINS: tl.constexpr, BLOCK: tl.constexpr):
    """Per-row histogram of one digit among the keys matching the threshold prefix.

    One program per (row, block of BLOCK columns); counts are added to the row's [NUM_BINS]
    int32 histogram with atomics."""
    row = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = columns < num_columns
    signed_keys = tl.load(keys_ptr + row.to(tl.int64) * num_columns + columns, mask=in_row, other=0)
    keys = signed_keys.to(tl.uint32, bitcast=True) ^ 0x80000000  # unsigned order-preserving key
    digit = ((keys >> DIGIT_SHIFT) & ((1 << DIGIT_BITS) - 1)).to(tl.int32)
    counted = in_row
    if HAS_PREFIX:
        prefix = tl.load(prefix_ptr + row).to(tl.uint32, bitcast=True)
        counted = counted & ((keys >> (DIGIT_SHIFT + DIGIT_BITS)) == prefix)
    # masked-out keys land in bin 0 and are taken back out (histogram's mask= needs Triton >= 3.2;
    # 1 - x rather than ~x: Triton 3.1's interpreter cannot invert a boolean)
    counts = tl.histogram(tl.where(counted, digit, 0), NUM_BINS)
    counts -= tl.where(tl.arange(0, NUM_BINS) == 0, tl.sum(1 - counted.to(tl.int32), axis=0), 0)
    tl.atomic_add(histogram_ptr + row * NUM_BINS + tl.arange(0, NUM_BINS), counts)
