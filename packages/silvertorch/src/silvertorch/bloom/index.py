"""BloomIndex: bit-sliced Bloom filters over item attributes, searched as bit operations.

Layout: items in bundles of 2048; bundle b has `widths[b]` rows (a prime >= max terms of an
item in the bundle * k * b_multiplier) of 32 int64 words; bit i % 64 of word (i % 2048) // 64
in row p is set when item i has a term hashing to row p (`hashing.bloom_positions`: k distinct
rows per term). A term's test over 64 items is the AND of k words. Beside the bits the index
keeps the items' attributes (for exact NOT, exact verification and rebuilding bundles on append)
and a tombstone mask for deleted items.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

import torch

from gpukernels_common import select_backend
from gpukernels_common.device import to_device

from ..filtering import device_constant
from ..topk import as_integers, past_int64
from .hashing import bloom_positions, next_prime, term_hash
from .parser import AND, EXACT_TERM, NOT, OR, TERM, TRUE, FilterPlans

BUNDLE = 2048
WORDS_PER_BUNDLE = BUNDLE // 64
# 2: a random k-subset of rows per term (`hashing.bloom_positions`); version 1 files hold double-hashed rows
FORMAT_VERSION = 2
# what to do with a file of an older version (the header's string), as the retrieval model's OLD_VERSIONS
OLD_VERSIONS = {"1": "version 1 placed each term's Bloom rows by double hashing: build the index again from the items"}
MAX_K = 10  # a term's rows per bundle: the kernels keep this many draws (`kernels._bloom_rows`)
MAX_WIDTH = 1 << 30  # a bound on rows per bundle: the prime above it stays below 2^31 (32-bit row hashes)
BUILD_CHUNK = 1 << 22  # (item, term) pairs per step of the reference build


def _or_bits(n_words: int, word: torch.Tensor, bit: torch.Tensor, device) -> torch.Tensor:
    """OR-scatter: distinct (word, bit) pairs summed as powers of two (exact in int64 wraparound)."""
    out = torch.zeros(n_words, dtype=torch.int64, device=device)
    if word.numel():
        key = torch.unique(word * 64 + bit)
        out.index_add_(0, key // 64, torch.bitwise_left_shift(torch.ones_like(key), key % 64))
    return out


def check_k(k, name: str = "k") -> None:
    """The one check of a Bloom index's k (build, load, the retrieval model's bloom_k): k=2.5 was
    built as 2 and True as 1, and a k above the kernels' draws reads other rows than the reference."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= MAX_K:
        raise ValueError(f"{name} must be an integer in [1, {MAX_K}], got {k!r}")


def _check_bundle_rows(lengths: torch.Tensor, k: int, b_multiplier: float) -> None:
    """Refuse items whose bundle would need MAX_WIDTH rows or more: the kernels reduce 32-bit row
    hashes modulo the width (`bundle_widths`; `append` checks before it changes anything)."""
    most = int(lengths.max()) if lengths.numel() else 0
    if math.ceil(most * k * b_multiplier) >= MAX_WIDTH:
        raise ValueError(f"an item with {most} terms needs {math.ceil(most * k * b_multiplier)} Bloom rows at k={k}, "
                         f"b_multiplier={b_multiplier}; a bundle holds fewer than {MAX_WIDTH} rows")


def bundle_widths(lengths: torch.Tensor, k: int, b_multiplier: float) -> torch.Tensor:
    """Rows per bundle for items with `lengths` terms each (bundles from the first item): the
    smallest prime >= max(ceil(max terms in the bundle * k * b_multiplier), k + 1)."""
    n = lengths.numel()
    padded = torch.zeros(math.ceil(n / BUNDLE) * BUNDLE, dtype=torch.int64)
    padded[:n] = lengths.cpu()
    _check_bundle_rows(lengths, k, b_multiplier)
    return torch.tensor([next_prime(max(math.ceil(int(m) * k * b_multiplier), k + 1)) for m in padded.view(-1, BUNDLE).amax(1)],
                        dtype=torch.int64)


