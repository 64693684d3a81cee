"""Side by side with TorchRec's TrainPipelineSparseDist on CPU (2 gloo ranks): samples/s and
exposed communication for the same model shape.

Model: two embedding tables (table-wise sharded: one per rank; TorchRec's CPU sharder offers
table-wise, column-wise and data-parallel, not row-wise) sum-pooled over jagged histories, plus
a dense MLP over [pooled, dense features] with a logistic loss; SGD. Both sides pool on the
table's owner and send back one vector per (sample, table); both update the looked-up rows with
SGD inside the backward (freescale `fused_lr=`, TorchRec's fbgemm fused backward + optimizer), so
neither builds a gradient for the tables. One freescale row runs that update compiled
(`fused_update="compiled"`: one torch.compile'd gather-scale-add loop, where the default adds a
[ids, dim] tensor of per-id steps with `index_add_`). Another returns every looked-up row and
pools on the requester (`pooling="none"` + a sum per sample), for the cost of that traffic. Two
rows balance the samples over the ranks (kk_equal on the id counts): always, and only when the
slowest rank's cost drops by 5% or more (`min_gain=0.05`; otherwise no sample moves). The
freescale pipeline sends batch i+1's embedding ids to their owners while batch i computes (as
TorchRec's pipeline does); one row turns that off, for what it saves.
Each rank draws the same batches for every framework. Exposed communication = step time - the
same framework's step with the same code and batches as two one-rank jobs running at once
(every table local, collectives trivial, the same CPU contention); it includes each pipeline's
own overhead.

TorchRec is an optional anchor, never a dependency: without it this prints a message and exits 0.
Run it where torchrec is installed, with freescale on the path, e.g.
    python -m venv /tmp/trec && /tmp/trec/bin/pip install torch==2.13.0
    /tmp/trec/bin/pip install --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0
    /tmp/trec/bin/pip install tensordict torchmetrics==1.0.3 tqdm pyre-extensions numpy
    PYTHONPATH=packages/freescale/src:packages/gpukernels-common/src /tmp/trec/bin/python \\
        packages/freescale/benchmarks/bench_torchrec.py
then `python packages/freescale/benchmarks/run.py --only torchrec` (any interpreter) renders RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from gpukernels_common.distributed import destroy_process_group

HERE = Path(__file__).resolve().parent
KEYS = ("history", "other")
COMPUTE_ONLY = " (two one-rank jobs: compute only)"
UNPOOLED = "freescale TrainPipeline, rows returned unpooled (pooled on the requester)"
NOT_PREFETCHED = "freescale TrainPipeline, ids not distributed ahead"
COMPILED = "freescale TrainPipeline, compiled row update"
BALANCED_MIN_GAIN = "freescale TrainPipeline + kk_equal balancing, min_gain 5% (samples stay when the gain is smaller)"


@dataclasses.dataclass
class Shape:
    rows: int = 20000
    dim: int = 32
    dense: int = 13
    batch: int = 64  # samples per rank per step
    max_len: int = 512
    steps: int = 20
    warmup: int = 3
    repeats: int = 5  # each runner's median over this many runs


def make_batches(rank: int, shape: Shape):
    """Per rank: (values, lengths key-major, dense, label) for warmup + steps batches."""
    from freescale.data import zipf_lengths

    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for step in range(shape.warmup + shape.steps):
        lengths = torch.cat([zipf_lengths(shape.batch, max_len=shape.max_len, seed=1000 * rank + 10 * step + k) for k in range(2)])
        values = torch.randint(0, shape.rows, (int(lengths.sum()),), generator=g)
        out.append((values, lengths, torch.randn(shape.batch, shape.dense, generator=g),
                    torch.randint(0, 2, (shape.batch,), generator=g).float()))
    return out


def mlp(shape: Shape) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(shape.dim + shape.dense, 64), nn.ReLU(), nn.Linear(64, 1))


def timed(run_steps, shape: Shape) -> float:
    """Seconds for the timed steps: run_steps(on_step) calls on_step() after every step."""
    stamps = []
    run_steps(lambda: stamps.append(time.perf_counter()))
    return stamps[-1] - stamps[shape.warmup - 1]


def run_freescale(batches, shape: Shape, balance: bool, owner_pooling: bool = True, prefetch: bool = True,
                  min_gain: float = 0.0, fused_update: str = "eager") -> float:
    import freescale

    tables = freescale.ShardedEmbeddings({k: shape.rows for k in KEYS}, shape.dim, sharding="table", fused_lr=0.01,
                                         fused_update=fused_update)
    head = mlp(shape)
    opt = torch.optim.SGD(head.parameters(), lr=0.01)  # the tables update themselves in the backward
    scheduler = freescale.CommScheduler()
    balancer = freescale.BatchBalancer(cost_model=freescale.CostModel(a=1.0), method="kk_equal", min_gain=min_gain) if balance else None

    def pooled_of(features):
        if owner_pooling:
            return tables(features)
        rows = tables(features, pooling="none")  # every looked-up row comes back; summed here
        bags = {key: torch.repeat_interleave(torch.arange(features.batch_size), features[key][1]) for key in KEYS}
        return {key: rows[key].new_zeros(features.batch_size, shape.dim).index_add(0, bags[key], rows[key]) for key in KEYS}

    def step(features, dense, global_batch):
        opt.zero_grad()
        pooled = pooled_of(features)
        logit = head(torch.cat([pooled["history"] + pooled["other"], dense["dense"]], 1)).squeeze(1)
        (F.binary_cross_entropy_with_logits(logit, dense["label"], reduction="sum") / global_batch).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in head.parameters()])
        future = scheduler.all_reduce(flat, name="dense")
        scheduler.flush()
        future.result(timeout=120)
        for p, g in zip(head.parameters(), flat.split([p.numel() for p in head.parameters()])):
            p.grad = g.view_as(p)
        opt.step()

    def steps(on_step):
        def step_and_stamp(features, dense, global_batch):
            step(features, dense, global_batch)
            on_step()

        prefetched = {"embeddings": tables, "pooling": "sum" if owner_pooling else "none"} if prefetch else {}
        pipe = freescale.TrainPipeline(step_and_stamp, balancer=balancer, **prefetched)
        pipe.run((freescale.KeyedJagged(list(KEYS), v, ln), {"dense": d, "label": y}) for v, ln, d, y in batches)

    seconds = timed(steps, shape)
    scheduler.close()
    return seconds


def run_torchrec(batches, shape: Shape) -> float:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.sharding_plan import get_default_sharders
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.distributed.types import ShardingType
    from torchrec.streamable import Pipelineable

    @dataclasses.dataclass
    class Batch(Pipelineable):
        sparse: KeyedJaggedTensor
        dense: torch.Tensor
        label: torch.Tensor

        def to(self, device, non_blocking=False):
            return Batch(self.sparse.to(device, non_blocking=non_blocking), self.dense.to(device), self.label.to(device))

        def record_stream(self, stream):
            pass

        def pin_memory(self):
            return self

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.ebc = EmbeddingBagCollection([EmbeddingBagConfig(name=k, embedding_dim=shape.dim, num_embeddings=shape.rows,
                                                                  feature_names=[k]) for k in KEYS], device=torch.device("meta"))
            self.head = mlp(shape)

        def forward(self, batch):
            pooled = self.ebc(batch.sparse)
            logit = self.head(torch.cat([pooled["history"] + pooled["other"], batch.dense], 1)).squeeze(1)
            return F.binary_cross_entropy_with_logits(logit, batch.label), logit.detach()

    model = Model()
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=dist.get_world_size(), compute_device="cpu"),
                                       constraints={k: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value]) for k in KEYS})
    plan = planner.plan(model, get_default_sharders())  # deterministic: the same plan on every rank
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan)
    opt = torch.optim.SGD(dmp.parameters(), lr=0.01)
    pipe = TrainPipelineSparseDist(dmp, opt, torch.device("cpu"))

    def steps(on_step):
        it = iter(Batch(KeyedJaggedTensor(keys=list(KEYS), values=v, lengths=ln), d, y) for v, ln, d, y in batches)
        while True:
            try:
                pipe.progress(it)
            except StopIteration:
                return
            on_step()

    return timed(steps, shape)


def _rank(queue, job, rank, world, port, shape):
    """One process of a `world`-rank job; `job * world + rank` picks its batches (so that two
    one-rank jobs run the same per-process work as the two-rank job)."""
    data_rank = job * world + rank
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    batches = make_batches(data_rank, shape)
    runners = (("torchrec TrainPipelineSparseDist", lambda: run_torchrec(batches, shape)),
               ("freescale TrainPipeline", lambda: run_freescale(batches, shape, balance=False)),
               (COMPILED, lambda: run_freescale(batches, shape, balance=False, fused_update="compiled")),
               (NOT_PREFETCHED, lambda: run_freescale(batches, shape, balance=False, prefetch=False)),
               ("freescale TrainPipeline + kk_equal balancing", lambda: run_freescale(batches, shape, balance=True)),
               (BALANCED_MIN_GAIN, lambda: run_freescale(batches, shape, balance=True, min_gain=0.05)),
               (UNPOOLED, lambda: run_freescale(batches, shape, balance=False, owner_pooling=False)))
    seconds = {name: [] for name, _ in runners}
    for _ in range(shape.repeats):  # round robin, so that load from other jobs hits every runner alike
        for name, run in runners:
            dist.barrier()
            seconds[name].append(run())
    queue.put({name: statistics.median(runs) for name, runs in seconds.items()})
    dist.barrier()
    destroy_process_group()


def run_jobs(jobs: int, world: int, shape: Shape) -> dict:
    """`jobs` independent `world`-rank jobs at once; seconds per runner, slowest process."""
    from gpukernels_common.bench import spawn_jobs

    results = spawn_jobs(_rank, world, (shape,), jobs=jobs, timeout=1200)
    return {name: max(r[name] for r in results) for name in results[0]}  # a step ends with the slowest rank


def main() -> int:
    from gpukernels_common.bench import BenchRecord, bench_args, write_records

    args = bench_args(gpu_help="(CPU only: TorchRec's CPU path with gloo)")
    if importlib.util.find_spec("torchrec") is None:
        print("bench_torchrec: torchrec is not installed here; skipping (see this script's docstring to run it)")
        return 0
    shape = Shape(steps=4, warmup=2, repeats=1) if args.quick else Shape()
    world = 2
    # compute only: the same code as two one-rank jobs at once (every table local, collectives
    # trivial, the same CPU contention), then the two-rank job
    alone = run_jobs(world, 1, shape)
    together = run_jobs(1, world, shape)
    seconds = {**{name + COMPUTE_ONLY: sec for name, sec in alone.items()}, **together}
    versions = {name: importlib.metadata.version(name) for name in ("torchrec", "fbgemm-gpu-cpu")}
    records = []
    for name, sec in seconds.items():
        step_ms = 1e3 * sec / shape.steps
        figures = {"step_ms": round(step_ms, 2), "samples_per_s": round(world * shape.batch * shape.steps / sec, 1)}
        if not name.endswith(COMPUTE_ONLY):
            compute_ms = 1e3 * seconds[name + COMPUTE_ONLY] / shape.steps
            figures.update(exposed_comm_ms=round(step_ms - compute_ms, 2), exposed_comm_ratio=round(1 - compute_ms / step_ms, 3))
        print(f"{name:78s} step {step_ms:7.2f} ms  {figures['samples_per_s']:8.1f} samples/s  "
              f"exposed comm {figures.get('exposed_comm_ms', 0.0):6.2f} ms")
        records.append(BenchRecord("TorchRec side by side, 2 gloo ranks", name,
                                   {"world": world, "batch_per_rank": shape.batch, "tables": f"{len(KEYS)} x {shape.rows} x {shape.dim}, table-wise",
                                    "lengths": f"zipf 1.2, max {shape.max_len}", "steps": shape.steps,
                                    "repeats (median)": shape.repeats, **versions}, figures))
    if not args.quick:
        write_records(HERE / "results" / "torchrec.jsonl", records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
