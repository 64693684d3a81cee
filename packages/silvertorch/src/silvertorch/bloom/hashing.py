"""64-bit hashing shared by the index build, the query compiler and the kernels.

Terms are (feature_id, value) pairs. `term_hash` mixes them with the splitmix64 finalizer
(torch int64 arithmetic wraps like uint64; right shifts are made logical by masking), and
`bloom_positions` derives a term's k distinct rows in a bundle, a uniformly random k-subset of its
width, from k 32-bit hashes (the halves of splitmix64 of h + i * golden ratio, i = 1, 2, ...).
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


def bloom_positions(h: torch.Tensor, width: torch.Tensor, k: int) -> torch.Tensor:
    """[..., k] distinct rows in [0, width) for term hashes `h` (k < width < 2^31): a uniformly
    random k-subset, drawn by Floyd's sampling from k 32-bit hashes (the low and high halves of
    mix64(h + i * golden), i = 1, 2, ...): draw j (j = 0 .. k-1) is the hash modulo width - k + j + 1,
    replaced by width - k + j when an earlier draw took that row.

    Random rows, as the false-positive formula (1 - e^(-1/m))^k assumes. Double hashing
    (rows h1 + j * h2 modulo a prime width) gave each term one of only width^2 row sets, so a probe
    term had all its rows in common with some stored term of an item far more often than
    independent rows would: at k=5, m=10 the rate was 21x the formula (`FORMAT_VERSION` 2 of the
    Bloom index and of the retrieval model)."""
    halves = (k + 1) // 2
    i = torch.arange(1, halves + 1, device=h.device)
    r = mix64(h.to(torch.int64).unsqueeze(-1) + i * _GOLDEN)  # [..., halves]
    draws = torch.stack([r & 0xFFFFFFFF, _lsr(r, 32)], -1).reshape(*r.shape[:-1], 2 * halves)
    rows: list[torch.Tensor] = []
    for j in range(k):
        top = width - k + j  # no earlier draw took it: they are all below it
        row = draws[..., j] % (top + 1)
        if rows:
            row = torch.where((torch.stack(rows, -1) == row.unsqueeze(-1)).any(-1), top, row)
        rows.append(row)
    return torch.stack(rows, -1)


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