def _term_words(items: torch.Tensor, hashes: torch.Tensor, widths: torch.Tensor, row_offsets: torch.Tensor, k: int) -> torch.Tensor:
    """[terms, k]: the words (indices into the flat bits) holding item items[t]'s bit for term
    hashes[t], one per Bloom row; the bit is items[t] % 64."""
    bundle = items // BUNDLE
    rows = row_offsets[bundle].unsqueeze(1) + bloom_positions(hashes, widths[bundle], k)
    return rows * WORDS_PER_BUNDLE + ((items % BUNDLE) // 64).unsqueeze(1)


def bloom_disagreement(bits, row_offsets, widths, lengths, term_items, term_hashes, k: int, b_multiplier: float,
                       samples: int = 1024) -> str | None:
    """None when a Bloom index agrees with its items' terms (item i has lengths[i] terms; term t
    is term_hashes[t] of item term_items[t], in any order), else what disagrees. Checks the
    layout in full (each bundle's width follows from k and b_multiplier, the row offsets from the
    widths) and the bits on `samples` terms spread over the items (each sets its k rows). A loaded
    index that fails would silently lose true matches: say a hand-edited k, or bits from another build."""
    n = lengths.numel()
    if widths.numel() != math.ceil(n / BUNDLE):
        return f"{widths.numel()} bundle widths for {n} items (expected {math.ceil(n / BUNDLE)})"
    try:
        expected = bundle_widths(lengths, k, b_multiplier)
    except ValueError as err:  # widths past the kernels' bound: said as what disagrees, so the loaders name their file
        return str(err)
    if not torch.equal(widths.cpu(), expected):
        return f"the bundle widths do not follow from k={k} and b_multiplier={b_multiplier} (a changed k or b_multiplier?)"
    if row_offsets.numel() != widths.numel() + 1 or not torch.equal(row_offsets.cpu(), torch.cat([torch.zeros(1, dtype=torch.int64), expected.cumsum(0)])):
        return "the bundles' row offsets do not follow from their widths"
    if tuple(bits.shape) != (int(row_offsets[-1]), WORDS_PER_BUNDLE):
        return f"bits are {tuple(bits.shape)}, the widths give ({int(row_offsets[-1])}, {WORDS_PER_BUNDLE})"
    n_terms = term_hashes.numel()
    if n_terms == 0:
        return None
    pick = torch.linspace(0, n_terms - 1, min(samples, n_terms)).round().long().to(bits.device)
    items = term_items.to(bits.device)[pick]
    words = _term_words(items, term_hashes.to(bits.device)[pick], widths.to(bits.device), row_offsets.to(bits.device), k)
    unset = ((bits.reshape(-1)[words] >> (items % 64).unsqueeze(1)) & 1) == 0
    if unset.any():
        return f"{int(unset.any(1).sum())} of {pick.numel()} sampled terms are missing from the Bloom bits (bits from another build?)"
    return None


def _positions(values, name: str, device) -> torch.Tensor:
    """Item positions (or range bounds) as int64 (see `as_integers`)."""
    return as_integers(values, name, device, what="integer item positions")


def _validate_attributes(feature_ids, offsets, values):
    for name, t in (("feature_ids", feature_ids), ("values", values), ("offsets", offsets)):
        # the int64 cast would truncate float offsets (0, 1.5, 3 moved pairs to other items), drop an
        # imaginary part or read bools as 0s and 1s, silently
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            what = "offsets must be an integer tensor" if name == "offsets" else "feature_ids and values must be integer tensors"
            raise ValueError(f"{what}, got {name} of {t.dtype}")
        # uint64 past int64 wraps to a negative value in the cast: the item would match a value it
        # does not have and no filter can write its own (the parser and encode_items take int64)
        if past_int64(t):
            raise ValueError(f"{name} holds values outside the int64 range (uint64 >= 2**63); encode such values as "
                             f"text (FilterSchema.encode_items), which a quoted filter value matches")
    if offsets.dim() != 1 or offsets.numel() < 1 or int(offsets[0]) != 0:
        raise ValueError("offsets must be a 1-D tensor [n_items + 1] starting at 0")
    if (offsets.diff() < 0).any():
        raise ValueError("offsets must be non-decreasing")
    if feature_ids.dim() != 1 or values.dim() != 1 or feature_ids.numel() != values.numel():
        raise ValueError(f"feature_ids and values must be 1-D with the same length, got {tuple(feature_ids.shape)} and {tuple(values.shape)}")
    if int(offsets[-1]) != values.numel():
        raise ValueError(f"offsets end at {int(offsets[-1])} but there are {values.numel()} (feature_id, value) pairs")


class BloomIndex:
    def __init__(self, *, k, b_multiplier, feature_ids, offsets, values, bits, row_offsets, widths, deleted, layout=0):
        self.k, self.b_multiplier = int(k), float(b_multiplier)
        # the IVF storage layout its item positions follow (`IVFIndex.layout`), checked by the search
        self.layout = int(layout)
        self.feature_ids, self.offsets, self.values = feature_ids, offsets, values
        self.bits, self.row_offsets, self.widths, self.deleted = bits, row_offsets, widths, deleted
        self._refresh()

    # -- construction ------------------------------------------------------------------
    @classmethod
    def build(cls, feature_ids, offsets, values, k: int = 3, b_multiplier: float = 5.0, device=None, layout: int = 0) -> BloomIndex:
        """Index items given as jagged (feature_id, value) pairs: item i owns pairs offsets[i]:offsets[i+1].
        `layout`: for items in an IVF index's order, its `layout` (counts up when compact() moves
        items; the search refuses a filter made for another)."""
        feature_ids, offsets, values = (torch.as_tensor(t) for t in (feature_ids, offsets, values))
        _validate_attributes(feature_ids, offsets, values)
        check_k(k)
        # a NaN or infinite b_multiplier passed `<= 1` and failed in the widths' integer conversion
        # (or, with no items yet, in a later append)
        if isinstance(b_multiplier, bool) or not isinstance(b_multiplier, numbers.Real) or not 1.0 < b_multiplier < math.inf:
            raise ValueError(f"b_multiplier must be a finite number > 1, got {b_multiplier!r}")
        device = torch.device(device) if device is not None else feature_ids.device
        n = offsets.numel() - 1
        idx = cls(k=k, b_multiplier=b_multiplier, feature_ids=feature_ids.to(device, torch.int64),
                  offsets=offsets.to(device, torch.int64), values=values.to(device, torch.int64),
                  bits=torch.zeros(0, 32, dtype=torch.int64, device=device),
                  row_offsets=torch.zeros(1, dtype=torch.int64, device=device),
                  widths=torch.zeros(0, dtype=torch.int64, device=device),
                  deleted=torch.zeros(math.ceil(n / 64), dtype=torch.int64, device=device), layout=layout)
        idx._build_bundles(0)
        return idx

    def _build_bundles(self, first_bundle: int) -> None:
        """(Re)build bundles first_bundle.. from the stored attributes."""
        n = self.num_items
        n_bundles = math.ceil(n / BUNDLE)
        device = self.offsets.device
        keep_rows = int(self.row_offsets[first_bundle]) if first_bundle < self.row_offsets.numel() else int(self.row_offsets[-1])
        item_lo = first_bundle * BUNDLE
        lengths = self.offsets.diff()
        new_widths = bundle_widths(lengths[item_lo:], self.k, self.b_multiplier).to(device)
        widths = torch.cat([self.widths[:first_bundle], new_widths])
        row_offsets = torch.zeros(n_bundles + 1, dtype=torch.int64, device=device)
        row_offsets[1:] = torch.cumsum(widths, 0)
        start = int(self.offsets[item_lo]) if item_lo <= n else 0
        item_of_term = torch.repeat_interleave(torch.arange(item_lo, n, device=device), lengths[item_lo:])
        h = term_hash(self.feature_ids[start:], self.values[start:])
        new_rows = int(row_offsets[-1]) - keep_rows
        if select_backend(h).uses_triton and h.numel():
            import triton

            from .kernels import build_kernel

            fresh = torch.zeros(new_rows, 32, dtype=torch.int64, device=device)
            block = 1024 if self.k <= 5 else 256  # each lane holds its k draws: 254 registers a thread at k=10 with 1024
            h, item_of_term, widths, row_offsets = _row_major(h, item_of_term, widths, row_offsets)
            build_kernel[(triton.cdiv(h.numel(), block),)](fresh, h, item_of_term, widths, row_offsets,
                                                          h.numel(), keep_rows, K=self.k, BLOCK=block)
        else:
            fresh = torch.zeros(new_rows * 32, dtype=torch.int64, device=device)
            for lo in range(0, h.numel(), BUILD_CHUNK):  # chunks bound the temporaries (10M items: ~1 GB, not ~30)
                items = item_of_term[lo : lo + BUILD_CHUNK]
                word = _term_words(items, h[lo : lo + BUILD_CHUNK], widths, row_offsets, self.k) - keep_rows * WORDS_PER_BUNDLE
                bit = (items % 64).unsqueeze(1).expand_as(word)
                fresh |= _or_bits(new_rows * 32, word.reshape(-1), bit.reshape(-1), device)
            fresh = fresh.view(new_rows, 32)
        self.bits = torch.cat([self.bits[:keep_rows], fresh])
        self.widths, self.row_offsets = widths, row_offsets
        self._refresh()

    def _refresh(self) -> None:
        n = self.num_items
        n_words = math.ceil(n / 64)
        live = torch.full((n_words,), -1, dtype=torch.int64, device=self.offsets.device)
        if n % 64:
            live[-1] = (1 << (n % 64)) - 1
        self.live = live & ~self.deleted[:n_words]
        # exact side table: (term hash, item) sorted by hash, for exact NOT and verification
        lengths = self.offsets.diff()
        items = torch.repeat_interleave(torch.arange(n, device=self.offsets.device), lengths)
        h = term_hash(self.feature_ids, self.values)
        order = torch.argsort(h)
        self._term_hashes, self._term_items = h[order], items[order]
        self._exact_cache: dict[int, torch.Tensor] = {}

    # -- facts ---------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return self.offsets.numel() - 1

    @property
    def num_words(self) -> int:
        return math.ceil(self.num_items / 64)

    def bloom_bytes(self) -> int:
        return self.bits.numel() * 8

    def bytes_per_item(self) -> float:
        """Bloom bits per item in bytes (the side table and attributes are reported separately)."""
        return self.bloom_bytes() / max(self.num_items, 1)

    # -- exact side table ------------------------------------------------------------------
    def _items_with(self, h: int) -> torch.Tensor:
        key = torch.tensor([h], dtype=torch.int64, device=self._term_hashes.device)
        lo = torch.searchsorted(self._term_hashes, key)
        hi = torch.searchsorted(self._term_hashes, key, right=True)
        return self._term_items[int(lo) : int(hi)]

    def exact_term_words(self, h: int) -> torch.Tensor:
        """Packed bitmap (int64 [num_words]) of the items that really have the term with hash h."""
        if h not in self._exact_cache:
            items = self._items_with(h)
            self._exact_cache[h] = _or_bits(self.num_words, items // 64, items % 64, self.offsets.device)
        return self._exact_cache[h]

    def _plan_tensors(self, plans: FilterPlans, row_of: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(ops, args, hashes, exact row per slot) row-major on the index's device: one copy for all
        four (`to_device`: no host synchronisation); the kernels derive the rows from the hashes themselves."""
        return to_device((plans.ops, plans.args, plans.hashes, row_of), self.bits.device)

    def _exact_tables(self, plans: FilterPlans):
        """Exact bitmaps for every EXACT_TERM slot: (rows [n, num_words] on the index's device, row
        index per (query, slot) on the host). Read on the host, where parse_filters makes the plans:
        a search with such plans reads nothing back from the device. Vectorised over the batch (a
        batch of 256 negated filters took 1.4 ms element by element); without exact terms the
        kernels read no row, and one kept zero word stands in for the table."""
        q, t = plans.hashes.shape
        row_of = torch.zeros(q, t, dtype=torch.int32)
        ops, args, hashes = plans.ops.cpu(), plans.args.cpu(), plans.hashes.cpu()
        query, step = (ops == EXACT_TERM).nonzero(as_tuple=True)
        if not query.numel():  # the kernels and the reference read the table at exact terms only
            return device_constant("zero_word", self.bits.device,
                                   lambda d: torch.zeros(1, 1, dtype=torch.int64, device=d)), row_of
        slot = args[query, step].long()
        unique, row = torch.unique(hashes[query, slot], return_inverse=True)
        row_of[query, slot] = row.to(torch.int32)
        return torch.stack([self.exact_term_words(h) for h in unique.tolist()]), row_of

    # -- evaluation (reference) ------------------------------------------------------------
    def _eval_reference(self, plans: FilterPlans, q: int, w: torch.Tensor, exact, row_of) -> torch.Tensor:
        wmask = (w >= 0) & (w < self.num_words)
        wc = w.clamp(0, max(self.num_words - 1, 0))
        bundle = wc // WORDS_PER_BUNDLE
        wib = wc % WORDS_PER_BUNDLE
        stack: list[torch.Tensor] = []
        for op, slot in zip(plans.ops[q].tolist(), plans.args[q].tolist()):
            if op == TERM:
                # a term's rows depend on the bundle only: placed once per bundle and gathered per word
                # when the words outnumber the bundles (a full search), else placed per word (a few ranges)
                if wc.numel() >= self.widths.numel():
                    pos = bloom_positions(plans.hashes[q, slot].expand_as(self.widths), self.widths, self.k)[bundle]
                else:
                    pos = bloom_positions(plans.hashes[q, slot].expand_as(wc), self.widths[bundle], self.k)
                words = self.bits[self.row_offsets[bundle].unsqueeze(1) + pos, wib.unsqueeze(1)]
                acc = words[:, 0]
                for j in range(1, self.k):
                    acc = acc & words[:, j]
                stack.append(acc)
            elif op == EXACT_TERM:
                stack.append(exact[int(row_of[q, slot])][wc])
            elif op == TRUE:
                stack.append(torch.full_like(wc, -1))
            elif op == NOT:
                stack.append(~stack.pop())
            elif op in (AND, OR):
                b, a = stack.pop(), stack.pop()
                stack.append(a & b if op == AND else a | b)
        res = stack[-1] & self.live[wc]
        return torch.where(wmask, res, torch.zeros_like(res))

    def _check_plans(self, plans: FilterPlans):
        if not isinstance(plans, FilterPlans):
            raise TypeError(f"plans must come from silvertorch.parse_filters, got {type(plans).__name__}")

    def search(self, plans: FilterPlans, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Full-corpus filter: int64 [Q, ceil(N/64)]; bit i % 64 of word i // 64 set = item i passes.
        `out`: a preallocated int64 [Q, ceil(N/64)] tensor to write into (returned)."""
        self._check_plans(plans)
        out = _checked_out(out, (plans.num_queries, self.num_words), torch.int64, self.bits.device)
        exact, row_of = self._exact_tables(plans)
        if self.num_words == 0 or plans.num_queries == 0:  # (torch.stack below refuses zero queries)
            return torch.zeros(plans.num_queries, self.num_words, dtype=torch.int64, device=self.bits.device) if out is None else out
        if select_backend(self.bits).uses_triton:
            import triton

            from .kernels import search_kernel

            if out is None:
                out = torch.empty(plans.num_queries, self.num_words, dtype=torch.int64, device=self.bits.device)
            bw = 128
            bits, row_offsets, widths, live = _row_major(self.bits, self.row_offsets, self.widths, self.live)
            ops, args, hashes, row_of = self._plan_tensors(plans, row_of)
            search_kernel[(plans.num_queries, triton.cdiv(self.num_words, bw))](
                out, bits, row_offsets, widths, live, ops, args, hashes, exact.contiguous(),
                row_of, plans.ops.shape[1], plans.hashes.shape[1], self.num_words, K=self.k, BW=bw)
            return out
        plans = plans.to(self.bits.device)
        w = torch.arange(self.num_words, device=self.bits.device)
        result = torch.stack([self._eval_reference(plans, q, w, exact, row_of) for q in range(plans.num_queries)])
        return result if out is None else out.copy_(result)

    def search_ranges(self, plans: FilterPlans, starts: torch.Tensor, lengths: torch.Tensor, max_length: int, *,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        """Filter only item ranges: int32 [Q, R, ceil(max_length/32)], bit b of word o = item starts[q,r] + 32*o + b.
        `out`: a preallocated int32 tensor of that shape to write into (returned)."""
        self._check_plans(plans)
        starts, lengths = _positions(starts, "starts", None), _positions(lengths, "lengths", None)
        if starts.shape != lengths.shape or starts.dim() != 2 or starts.shape[0] != plans.num_queries:
            raise ValueError(f"starts and lengths must both be [num_queries={plans.num_queries}, ranges], got "
                             f"{tuple(starts.shape)} and {tuple(lengths.shape)}")
        if (lengths < 0).any() or (lengths > max_length).any():
            raise ValueError(f"lengths must be in [0, max_length={max_length}]")
        if (starts < 0).any() or ((starts + lengths) > self.num_items).any():
            raise ValueError(f"ranges must lie inside the index's {self.num_items} items")
        return self._search_ranges(plans, starts, lengths, max_length, out)

    def _search_ranges(self, plans: FilterPlans, starts: torch.Tensor, lengths: torch.Tensor, max_length: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """`search_ranges` without its checks, for ranges the caller made inside the index (an IVF
        search's probed clusters): the checks read the ranges back, a host synchronisation each."""
        starts, lengths = starts.to(self.bits.device, torch.int64), lengths.to(self.bits.device, torch.int64)
        exact, row_of = self._exact_tables(plans)
        q, r = starts.shape
        w32 = max(math.ceil(max_length / 32), 1)
        out = _checked_out(out, (q, r, w32), torch.int32, self.bits.device)
        if self.num_words == 0:  # no items, so every range is empty (the reference would index empty bundle tables)
            return torch.zeros(q, r, w32, dtype=torch.int32, device=self.bits.device) if out is None else out.zero_()
        if select_backend(self.bits).uses_triton:
            import triton

            from .kernels import range_kernel

            if out is None:
                out = torch.empty(q, r, w32, dtype=torch.int32, device=self.bits.device)
            bw = 64
            bits, row_offsets, widths, live = _row_major(self.bits, self.row_offsets, self.widths, self.live)
            ops, args, hashes, row_of = self._plan_tensors(plans, row_of)
            range_kernel[(q * r, triton.cdiv(w32, bw))](
                out, starts.contiguous(), lengths.contiguous(), bits, row_offsets, widths, live, ops, args, hashes,
                exact.contiguous(), row_of, plans.ops.shape[1], plans.hashes.shape[1],
                self.num_words, r, w32, K=self.k, BW=bw)
            return out
        result = self._ranges_reference(plans.to(self.bits.device), starts, lengths, w32, exact, row_of)
        return result if out is None else out.copy_(result)

    def _ranges_reference(self, plans, starts, lengths, w32, exact, row_of):
        q, r = starts.shape
        out = torch.zeros(q, r, w32, dtype=torch.int32, device=self.bits.device)
        o = torch.arange(w32, device=self.bits.device)
        for qi in range(q):
            first = starts[qi].unsqueeze(1) + 32 * o  # [R, W32]
            w0 = (first // 64).reshape(-1)
            shift = (first % 64).reshape(-1)
            e0 = self._eval_reference(plans, qi, w0, exact, row_of)
            e1 = self._eval_reference(plans, qi, w0 + 1, exact, row_of)
            lo = (e0 >> shift) & ((torch.ones_like(shift) << (64 - shift).clamp(max=63)) - 1).where(shift > 0, torch.full_like(shift, -1))
            hi = torch.where(shift == 0, torch.zeros_like(e1), e1 << (64 - shift).clamp(max=63))
            word = (lo | hi) & 0xFFFFFFFF
            remaining = (lengths[qi].unsqueeze(1) - 32 * o).reshape(-1)
            keep = torch.where(remaining >= 32, torch.full_like(remaining, 0xFFFFFFFF),
                               (torch.ones_like(remaining) << remaining.clamp(0, 31)) - 1)
            word = torch.where(remaining > 0, word & keep, torch.zeros_like(word))
            word = torch.where(word >= 2**31, word - 2**32, word)
            out[qi] = word.view(r, w32).to(torch.int32)
        return out

    def filter(self, plans: FilterPlans) -> BloomFilter:
        """A range-filter object for the IVF search (see silvertorch.filtering)."""
        self._check_plans(plans)
        return BloomFilter(self, plans)

    # -- exact evaluation ----------------------------------------------------------------
    def verify(self, plans: FilterPlans, positions: torch.Tensor) -> torch.Tensor:
        """Exact filter result (bool [Q, M]) for candidate item positions; -1 = padding -> False."""
        self._check_plans(plans)
        positions = _positions(positions, "positions", self.bits.device)
        if positions.dim() != 2 or positions.shape[0] != plans.num_queries:
            raise ValueError(f"positions must be [num_queries={plans.num_queries}, M], got {tuple(positions.shape)}")
        if ((positions < -1) | (positions >= self.num_items)).any():
            raise ValueError(f"positions must be -1 (padding) or in [0, {self.num_items})")
        valid = positions >= 0
        out = torch.zeros_like(valid)
        if self.num_items == 0:  # padding only (checked above); there is no live word to read
            return out
        p = positions.clamp(min=0)
        alive = ((self.live[p // 64] >> (p % 64)) & 1).bool() & valid
        for q in range(plans.num_queries):
            stack = []
            for op, slot in zip(plans.ops[q].tolist(), plans.args[q].tolist()):
                if op in (TERM, EXACT_TERM):
                    members = self._items_with(int(plans.hashes[q, slot]))
                    stack.append(torch.isin(p[q], members))
                elif op == TRUE:
                    stack.append(torch.ones_like(valid[q]))
                elif op == NOT:
                    stack.append(~stack.pop())
                elif op in (AND, OR):
                    b, a = stack.pop(), stack.pop()
                    stack.append(a & b if op == AND else a | b)
            out[q] = stack[-1] & alive[q]
        return out

    # -- mutation --------------------------------------------------------------------------
    def append(self, feature_ids, offsets, values) -> torch.Tensor:
        """Add items; returns their positions. The last partial bundle and the new ones are rebuilt."""
        feature_ids, offsets, values = (torch.as_tensor(t, device=self.bits.device) for t in (feature_ids, offsets, values))
        _validate_attributes(feature_ids, offsets, values)
        # refused before the attributes are appended: the rebuild's refusal left them counted, without bits
        _check_bundle_rows(offsets.diff(), self.k, self.b_multiplier)
        old_n = self.num_items
        self.feature_ids = torch.cat([self.feature_ids, feature_ids.to(torch.int64)])
        self.values = torch.cat([self.values, values.to(torch.int64)])
        self.offsets = torch.cat([self.offsets, offsets[1:].to(torch.int64) + self.offsets[-1]])
        words = self.num_words
        self.deleted = torch.cat([self.deleted, torch.zeros(words - self.deleted.numel(), dtype=torch.int64, device=self.bits.device)])
        self._build_bundles(old_n // BUNDLE)
        return torch.arange(old_n, self.num_items, device=self.bits.device)

    def delete(self, positions) -> None:
        """Tombstone items: every search, range search and verification drops them."""
        positions = _positions(positions, "positions", self.bits.device).reshape(-1)
        if ((positions < 0) | (positions >= self.num_items)).any():
            raise ValueError(f"positions to delete must be in [0, {self.num_items})")
        self.deleted |= _or_bits(self.num_words, positions // 64, positions % 64, self.bits.device)
        self._refresh()

    # -- persistence ---------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write a safetensors file with a JSON header (format version, k, b_multiplier)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"bits": self.bits, "row_offsets": self.row_offsets, "widths": self.widths, "deleted": self.deleted,
                   "feature_ids": self.feature_ids, "offsets": self.offsets, "values": self.values}
        meta = {"format": "silvertorch.BloomIndex", "format_version": str(FORMAT_VERSION),
                "config": json.dumps({"k": self.k, "b_multiplier": self.b_multiplier, "bundle": BUNDLE, "layout": self.layout})}
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path, device="cpu") -> BloomIndex:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path}: not a readable safetensors BloomIndex file ({err})") from err
        if meta.get("format") != "silvertorch.BloomIndex":
            raise ValueError(f"{path}: not a silvertorch BloomIndex file (format={meta.get('format')!r})")
        if meta.get("format_version") != str(FORMAT_VERSION):
            hint = OLD_VERSIONS.get(meta.get("format_version"))
            raise ValueError(f"{path}: format version {meta.get('format_version')} is not supported (expected {FORMAT_VERSION}"
                             + (f"; {hint}" if hint else "") + ")")
        try:  # a header without k, or not an object, failed with a KeyError or AttributeError
            config = json.loads(meta["config"])
            k, b_multiplier = config["k"], float(config["b_multiplier"])
            check_k(k)  # as build (k=12 loaded and read other rows; k=0 failed with a torch RuntimeError)
            if not math.isfinite(b_multiplier):
                raise ValueError(f"b_multiplier={b_multiplier}")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: the header's config is not a BloomIndex's ({type(err).__name__}: {err})") from None
        if config.get("bundle") != BUNDLE:
            raise ValueError(f"{path}: bundle size {config.get('bundle')} != {BUNDLE}")
        names = {"bits", "row_offsets", "widths", "deleted", "feature_ids", "offsets", "values"}
        missing = names - set(tensors)
        if missing:
            raise ValueError(f"{path}: missing tensors {sorted(missing)}")
        # what `build` checks, and the saved layout: tombstones cut short were broadcast over every
        # word, attributes build refuses loaded as a wrong side table (answers silently wrong)
        try:
            wrong = sorted(name for name in names if tensors[name].dtype != torch.int64)
            if wrong:
                raise ValueError(f"{', '.join(wrong)} must be int64, got {', '.join(str(tensors[n].dtype) for n in wrong)}")
            _validate_attributes(tensors["feature_ids"], tensors["offsets"], tensors["values"])
            n_words = math.ceil((tensors["offsets"].numel() - 1) / 64)
            if tuple(tensors["deleted"].shape) != (n_words,):
                raise ValueError(f"deleted is {tuple(tensors['deleted'].shape)}, expected ({n_words},): a word per 64 items")
        except ValueError as err:
            raise ValueError(f"{path}: not a valid BloomIndex file: {err}") from None
        idx = cls(k=k, b_multiplier=b_multiplier, layout=config.get("layout", 0), **tensors)
        problem = bloom_disagreement(idx.bits, idx.row_offsets, idx.widths, idx.offsets.diff(), idx._term_items,
                                     idx._term_hashes, idx.k, idx.b_multiplier)  # the side table's terms: not hashed again
        if problem is not None:
            raise ValueError(f"{path}: the Bloom index does not match its items: {problem}")
        return idx


class BloomFilter:
    """Range-filter protocol over a BloomIndex and a batch of plans (consumed by the IVF search).
    Its range masks are a superset of the matches (`approximate`): the search checks its winners
    with `exact_mask` and replaces the false positives."""

    approximate = True

    def __init__(self, index: BloomIndex, plans: FilterPlans):
        self.index, self.plans = index, plans

    @property
    def num_queries(self) -> int:
        return self.plans.num_queries

    @property
    def num_items(self) -> int:
        return self.index.num_items

    @property
    def layout(self) -> int:
        return self.index.layout

    def range_masks(self, starts, lengths, max_length: int) -> torch.Tensor:
        """The ranges' keep words (`BloomIndex.search_ranges`: the ranges checked, a ValueError
        for one outside the index)."""
        return self.index.search_ranges(self.plans, starts, lengths, max_length)

    def _range_masks_unchecked(self, starts, lengths, max_length: int) -> torch.Tensor:
        """`range_masks` for the IVF search, whose ranges are its clusters' (inside the index by
        construction): not read back to be checked, a host synchronisation each."""
        return self.index._search_ranges(self.plans, starts, lengths, max_length)

    def exact_mask(self, positions) -> torch.Tensor:
        return self.index.verify(self.plans, positions)

    def select(self, queries: torch.Tensor) -> BloomFilter:
        return BloomFilter(self.index, self.plans.select(queries))


def _row_major(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernels index every tensor as row-major: hand-made plans or a loaded index with other
    strides are copied once rather than read wrongly."""
    return tuple(t.contiguous() for t in tensors)


def _checked_out(out: torch.Tensor | None, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    if out is not None and (tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != torch.device(device)
                            or not out.is_contiguous()):  # the kernels write it row-major
        raise ValueError(f"out must be a contiguous {dtype} {tuple(shape)} on {device}, got {out.dtype} {tuple(out.shape)} "
                         f"on {out.device}{'' if out.is_contiguous() else ' (not contiguous)'}")
    return out
