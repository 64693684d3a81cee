"""Step-time overhead of each balancer against equal-weight training, same model, same run.

Prints and records ms/step for 2, 4, 8, 16 tasks. Representation-level MultiBalance vs the
parameter-level methods (MetaBalance, PCGrad and MGDA on the shared parameters).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SharedBottomModel  # noqa: E402

import multibalance as mb  # noqa: E402
from gpukernels_common.bench import BenchRecord, bench_args, time_fn, write_records  # noqa: E402


def make_balancer(name, tasks, model):
    shared = model.shared_parameters()
    return {
        "equal": lambda: mb.EqualWeights(tasks),
        "multibalance": lambda: mb.MultiBalance(tasks),
        "metabalance(params)": lambda: mb.MetaBalance(tasks, shared_parameters=shared),
        "pcgrad(params)": lambda: mb.PCGrad(tasks, shared_parameters=shared),
        "mgda(params)": lambda: mb.MGDA(tasks, shared_parameters=shared),
    }[name]()


def main():
    args = bench_args()
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    torch.manual_seed(0)
    batch = 512 if args.quick else 2048
    # embedding tables dominate the shared parameters, as in recommendation models
    cardinality = {"user": 20000, "item": 50000, "a": 1000, "b": 1000}
    records = []
    methods = ["equal", "multibalance", "metabalance(params)", "pcgrad(params)", "mgda(params)"]
    for n_tasks in ([2, 4] if args.quick else [2, 4, 8, 16]):
        tasks = [f"t{i}" for i in range(n_tasks)]
        model = SharedBottomModel(cardinality, 32, tasks).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        sparse = {k: torch.randint(0, v, (batch,), device=device) for k, v in cardinality.items()}
        dense = torch.randn(batch, 32, device=device)
        labels = {t: (torch.rand(batch, 1, device=device) < 0.3).float() for t in tasks}
        balancers = {m: make_balancer(m, tasks, model) for m in methods}

        def step(bal):
            opt.zero_grad(set_to_none=True)
            rep = bal.attach(model.shared(sparse, dense))
            losses = {t: torch.nn.functional.binary_cross_entropy_with_logits(model.heads[t](rep), labels[t]) for t in tasks}
            bal.backward(losses)
            opt.step()

        # interleave providers over rounds so machine noise hits all of them alike
        times = {m: [] for m in methods}
        for _ in range(3):
            for m in methods:
                times[m].append(time_fn(lambda b=balancers[m]: step(b), device=device, warmup_ms=50, rep_ms=400)["ms"])
        base = sorted(times["equal"])[1]
        for m in methods:
            ms = sorted(times[m])[1]
            overhead = 100 * (ms / base - 1)
            print(f"tasks={n_tasks:2d} {m:22s} {ms:8.2f} ms/step  overhead {overhead:+7.1f}%  QPS change {100 * (base / ms - 1):+6.1f}%")
            records.append(BenchRecord("step-time overhead vs equal weights", m,
                                       {"tasks": n_tasks, "batch": batch, "shared_params_M": round(sum(p.numel() for p in model.shared_parameters()) / 1e6, 2)},
                                       {"ms_per_step": round(ms, 3), "overhead_pct": round(overhead, 1), "qps_change_pct": round(100 * (base / ms - 1), 1)}))
    if args.quick:  # a smoke run: print only, keep the full figures on disk
        return
    write_records(HERE / "results" / ("overhead_gpu.jsonl" if args.gpu else "overhead.jsonl"), records)


if __name__ == "__main__":
    main()
