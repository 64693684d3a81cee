"""The range-filter protocol between filters and the IVF search.

A range filter answers, for each query q and item range r (positions in the index's
cluster-ordered storage), which items pass: `range_masks(starts, lengths, max_length)` returns
int32 words [Q, R, ceil(max_length/32)] where bit b (LSB = 0) of word w is item
starts[q,r] + 32*w + b (bits at or past the length are 0). `BloomIndex.filter(plans)` is one;
`DenseMaskFilter` wraps a precomputed boolean mask.
"""

from __future__ import annotations

import math
import sys
from typing import Protocol

import torch

from gpukernels_common import select_backend, tracing

if sys.byteorder != "little":  # pack_bits/unpack_bits view int32 words as their bytes, least significant first
    raise ImportError("silvertorch's filter words need a little-endian machine")


def _tensor_version(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter (it moves on every in-place change); None for inference
    tensors (made under `torch.inference_mode()`), which have none."""
    return None if tensor.is_inference() else tensor._version


def _dropped():
    return None


class _Kept(tuple):
    """What `derived_from` keeps: (tensor, version, key, value). Not carried into a copy of its
    owner (`copy.deepcopy`, pickle): the copy's tensors count their versions afresh, so the kept
    version could match a copied tensor edited after the value was made (a deep copy of a model
    read fresh items added since as zeros). The copy makes its own when first asked."""

    __slots__ = ()

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (_dropped, ())


def kept_derived(owner, slot: str, tensor: torch.Tensor):
    """(key, value) that `derived_from` kept in `owner.<slot>` for `tensor` as it is now (not
    replaced, not changed in place since), else None."""
    kept = getattr(owner, slot, None)
    version = _tensor_version(tensor)
    if kept is None or kept[0] is not tensor or version is None or kept[1] != version:
        return None
    return kept[2], kept[3]


def derived_from(owner, slot: str, tensor: torch.Tensor, make, key=None):
    """`make(tensor)`, kept in `owner.<slot>` with `key` and made again only when `tensor` was
    replaced or changed in place (its version counter moved) or another key is asked for:
    derived state read on every call. An inference tensor has no version counter: made afresh
    every time."""
    kept = kept_derived(owner, slot, tensor)
    if kept is not None and kept[0] == key:
        return kept[1]
    value = make(tensor)
    setattr(owner, slot, _Kept((tensor, _tensor_version(tensor), key, value)))
    return value


class RangeFilter(Protocol):
    num_queries: int
    num_items: int  # the item positions it covers (an index's main and fresh items)

    def range_masks(self, starts: torch.Tensor, lengths: torch.Tensor, max_length: int) -> torch.Tensor: ...

    def exact_mask(self, positions: torch.Tensor) -> torch.Tensor: ...

    # `approximate = True` (class attribute): range_masks may pass items that do not match (a Bloom
    # filter); the search then checks its winners with exact_mask. Absent or False: masks are exact.
    # `layout`: the index storage layout (`IVFIndex.layout`) its positions refer to; absent = 0, the
    # build's. compact() moves items and counts the index's layout up, so a stale filter is refused.

    def select(self, queries: torch.Tensor) -> RangeFilter:
        """The same filters for the given queries (row indices) only, in that order."""
        ...


_CONSTANTS: dict[tuple[str, torch.device], torch.Tensor] = {}
CONSTANT_MAX_NUMEL = 1 << 16  # larger tables (an arange of a radix k of 1M) are made per call, not kept


def _faking() -> bool:
    """Whether a fake-tensor mode is active (an export's trace, or fake tensors run by hand): a
    kept table, a real tensor, cannot meet its fakes, and a table made there is a fake."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def device_constant(name: str, device: torch.device, make) -> torch.Tensor:
    """A constant table `make(device)`, made once per device and kept: `torch.tensor(list)` on a
    GPU is a copy from pageable host memory (a synchronisation), an arange a launch, on every
    call otherwise. Not kept past CONSTANT_MAX_NUMEL entries, nor while torch.compile or export
    traces or a CUDA graph is captured (a table made then is a fake, a graph's value, or holds its
    values only once the graph replays: the eager calls before a capture make them); under a
    fake-tensor mode neither read nor kept, but made afresh. Made outside inference mode, so that
    one made under it is kept too."""
    key = (name, torch.device(device))
    # (compiling first: dynamo traces the table lookup, not the dispatch-mode query)
    faking = not torch.compiler.is_compiling() and _faking()
    table = None if faking else _CONSTANTS.get(key)
    if table is None:
        if faking or tracing():  # checked before is_inference, which dynamo cannot trace
            return make(key[1])
        with torch.inference_mode(False):
            table = make(key[1])
        if type(table) is torch.Tensor and table.numel() <= CONSTANT_MAX_NUMEL and not table.is_inference():
            _CONSTANTS[key] = table
    return table


def device_scalar(value: float | int, like: torch.Tensor) -> torch.Tensor:
    """`value` as a 0-d tensor of `like`'s dtype on its device, a `device_constant`: the fill of
    `torch.where(mask, x, device_scalar(-inf, x))`, one launch where `full_like` (or a Python
    scalar, made into a tensor on the device every call) takes two."""
    return device_constant(f"scalar {value!r} {like.dtype}", like.device,
                           lambda d: torch.full((), value, dtype=like.dtype, device=d))


def device_arange(n: int, device: torch.device) -> torch.Tensor:
    """`torch.arange(n)` on `device`, a `device_constant`."""
    return device_constant(f"arange{n}", device, lambda d: torch.arange(n, device=d))


def _bit_weights(device) -> torch.Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


def _byte_bits(device) -> torch.Tensor:
    return ((torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1).bool()


def _byte_popcounts(device) -> torch.Tensor:
    return _byte_bits(device).sum(1)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., n] -> int32 [..., ceil(n/32)], LSB first."""
    n = mask.shape[-1]
    words = math.ceil(n / 32) if n else 1
    if n != words * 32:
        mask = torch.nn.functional.pad(mask, (0, words * 32 - n))
    # a byte at a time (a quarter of the memory traffic of int32 bit arithmetic): each 8 bools
    # weighted 1..128 and summed in uint8, four bytes viewed as one little-endian int32 word
    bits = mask.contiguous().view(torch.uint8).view(*mask.shape[:-1], words * 4, 8)
    weights = device_constant("bit_weights", mask.device, _bit_weights)
    return (bits * weights).sum(-1, dtype=torch.uint8).view(torch.int32)


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [..., W] -> bool [..., n]: each byte of the words looks up its 8 bools."""
    byte_bits = device_constant("byte_bits", words.device, _byte_bits)
    as_bytes = words.to(torch.int32).contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    return byte_bits.index_select(0, as_bytes).view(*words.shape[:-1], words.shape[-1] * 32)[..., :n]


def count_bits(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> int64 [...]: the set bits of each row of words (a SWAR popcount in int64,
    where the 32-bit arithmetic cannot overflow)."""
    x = words.to(torch.int64) & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (((x * 0x01010101) >> 24) & 0xFF).sum(-1)


def count_row_bits(words: torch.Tensor) -> torch.Tensor:
    """int32 [Q, ...] -> int64 [Q]: the set bits of each row's words (every word after the
    first dimension), `count_bits(words)` summed per row in three ops: a table of the 256
    bytes' popcounts, looked up by each byte of the words."""
    as_bytes = words.to(torch.int32).contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    counts = device_constant("byte_popcounts", words.device, _byte_popcounts).index_select(0, as_bytes)
    return counts.view(words.shape[0], math.prod(words.shape[1:]) * 4).sum(1)  # (no -1: Q = 0 has no row to infer it)


class DenseMaskFilter:
    """A filter given as a boolean mask [Q, N] over index positions (exact). `range_masks` keeps
    the mask packed into bits (32 times smaller than the mask) for the next call. `layout`: the
    index layout the positions refer to (`IVFIndex.layout`; 0 until a compact() moves items)."""

    def __init__(self, mask: torch.Tensor, layout: int = 0):
        mask = torch.as_tensor(mask)  # a numpy bool array too (its dtype is not torch.bool: it was refused as "got bool")
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(f"mask must be a bool tensor [num_queries, num_items], got {mask.dtype} {tuple(mask.shape)}")
        self.mask, self.layout = mask, int(layout)
        self._packed = None  # derived_from's: the packed words, packed again when the mask is replaced or edited

    @property
    def num_items(self) -> int:
        return self.mask.shape[1]

    @property
    def num_queries(self) -> int:
        return self.mask.shape[0]

    def range_masks(self, starts, lengths, max_length):
        # the ranges come on the index's device, the words go back on the mask's (as a BloomFilter's
        # on its index's): the search moves them
        starts, lengths = starts.to(self.mask.device), lengths.to(self.mask.device)
        num_words = max(math.ceil(max_length / 32), 1)
        packed = self._packed_words(num_words)
        if select_backend(self.mask).uses_triton and starts.numel():
            return self._range_masks_triton(packed, starts, lengths, num_words)
        return self._range_masks_reference(packed, starts, lengths, num_words)

    def _range_masks_triton(self, packed, starts, lengths, num_words):
        """`_range_masks_reference` in one kernel (`range_words_kernel`; 14 ops fewer)."""
        import triton

        from .filtering_kernels import range_words_kernel

        words = torch.empty(*starts.shape, num_words, dtype=torch.int32, device=starts.device)
        block = min(1024, triton.next_power_of_2(words.numel()))
        range_words_kernel[(triton.cdiv(words.numel(), block),)](
            packed, starts.contiguous(), lengths.contiguous(), words, words.numel(), self.mask.shape[1], starts.shape[-1],
            num_words, packed.shape[1], BLOCK=block)
        return words

    def _range_masks_reference(self, packed, starts, lengths, num_words):
        n = self.mask.shape[1]
        # word w of a range starting at bit s: the packed words s // 32 + w and the next one, joined
        # into 64 bits and shifted right by s % 32 (unsigned 32-bit words held in int64)
        start = starts.clamp(0, n).to(torch.int64)
        offset = (start % 32).unsqueeze(-1)
        word_steps = device_arange(num_words + 1, start.device)
        first = (start // 32).unsqueeze(-1) + word_steps  # [Q, R, W + 1]
        both = packed.gather(1, first.flatten(1)).view(first.shape)  # flatten: reshape(q, -1) fails for q = 0
        words = (both[..., :-1] | (both[..., 1:] << 32)) >> offset  # bits s + 32w .. in the low 32
        # bits at or past the range's length are 0 (and those above the low 32: valid <= 32)
        word_bits = device_constant(f"word_bits{num_words}", start.device, lambda d: 32 * torch.arange(num_words, device=d))
        valid = (lengths.to(torch.int64).unsqueeze(-1) - word_bits).clamp(0, 32)
        words &= (1 << valid) - 1
        # the low halves (little-endian), as int32; a copy with unit last stride even where the last size is 1
        # (`contiguous()` keeps the strided view then, and viewing its words as bytes fails)
        return words.view(torch.int32)[..., 0::2].clone(memory_format=torch.contiguous_format)

    def _packed_words(self, num_words: int) -> torch.Tensor:
        """The mask's bits as unsigned 32-bit words in int64 [Q, ceil(N/32) + num_words + 1], zero
        words after the last (a range read past the end finds zeros); kept for the next call."""
        return derived_from(self, "_packed", self.mask, lambda mask: torch.nn.functional.pad(
            pack_bits(mask).to(torch.int64) & 0xFFFFFFFF, (0, num_words + 1)), key=num_words)

    def select(self, queries):
        rows = queries.to(self.mask.device)
        picked = DenseMaskFilter(self.mask[rows], self.layout)
        kept = kept_derived(self, "_packed", self.mask)
        if kept is not None:  # those rows' packed words: an adaptive round does not pack again
            num_words, packed = kept
            derived_from(picked, "_packed", picked.mask, lambda _: packed[rows], key=num_words)
        return picked

    def exact_mask(self, positions):
        valid = positions >= 0
        return self.mask.gather(1, positions.clamp(min=0)) & valid
