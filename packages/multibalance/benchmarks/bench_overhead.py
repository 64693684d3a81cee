"""Step-time overhead of each balancer against equal-weight training, same model, same run.

Prints and records ms/step for 2, 4, 8, 16 tasks. Representation-level MultiBalance (its
factored path, and its general path that forms every task's representation gradient) vs the
parameter-level methods (MetaBalance, PCGrad and MGDA on the shared parameters).

Equal weights and the two MultiBalance paths alternate in blocks of two steps, many times over;
each reports its median block, and the overhead is the median of the per-block ratios to the
equal-weights block beside it, with a 95% confidence interval (`common.paired_overhead`): on a
shared machine the load drifts over seconds, and only a fine, paired interleave lets the
few-percent differences through. The parameter-level methods, slower by multiples, get a few
coarse rounds.

On the CPU every figure is taken twice: with glibc's malloc as it comes, and with freed memory
kept in the process ("steady"; see `common.MALLOC_CONDITIONS` for why the first is noisy).

With `--gpu` a second, device-bound model follows at 2 and 8 tasks (batch 65,536, bottom MLP
4,096 -> 1,024, fewer blocks): the first model's step is bound by host work there (launches and
autograd calls, 3.5 ms on an H200), where any added host op shows in full; a step whose device
time dominates hides host work that runs ahead of it, as in production training.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROUNDS = 3  # coarse rounds for the parameter-level methods
BLOCKS, STEPS_PER_BLOCK = 150, 2  # the paired interleave of equal weights and MultiBalance
sys.path.insert(0, str(HERE))
from common import MALLOC_CONDITIONS, SharedBottomModel, paired_overhead, set_malloc  # noqa: E402

import multibalance as mb  # noqa: E402
from gpukernels_common.bench import BenchRecord, bench_args, time_fn, write_records  # noqa: E402


def _general(balancer):
    balancer.uses_norms_only = False  # every task's [B, D] representation gradient, as before the factored path
    return balancer


def _paired_ms(steps: dict, device: str, n_blocks: int = BLOCKS) -> dict:
    """Ms per step of each provider in `n_blocks` alternating blocks of STEPS_PER_BLOCK steps."""
    blocks = {name: [] for name in steps}
    for step in steps.values():  # warm up
        for _ in range(STEPS_PER_BLOCK):
            step()
    for _ in range(n_blocks):
        for name, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(STEPS_PER_BLOCK):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            blocks[name].append(1e3 * (time.perf_counter() - start) / STEPS_PER_BLOCK)
    return blocks


def make_balancer(name, tasks, model):
    shared = model.shared_parameters()
    return {
        "equal": lambda: mb.EqualWeights(tasks),
        "multibalance": lambda: mb.MultiBalance(tasks),
        "multibalance (general path)": lambda: _general(mb.MultiBalance(tasks)),
        "metabalance(params)": lambda: mb.MetaBalance(tasks, shared_parameters=shared),
        "pcgrad(params)": lambda: mb.PCGrad(tasks, shared_parameters=shared),
        "mgda(params)": lambda: mb.MGDA(tasks, shared_parameters=shared),
    }[name]()


def _measure(n_tasks, batch, cardinality, paired, coarse, device, malloc, hidden=512, rep=256, n_blocks=BLOCKS) -> list:
    """One task count: the paired interleave of `paired`, coarse rounds of `coarse`."""
    methods = paired + coarse
    records = []
    tasks = [f"t{i}" for i in range(n_tasks)]
    model = SharedBottomModel(cardinality, 32, tasks, hidden=hidden, rep=rep).to(device)
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

    blocks = _paired_ms({m: (lambda b=balancers[m]: step(b)) for m in paired}, device, n_blocks)
    median_ms = {m: statistics.median(blocks[m]) for m in paired}
    times = {m: [] for m in coarse}
    for _ in range(ROUNDS):  # interleaved rounds, so machine noise hits every method alike
        for m in coarse:
            times[m].append(time_fn(lambda b=balancers[m]: step(b), device=device, warmup_ms=50, rep_ms=400)["ms"])
    median_ms.update({m: statistics.median(times[m]) for m in coarse})
    base = median_ms["equal"]
    for m in methods:
        ms = median_ms[m]
        if m in paired:
            stats = paired_overhead(blocks["equal"], blocks[m])
        else:
            stats = {"overhead_pct": round(100 * (ms / base - 1), 1), "ci95_pct": "-"}
        qps_change = round(100 * (1 / (1 + stats["overhead_pct"] / 100) - 1), 1)
        print(f"[{malloc}] tasks={n_tasks:2d} {m:28s} {ms:8.2f} ms/step  overhead {stats['overhead_pct']:+7.1f}% "
              f"(95% CI {stats['ci95_pct']})  QPS change {qps_change:+6.1f}%")
        records.append(BenchRecord("step-time overhead vs equal weights", m,
                                   {"tasks": n_tasks, "batch": batch, "malloc": malloc, "shared_params_M": round(sum(p.numel() for p in model.shared_parameters()) / 1e6, 2),
                                    "bottom MLP": f"{hidden} -> {rep}",
                                    "timing (median)": f"{n_blocks} blocks of {STEPS_PER_BLOCK} steps, interleaved" if m in paired else f"{ROUNDS} rounds",
                                    "path": getattr(balancers[m], "last_path", "") or "-"},
                                   {"ms_per_step": round(ms, 3), **stats, "qps_change_pct": qps_change}))
    return records


def main():
    args = bench_args()
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    batch = 512 if args.quick else 2048
    # embedding tables dominate the shared parameters, as in recommendation models
    cardinality = {"user": 20000, "item": 50000, "a": 1000, "b": 1000}
    records = []
    out = HERE / "results" / ("overhead_gpu.jsonl" if args.gpu else "overhead.jsonl")
    paired = ["equal", "multibalance", "multibalance (general path)"]
    coarse = ["metabalance(params)", "pcgrad(params)", "mgda(params)"]
    # "steady" cannot be undone, so it comes second; the parameter-level methods, slower by
    # multiples, are timed under the first only
    for condition in MALLOC_CONDITIONS if device == "cpu" else MALLOC_CONDITIONS[:1]:
        set_malloc(condition)
        torch.manual_seed(0)
        for n_tasks in ([2, 4] if args.quick else [2, 4, 8, 16]):
            records += _measure(n_tasks, batch, cardinality, paired, coarse if condition == MALLOC_CONDITIONS[0] else [],
                                device, "CUDA caching allocator" if device == "cuda" else condition)
            if not args.quick:  # a smoke run prints only; else after each task count: a run cut short keeps what it measured
                write_records(out, records)
    if args.gpu:  # the device-bound model (see the module docstring)
        for n_tasks in [2] if args.quick else [2, 8]:
            records += _measure(n_tasks, 4096 if args.quick else 65536, cardinality, paired, coarse, device,
                                "CUDA caching allocator", hidden=4096, rep=1024, n_blocks=5 if args.quick else 30)
            if not args.quick:
                write_records(out, records)


if __name__ == "__main__":
    main()
