"""Triton kernel of the radix top-K selection (imported only when a Triton backend runs)."""

import triton
import triton.language as tl


@triton.jit
def digit_histogram_kernel(keys_ptr, prefix_ptr, histogram_ptr, num_columns,
                           DIGIT_SHIFT: tl.constexpr, DIGIT_BITS: tl.constexpr, HAS_PREFIX: tl.constexpr,
                           NUM_BINS: tl.constexpr, BLOCK: tl.constexpr):
    """Per-row histogram of one digit among the keys matching the threshold prefix (int64 [rows]).

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
        prefix = tl.load(prefix_ptr + row).to(tl.uint32)  # int64, the digits chosen so far (< 2**22)
        counted = counted & ((keys >> (DIGIT_SHIFT + DIGIT_BITS)) == prefix)
    # masked-out keys land in bin 0 and are taken back out (histogram's mask= needs Triton >= 3.2;
    # 1 - x rather than ~x: Triton 3.1's interpreter cannot invert a boolean)
    counts = tl.histogram(tl.where(counted, digit, 0), NUM_BINS)
    counts -= tl.where(tl.arange(0, NUM_BINS) == 0, tl.sum(1 - counted.to(tl.int32), axis=0), 0)
    tl.atomic_add(histogram_ptr + row * NUM_BINS + tl.arange(0, NUM_BINS), counts)


@triton.jit
def _selection_key(values, columns):
    """int64 keys ordered by value, then by column descending (`topk._sorted_selection`'s): the
    value's order-preserving int32 key above (-0.0 as 0.0), 2**31 - 1 - column below."""
    bits = tl.where(values == 0.0, 0.0, values).to(tl.int32, bitcast=True)
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (keys.to(tl.int64) << 32) | (2147483647 - columns.to(tl.int64))


@triton.jit
def two_level_keys_kernel(scores_ptr, best_values_ptr, best_columns_ptr, keys_ptr, M, K, KEEP,
                          FIX_TIES: tl.constexpr, BK: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: the selection keys [K] of the two-level selection (`topk._select_two_level`
    with fixed shapes). The row's best KEEP winners (sorted, values and columns) give the k-th value
    T; the winners above T keep their slots, and FIX_TIES: the slots after them take the row's
    first ties at T in column order, found by a running count over the row (`_first_ties_in_place`)."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BK)
    in_k = s < K
    values = tl.load(best_values_ptr + row * KEEP + s, mask=in_k, other=float("-inf"))
    columns = tl.load(best_columns_ptr + row * KEEP + s, mask=in_k, other=0)
    winner = in_k
    if FIX_TIES:
        threshold = tl.load(best_values_ptr + row * KEEP + K - 1)
        num_above = tl.sum((in_k & (values > threshold)).to(tl.int32), axis=0)
        winner = in_k & (s < num_above)
        tied = 0
        for c0 in range(0, M, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            x = tl.load(scores_ptr + row * M + c, mask=c < M, other=0.0)
            tie = (c < M) & (x == threshold)
            slot = num_above + tied + tl.cumsum(tie.to(tl.int32), axis=0) - 1
            tl.store(keys_ptr + row * K + slot, _selection_key(x, c), mask=tie & (slot < K))
            tied += tl.sum(tie.to(tl.int32), axis=0)
    tl.store(keys_ptr + row * K + s, _selection_key(values, columns), mask=winner)


@triton.jit
def decode_selection_kernel(keys_ptr, scores_ptr, values_ptr, indices_ptr, N, K, M, BLOCK: tl.constexpr):
    """Sorted selection keys [N = rows x K] back to (value, column): the value read from the row
    (columns past M, padding, read -inf), index -1 where the value is -inf (no candidate)."""
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = at < N
    key = tl.load(keys_ptr + at, mask=valid, other=0)
    column = 2147483647 - (key & 0xFFFFFFFF)
    value = tl.load(scores_ptr + (at // K) * M + column, mask=valid & (column < M), other=float("-inf"))
    tl.store(values_ptr + at, value, mask=valid)
    tl.store(indices_ptr + at, tl.where(value == float("-inf"), -1, column), mask=valid)


@triton.jit
def choose_digit_kernel(histogram_ptr, state_ptr, Q, K, FIRST: tl.constexpr, DIGIT_BITS: tl.constexpr,
                        NUM_BINS: tl.constexpr):
    """One program per row, after a pass's histogram (`topk._choose_digit` and the threshold's
    update in `topk._radix_threshold`): the digit holding the remaining-th largest key, appended
    to the row's threshold. state int64 [4, Q]: threshold, keys above it, keys still to take
    (remaining), keys at it; FIRST: the state starts at (0, 0, K). The histogram is cleared for the
    next pass."""
    row = tl.program_id(0)
    bins = tl.arange(0, NUM_BINS)
    counts = tl.load(histogram_ptr + row * NUM_BINS + bins).to(tl.int64)
    tl.store(histogram_ptr + row * NUM_BINS + bins, tl.zeros((NUM_BINS,), dtype=tl.int32))
    at_or_above = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts  # keys with digit >= d
    if FIRST:
        threshold = tl.zeros((), dtype=tl.int64) + 0
        above_before = tl.zeros((), dtype=tl.int64) + 0
        remaining = tl.zeros((), dtype=tl.int64) + K
    else:
        threshold = tl.load(state_ptr + row)
        above_before = tl.load(state_ptr + Q + row)
        remaining = tl.load(state_ptr + 2 * Q + row)
    digit = tl.sum((at_or_above >= remaining).to(tl.int64), axis=0) - 1
    at = tl.sum(tl.where(bins == digit, counts, 0), axis=0)
    above = tl.sum(tl.where(bins == digit, at_or_above, 0), axis=0) - at
    tl.store(state_ptr + row, (threshold << DIGIT_BITS) | digit)
    tl.store(state_ptr + Q + row, above_before + above)
    tl.store(state_ptr + 2 * Q + row, remaining - above)
    tl.store(state_ptr + 3 * Q + row, at)
