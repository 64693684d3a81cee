"""Exact top-k of candidate score rows, for k from 1 to 1,000,000.

    values, indices = select_topk(scores, k)          # scores [Q, M] float32, -inf = no candidate

Every method returns what a stable descending sort returns (`select_topk_reference`): values
descending, equal scores in ascending index order, and slots past a row's last candidate as
value -inf with index -1. Methods:

- "sort": the reference, one stable sort of the whole row. Cheapest for short rows, and on the
  CPU wherever k is a large part of the row.
- "two_level" (k <= 4096): rows cut into tiles (max(1024, 8k) columns on GPUs, the whole row on
  the CPU); `torch.topk` keeps each tile's k + 1 best, then one more over the tile winners gives
  the k-th value T and the (k+1)-th. Every score above T is among the winners; `torch.topk` picks
  ties arbitrarily, so only a row whose (k+1)-th winner also equals T reads its full row for the
  first ties at T in index order. Only the k selected are then sorted.
- "radix" (large k): scores become order-preserving 32-bit keys; three digit histograms
  (11, 11, 10 bits, most significant first) find each row's k-th largest key T and how many
  keys exceed it; the selection is every key > T plus the first ties at T in index order, and
  only those k are sorted. The histogram step runs as a Triton kernel when
  `select_backend(scores).uses_triton` (the interpreter on CPU), each pass's choice of digit as a
  second one, else in PyTorch, where each pass after the first works on the keys still matching
  the threshold's prefix.

On a Triton backend the two-level selection's tie fix-up (fixed shapes) and ordering run as two
small kernels around one sort (`_two_level_selection_triton`); the PyTorch formulation beside
them is their reference.

All argument checks happen before any kernel runs. Triton is imported only when its kernel is
first built, never at module import.
"""

from __future__ import annotations

import numbers

import torch

from gpukernels_common import capturing, select_backend

from .filtering import device_constant

METHODS = ("auto", "sort", "two_level", "radix")
AUTO_SORT_MAX_COLUMNS = 8192  # auto on GPUs: rows this short are sorted whole
# auto on the CPU: two-level once rows are long against k and the batch is not tiny (a stable sort
# of 128 x 4,800 scores takes 17.5 ms there, the two-level selection of k = 100 from them 3.6 ms,
# of k = 1,200 as long as the sort; a batch of 3 x 100 sorts in half the time)
CPU_TWO_LEVEL_MIN_COLUMNS_PER_K = 4
CPU_TWO_LEVEL_MIN_SCORES = 1024
TWO_LEVEL_MAX_K = 4096  # auto: above this k the radix select is used
ACCEPTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # converted losslessly to float32

# (shift, bits) of each radix digit of the 32-bit unsigned key, most significant first.
RADIX_DIGITS = ((21, 11), (10, 11), (0, 10))
RADIX_BINS = 2048
HISTOGRAM_BLOCK = 4096  # columns per Triton program
_INT32_MIN = -(2**31)


