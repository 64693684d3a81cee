"""A small keyed jagged tensor in pure torch (the shape of TorchRec's KeyedJaggedTensor).

`lengths` is key-major: lengths[k * batch + i] is the length of sample i under key k.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import torch


class KeyedJagged:
    def __init__(self, keys: Sequence[str], values: torch.Tensor, lengths: torch.Tensor):
        keys = list(keys)
        if not keys or len(set(keys)) != len(keys):
            raise ValueError(f"keys must be distinct and non-empty, got {keys}")
        if values.dim() != 1 or lengths.dim() != 1:
            raise ValueError(f"values and lengths must be 1-D, got {tuple(values.shape)} and {tuple(lengths.shape)}")
        if lengths.dtype not in (torch.int32, torch.int64) or (lengths < 0).any():
            raise ValueError("lengths must be a non-negative integer tensor")
        if lengths.numel() % len(keys):
            raise ValueError(f"lengths has {lengths.numel()} entries, not a multiple of {len(keys)} keys")
        if int(lengths.sum()) != values.numel():
            raise ValueError(f"lengths sum to {int(lengths.sum())} but values has {values.numel()} entries")
        self.keys, self.values, self.lengths = keys, values, lengths.long()

    @classmethod
    def from_dict(cls, data: dict[str, list[torch.Tensor]], dtype: torch.dtype | None = None) -> KeyedJagged:
        """{key: [per-sample 1-D tensors (or lists)]} with the same batch size per key. `dtype`: the
        values' dtype (every sample is cast to it, an empty batch too); by default that of the
        non-empty samples concatenated (an empty sample's dtype does not count), int64 for a batch
        with no values. Give it where a batch may be empty
        (e.g. a rank's share of a final partial batch) and the ids are not int64."""
        keys = list(data)
        if not keys:
            raise ValueError("from_dict needs at least one key, got an empty dict")
        sizes = {len(v) for v in data.values()}
        if len(sizes) != 1:
            raise ValueError(f"every key needs the same number of samples, got {sizes}")
        parts = [torch.as_tensor(t).reshape(-1) for k in keys for t in data[k]]
        lengths = torch.tensor([t.numel() for t in parts], dtype=torch.long)
        if dtype is None:
            # empty samples (torch.tensor([]) is float32) take no part: they turned int64 ids into floats
            filled = [t.dtype for t in parts if t.numel()]
            dtype = functools.reduce(torch.promote_types, filled) if filled else torch.long
        values = torch.cat([t.to(dtype) for t in parts]) if parts else torch.empty(0, dtype=dtype)
        return cls(keys, values, lengths)

    @property
    def batch_size(self) -> int:
        return self.lengths.numel() // len(self.keys)

    @property
    def offsets(self) -> torch.Tensor:
        return torch.cat([self.lengths.new_zeros(1), torch.cumsum(self.lengths, 0)])

    def lengths_per_key(self) -> torch.Tensor:
        return self.lengths.view(len(self.keys), self.batch_size)

    def sample_lengths(self) -> torch.Tensor:
        """Total length of each sample over all keys."""
        return self.lengths_per_key().sum(0)

    def __getitem__(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self.keys:
            raise KeyError(f"no key {key!r} in these features (keys: {self.keys})")
        k = self.keys.index(key)
        b = self.batch_size
        start = int(self.lengths[: k * b].sum())
        lengths = self.lengths[k * b : (k + 1) * b]
        return self.values[start : start + int(lengths.sum())], lengths

    def to_dict(self) -> dict[str, list[torch.Tensor]]:
        out, chunks = {}, list(torch.split(self.values, self.lengths.tolist()))
        b = self.batch_size
        for k, key in enumerate(self.keys):
            out[key] = chunks[k * b : (k + 1) * b]
        return out

    def permute(self, indices: torch.Tensor) -> KeyedJagged:
        """Select/reorder samples (a subset, repeats allowed). `indices`: a 1-D tensor (or list) of
        integer sample indices in [0, batch_size); a bool mask, float indices or another number of
        dimensions are refused with a ValueError (for a mask, pass `mask.nonzero()[:, 0]`), an
        index out of range with an IndexError."""
        indices = self._checked_indices(indices)
        rows = self._key_major_rows(indices).reshape(-1)
        return self._gather_runs(self.offsets[rows], self.lengths[rows])

    def windows(self, indices: torch.Tensor, start: torch.Tensor, stop: torch.Tensor) -> KeyedJagged:
        """Samples `indices` (repeats allowed), each cut to its positions [start, stop) under every
        key; the keys must be per-position sequences of one length per sample (aligned). `start`
        and `stop`: integers, one per index (float positions are refused, not truncated)."""
        indices = self._checked_indices(indices)
        # beside the lengths: a plan's windows live on the host, a GPU batch's lengths on the GPU
        device = self.lengths.device
        start = sample_indices(start, "start").to(device)  # floats were truncated to positions
        stop = sample_indices(stop, "stop").to(device)
        lengths = self.aligned_lengths()
        if not (indices.shape == start.shape == stop.shape):
            raise ValueError(f"indices, start and stop must be 1-D of one size, got {tuple(indices.shape)}, "
                             f"{tuple(start.shape)}, {tuple(stop.shape)}")
        if ((start < 0) | (stop < start) | (stop > lengths[indices])).any():
            raise ValueError("windows need 0 <= start <= stop <= the sample's length")
        rows = self._key_major_rows(indices).reshape(-1)
        n_keys = len(self.keys)
        return self._gather_runs(self.offsets[rows] + start.repeat(n_keys), (stop - start).repeat(n_keys))

    def _checked_indices(self, indices) -> torch.Tensor:
        """`indices` as 1-D int64 sample indices into this batch: a ValueError for a mask, floats or
        another number of dimensions, an IndexError for one out of [0, batch_size)."""
        indices = sample_indices(indices)
        if indices.numel():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.batch_size:
                raise IndexError(f"sample indices must be in [0, {self.batch_size}) (the batch size), got [{low}, {high}]")
        return indices

    def _key_major_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Entries (keys x samples) of `lengths` for samples `indices`, on the lengths' device
        (the indices may be on another: a plan's are on the host for a GPU batch)."""
        keys = torch.arange(len(self.keys), device=self.lengths.device)
        return keys.unsqueeze(1) * self.batch_size + indices.to(self.lengths.device).unsqueeze(0)

    def aligned_lengths(self) -> torch.Tensor:
        """Per-sample length when every key holds one entry per position of the same sequence
        (e.g. items and their targets); a ValueError otherwise."""
        per_key = self.lengths_per_key()
        if not (per_key == per_key[:1]).all():
            raise ValueError(f"keys {self.keys} must have the same length in every sample (per-position sequences)")
        return per_key[0]

    def _gather_runs(self, starts: torch.Tensor, new_lengths: torch.Tensor) -> KeyedJagged:
        """A KeyedJagged whose entry j (key-major) holds values[starts[j] : starts[j] + new_lengths[j]]."""
        return KeyedJagged(self.keys, gather_runs(self.values, starts, new_lengths), new_lengths)

    def sample_major(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples `indices` with each sample's keys side by side (sample 0's keys, then sample 1's,
        ...), so that a run of samples is one contiguous slice: (values, lengths of shape
        (samples, keys)). `from_sample_major` undoes it."""
        indices = self._checked_indices(indices)
        rows = self._key_major_rows(indices).T.contiguous()  # the lengths gathered by it go into an all-to-all
        lengths = self.lengths[rows]
        return gather_runs(self.values, self.offsets[rows].reshape(-1), lengths.reshape(-1)), lengths

    @classmethod
    def from_sample_major(cls, keys: Sequence[str], values: torch.Tensor, lengths: torch.Tensor) -> KeyedJagged:
        """The KeyedJagged of sample-major `values` with `lengths` of shape (samples, keys)."""
        keys = list(keys)
        if lengths.dim() != 2 or lengths.shape[1] != len(keys):
            # a flat (key-major) lengths tensor was read as one key per sample, silently
            raise ValueError(f"lengths must be (samples, keys) = (*, {len(keys)}), got shape {tuple(lengths.shape)}")
        # checked before the gather, which dropped values past the lengths' sum silently (and failed
        # on others with an IndexError or repeat_interleave's error)
        if lengths.dtype not in (torch.int32, torch.int64) or (lengths < 0).any():
            raise ValueError("lengths must be a non-negative integer tensor")
        if values.dim() != 1 or int(lengths.sum()) != values.numel():
            raise ValueError(f"lengths sum to {int(lengths.sum())} but values has {values.numel()} entries "
                             f"(shape {tuple(values.shape)}; must be 1-D)")
        flat = lengths.reshape(-1)
        starts = (torch.cumsum(flat, 0) - flat).view(lengths.shape)
        return cls(keys, gather_runs(values, starts.T.reshape(-1), lengths.T.reshape(-1)), lengths.T.reshape(-1))

    def split(self, sizes: Sequence[int]) -> list[KeyedJagged]:
        """Consecutive runs of `sizes[i]` samples: non-negative integers that sum to the batch size."""
        # a numpy array (np.bincount's counts, say) is taken as a tensor is, as it was before these checks
        if isinstance(sizes, (str, bytes)) or not (isinstance(sizes, (Sequence, torch.Tensor)) or hasattr(sizes, "__array__")):
            raise TypeError(f"split: sizes must be a sequence of sample counts, got {type(sizes).__name__}")
        if getattr(sizes, "ndim", 1) != 1:
            raise TypeError(f"split: sizes must be a 1-D sequence of sample counts, got shape {tuple(sizes.shape)}")
        given, sizes = sizes, [_count(s) for s in sizes]
        if None in sizes:  # a negative size ended in torch.arange's error, a float one in the indices' check
            shown = given.tolist() if hasattr(given, "tolist") else list(given)
            raise ValueError(f"split: sizes must be non-negative integers summing to the batch size "
                             f"{self.batch_size}, got {shown}")
        if sum(sizes) != self.batch_size:
            raise ValueError(f"split sizes sum to {sum(sizes)}, batch size is {self.batch_size}")
        out, start = [], 0
        for s in sizes:
            out.append(self.permute(torch.arange(start, start + s)))
            start += s
        return out

    @staticmethod
    def concat(parts: Sequence[KeyedJagged]) -> KeyedJagged:
        """The parts' samples one after the other (same keys, in the same order). Their values
        must share one dtype and device: a ValueError names the first part that differs (they
        were promoted silently, e.g. int32 and int64 ids to int64, ids and float weights to
        floats). As in `from_dict`, a part without values does not count (it takes the others'
        dtype). Lengths need no check: the constructor stores them as int64 whatever int dtype
        it was given."""
        parts = list(parts)
        if not parts:
            raise ValueError("concat needs at least one KeyedJagged")
        for i, p in enumerate(parts):
            if not isinstance(p, KeyedJagged):
                raise TypeError(f"concat: parts[{i}] is a {type(p).__name__}, not a KeyedJagged")
        keys = parts[0].keys
        if any(p.keys != keys for p in parts):
            raise ValueError("concat needs the same keys in every part")
        filled = [(i, p) for i, p in enumerate(parts) if p.values.numel()]
        first, ref = filled[0] if filled else (0, parts[0])
        for i, p in filled:
            if p.values.dtype != ref.values.dtype:
                raise ValueError(f"concat: parts[{i}] has values of dtype {p.values.dtype}, parts[{first}] "
                                 f"{ref.values.dtype}: give every part one dtype (e.g. KeyedJagged.from_dict(..., "
                                 "dtype=...)); concat does not promote")
        for i, p in enumerate(parts):
            if p.values.device != ref.values.device or p.lengths.device != ref.lengths.device:
                raise ValueError(f"concat: parts[{i}] is on {p.values.device} (lengths on {p.lengths.device}), "
                                 f"parts[{first}] on {ref.values.device} (lengths on {ref.lengths.device})")
        dtype = ref.values.dtype
        lengths = torch.cat([torch.cat([p.lengths_per_key()[k] for p in parts]) for k in range(len(keys))])
        values = torch.cat([torch.cat([p[key][0].to(dtype) for p in parts]) for key in keys])
        return KeyedJagged(keys, values, lengths)

    def to_torchrec(self):
        """TorchRec's KeyedJaggedTensor (needs `torchrec` installed)."""
        try:
            from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        except ImportError as err:
            raise ModuleNotFoundError("to_torchrec() needs torchrec: pip install torchrec") from err
        return KeyedJaggedTensor(keys=self.keys, values=self.values, lengths=self.lengths)

    def __eq__(self, other) -> bool:
        # torch.equal compares int32 ids with int64 ones (or floats) by value; a batch of another
        # dtype is another batch (concat refuses to mix them), and torch.equal raises across
        # devices, so both are checked first. Lengths are always stored as int64.
        return (isinstance(other, KeyedJagged) and self.keys == other.keys
                and self.values.dtype == other.values.dtype and self.values.device == other.values.device
                and self.lengths.device == other.lengths.device
                and torch.equal(self.lengths, other.lengths) and torch.equal(self.values, other.values))

    def __repr__(self) -> str:
        return f"KeyedJagged(keys={self.keys}, batch_size={self.batch_size}, values={self.values.numel()})"


def _count(size) -> int | None:
    """`size` as a non-negative int (ints, numpy integers, integer 0-d tensors); None otherwise
    (floats, bools, negatives)."""
    if isinstance(size, bool) or (isinstance(size, torch.Tensor) and size.dtype == torch.bool):
        return None
    try:
        size = operator.index(size)
    except TypeError:
        return None
    return size if size >= 0 else None


def sample_indices(indices, name: str = "sample indices") -> torch.Tensor:
    """`indices` (a tensor or list) as 1-D int64 sample indices; a ValueError for a bool mask or
    non-integer indices (which would otherwise be read as indices 0/1 or truncated) and for
    another number of dimensions (a (1, n) tensor was taken as n indices). `name`: the argument,
    for the error."""
    given = torch.as_tensor(indices)
    if given.numel() == 0 and not isinstance(indices, torch.Tensor):
        given = given.long()  # torch.as_tensor([]) is float32
    if given.dtype == torch.bool:
        raise ValueError(f"{name} must be integers, got a bool tensor: for a mask pass mask.nonzero()[:, 0]")
    if given.is_floating_point() or given.is_complex():
        raise ValueError(f"{name} must be integers, got dtype {given.dtype}")
    if given.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor (or list), got shape {tuple(given.shape)}")
    return given.to(torch.long)


# On the CPU, slicing and concatenating costs about 1.5 us a run and the index gather about 5 ns
# a value plus a fixed 25 us (benchmarks/bench_reorder.py): slices win once runs average this long
CAT_MIN_AVERAGE_RUN = 300


def gather_runs(values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """values[starts[j] : starts[j] + lengths[j]] for every j, concatenated: slices joined by one
    `torch.cat` for few long runs on the CPU, else one index gather (no Python loop per run)."""
    total = int(lengths.sum())
    if total == 0:
        return values[:0]
    if values.device.type == "cpu" and total >= CAT_MIN_AVERAGE_RUN * lengths.numel():
        return torch.cat([values[a : a + n] for a, n in zip(starts.tolist(), lengths.tolist())])
    return gather_runs_indexed(values, starts, lengths, total)


def gather_runs_indexed(values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """gather_runs as one index gather: position p of run j reads starts[j] + (p - first output
    position of run j)."""
    shift = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths)
    return values[(torch.arange(total, device=shift.device) + shift).to(values.device)]
