"""Expert parallelism: rows of x that travel per step, per (token, choice) slot vs de-duplicated.

Real runs of `moeblaze.MoE(expert_group=...)` over 2 and 4 gloo ranks on this machine (one
forward per configuration; the counts are `layer.last_traffic`, i.e. the all-to-all send sizes
the layer used). Without de-duplication every kept (token, choice) slot sends its own copy of
the token's row; moeblaze sends one row per (token, destination rank). Each row also comes back
once (the owner's weighted sum), so the combine all-to-all saves the same. Rows a rank keeps
for its own experts are a local copy; "remote" counts only those that cross ranks. Counts only:
a CPU timing of gloo says nothing about NVLink/InfiniBand. Routing: the router at
initialisation on Gaussian tokens (close to uniform), dropless.
"""

from __future__ import annotations

import datetime
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from gpukernels_common.bench import BenchRecord, bench_args, spawn_jobs, write_records
from moeblaze import MoE

HERE = Path(__file__).resolve().parent
D_MODEL, D_FF = 32, 32  # the counts do not depend on them


def _rank(queue, job, rank, world, port, configs, tokens):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GKC_BACKEND="reference")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed.nn's deprecation notice, per rank
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    totals = []
    for n_experts, top_k in configs:
        torch.manual_seed(0)  # the same router on every rank; tokens differ per rank
        layer = MoE(D_MODEL, D_FF, n_experts, top_k, expert_group=dist.group.WORLD)
        x = torch.randn(tokens, D_MODEL, generator=torch.Generator().manual_seed(1000 + rank))
        with torch.no_grad():
            layer(x)
        counts = torch.tensor([layer.last_traffic[key] for key in ("slots", "rows", "remote_slots", "remote_rows")])
        dist.all_reduce(counts)
        totals.append(counts.tolist())
    queue.put(totals if rank == 0 else None)
    dist.barrier()
    dist.destroy_process_group()


def run_world(world, configs, tokens):
    return next(r for r in spawn_jobs(_rank, world, (configs, tokens)) if r is not None)


def main():
    args = bench_args(gpu_help="(row counts do not depend on the device; nothing to measure on a GPU)")
    if args.gpu:
        print("bench_parallel: counts only, device-independent; run it without --gpu")
        return 0
    tokens = 256 if args.quick else 4096
    configs = [(e, k) for e in (16, 64) for k in (2, 4, 8)]
    records = []
    for world in (2, 4):
        for (e, k), (slots, rows, remote_slots, remote_rows) in zip(configs, run_world(world, configs, tokens)):
            shape = {"ranks": world, "experts": e, "experts_per_rank": e // world, "top_k": k, "tokens_per_rank": tokens}
            per_slot = {"rows_sent": slots, "remote_rows_sent": remote_slots, "x_per_slot": 1.0, "x_remote_per_slot": 1.0}
            dedup = {"rows_sent": rows, "remote_rows_sent": remote_rows, "x_per_slot": round(rows / slots, 3),
                     "x_remote_per_slot": round(remote_rows / remote_slots, 3)}
            print(f"ranks={world} E={e:3d} k={k}: rows {slots:7d} -> {rows:7d} ({rows / slots:.3f}x), "
                  f"remote {remote_slots:7d} -> {remote_rows:7d} ({remote_rows / remote_slots:.3f}x)")
            bench = "expert-parallel rows of x sent per step (dispatch; the combine returns as many)"
            records.append(BenchRecord(bench, "one row per (token, choice) slot", shape, per_slot))
            records.append(BenchRecord(bench, "moeblaze: one row per (token, rank)", shape, dedup))
    if args.quick:  # a smoke run: print only, keep the full figures on disk
        return 0
    write_records(HERE / "results" / "parallel.jsonl", records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