def as_count(value, name: str) -> int:
    """A count argument (k, nprobe, max_nprobe) as an int: Python and numpy integers, not bools or
    floats (nprobe=2.5 would fail deep in torch.topk, a float k would be truncated)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def past_int64(t: torch.Tensor) -> bool:
    """Whether a uint64 tensor holds values of 2**63 or more, which an int64 cast wraps negative."""
    # torch has no comparisons of uint64: such values are the ones whose int64 view is negative
    return t.dtype == getattr(torch, "uint64", None) and t.numel() > 0 and bool((t.view(torch.int64) < 0).any())


def as_integers(values, name: str, device=None, what: str = "integers") -> torch.Tensor:
    """Ids or item positions as int64, refusing floats, complex and booleans: 1.5 would be
    truncated to 1 and a bool mask read as 0s and 1s, silently. An empty list (float32 to
    torch) is no values, not fractional ones. Values past int64 are refused by name (a Python int
    failed with torch's unnamed "Overflow when unpacking long long"; a uint64 one wrapped negative)."""
    try:
        t = torch.as_tensor(values, device=device)
    except (RuntimeError, TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"{name} must be {what} (int64), got {values!r:.80}: {err}") from None
    if t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise ValueError(f"{name} must be {what}, got {t.dtype}")
    if past_int64(t):
        raise ValueError(f"{name} must be {what} within int64, got uint64 values past {torch.iinfo(torch.int64).max}")
    return t.long()


def select_topk(scores: torch.Tensor, k: int, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The k best scores of each row: (values [Q, k] float32 descending, indices [Q, k] int64).

    Equal scores come in ascending column order; when a row has fewer than k candidates
    (scores above -inf) the remaining slots hold value -inf and index -1. Raises ValueError
    for a non-2-D `scores` or one not float32, float16 or bfloat16, NaN in `scores`, k < 1,
    k > M or an unknown method.
    """
    return select_topk_checked(_checked_scores(scores, k, method), k, method)


def select_topk_checked(scores: torch.Tensor, k: int, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """`select_topk` for callers that guarantee its argument checks (a contiguous float32
    [Q, M] without NaN, an int 1 <= k <= M, a known method), e.g. the IVF search on its own
    scores: no checks, so no NaN scan read back on the host (a device synchronisation)."""
    num_rows, num_columns = scores.shape
    if num_rows == 0:
        return scores.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=scores.device)
    if method == "auto":
        if num_columns <= AUTO_SORT_MAX_COLUMNS:
            long_on_cpu = (scores.device.type == "cpu" and num_columns >= CPU_TWO_LEVEL_MIN_COLUMNS_PER_K * k
                           and num_rows * num_columns >= CPU_TWO_LEVEL_MIN_SCORES)  # k <= 2,048 <= TWO_LEVEL_MAX_K here
            method = "two_level" if long_on_cpu else "sort"
        else:
            method = "two_level" if k <= TWO_LEVEL_MAX_K else "radix"
    if method == "sort":
        return _select_sort(scores, k)
    if method == "two_level":
        return _select_two_level(scores, k)
    return _select_radix(scores, k)


def select_topk_reference(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch reference: stable descending sort of each row, first k kept."""
    return _select_sort(_checked_scores(scores, k, "sort"), k)


def _select_sort(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return _mark_missing(values[:, :k].contiguous(), indices[:, :k].contiguous())


# -- checks and shared helpers ---------------------------------------------------------------
def _checked_scores(scores, k, method) -> torch.Tensor:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [num_rows, num_columns], got shape {tuple(scores.shape)}")
    if scores.dtype not in ACCEPTED_DTYPES:
        raise ValueError(f"scores must be a float tensor (float32, float16 or bfloat16), got {scores.dtype}")
    k = as_count(k, "k")
    num_columns = scores.shape[1]
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if k > num_columns:
        raise ValueError(f"k={k} exceeds the number of columns M={num_columns}")
    if num_columns >= 2**31 - 1:
        raise ValueError(f"scores rows must have fewer than 2**31 - 1 columns, got M={num_columns}")
    # not while a CUDA graph is captured (no value can be read back); the eager calls before it check
    if scores.numel() and not capturing() and torch.isnan(scores.amax()):  # max propagates NaN: one reduction, no [Q, M] mask
        raise ValueError("scores contain NaN")
    return scores.float().contiguous()


def _mark_missing(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots holding -inf are not candidates: index -1."""
    return values, indices.masked_fill(values == float("-inf"), -1)


def order_preserving_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered like the float32 scores (-0.0 and 0.0 share a key; no NaN allowed).

    Non-negative floats keep their bits; negative ones get their 31 magnitude bits inverted.
    The unsigned 32-bit key the radix digits are taken from is this key with its sign bit flipped.
    """
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


# -- two-level: tile-local top-k, then a merge of the tile winners ----------------------------
def _reads_back_cheaply(scores: torch.Tensor) -> bool:
    """Whether a data-dependent shape (nonzero, a count read on the host) costs no device
    synchronisation: plain CPU tensors. The Triton backends (GPUs, the interpreter standing in
    for them) take fixed-shape formulations instead."""
    return scores.device.type == "cpu" and not select_backend(scores).uses_triton


def _select_two_level(scores: torch.Tensor, k: int, tile_width: int | None = None,
                      fixed_shapes: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile winners give the exact k-th value T and every score above it. Each tile keeps k + 1
    winners, so a row whose (k+1)-th best winner is below T has all its ties at T among its k
    best winners; only the rows where it equals T (ties past the winners) read their full row
    for the first ties in index order (`torch.topk` picks ties arbitrarily). A row with fewer
    than k candidates has T = -inf: any of its -inf slots will do (they come back as index -1).
    On the CPU the row is one tile (one `torch.topk` per row is fastest there). `fixed_shapes`
    (default: not on plain CPU tensors): the tie fix-up runs over every row with fixed shapes,
    reading nothing back, instead of gathering the rows that need it."""
    num_rows, num_columns = scores.shape
    if fixed_shapes is None:
        fixed_shapes = not _reads_back_cheaply(scores)
    if tile_width is None:
        tile_width = num_columns if scores.device.type == "cpu" else max(1024, 8 * k)
    tile_width = min(tile_width, num_columns)
    keep = min(k + 1, num_columns)  # one past k shows whether the ties at T go past the winners
    num_tiles = -(-num_columns // tile_width)
    padding = num_tiles * tile_width - num_columns
    padded = torch.nn.functional.pad(scores, (0, padding), value=float("-inf")) if padding else scores
    winner_values, winner_columns = padded.view(num_rows, num_tiles, tile_width).topk(min(keep, tile_width), dim=2,
                                                                                      sorted=num_tiles == 1)
    if num_tiles > 1:  # a score above T is in its tile's winners (else its tile alone holds k scores above T)
        tile_start = torch.arange(num_tiles, device=scores.device).mul_(tile_width).view(1, num_tiles, 1)
        winner_values = winner_values.reshape(num_rows, -1)
        winner_columns = (winner_columns + tile_start).reshape(num_rows, -1)
        best_values, best = torch.topk(winner_values, keep, dim=1)
        best_columns = winner_columns.gather(1, best)
    else:  # one tile: its winners come sorted
        best_values, best_columns = winner_values.view(num_rows, keep), winner_columns.view(num_rows, keep)
    if fixed_shapes and k <= TWO_LEVEL_MAX_K and select_backend(scores).uses_triton:
        return _two_level_selection_triton(scores, best_values, best_columns, k, keep > k)
    kth_value = best_values[:, k - 1]
    columns = best_columns[:, :k].contiguous()
    if keep > k and fixed_shapes:
        columns = _first_ties_in_place(scores, best_values, columns, kth_value, k)
    elif keep > k:
        spill_rows = ((best_values[:, k] == kth_value) & (kth_value > float("-inf"))).nonzero(as_tuple=True)[0]
        if spill_rows.numel():  # exact: the scores above T, then the first ties at T in index order
            threshold = kth_value[spill_rows].unsqueeze(1)
            num_above = (best_values[spill_rows, :k] > threshold).sum(1)  # they lead the sorted winners
            tie_rows, tie_columns = (scores.index_select(0, spill_rows) == threshold).nonzero(as_tuple=True)
            first_tie_of_row = torch.searchsorted(tie_rows, torch.arange(spill_rows.numel(), device=scores.device))
            slot = num_above[tie_rows] + torch.arange(tie_rows.numel(), device=scores.device) - first_tie_of_row[tie_rows]
            kept = slot < k
            fixed = columns[spill_rows]
            fixed[tie_rows[kept], slot[kept]] = tie_columns[kept]
            columns[spill_rows] = fixed
    return _sorted_selection(padded, columns)  # padding columns only come with -inf: index -1


def _two_level_selection_triton(scores, best_values, best_columns, k, fix_ties):
    """The fixed-shape tie fix-up and `_sorted_selection` in two kernels around one sort (about 25
    ops fewer): `two_level_keys_kernel` writes each row's k selection keys, the sort orders them,
    `decode_selection_kernel` reads the values and columns back out of them."""
    import triton

    from .topk_kernels import decode_selection_kernel, two_level_keys_kernel

    num_rows, num_columns = scores.shape
    k = int(k)  # a numpy integer is no constexpr
    scores, best_values, best_columns = scores.contiguous(), best_values.contiguous(), best_columns.contiguous()
    keys = torch.empty(num_rows, k, dtype=torch.int64, device=scores.device)
    two_level_keys_kernel[(num_rows,)](scores, best_values, best_columns, keys, num_columns, k, best_values.shape[1],
                                       FIX_TIES=fix_ties, BK=triton.next_power_of_2(k), BLOCK=1024)
    keys = torch.sort(keys, dim=1, descending=True).values  # unique in a row
    values = torch.empty(num_rows, k, dtype=torch.float32, device=scores.device)
    indices = torch.empty(num_rows, k, dtype=torch.int64, device=scores.device)
    block = min(1024, triton.next_power_of_2(num_rows * k))
    decode_selection_kernel[(triton.cdiv(num_rows * k, block),)](keys, scores, values, indices, num_rows * k, k, num_columns,
                                                                 BLOCK=block)
    return values, indices


def _running_counts(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(running count of the set entries of bool [Q, M] in row-major order, flat [Q*M]; the count
    before each row [Q]). One scan of the flattened mask: a device-wide scan is fast where a scan
    of each row is not (4 rows of 2M: one long serial scan per row on a GPU)."""
    num_rows, num_columns = mask.shape
    dtype = torch.int32 if mask.numel() < 2**31 else torch.int64
    running = mask.reshape(-1).cumsum(0, dtype=dtype)
    return running, torch.nn.functional.pad(running.view(num_rows, num_columns)[:-1, -1], (1, 0))


def _nth_set_columns(running, before_row, nth, num_columns):
    """Per row, the column of the nth [Q, n] (1-based) set entry of the mask `_running_counts`
    counted: a binary search of the flat running count."""
    return torch.searchsorted(running, nth + before_row.unsqueeze(1)) % num_columns  # flat position -> column


def _arange_from_1(k: int, device) -> torch.Tensor:
    return device_constant(f"arange_from_1_{k}", device, lambda d: torch.arange(1, k + 1, dtype=torch.int32, device=d))


def _first_ties_in_place(scores, best_values, columns, kth_value, k):
    """The two-level tie fix-up with fixed shapes (no rows gathered, no count read back), over
    every row: the slots after the winners above T take the first ties at T in index order,
    found by a binary search of the running tie count. A row whose ties all are among its
    winners gets the same columns back (those ties are all its ties), so no row is told apart;
    a row short of candidates (T = -inf) gets its first -inf slots (index -1 either way)."""
    num_above = (best_values[:, :k] > kth_value.unsqueeze(1)).sum(1, dtype=torch.int32)  # they lead the sorted winners
    running, before_row = _running_counts(scores == kth_value.unsqueeze(1))
    # slot s holds tie number s - num_above + 1 (1-based); slots before num_above keep their winner
    tie_number = _arange_from_1(k, scores.device) - num_above.unsqueeze(1)
    tie_columns = _nth_set_columns(running, before_row, tie_number.to(running.dtype), scores.shape[1])
    return torch.where(tie_number > 0, tie_columns, columns)


def _sorted_selection(scores: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row's selected columns by score descending, then column ascending: one sort of
    int64 keys (the score's order-preserving key above, the column's complement below; unique in
    a row), not a stable sort after a sort by column."""
    values = scores.gather(1, columns)
    keys = (order_preserving_keys(values).long() << 32) | ((2**31 - 1) - columns)  # columns < 2**31 - 1
    order = torch.sort(keys, dim=1, descending=True).indices
    return _mark_missing(values.gather(1, order), columns.gather(1, order))


# -- radix select -----------------------------------------------------------------------------
def _digits(keys: torch.Tensor, shift: int, bits: int) -> torch.Tensor:
    """Digit (shift, bits) of the unsigned key (= signed key with its top bit flipped)."""
    digit = (keys >> shift) & ((1 << bits) - 1)
    if shift + bits == 32:
        digit = digit ^ (1 << (bits - 1))
    return digit


def _choose_digit(histogram: torch.Tensor, remaining: torch.Tensor):
    """Per row, the digit holding the remaining-th largest key: (digit, keys in higher digits, keys at it)."""
    at_or_above = histogram.flip(1).cumsum(1).flip(1)  # [Q, bins]: keys with digit >= d
    digit = (at_or_above >= remaining.unsqueeze(1)).sum(1) - 1
    at = histogram.gather(1, digit.unsqueeze(1)).squeeze(1)
    above = at_or_above.gather(1, digit.unsqueeze(1)).squeeze(1) - at
    return digit, above, at


def _radix_threshold(keys: torch.Tensor, k: int, histogram_of):
    """(threshold unsigned key [Q], keys above it [Q], keys equal to it [Q]): one digit per pass,
    most significant first; `histogram_of(pass_index, shift, bits, threshold)` counts, per row,
    the digit of the keys whose higher digits equal the threshold chosen so far."""
    num_rows = keys.shape[0]
    remaining = torch.full((num_rows,), k, dtype=torch.int64, device=keys.device)
    threshold = torch.zeros(num_rows, dtype=torch.int64, device=keys.device)
    count_above = torch.zeros_like(threshold)
    count_at = remaining
    for pass_index, (shift, bits) in enumerate(RADIX_DIGITS):
        chosen, above, count_at = _choose_digit(histogram_of(pass_index, shift, bits, threshold), remaining)
        threshold = (threshold << bits) | chosen
        count_above += above
        remaining -= above
    return threshold, count_above, count_at


def _radix_threshold_torch(keys: torch.Tensor, k: int):
    """PyTorch histograms: the first pass counts every key; later passes only the keys whose
    higher digits match the threshold's (compacted into flat lists of (row, key))."""
    num_rows = keys.shape[0]
    state = {"keys": keys, "rows": torch.arange(num_rows, device=keys.device, dtype=torch.int32).unsqueeze(1)}

    def histogram_of(pass_index, shift, bits, threshold):
        if pass_index:  # narrow to the keys matching the digits chosen so far
            prev_shift, prev_bits = RADIX_DIGITS[pass_index - 1]
            chosen = threshold & ((1 << prev_bits) - 1)  # the digit the last pass chose
            keep = _digits(state["keys"], prev_shift, prev_bits) == chosen.to(torch.int64)[state["rows"].long()]
            if state["keys"].dim() == 2:
                rows, columns = keep.nonzero(as_tuple=True)
                state["keys"], state["rows"] = keys[rows, columns], rows.to(torch.int32)
            else:
                state["keys"], state["rows"] = state["keys"][keep], state["rows"][keep]
        digit = _digits(state["keys"], shift, bits)
        bins = (state["rows"] * RADIX_BINS + digit).reshape(-1)
        return torch.bincount(bins, minlength=num_rows * RADIX_BINS).view(num_rows, RADIX_BINS)

    return _radix_threshold(keys, k, histogram_of)


def _radix_threshold_triton(keys: torch.Tensor, k: int):
    """Same as `_radix_threshold_torch`: each pass one Triton histogram over the full rows, then one
    kernel choosing the digit and updating the row's state (`choose_digit_kernel`, where
    `_choose_digit` and the updates take about 15 ops a pass)."""
    num_rows, num_columns = keys.shape
    from .topk_kernels import choose_digit_kernel, digit_histogram_kernel

    grid = (num_rows, -(-num_columns // HISTOGRAM_BLOCK))
    histogram = torch.zeros(num_rows, RADIX_BINS, dtype=torch.int32, device=keys.device)  # cleared by each choice
    state = torch.empty(4, num_rows, dtype=torch.int64, device=keys.device)  # threshold, above, remaining, at
    for pass_index, (shift, bits) in enumerate(RADIX_DIGITS):
        digit_histogram_kernel[grid](keys, state[0], histogram, num_columns, DIGIT_SHIFT=shift, DIGIT_BITS=bits,
                                     HAS_PREFIX=pass_index > 0, NUM_BINS=RADIX_BINS, BLOCK=HISTOGRAM_BLOCK)
        choose_digit_kernel[(num_rows,)](histogram, state, num_rows, int(k), FIRST=pass_index == 0, DIGIT_BITS=bits,
                                         NUM_BINS=RADIX_BINS)
    return state[0], state[1], state[3]


def _select_radix(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    keys = order_preserving_keys(scores)
    find_threshold = _radix_threshold_triton if select_backend(scores).uses_triton else _radix_threshold_torch
    threshold, count_above, count_at = find_threshold(keys, k)
    signed_threshold = (threshold + _INT32_MIN).to(torch.int32).unsqueeze(1)
    if not _reads_back_cheaply(scores):
        columns = _radix_columns_fixed_shapes(keys, signed_threshold, count_above, k)
    else:
        columns = _radix_columns(keys, signed_threshold, count_above, count_at, k)
    order = torch.sort(keys.gather(1, columns), dim=1, descending=True, stable=True).indices
    indices = columns.gather(1, order)
    return _mark_missing(scores.gather(1, indices), indices)


def _radix_columns_fixed_shapes(keys, signed_threshold, count_above, k):
    """[Q, k] selected columns, ascending: every key above the threshold and the first
    k - count_above ties at it, found by binary searches of running counts (fixed shapes:
    nothing is read back on the host)."""
    ties = keys == signed_threshold
    running_ties, ties_before_row = _running_counts(ties)
    last_tie_kept = (ties_before_row + (k - count_above)).to(running_ties.dtype).unsqueeze(1)
    selected = (keys > signed_threshold) | (ties & (running_ties.view(keys.shape) <= last_tie_kept))
    running, before_row = _running_counts(selected)  # exactly k per row
    wanted = _arange_from_1(k, keys.device).to(running.dtype).expand(keys.shape[0], k)
    return _nth_set_columns(running, before_row, wanted, keys.shape[1])


def _radix_columns(keys, signed_threshold, count_above, count_at, k):
    """`_radix_columns_fixed_shapes` by gathering the rows with surplus ties (CPU tensors)."""
    num_rows = keys.shape[0]
    selected = keys >= signed_threshold
    surplus_rows = (count_above + count_at > k).nonzero().squeeze(1)
    if surplus_rows.numel():  # keep only the first (k - count_above) ties at the threshold
        ties = keys[surplus_rows] == signed_threshold[surplus_rows]
        tie_rank = ties.cumsum(1, dtype=torch.int32)
        needed = (k - count_above[surplus_rows]).to(torch.int32).unsqueeze(1)
        selected[surplus_rows] &= ~(ties & (tie_rank > needed))
    return selected.nonzero()[:, 1].view(num_rows, k)  # ascending per row
