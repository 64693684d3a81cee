"""Step-time overhead under DistributedDataParallel: 2 gloo ranks (one CPU thread each), the
model of bench_overhead.py wrapped in DDP, equal weights against MultiBalance on its factored
path (the heads' backward, the task norms summed over ranks while it finishes, then the
bottom's backward), the same with `norm_lag=1` (the norms' sum awaited a step later: no second
synchronization point) and on its general path (every task's representation gradient formed).
The four alternate in blocks of two steps on the same model; each reports its median block, and the
overhead is the median of the per-block ratios with a 95% confidence interval
(`common.paired_overhead`); a block ends with the slower rank. Every figure is taken under both
allocator conditions of `common.MALLOC_CONDITIONS` (each in its own pair of rank processes).
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import MALLOC_CONDITIONS, SharedBottomModel, paired_overhead, set_malloc  # noqa: E402

WORLD = 2
BLOCKS, STEPS_PER_BLOCK = 200, 2
PROVIDERS = ("equal", "multibalance", "multibalance, norm_lag=1", "multibalance (general path)")


class _SharedOf(torch.nn.Module):
    """The whole model under DDP, whose forward is the shared bottom (the heads read the balanced
    representation outside it; their gradients come in the same backward)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sparse, dense):
        return self.model.shared(sparse, dense)


def _rank(queue, job, rank, world, port, n_tasks, batch, blocks, malloc):
    import torch.distributed as dist

    import multibalance as mb

    set_malloc(malloc)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)  # the same model on every rank
    tasks = [f"t{i}" for i in range(n_tasks)]
    cardinality = {"user": 20000, "item": 50000, "a": 1000, "b": 1000}
    model = SharedBottomModel(cardinality, 32, tasks)
    ddp = torch.nn.parallel.DistributedDataParallel(_SharedOf(model))  # every parameter, heads included
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own half of the global batch
    sparse = {k: torch.randint(0, v, (batch // world,), generator=g) for k, v in cardinality.items()}
    dense = torch.randn(batch // world, 32, generator=g)
    labels = {t: (torch.rand(batch // world, 1, generator=g) < 0.3).float() for t in tasks}
    general = mb.MultiBalance(tasks)
    general.uses_norms_only = False
    balancers = {"equal": mb.EqualWeights(tasks), "multibalance": mb.MultiBalance(tasks),
                 "multibalance, norm_lag=1": mb.MultiBalance(tasks, norm_lag=1), "multibalance (general path)": general}

    def step(bal):
        opt.zero_grad(set_to_none=True)
        rep = bal.attach(ddp(sparse, dense))
        losses = {t: torch.nn.functional.binary_cross_entropy_with_logits(model.heads[t](rep), labels[t]) for t in tasks}
        bal.backward(losses)
        opt.step()

    for bal in balancers.values():
        for _ in range(STEPS_PER_BLOCK):
            step(bal)
    times = {name: [] for name in balancers}
    for _ in range(blocks):
        for name, bal in balancers.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(STEPS_PER_BLOCK):
                step(bal)
            dist.barrier()  # the block ends with the slower rank
            times[name].append(1e3 * (time.perf_counter() - start) / STEPS_PER_BLOCK)
    paths = {name: getattr(bal, "last_path", "") or "-" for name, bal in balancers.items()}
    queue.put({"blocks": times, "paths": paths} if rank == 0 else None)
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    from gpukernels_common.bench import bench_args, write_records

    args = bench_args(gpu_help="(CPU only: 2 gloo ranks)")
    if args.gpu:
        print("bench_ddp_overhead: CPU only (gloo); nothing to run with --gpu")
        return 0
    batch = 512 if args.quick else 2048
    blocks = 3 if args.quick else BLOCKS
    records = []
    for malloc in MALLOC_CONDITIONS:
        for n_tasks in ([2] if args.quick else [2, 4, 8, 16]):
            records += _measure(n_tasks, batch, blocks, malloc)
    if not args.quick:
        write_records(HERE / "results" / "ddp_overhead.jsonl", records)
    return 0


def _measure(n_tasks, batch, blocks, malloc) -> list:
    from gpukernels_common.bench import BenchRecord, spawn_jobs

    records = []
    result = next(r for r in spawn_jobs(_rank, WORLD, (n_tasks, batch, blocks, malloc), timeout=1800) if r is not None)
    timed = result["blocks"]
    for name in PROVIDERS:
        ms = statistics.median(timed[name])
        stats = paired_overhead(timed["equal"], timed[name])
        print(f"[{malloc}] tasks={n_tasks:2d} {name:28s} {ms:8.2f} ms/step  overhead {stats['overhead_pct']:+6.1f}% "
              f"(95% CI {stats['ci95_pct']})  path {result['paths'][name]}")
        records.append(BenchRecord(f"step-time overhead under DDP ({WORLD} gloo ranks) vs equal weights", name,
                                   {"tasks": n_tasks, "global batch": batch, "world": WORLD, "malloc": malloc,
                                    "timing (median)": f"{blocks} blocks of {STEPS_PER_BLOCK} steps, interleaved",
                                    "path": result["paths"][name]},
                                   {"ms_per_step": round(ms, 3), **stats}))
    return records


if __name__ == "__main__":
    sys.exit(main())
