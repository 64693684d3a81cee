"""Per-task NE and AUC over seeds with 95% confidence intervals on MovieLens-100k (and Adult
when pyarrow is installed): MultiBalance vs equal weights, uncertainty weighting, MGDA-UB and
torchjd's UPGrad (when `torchjd` is installed).

Tasks on MovieLens-100k: like (rating >= 4), love (rating 5), dislike (rating <= 2).
Random 80/20 split per seed; Adam lr 1e-3; 2 epochs; batch 512.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SharedBottomModel  # noqa: E402

import multibalance as mb  # noqa: E402
from gpukernels_common.bench import BenchRecord, bench_args, write_records  # noqa: E402
from multibalance.data import adult, movielens_100k  # noqa: E402

T95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}


def load(name):
    if name == "movielens":
        d = movielens_100k()
        card = {k: v for k, v in d["cardinality"].items() if k != "genre"}
        sparse = {k: d[k] for k in card}
        return sparse, d["genre"], card, {t: d[t] for t in ("like", "love", "dislike")}
    d = adult()
    card = {f"c{i}": v for i, v in enumerate(d["cardinality"].values())}
    sparse = {f"c{i}": d["categorical"][:, i] for i in range(len(card))}
    return sparse, d["numeric"], card, {"income": d["income"], "never_married": d["never_married"]}


class UPGradBalancer:
    """torchjd's UPGrad on the shared parameters through its mtl_backward (the anchor)."""

    def __init__(self, tasks, model):
        from torchjd.aggregation import UPGrad
        from torchjd.autojac import jac_to_grad, mtl_backward

        self.tasks, self.model, self.agg = tasks, model, UPGrad()
        self._mtl_backward, self._jac_to_grad = mtl_backward, jac_to_grad

    def attach(self, rep):
        self.rep = rep
        return rep

    def backward(self, losses):
        self._mtl_backward([losses[t] for t in self.tasks], features=self.rep)
        self._jac_to_grad(self.model.shared_parameters(), self.agg)


def make(method, tasks, model):
    if method == "upgrad(torchjd)":
        return UPGradBalancer(tasks, model)
    return {"equal": mb.EqualWeights, "uncertainty": mb.UncertaintyWeighting, "mgda-ub": mb.MGDA,
            "multibalance": mb.MultiBalance}[method](tasks)


def run(dataset, method, seed, epochs, data):
    sparse, dense, card, labels = data
    tasks = list(labels)
    n = dense.shape[0]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    split = int(0.8 * n)
    tr, te = perm[:split], perm[split:]
    torch.manual_seed(seed)
    model = SharedBottomModel(card, dense.shape[1], tasks, emb_dim=16, hidden=128, rep=64)
    bal = make(method, tasks, model)
    params = list(model.parameters()) + (list(bal.parameters()) if isinstance(bal, torch.nn.Module) else [])
    opt = torch.optim.Adam(params, lr=1e-3)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for _ in range(epochs):
        order = tr[torch.randperm(split, generator=g)]
        for idx in order.split(512):
            opt.zero_grad(set_to_none=True)
            rep = bal.attach(model.shared({k: v[idx] for k, v in sparse.items()}, dense[idx]))
            bal.backward({t: bce(model.heads[t](rep).squeeze(1), labels[t][idx]) for t in tasks})
            opt.step()
    metrics = mb.MultiTaskMetrics(tasks)
    with torch.no_grad():
        for idx in te.split(4096):
            rep = model.shared({k: v[idx] for k, v in sparse.items()}, dense[idx])
            metrics.update({t: model.heads[t](rep).squeeze(1) for t in tasks}, {t: labels[t][idx] for t in tasks})
    return metrics.compute()


def main():
    args = bench_args(gpu_help="(CPU-only benchmark; accepted for run.py)")
    seeds = [0, 1] if args.quick else [0, 1, 2, 3, 4]
    epochs = 1 if args.quick else 2
    methods = ["equal", "uncertainty", "mgda-ub", "multibalance"]
    try:
        import torchjd  # noqa: F401

        methods.append("upgrad(torchjd)")
    except ImportError:
        print("torchjd not installed: UPGrad column skipped (pip install torchjd)")
    datasets = ["movielens"]
    try:
        import pyarrow  # noqa: F401

        datasets.append("adult")
    except ImportError:
        print("pyarrow not installed: Adult skipped (pip install 'multibalance[data]')")
    records = []
    for dataset in datasets:
        data = load(dataset)
        for method in methods:
            per_seed = [run(dataset, method, s, epochs, data) for s in seeds]
            for task in per_seed[0]:
                for metric in ("ne", "auc"):
                    vals = [r[task][metric] for r in per_seed]
                    mean = statistics.mean(vals)
                    half = T95.get(len(vals), 1.96) * statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")
                    print(f"{dataset:9s} {method:16s} {task:14s} {metric:3s} {mean:.4f} ± {half:.4f}")
                    records.append(BenchRecord(f"quality on {dataset} ({len(seeds)} seeds, {epochs} epochs)", method,
                                               {"task": task, "metric": metric}, {"mean": round(mean, 5), "ci95": round(half, 5)}))
    if args.quick:  # a smoke run: print only, keep the full figures on disk
        return
    if len(methods) < 5 or len(datasets) < 2:  # a partial run would replace the full table with fewer rows
        print("partial run (torchjd or pyarrow missing): figures printed, results/quality.jsonl kept as it was")
        return
    write_records(HERE / "results" / "quality.jsonl", records)


if __name__ == "__main__":
    main()
