"""Bubble ratio, step time and samples/s: naive data parallel vs freescale's balanced batches.

1. Real runs: 4 gloo ranks on this machine with sleep-simulated compute (a GPU does not use
   the host CPU; sleep keeps 4 ranks honest on 2 cores), global batches of heavy-tailed
   lengths (Zipf alpha 1.2, max 4096) and of real MovieLens-100k history lengths.
2. Simulator: the same cost model at 8, 64 and 256 ranks, partitioners compared.
Cost per sample: 256*L + L^2 (HSTU-like); bubble = straggler wait / step time.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from freescale import BatchBalancer, BubbleMeter, CostModel, bubble_reduction, simulate
from freescale.data import movielens_sequences, zipf_lengths
from gpukernels_common.bench import BenchRecord, bench_args, spawn_jobs, write_records
from gpukernels_common.distributed import destroy_process_group

HERE = Path(__file__).resolve().parent
COST = CostModel(a=256.0, b=1.0)


def length_pool(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    if kind == "zipf":
        return zipf_lengths(n, alpha=1.2, max_len=4096, seed=seed)
    lengths = movielens_sequences().lengths
    g = torch.Generator().manual_seed(seed)
    return lengths[torch.randint(0, lengths.numel(), (n,), generator=g)]


def _rank(queue, job, rank, world, port, method, batches, sec_per_cost, cost, long_sequences):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    meter = BubbleMeter()
    balancer = BatchBalancer(cost_model=cost, method=method, long_sequences=long_sequences)
    per = batches[0].numel() // world
    local_of = lambda lengths: lengths[rank * per : (rank + 1) * per]  # noqa: E731
    # pipelined as in TrainPipeline: batch i+1's lengths are all-gathered and partitioned (in a
    # background thread) while batch i computes
    future = balancer.plan_async(local_of(batches[0])) if method != "contiguous" else None
    for i, lengths in enumerate(batches):
        with meter.step(samples=per):
            mine = local_of(lengths)
            if future is not None:
                with meter.comm("plan_wait"):
                    plan = future.result()
                mine = plan.received().lengths  # whole samples, or capped/split windows
                if i + 1 < len(batches):
                    future = balancer.plan_async(local_of(batches[i + 1]))  # gathered and partitioned in the background
            with meter.compute():
                time.sleep(float(cost(mine).sum()) * sec_per_cost)
            meter.sync(lambda: dist.all_reduce(torch.zeros(1 << 16)), name="grad_allreduce")
    summary = meter.summary(skip=1)  # a collective: every rank takes part
    queue.put(summary if rank == 0 else None)
    destroy_process_group()


def real_run(world, method, batches, sec_per_cost, cost=COST, long_sequences="report"):
    args = (method, batches, sec_per_cost, cost, long_sequences)
    return next(r for r in spawn_jobs(_rank, world, args) if r is not None)


def main():
    args = bench_args(gpu_help="(no GPU path: this benchmark simulates compute)")
    records = []
    world, per_rank = 4, 32
    steps = 4 if args.quick else 12
    for kind in ("zipf", "movielens"):
        pool = length_pool(kind, world * per_rank * steps, seed=1)
        batches = list(pool.split(world * per_rank))
        # calibrate: about 60 ms of compute per rank per step on average
        sec_per_cost = 0.06 / float(COST(pool).sum() / (world * steps))
        base = None
        for method in ("contiguous", "lpt_equal", "kk_equal", "kk"):
            s = real_run(world, method, batches, sec_per_cost)
            base = s["bubble_ratio"] if method == "contiguous" else base
            red = bubble_reduction(base, s["bubble_ratio"])
            print(f"real {kind:9s} W={world} {method:10s} bubble {s['bubble_ratio']:.3f} exposed comm {s['exposed_comm_ratio']:.3f} "
                  f"step {s['step_ms']:.1f} ms  {s['samples_per_s']:.0f} samples/s  reduction {100 * red:.1f}%")
            records.append(BenchRecord(f"real gloo run, {world} ranks, sleep-simulated compute", method,
                                       {"lengths": kind, "world": world, "samples_per_rank": per_rank, "steps": steps},
                                       {"bubble_ratio": round(s["bubble_ratio"], 4), "exposed_comm_ratio": round(s["exposed_comm_ratio"], 4),
                                        "step_ms": round(s["step_ms"], 2), "samples_per_s": round(s["samples_per_s"], 1),
                                        "bubble_reduction_pct": round(100 * red, 1)}))
    for kind in ("zipf", "movielens"):
        for w in (8, 64, 256):
            sim_steps = 3 if args.quick else 10
            pool = length_pool(kind, w * per_rank * sim_steps, seed=2)
            batches = list(pool.split(w * per_rank))
            naive = simulate(batches, w, COST, method="contiguous", seconds_per_cost=1e-9)
            for method in ("contiguous", "lpt_equal", "kk_equal", "kk"):
                r = naive if method == "contiguous" else simulate(batches, w, COST, method=method, seconds_per_cost=1e-9)
                red = bubble_reduction(naive.bubble_ratio, r.bubble_ratio)
                print(f"sim  {kind:9s} W={w:3d} {method:10s} bubble {r.bubble_ratio:.4f} reduction {100 * red:.1f}%")
                records.append(BenchRecord("simulator (same cost model)", method,
                                           {"lengths": kind, "world": w, "samples_per_rank": per_rank, "steps": sim_steps},
                                           {"bubble_ratio": round(r.bubble_ratio, 5), "bubble_reduction_pct": round(100 * red, 1),
                                            "samples_per_s_rel": round(r.samples_per_s / naive.samples_per_s, 3)}))
    if args.quick:  # a smoke run: print only, keep the full figures on disk
        return
    write_records(HERE / "results" / "bubbles.jsonl", records)


if __name__ == "__main__":
    sys.exit(main())
