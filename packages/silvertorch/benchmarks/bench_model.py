"""Retrieval-model throughput on a synthetic corpus: queries per second of one forward (user tower
-> probe -> Bloom filter -> int8 scores -> top-K -> OverArch -> Value Model -> top-N), at several
batch sizes, with and without a filter, beside a plain PyTorch pipeline (fp32 scores of every item,
exact filter mask, torch.topk, the same OverArch and Value Model).

CPU: 200,000 items, K = 1,000 candidates re-scored; `--gpu`: 1,000,000 items, K = 10,000 (the
figure issue 5 asks for). Items: 64-d unit vectors around 2,000 centres; attributes: a category
(Zipf over 50) and a year (30 values). With the filter, a second model probes adaptively (from
nprobe 16 up to 64 clusters until K items pass); `mean_found` is the items that passed in the
probed clusters. A third model evaluates all 16 term slots exactly on the probed clusters
(max_exact_terms = max_terms, the cost before filters kept their terms under NOT in a few leading
slots), beside the default bound: same results, the difference is that cost, for compiled and
exported graphs and GPUs; eager on the CPU both read only the slots the batch's plans use.
With `--gpu` a row runs the default model as a CUDA graph (`RetrievalModel.capture`, one capture
per batch size: the forward's kernels replayed with one launch), and a table gives the device
memory of graphs at batch 1, 16 and 128 captured at once (one shared pool) against a capture per
size (a pool each). A last row runs the default model as an AOTInductor package (`RetrievalModel.package`: the
forward compiled ahead of time, C++ on the CPU, loaded with torch alone), compile time in
`build_s`.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpukernels_common.bench import BenchRecord, bench_args, time_fn, write_records
from silvertorch import EmbeddingTower, FilterSchema, OverArch, RetrievalModel, ValueModel

HERE = Path(__file__).resolve().parent
SCHEMA = {"cat": 1, "year": 2}
FILTERS = {"(none)": ("", lambda cat, year: torch.ones_like(cat, dtype=torch.bool)),
           "cat:3 AND NOT year:2001": ("cat:3 AND NOT year:2001", lambda cat, year: (cat == 3) & (year != 2001))}


def corpus(n: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(2000, d, generator=g)
    emb = torch.nn.functional.normalize(centres[torch.randint(0, 2000, (n,), generator=g)] + 0.7 * torch.randn(n, d, generator=g), dim=1)
    cat = (50 * torch.rand(n, generator=g) ** 2).long()  # small categories are common
    year = 1990 + torch.randint(0, 30, (n,), generator=g)
    return emb, cat, year


def with_settings(model: RetrievalModel, **settings) -> RetrievalModel:
    """`model` searching with other settings over the same tensors and modules (a shallow copy):
    building each variant again redoes the k-means over every item on the CPU, three times the
    build where a GPU session's cap leaves time for one."""
    variant = copy.copy(model)
    for name, value in settings.items():
        setattr(variant, name, value)
    return variant


def pool_record(model, sizes, device, n, d, k_cand, n_clusters, records):
    """Device memory of the graphs at every batch size captured at once (one shared pool) against
    one capture per size (a pool each), both after the warm runs above."""

    def reserved_by(capture):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved()
        made = capture()
        torch.cuda.synchronize()
        return made, torch.cuda.memory_reserved() - before

    example = torch.randint(0, 10_000, (max(sizes), 1), device=device)
    try:
        separate, separate_bytes = reserved_by(lambda: [model.capture(example[:s]) for s in sizes])
        del separate
        shared, shared_bytes = reserved_by(lambda: model.capture(example, batch_sizes=sizes))
        del shared
    except Exception as error:  # reported, and the other figures still recorded
        print(f"CUDA graph capture at batch sizes {sizes} failed: {type(error).__name__}: {error}")
        return
    fig = {"shared_pool_mib": round(shared_bytes / 2**20, 1), "pool_per_size_mib": round(separate_bytes / 2**20, 1)}
    print(f"CUDA graphs at batch sizes {sizes}: {fig}")
    records.append(BenchRecord(f"retrieval model CUDA graphs, device memory ({device}, {n:,} items x {d}, K = {k_cand:,}, "
                               f"nprobe 16 of {n_clusters})", "silvertorch RetrievalModel.capture",
                               {"batch_sizes": ", ".join(map(str, sizes))}, fig))
    write_records(HERE / "results" / "model_gpu.jsonl", records)


