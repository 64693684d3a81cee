"""Where a search's time goes on a GPU: torch.profiler over a few calls of the IVF search, the
Bloom search, select_topk and the retrieval model's forward. Prints, per case, the wall time per
call, the kernels by device time, the host ops by CPU time and the host synchronisations. A
diagnostic for tuning, not a benchmark: it records nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from gpukernels_common.bench import device_time_us
from silvertorch import BloomIndex, DenseMaskFilter, IVFIndex, parse_filters, select_topk
from silvertorch.topk import _select_two_level

sys.path.insert(0, str(Path(__file__).resolve().parent))

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "aten::item", "aten::_local_scalar_dense",
         "aten::nonzero", "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")


def profile(name, fn, calls=5):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / calls * 1e3
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu = sorted((e for e in events if device_time_us(e) > 0), key=device_time_us, reverse=True)
    print(f"\n### {name}: {wall:.3f} ms per call (wall, synchronised); device busy {sum(map(device_time_us, gpu)) / calls / 1e3:.3f} ms")
    for e in gpu[:10]:
        print(f"  gpu {device_time_us(e) / calls / 1e3:8.3f} ms x{e.count // calls:<4d} {e.key[:90]}")
    cpu = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total, reverse=True)
    for e in cpu[:12]:
        print(f"  cpu {e.self_cpu_time_total / calls / 1e3:8.3f} ms x{e.count // calls:<4d} {e.key[:90]}")
    for e in events:
        if e.key in SYNCS:
            print(f"  host {e.key}: {e.count / calls:.1f} per call, {e.self_cpu_time_total / calls / 1e3:.3f} ms")


def main():
    device = "cuda"
    from bench_ivf import data
    x, q, attr = data(1_000_000, 128, 2048, 128)
    index = IVFIndex.build(x.to(device), n_clusters=1024, iters=5)
    qd = q.to(device)
    print(f"IVF: max cluster {index.max_cluster}, mean {1_000_000 / 1024:.0f}")
    allowed = (attr < 10).to(device)
    mask = DenseMaskFilter(allowed.expand(128, -1)[:, index.order.to(device)])
    profile("IVF search 128 queries, nprobe 16, k 100, no filter", lambda: index.search_with_stats(qd, k=100, nprobe=16))
    profile("IVF search 128 queries, nprobe 16, k 100, 1% mask", lambda: index.search_with_stats(qd, k=100, nprobe=16, filters=mask))
    profile("IVF search 1 query, nprobe 16, k 100, no filter", lambda: index.search_with_stats(qd[:1], k=100, nprobe=16))

    scores = torch.randn(4, 2_000_000, device=device)
    profile("select_topk two_level 4 x 2M k=100", lambda: select_topk(scores, 100, "two_level"))
    profile("select_topk radix 4 x 2M k=100", lambda: select_topk(scores, 100, "radix"))
    # the two-level selection with the whole row as one tile (its CPU layout): one torch.topk
    profile("two-level, one tile, 4 x 2M k=100", lambda: _select_two_level(scores, 100, tile_width=scores.shape[1]))
    profile("select_topk two_level 128 x 16k k=100", lambda: select_topk(torch.randn(128, 16384, device=device), 100, "two_level"))

    from bench_bloom import make_items
    fids, offsets, vals = make_items(10_000_000)
    bloom = BloomIndex.build(fids.to(device), offsets.to(device), vals.to(device), k=3, b_multiplier=5.0)
    plans = parse_filters(["2:5"])
    profile("Bloom search 10M items, one term", lambda: bloom.search(plans))
    plans16 = parse_filters(["1:0 AND 2:0 AND NOT 4:0"] * 16)
    profile("Bloom search 10M items, 16 queries, a AND b AND NOT c", lambda: bloom.search(plans16))

    from bench_model import FILTERS, SCHEMA, corpus

    from silvertorch import EmbeddingTower, FilterSchema, OverArch, RetrievalModel, ValueModel
    emb, cat, year = corpus(200_000, 64)
    torch.manual_seed(0)
    attrs = FilterSchema(SCHEMA).encode_items([{"cat": int(c), "year": int(y)} for c, y in zip(cat.tolist(), year.tolist())])
    model = RetrievalModel.build(EmbeddingTower([10_000], 64, normalize=True), OverArch(64, 2, [128, 64]), ValueModel(2, [1.0, 0.5]),
                                 emb, attributes=attrs, schema=SCHEMA, n_clusters=256, nprobe=16, k_candidates=10_000,
                                 num_results=100, fresh_capacity=0).to(device).eval()
    captured = model.capture(torch.zeros(16, 1, dtype=torch.int64))
    for expr in ("", FILTERS["cat:3 AND NOT year:2001"][0]):
        ids = torch.randint(0, 10_000, (16, 1), device=device)
        plans = model.prepare_filters([expr] * 16)
        with torch.no_grad():
            profile(f"RetrievalModel 200k items, K=10,000, batch 16, filter {expr!r}", lambda: model(ids, *plans))
        profile(f"RetrievalModel as a CUDA graph, same, filter {expr!r}", lambda: captured(ids, *plans))


if __name__ == "__main__":
    sys.exit(main())
