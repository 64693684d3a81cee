"""IVF search: recall against exact filtered search, QPS and bytes per item, side by side with
faiss-cpu (IndexIVFScalarQuantizer QT_8bit and IndexIVFFlat, filters through IDSelectorBatch)
on the same synthetic clustered data, nlist, nprobe and filters.

Filters: one attribute per item (values 0..999); a query batch keeps items whose attribute is
below a threshold (selectivity 100%, 10%, 1%, 0.1%). Under filters, silvertorch also runs with
adaptive probing (start at nprobe 4, double until k items pass or 64 clusters) and reports how
many passing candidates it found. The CPU figures use silvertorch's PyTorch reference path on
200k x 128 items (nlist 512) and 1M x 128 (nlist 1024); `qps_vs_faiss_sq8` is our QPS over faiss
IVF-SQ8's at the same nprobe and filter, where the two reach the same recall (both shown). `--gpu`
scores with the compiled Triton kernel on 1M x 128 items (nlist 1024), beside torch's fp16
matmul + topk over every item, and reports each search against its bandwidth floor: the bytes of
the probed clusters' rows (int8 code + fp32 scale, each distinct cluster once per batch) over the
rate of a device-to-device copy (bytes read plus written); unfiltered, the search also runs as
one CUDA graph (`IVFIndex.capture`). Every search, ours and faiss's, is
timed as the median of repeated calls after a warm call (`time_fn`), not as one cold call.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from gpukernels_common.bench import BenchRecord, bench_args, time_fn, write_records
from silvertorch import DenseMaskFilter, IVFIndex

HERE = Path(__file__).resolve().parent
REP_MS = 300  # repeated calls per search after the warm one (at least 3)


def data(n, d, centers, n_queries, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=g)
    x = c[torch.randint(0, centers, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    q = c[torch.randint(0, centers, (n_queries,), generator=g)] + 0.5 * torch.randn(n_queries, d, generator=g)
    attr = torch.randint(0, 1000, (n,), generator=g)
    return x, q, attr


def copy_bandwidth(device) -> float:
    """Bytes read plus written per second by a device-to-device copy of 1 GiB."""
    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device=device)["ms"]
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    hit = sum(len(set(f.tolist()) & (set(t.tolist()) - {-1})) for f, t in zip(found, truth))
    return hit / max(sum(int((t >= 0).sum()) for t in truth), 1)


def main():
    args = bench_args()
    device = "cuda" if args.gpu else "cpu"
    if args.quick:
        shapes = [(20_000, 64, 64, 32)]
    else:  # (items, dim, nlist, queries); the CPU run at the 1M x 128 as well
        shapes = [(1_000_000, 128, 1024, 128)] if args.gpu else [(200_000, 128, 512, 128), (1_000_000, 128, 1024, 128)]
    records = []
    for n, d, nlist, nq in shapes:
        run_shape(args, device, n, d, nlist, nq, records)


def run_shape(args, device, n, d, nlist, nq, records):
    """Every search of one corpus shape; `records` gathers them (written after each selectivity)."""
    x, q, attr = data(n, d, 2 * nlist, nq)
    t0 = time.perf_counter()
    index = IVFIndex.build(x.to(device), n_clusters=nlist, iters=10)
    if args.gpu:  # the build's last kernels may still run: the time of their launch is not the build's
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    try:
        import faiss
        import numpy as np
    except ImportError:
        faiss = None
        print("faiss-cpu not installed: anchors skipped (pip install faiss-cpu)")
    anchors = {}
    if faiss is not None:
        faiss.omp_set_num_threads(2)
        xs = x.numpy().astype("float32")
        quantizer = faiss.IndexFlatIP(d)
        for name, make in (("faiss IVF-SQ8", lambda qz: faiss.IndexIVFScalarQuantizer(qz, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)),
                           ("faiss IVF-Flat", lambda qz: faiss.IndexIVFFlat(qz, d, nlist, faiss.METRIC_INNER_PRODUCT))):
            qz = faiss.IndexFlatIP(d)
            idx = make(qz)
            idx.train(xs)
            idx.add(xs)
            anchors[name] = (idx, qz)
        del quantizer
    k = 100
    bandwidth = copy_bandwidth(device) if args.gpu else None
    x_dev, q_dev = x.to(device), q.to(device)
    for sel in (100, 10, 1, 0.1):
        allowed = attr < int(sel * 10)
        allowed_dev = allowed.to(device)
        exact = (q_dev @ x_dev.T).masked_fill(~allowed_dev, float("-inf"))
        top = torch.topk(exact, k, dim=1)
        truth = torch.where(torch.isfinite(top.values), top.indices, torch.full_like(top.indices, -1)).cpu()
        del exact
        mask = DenseMaskFilter(allowed_dev.expand(nq, -1)[:, index.order.to(device)])  # index storage order
        if args.gpu:  # the anchor: fp16 scores of every item, the filter as a mask, torch.topk
            x_half, q_half = x_dev.half(), q_dev.half()

            def brute():
                return torch.topk((q_half @ x_half.T).float().masked_fill(~allowed_dev, float("-inf")), k, dim=1)

            ms = time_fn(brute, device=device, rep_ms=REP_MS)["ms"]
            values, indices = brute()
            ids = torch.where(torch.isfinite(values), indices, torch.full_like(indices, -1)).cpu()
            fig = {"recall@10": round(recall(ids[:, :10], truth[:, :10]), 4), "recall@100": round(recall(ids, truth), 4),
                   "qps": round(nq / (ms / 1e3), 1), "bytes_per_item": 2 * d}
            print(f"torch fp16 matmul + topk sel={sel}% {fig}")
            records.append(BenchRecord(f"IVF search ({device}, {n} x {d}, nlist {nlist}, {nq} queries, k={k})",
                                       "torch fp16 matmul + topk (every item)", {"selectivity_pct": sel, "nprobe": "all"}, fig))
            del x_half, q_half
        for nprobe in (4, 16, 64):
            def run():
                return index.search_with_stats(q_dev, k=k, nprobe=nprobe, filters=mask if sel < 100 else None)

            r = run()
            ms = time_fn(run, device=device, rep_ms=REP_MS)["ms"]
            ids = r.ids.cpu()
            fig = {"recall@10": round(recall(ids[:, :10], truth[:, :10]), 4), "recall@100": round(recall(ids, truth), 4),
                   "qps": round(nq / (ms / 1e3), 1), "bytes_per_item": index.bytes_per_item(), "build_s": round(build_s, 1)}
            if bandwidth:  # the probed clusters' rows, each distinct cluster read once per batch
                sizes = index.offsets.diff()
                clusters = index.probe(q_dev, nprobe)
                floor_ms = 1e3 * int(sizes[clusters.unique()].sum()) * (d + index.scales.element_size()) / bandwidth
                fig.update(floor_ms=round(floor_ms, 4), pct_of_floor=round(100 * floor_ms / ms, 1),
                           item_scores_per_s=round(int(sizes[clusters].sum()) / (ms / 1e3)))  # (query, probed item) pairs
            print(f"silvertorch sel={sel}% nprobe={nprobe} {fig}")
            ours = BenchRecord(f"IVF search ({device}, {n} x {d}, nlist {nlist}, {nq} queries, k={k})",
                               "silvertorch int8 " + ("triton" if args.gpu else "reference"), {"selectivity_pct": sel, "nprobe": nprobe}, fig)
            records.append(ours)
            if args.gpu and sel == 100:  # the same search as one CUDA graph (IVFIndex.capture)
                try:
                    captured = index.capture(q_dev, k=k, nprobe=nprobe)
                except Exception as error:  # reported; the eager figures stand
                    print(f"capture at nprobe {nprobe} failed: {type(error).__name__}: {error}")
                else:
                    ms = time_fn(lambda: captured(q_dev), device=device, rep_ms=REP_MS)["ms"]
                    ids = captured(q_dev)[1].cpu()
                    fig = {"recall@10": round(recall(ids[:, :10], truth[:, :10]), 4), "recall@100": round(recall(ids, truth), 4),
                           "qps": round(nq / (ms / 1e3), 1), "bytes_per_item": index.bytes_per_item()}
                    print(f"silvertorch CUDA graph sel={sel}% nprobe={nprobe} {fig}")
                    records.append(BenchRecord(f"IVF search ({device}, {n} x {d}, nlist {nlist}, {nq} queries, k={k})",
                                               "silvertorch int8 triton as a CUDA graph", {"selectivity_pct": sel, "nprobe": nprobe}, fig))
                    del captured
            if sel < 100 and nprobe == 4:  # adaptive widening from the smallest probe
                def run_adaptive():
                    return index.search_with_stats(q_dev, k=k, nprobe=4, filters=mask, adaptive=True, max_nprobe=64)

                r = run_adaptive()
                ms = time_fn(run_adaptive, device=device, rep_ms=REP_MS)["ms"]
                fig = {"recall@10": round(recall(r.ids.cpu()[:, :10], truth[:, :10]), 4), "recall@100": round(recall(r.ids.cpu(), truth), 4),
                       "qps": round(nq / (ms / 1e3), 1), "mean_found": round(float(r.found.float().mean()), 1),
                       "mean_nprobe": round(float(r.nprobe.float().mean()), 1)}
                print(f"silvertorch adaptive sel={sel}% {fig}")
                records.append(BenchRecord(f"IVF search ({device}, {n} x {d}, nlist {nlist}, {nq} queries, k={k})",
                                           "silvertorch int8 " + ("triton" if args.gpu else "reference") + ", adaptive 4..64",
                                           {"selectivity_pct": sel, "nprobe": "4..64"}, fig))
            for name, (fidx, _) in anchors.items():
                params = faiss.SearchParametersIVF(nprobe=nprobe)
                if sel < 100:
                    keep = np.nonzero(allowed.numpy())[0].astype("int64")
                    params.sel = faiss.IDSelectorBatch(keep)
                queries_np = q.numpy().astype("float32")
                _, fids = fidx.search(queries_np, k, params=params)
                ms = time_fn(lambda fidx=fidx, params=params: fidx.search(queries_np, k, params=params), rep_ms=REP_MS)["ms"]
                fids = torch.from_numpy(fids)
                code_bytes = fidx.code_size + 8  # code + int64 id
                fig = {"recall@10": round(recall(fids[:, :10], truth[:, :10]), 4), "recall@100": round(recall(fids, truth), 4),
                       "qps": round(nq / (ms / 1e3), 1), "bytes_per_item": code_bytes}
                print(f"{name} sel={sel}% nprobe={nprobe} {fig}")
                if name == "faiss IVF-SQ8":
                    ours.figures["qps_vs_faiss_sq8"] = round(ours.figures["qps"] / fig["qps"], 2)
                records.append(BenchRecord(f"IVF search ({device}, {n} x {d}, nlist {nlist}, {nq} queries, k={k})", name,
                                           {"selectivity_pct": sel, "nprobe": nprobe}, fig))
        if not args.quick:  # after each selectivity: a run cut short (a time-boxed GPU session) keeps what it measured
            write_records(HERE / "results" / ("ivf_gpu.jsonl" if args.gpu else "ivf.jsonl"), records)


if __name__ == "__main__":
    sys.exit(main())