def main():
    args = bench_args()
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    n, d, k_cand, n_clusters = (1_000_000, 64, 10_000, 1024) if args.gpu else ((20_000, 64, 500, 64) if args.quick else (200_000, 64, 1_000, 256))
    emb, cat, year = corpus(n, d)
    torch.manual_seed(0)
    users = EmbeddingTower([10_000], d, normalize=True)
    overarch, value_model = OverArch(d, 2, [128, 64]), ValueModel(2, [1.0, 0.5])
    attrs = FilterSchema(SCHEMA).encode_items([{"cat": int(c), "year": int(y)} for c, y in zip(cat.tolist(), year.tolist())])
    t0 = time.perf_counter()
    options = dict(attributes=attrs, schema=SCHEMA, n_clusters=n_clusters, nprobe=16, k_candidates=k_cand, num_results=100,
                   fresh_capacity=0)
    model = RetrievalModel.build(users, overarch, value_model, emb, **options).to(device).eval()
    build_s = time.perf_counter() - t0
    adaptive = with_settings(model, max_nprobe=64)
    all_exact = with_settings(model, max_exact_terms=16)
    models = {"silvertorch RetrievalModel": model, "silvertorch RetrievalModel, adaptive nprobe 16..64": adaptive,
              "silvertorch RetrievalModel, all 16 term slots exact": all_exact}
    print(f"built {n:,} items x {d} ({n_clusters} clusters) in {build_s:.0f} s")
    setting = f"retrieval model forward ({device}, {n:,} items x {d}, K = {k_cand:,} re-scored, N = 100, nprobe 16 of {n_clusters})"
    emb_d, cat_d, year_d = emb.to(device), cat.to(device), year.to(device)
    graphs = {}  # batch size -> the model captured as a CUDA graph (RetrievalModel.capture)
    records, cases = [], []  # cases: (filter label, batch, allowed, ids, plans), for the package's pass

    def add_records(label, batch, allowed, figures):
        for provider, fig in figures.items():
            fig = {**fig, "ms": round(fig["ms"], 3), "qps": round(batch / (fig["ms"] / 1e3), 1)}
            print(f"{provider:52s} filter={label:26s} batch={batch:4d} {fig}")
            records.append(BenchRecord(setting, provider, {"filter": label, "batch": batch,
                                                           "selectivity_pct": round(100 * float(allowed.float().mean()), 2)}, fig))
        if not args.quick:  # after each batch: a run cut short (a time-boxed GPU session) keeps what it measured
            write_records(HERE / "results" / ("model_gpu.jsonl" if args.gpu else "model.jsonl"), records)

    with torch.no_grad():
        for label, (expr, pred) in FILTERS.items():
            allowed = pred(cat_d, year_d)
            for batch in (1, 16, 128) if not args.quick else (1, 16):
                ids = torch.randint(0, 10_000, (batch, 1), device=device)
                plans = [t.to(device) for t in model.prepare_filters([expr] * batch)]
                cases.append((label, batch, allowed, ids, plans))
                figures = {}
                for provider, m in models.items():
                    if m is adaptive and not expr:
                        continue
                    ms = time_fn(lambda i=ids, p=plans, m=m: m(i, *p), device=device, warmup_ms=50, rep_ms=500)["ms"]
                    found = m(ids, *plans)[4].float().mean()
                    figures[provider] = {"ms": ms, "build_s": round(build_s, 1), "mean_found": round(float(found), 1)}

                if args.gpu and batch not in graphs:  # one capture per batch size, for every filter
                    try:
                        graphs[batch] = model.capture(ids)
                    except Exception as error:  # reported, and the eager figures still recorded
                        graphs[batch] = None
                        print(f"CUDA graph capture at batch {batch} failed: {type(error).__name__}: {error}")
                if graphs.get(batch) is not None:
                    captured = graphs[batch]
                    ms = time_fn(lambda i=ids, p=plans: captured(i, *p), device=device, warmup_ms=50, rep_ms=500)["ms"]
                    found = captured(ids, *plans)[4].float().mean()
                    figures["silvertorch RetrievalModel as a CUDA graph"] = {"ms": ms, "build_s": round(build_s, 1),
                                                                           "mean_found": round(float(found), 1)}

                def brute(i=ids):
                    u = model.user_tower(i)
                    s = (u @ emb_d.T).masked_fill(~allowed, float("-inf"))
                    cand = torch.topk(s, k_cand, dim=1).indices
                    value = value_model(overarch(u, emb_d[cand]))
                    return cand.gather(1, torch.topk(value, 100, dim=1).indices)

                figures["torch fp32 brute force + topk + OverArch"] = {"ms": time_fn(brute, device=device, warmup_ms=50, rep_ms=500)["ms"]}
                add_records(label, batch, allowed, figures)

    if args.gpu and any(graphs.values()):
        graphs.clear()
        pool_record(model, [1, 16, 128] if not args.quick else [1, 16], device, n, d, k_cand, n_clusters, records)

    # the package last: its compile takes minutes, and a run cut short keeps the eager figures
    t0 = time.perf_counter()
    package = Path(tempfile.mkdtemp()) / "model.pt2"
    example = torch.randint(0, 10_000, (2, 1), device=device)
    packaged = torch._inductor.aoti_load_package(str(model.package(package, example, ["", FILTERS["cat:3 AND NOT year:2001"][0]], max_batch=128)))
    package_s = time.perf_counter() - t0
    print(f"AOTInductor package compiled in {package_s:.0f} s ({package.stat().st_size / 1e6:.0f} MB)")
    with torch.no_grad():
        for label, batch, allowed, ids, plans in cases:
            ms = time_fn(lambda i=ids, p=plans: packaged(i, *p), device=device, warmup_ms=50, rep_ms=500)["ms"]
            found = packaged(ids, *plans)[4].float().mean()
            add_records(label, batch, allowed, {"silvertorch RetrievalModel as an AOTInductor package": {
                "ms": ms, "build_s": round(package_s, 1), "mean_found": round(float(found), 1)}})


if __name__ == "__main__":
    sys.exit(main())
