"""Where a search's time goes on a GPU: torch.profiler over a few calls of the IVF search, the
Bloom search, select_topk and the retrieval model's forward. Prints, per case, the wall time per
call, the kernels by device time, the host ops by CPU time and the host synchronisations. A
diagnostic for tuning, not a benchmark: it records nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gpukernels_common.bench import print_profile as profile
from silvertorch import BloomIndex, DenseMaskFilter, IVFIndex, parse_filters, select_topk
from silvertorch.topk import _select_two_level

sys.path.insert(0, str(Path(__file__).resolve().parent))


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
    captured = index.capture(qd, k=100, nprobe=16)
    profile("IVF search 128 queries, nprobe 16, k 100, no filter, as a CUDA graph", lambda: captured(qd))

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
