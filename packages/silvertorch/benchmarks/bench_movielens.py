"""MovieLens-100k (from the installed recbole wheel): retrieval quality of the published model.

1. Filtered retrieval against exact search: for every user and several filters, the model's top-10
   (IVF int8 probe + Bloom filter + exact verification + OverArch + Value Model) against the same
   pipeline with exact filtering and fp32 brute force (Recall@10, NDCG@10 of the model's list
   against the exact list), at nprobe 4, 8 and all clusters.
2. OverArch re-scoring gain: held-out interactions (each user's last 10% by time), items seen in
   training excluded; top-10 by the two-tower dot product against top-200 by dot product
   re-ranked by the Value Model over OverArch's task probabilities (HitRate@10, NDCG@10 for
   `watch` = any held-out rating, `like` = held-out rating >= 4).
3. The like head alone: AUC of telling liked (>= 4) from other held-out ratings, OverArch's like
   probability against the dot product.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from gpukernels_common.bench import BenchRecord, bench_args, write_records
from silvertorch import RetrievalModel

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
from movielens import SCHEMA, item_attributes, item_dense_features, item_features, load_movielens, train  # noqa: E402

YEARS_95_98 = "{1995,1996,1997,1998}"
FILTERS = {  # expression -> exact predicate over (genres, year)
    "(none)": ("", lambda g, y: True),
    "genre:Comedy": ("genre:Comedy", lambda g, y: "Comedy" in g),
    "genre:Drama AND year:1995-98": (f"genre:Drama AND year:{YEARS_95_98}", lambda g, y: "Drama" in g and 1995 <= y <= 1998),
    "NOT genre:Drama": ("NOT genre:Drama", lambda g, y: "Drama" not in g),
    "genre:{Action,Thriller} AND NOT year:1997-98": ("genre:{Action,Thriller} AND NOT year:{1997,1998}",
                                                      lambda g, y: ("Action" in g or "Thriller" in g) and y not in (1997, 1998)),
    "genre:Documentary (3%)": ("genre:Documentary", lambda g, y: "Documentary" in g),
}


def ndcg(got: list, want: list, k: int) -> float:
    rel = set(want)
    dcg = sum(1 / math.log2(i + 2) for i, x in enumerate(got[:k]) if x in rel)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(k, len(rel))))
    return dcg / ideal if ideal else 1.0


def auc(score: torch.Tensor, label: torch.Tensor) -> float:
    ranks = torch.empty_like(score).scatter_(0, torch.argsort(score), torch.arange(1, score.numel() + 1, dtype=score.dtype))
    pos = label.sum()
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * (~label).sum()))


def main():
    args = bench_args()
    t0 = time.perf_counter()
    ml = load_movielens()
    user_tower, item_tower, overarch, value_model = train(ml, epochs=2 if args.quick else 8, overarch_epochs=1 if args.quick else 3,
                                                          log=lambda m: None)
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        item_emb = item_tower(item_features(ml))
        user_emb = user_tower(ml.users)
    n_items = item_emb.shape[0]
    dense = item_dense_features(ml)
    users = ml.users if not args.quick else ml.users[:100]
    records, setting = [], f"MovieLens-100k ({n_items} movies, {users.shape[0]} users, dim 32, CPU)"
    print(f"trained in {train_s:.0f} s")

    # 1. filtered retrieval vs exact search
    k_candidates, n = 200, 10
    for nprobe in (4, 8, 32):
        model = RetrievalModel.build(user_tower, overarch, value_model, item_emb, torch.arange(n_items), item_attributes(ml), SCHEMA,
                                     item_dense=dense, n_clusters=32, nprobe=nprobe, k_candidates=k_candidates, num_results=n, fresh_capacity=0)
        for name, (expr, pred) in FILTERS.items():
            ok = torch.tensor([pred(g, y) for g, y in zip(ml.item_genres, ml.item_years.tolist())])
            t0 = time.perf_counter()
            got = torch.cat([model.retrieve(b, [expr] * b.shape[0]).ids for b in users.split(128)])
            ms = (time.perf_counter() - t0) * 1e3
            with torch.no_grad():  # the exact pipeline
                s = (user_emb[: users.shape[0]] @ item_emb.T).masked_fill(~ok, float("-inf"))
                cand = torch.topk(s, min(k_candidates, int(ok.sum())), dim=1).indices
                value = value_model(overarch(user_emb[: users.shape[0]], item_emb[cand].bfloat16().float(), dense[cand]))
                want = cand.gather(1, torch.topk(value, min(n, cand.shape[1]), dim=1).indices)
            rec = [len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(got, want)]
            nd = [ndcg(a.tolist(), b.tolist(), n) for a, b in zip(got, want)]
            fig = {"selectivity_pct": round(100 * float(ok.float().mean()), 1), "recall@10": round(sum(rec) / len(rec), 4),
                   "ndcg@10": round(sum(nd) / len(nd), 4), "ms_per_query": round(ms / users.shape[0], 3)}
            print(f"nprobe {nprobe:2d} {name:45s} {fig}")
            records.append(BenchRecord(f"{setting}: filtered retrieval vs exact search (K={k_candidates}, N={n}, 32 clusters)",
                                       "silvertorch RetrievalModel", {"filter": name, "nprobe": nprobe}, fig))

    # 2. OverArch re-scoring against dot-product ranking, on held-out interactions
    seen = torch.zeros(ml.users.shape[0], n_items, dtype=torch.bool)
    seen[ml.train[:, 0], ml.train[:, 1]] = True
    with torch.no_grad():
        dots = (user_emb @ item_emb.T).masked_fill(seen, float("-inf"))
        by_dot = torch.topk(dots, n, dim=1).indices
        cand = torch.topk(dots, k_candidates, dim=1).indices
        rescored = cand.gather(1, torch.topk(value_model(overarch(user_emb, item_emb[cand], dense[cand])), n, dim=1).indices)
    for task, rows in (("watch", ml.test), ("like", ml.test[ml.test[:, 2] >= 4])):
        truth: dict[int, list] = {}
        for u, i in rows[:, :2].tolist():
            truth.setdefault(u, []).append(i)
        for method, ranked in (("dot product top-10", by_dot), ("OverArch + Value Model over top-200", rescored)):
            hit = [len(set(ranked[u].tolist()) & set(t)) / min(len(t), n) for u, t in truth.items()]
            nd = [ndcg(ranked[u].tolist(), t, n) for u, t in truth.items()]
            fig = {"recall@10": round(sum(hit) / len(hit), 4), "ndcg@10": round(sum(nd) / len(nd), 4), "users": len(truth)}
            print(f"{task:5s} {method:40s} {fig}")
            records.append(BenchRecord(f"{setting}: held-out interactions, seen items excluded", method, {"task": task}, fig))
    # 3. the like head where it matters: among held-out watched items, which were liked (rating >= 4)?
    with torch.no_grad():
        u, i = ml.test[:, 0], ml.test[:, 1]
        liked = ml.test[:, 2] >= 4
        by = {"dot product": (user_emb[u] * item_emb[i]).sum(-1),
              "OverArch like head": overarch(user_emb[u], item_emb[i].unsqueeze(1), dense[i].unsqueeze(1))[:, 0, 1]}
    for method, score in by.items():
        fig = {"auc": round(auc(score, liked), 4), "interactions": int(liked.numel())}
        print(f"like AUC {method:20s} {fig}")
        records.append(BenchRecord(f"{setting}: held-out ratings, liked (>= 4) vs not", method, {"task": "like"}, fig))
    if args.quick:
        return
    write_records(HERE / "results" / "movielens.jsonl", records)


if __name__ == "__main__":
    sys.exit(main())
