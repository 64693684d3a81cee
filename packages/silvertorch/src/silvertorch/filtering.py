"""The range-filter protocol between filters and the IVF search.

A range filter answers, for each query q and item range r (positions in the index's
cluster-ordered storage), which items pass: `range_masks(starts, lengths, max_length)` returns
int32 words [Q, R, ceil(max_length/32)] where bit b (LSB = 0) of word w is item
starts[q,r] + 32*w + b (bits at or past the length are 0). `BloomIndex.filter(plans)` is one;
`DenseMaskFilter` wraps a precomputed boolean mask.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch


class RangeFilter(Protocol):
    num_queries: int

    def range_masks(self, starts: torch.Tensor, lengths: torch.Tensor, max_length: int) -> torch.Tensor: ...

    def exact_mask(self, positions: torch.Tensor) -> torch.Tensor: ...


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., n] -> int32 [..., ceil(n/32)], LSB first."""
    n = mask.shape[-1]
    words = math.ceil(n / 32) if n else 1
    if n != words * 32:
        mask = torch.nn.functional.pad(mask, (0, words * 32 - n))
    # int32 all the way (int64 intermediates doubled the memory traffic): each 16-bit half is
    # summed below 2^16, and the high half shifted into the sign bit
    bits = mask.reshape(*mask.shape[:-1], words, 2, 16).to(torch.int32)
    halves = (bits << torch.arange(16, dtype=torch.int32, device=mask.device)).sum(-1, dtype=torch.int32)
    return halves[..., 0] | (halves[..., 1] << 16)


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [..., W] -> bool [..., n]."""
    bits = (words.to(torch.int32).unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=words.device)) & 1
    return bits.reshape(*words.shape[:-1], -1)[..., :n].bool()


class DenseMaskFilter:
    """A filter given as a boolean mask [Q, N] over index positions (exact). `range_masks` keeps
    one padded copy of the mask, [Q, N + L] bools, for the next call."""

    def __init__(self, mask: torch.Tensor):
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(f"mask must be a bool tensor [num_queries, num_items], got {mask.dtype} {tuple(mask.shape)}")
        self.mask = mask
        self._pad: tuple[int, torch.Tensor] | None = None

    @property
    def num_queries(self) -> int:
        return self.mask.shape[0]

    def range_masks(self, starts, lengths, max_length):
        q, n = self.mask.shape
        # the mask read through overlapping windows (window s = mask[s : s + L], False past the
        # end): one copy of the [Q, R, L] bits, no int64 position grid
        windows = self._padded(max_length).as_strided((q, n + 1, max_length), (n + max_length, 1, 1))
        rows = torch.arange(q, device=self.mask.device).unsqueeze(1)
        inside = torch.arange(max_length, device=self.mask.device) < lengths.unsqueeze(-1)
        return pack_bits(windows[rows, starts.clamp(0, n)] & inside)

    def _padded(self, length: int) -> torch.Tensor:
        """The mask with `length` False columns after it (kept for the next call: an adaptive
        search asks again with the same length)."""
        if self._pad is None or self._pad[0] != length:
            self._pad = (length, torch.nn.functional.pad(self.mask, (0, length)).contiguous())
        return self._pad[1]

    def exact_mask(self, positions):
        valid = positions >= 0
        return self.mask.gather(1, positions.clamp(min=0)) & valid
