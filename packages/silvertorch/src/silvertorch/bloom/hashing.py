"""64-bit hashing shared by the index build, the query compiler and the kernels.

Terms are (feature_id, value) pairs. `term_hash` mixes them with the splitmix64 finalizer
(torch int64 arithmetic wraps like uint64; right shifts are made logical by masking), and
`bloom_positions` derives k DISTINCT rows per bundle by double hashing modulo the bundle's
width, which is a prime: p_j = (h mod b + j * (1 + (h2 mod (b - 1)))) mod b for j < k.
String values go through FNV-1a 64 (`string_value`) so every process maps them alike, after
Unicode NFC normalization so that "Comédie" typed with a combining accent matches the same word
with a precomposed é.
"""

from __future__ import annotations

import unicodedata

import torch

_M1 = -4658895280553007687  # 0xbf58476d1ce4e5b9 as int64
_M2 = -7723592293110705685  # 0x94d049bb133111eb as int64
_GOLDEN = -7046029254386353131  # 0x9e3779b97f4a7c15 as int64


def _lsr(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer on int64 tensors (bit pattern identical to the uint64 version)."""
    x = x.to(torch.int64)
    x = (x ^ _lsr(x, 30)) * _M1
    x = (x ^ _lsr(x, 27)) * _M2
    return x ^ _lsr(x, 31)


def term_hash(feature_ids: torch.Tensor, values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """One 64-bit hash per (feature_id, value) term."""
    h = mix64(feature_ids.to(torch.int64) * _GOLDEN + seed)
    return mix64(h ^ values.to(torch.int64))


def second_hash(h: torch.Tensor) -> torch.Tensor:
    return mix64(h + _GOLDEN)


def _umod(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """uint64(x) mod m for int64 tensors holding uint64 bit patterns and 0 < m < 2^62."""
    high = _lsr(x, 1)  # x = 2*high + low, both non-negative
    low = x & 1
    return ((high % m) * 2 + low) % m


def bloom_positions(h: torch.Tensor, width: torch.Tensor, k: int) -> torch.Tensor:
    """[..., k] distinct rows in [0, width) for term hashes `h` (width prime, > k)."""
    h1 = _umod(h, width)
    step = 1 + _umod(second_hash(h), width - 1)
    j = torch.arange(k, device=h.device)
    return (h1.unsqueeze(-1) + j * step.unsqueeze(-1)) % width.unsqueeze(-1)


def string_value(text: str) -> int:
    """FNV-1a 64 of the UTF-8 bytes of the NFC form, as a signed int64 (stable across processes
    and runs). Every string value, the items' (`FilterSchema.encode_items`) and the filters',
    is hashed here, so canonically equivalent spellings (NFC or NFD) get one value. Text already
    in NFC (ASCII, most typed text) hashes as before, so its stored hashes stay valid; other text,
    decomposed or with a character NFC replaces (U+212B ANGSTROM SIGN, CJK compatibility
    ideographs), hashes differently now: items stored so need a rebuild."""
    h = 0xCBF29CE484222325
    for byte in unicodedata.normalize("NFC", text).encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h - (1 << 64) if h >= 1 << 63 else h


def next_prime(n: int) -> int:
    n = max(n, 2)
    while True:
        if all(n % d for d in range(2, int(n**0.5) + 1)):
            return n
        n += 1
