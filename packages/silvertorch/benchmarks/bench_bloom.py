"""Bloom-index filtering: items filtered per second, bytes per item and measured false-positive
rate, against an exact inverted index on pyroaring (the CPU baseline the paper compares to).

Items carry 10 (feature, value) terms over Zipf-like vocabularies; queries are single terms
(selectivity from ~20% down to ~0.1%) and a conjunction with a negation, one at a time and (at k=3,
b_multiplier=5) as a batch of 256 different filters in one search; 128 absent terms
measure the spread of the false-positive rate around the theory, and 512 over 65,536 items of
distinct terms its mean where the theory's independence holds; on the CPU, a 10M-item build. The CPU figures use
our PyTorch reference path (the Triton kernels run there only through the interpreter);
`--gpu` runs the compiled kernels at 1M and 10M items (pyroaring beside them at 1M only: its index
is built in a Python loop, minutes at 10M).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from gpukernels_common.bench import BenchRecord, bench_args, time_fn, write_records
from silvertorch import BloomIndex, parse_filters

HERE = Path(__file__).resolve().parent
TERMS = 10


def make_items(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    fids = torch.arange(1, TERMS + 1).repeat(n)
    # feature f has 10^(1 + f % 3) values, Zipf-ish: small values are common
    card = (10 ** (1 + fids % 3)).double()
    vals = (card * torch.rand(n * TERMS, generator=g, dtype=torch.float64) ** 3).long()
    offsets = torch.arange(0, n * TERMS + 1, TERMS)
    return fids, offsets, vals


def roaring_index(fids, vals, n):
    from pyroaring import BitMap

    postings: dict = {}
    items = torch.arange(n).repeat_interleave(TERMS).tolist()
    for f, v, i in zip(fids.tolist(), vals.tolist(), items):
        postings.setdefault((f, v), []).append(i)
    return {key: BitMap(v) for key, v in postings.items()}, BitMap(range(n))


def roaring_eval(index, universe, query):
    from pyroaring import BitMap

    kind, terms = query
    if kind == "all":
        return BitMap(universe)  # a copy, as the filter materialises its answer
    sets = [index.get(t, BitMap()) for t in terms]
    if kind == "term":
        return BitMap(sets[0])
    return (sets[0] & sets[1]) - sets[2]  # a AND b AND NOT c


def batch_queries(size: int) -> list:
    """`size` different filters, as a serving batch brings them: single terms and conjunctions
    with a negation over every feature, common and rarer values."""
    out = []
    for i in range(size):
        f = 1 + i % TERMS
        if i % 2 == 0:
            out.append(("term", [(f, (i // 20) % 5)]))
        else:
            out.append(("and-not", [(f, 0), (1 + (i + 3) % TERMS, i % 3), (1 + (i + 6) % TERMS, 0)]))
    return out


def query_text(query) -> str:
    kind, terms = query
    if kind == "all":
        return ""
    return " AND ".join(f"{'NOT ' if kind == 'and-not' and j == 2 else ''}{f}:{v}" for j, (f, v) in enumerate(terms))


def batch_record(idx, n, k, m, device, quick, roaring) -> BenchRecord:
    """One search over a batch of different filters (one plan per query): the GPU evaluates the
    batch in one launch, the inverted index one query after another."""
    batch = batch_queries(16 if quick else 256)
    texts = [query_text(q) for q in batch]
    plans = parse_filters(texts)
    ms = time_fn(lambda: idx.search(plans), device=device, warmup_ms=20, rep_ms=200)["ms"]
    parse_ms = time_fn(lambda: parse_filters(texts), warmup_ms=20, rep_ms=200)["ms"]  # on the host, before the search
    fig = {"ms": round(ms, 3), "us_per_query": round(1e3 * ms / len(batch), 2),
           "items_per_s": round(len(batch) * n / (ms / 1e3)), "parse_ms": round(parse_ms, 3)}
    if roaring is not None:
        rms = time_fn(lambda: [roaring_eval(*roaring, q) for q in batch], warmup_ms=20, rep_ms=200)["ms"]
        fig["roaring_ms"] = round(rms, 3)
        fig["speedup_vs_roaring"] = round(rms / ms, 2)
    print(f"n={n} k={k} m={m} batch of {len(batch)} filters: " + " ".join(f"{a}={b}" for a, b in fig.items()))
    return BenchRecord(f"Bloom filter search, a batch of different filters ({device})",
                       "silvertorch " + ("triton" if device == "cuda" else "reference"),
                       {"items": n, "k": k, "b_multiplier": m, "queries": len(batch)}, fig)


def uniform_fpr_record(k, m, device, quick) -> BenchRecord:
    """The false-positive rate of absent terms on items whose terms are all distinct (no common
    rows): where the theory's independent bits hold, so the mean should sit at the formula."""
    n, probes = (8_192, 64) if quick else (65_536, 512)
    vals = torch.arange(n * TERMS)  # distinct values (hashed: their rows are as random as any)
    idx = BloomIndex.build(torch.ones(n * TERMS, dtype=torch.long).to(device), torch.arange(0, n * TERMS + 1, TERMS).to(device),
                           vals.to(device), k=k, b_multiplier=m)
    hits = ((idx.search(parse_filters([f"1:{-(i + 1)}" for i in range(probes)])).unsqueeze(-1)
             >> torch.arange(64, device=device)) & 1).reshape(probes, -1)[:, :n]
    rate, theory = float(hits.double().mean()), (1 - math.exp(-1 / m)) ** k
    fig = {"probes": probes, "fpr_pct": round(100 * rate, 5), "theory_fpr_pct": round(100 * theory, 5),
           "fpr_over_theory": round(rate / theory, 2)}
    print(f"n={n} k={k} m={m} absent-term probes, uniform items: " + " ".join(f"{a}={b}" for a, b in fig.items()))
    return BenchRecord(f"Bloom false-positive rate over absent-term probes ({device}, uniform items, {TERMS} terms each)",
                       "silvertorch", {"items": n, "k": k, "b_multiplier": m}, fig)


def main():
    args = bench_args()
    device = "cuda" if args.gpu else "cpu"
    sizes = [1_000_000, 10_000_000] if args.gpu else ([100_000] if args.quick else [1_000_000])
    grid = [(3, 5.0)] if args.quick else [(2, 2.0), (3, 2.0), (3, 5.0), (3, 10.0), (5, 5.0), (5, 10.0)]
    queries = [("all", []), ("term", [(1, 0)]), ("term", [(2, 5)]), ("term", [(5, 40)]), ("term", [(2, 150)]),
               ("and-not", [(1, 0), (2, 0), (4, 0)])]
    texts = [query_text(q) for q in queries]
    records = []
    for n in sizes:
        fids, offsets, vals = make_items(n)
        have_roaring = n <= 1_000_000  # its index is built in a Python loop: minutes at 10M items
        try:
            if have_roaring:
                r_index, universe = roaring_index(fids, vals, n)
        except ImportError:
            have_roaring = False
            print("pyroaring not installed: baseline skipped (pip install pyroaring)")
        for k, m in grid:
            t0 = time.perf_counter()
            idx = BloomIndex.build(fids.to(device), offsets.to(device), vals.to(device), k=k, b_multiplier=m)
            if args.gpu:  # the build kernel runs asynchronously: the time of its launch is not the build's
                torch.cuda.synchronize()
            build_s = time.perf_counter() - t0
            plans = parse_filters(texts)
            words = idx.search(plans)
            got = ((words.unsqueeze(-1) >> torch.arange(64, device=device)) & 1).reshape(len(texts), -1)[:, :n].bool().cpu()
            exact = idx.verify(plans, torch.arange(n).unsqueeze(0).expand(len(texts), n))
            for qi, text in enumerate(texts):
                single = parse_filters([text])
                ms = time_fn(lambda s=single: idx.search(s), device=device, warmup_ms=20, rep_ms=200)["ms"]
                truth = exact[qi].cpu()
                negatives = int((~truth).sum())
                fpr = float((got[qi] & ~truth).sum()) / max(negatives, 1)
                lost = int((truth & ~got[qi]).sum())
                fig = {"items_per_s": round(n / (ms / 1e3)), "ms": round(ms, 3), "selectivity_pct": round(100 * float(truth.float().mean()), 3),
                       "fpr_pct": round(100 * fpr, 4), "theory_fpr_pct": round(100 * (1 - math.exp(-1 / m)) ** k, 4),
                       "lost_true_matches": lost, "bytes_per_item": round(idx.bytes_per_item(), 2), "build_s": round(build_s, 2)}
                if have_roaring:
                    rms = time_fn(lambda q=queries[qi]: roaring_eval(r_index, universe, q), warmup_ms=20, rep_ms=200)["ms"]
                    fig["roaring_ms"] = round(rms, 3)
                    fig["speedup_vs_roaring"] = round(rms / ms, 2)
                print(f"n={n} k={k} m={m} {text:32s} " + " ".join(f"{a}={b}" for a, b in fig.items()))
                records.append(BenchRecord(f"Bloom filter search ({device})", "silvertorch " + ("triton" if args.gpu else "reference"),
                                           {"items": n, "k": k, "b_multiplier": m, "query": text or "(empty: all)"}, fig))
            # The theory is an average over query terms. On skewed items the common terms set the
            # same rows in many columns, so a term whose k rows meet theirs sees many more false
            # positives than one whose rows do not: single probes spread widely around the mean.
            n_probes = 16 if args.quick else 128
            probes = parse_filters([f"{f}:{-(i + 1)}" for i, f in enumerate(torch.arange(n_probes) % TERMS + 1)])  # absent values
            hits = ((idx.search(probes).unsqueeze(-1) >> torch.arange(64, device=device)) & 1).reshape(n_probes, -1)[:, :n]
            fprs = hits.float().mean(1).cpu().sort().values
            theory = (1 - math.exp(-1 / m)) ** k
            fig = {"probes": n_probes, "mean_fpr_pct": round(100 * float(fprs.mean()), 4), "p50_fpr_pct": round(100 * float(fprs[n_probes // 2]), 4),
                   "p90_fpr_pct": round(100 * float(fprs[int(0.9 * n_probes)]), 4), "max_fpr_pct": round(100 * float(fprs[-1]), 4),
                   "theory_fpr_pct": round(100 * theory, 4)}
            print(f"n={n} k={k} m={m} absent-term probes: " + " ".join(f"{a}={b}" for a, b in fig.items()))
            records.append(BenchRecord(f"Bloom false-positive rate over absent-term probes ({device}, skewed items)", "silvertorch",
                                       {"items": n, "k": k, "b_multiplier": m}, fig))
            if n == sizes[0]:
                records.append(uniform_fpr_record(k, m, device, args.quick))
            if (k, m) == (3, 5.0):
                records.append(batch_record(idx, n, k, m, device, args.quick, (r_index, universe) if have_roaring else None))
            if not args.quick:  # after each setting: a run cut short (a time-boxed GPU session) keeps what it measured
                write_records(HERE / "results" / ("bloom_gpu.jsonl" if args.gpu else "bloom.jsonl"), records)
    records = []  # written setting by setting above; the 10M build's records are appended below
    if not args.gpu and not args.quick:  # the 10M-item build, on the CPU reference path (no roaring: its build is hours in Python)
        n = 10_000_000
        fids, offsets, vals = make_items(n)
        t0 = time.perf_counter()
        idx = BloomIndex.build(fids, offsets, vals, k=3, b_multiplier=5.0)
        build_s = time.perf_counter() - t0
        del fids, offsets, vals
        for text in ("1:0", "2:150"):
            single = parse_filters([text])
            ms = time_fn(lambda s=single: idx.search(s), warmup_ms=20, rep_ms=500)["ms"]
            fig = {"build_s": round(build_s, 1), "bytes_per_item": round(idx.bytes_per_item(), 2), "ms": round(ms, 1),
                   "items_per_s": round(n / (ms / 1e3))}
            print(f"n={n} k=3 m=5.0 {text}: " + " ".join(f"{a}={b}" for a, b in fig.items()))
            records.append(BenchRecord("Bloom index at 10M items (cpu)", "silvertorch reference",
                                       {"items": n, "k": 3, "b_multiplier": 5.0, "query": text}, fig))
    if args.quick:  # a smoke run: print only, keep the full figures on disk
        return
    write_records(HERE / "results" / ("bloom_gpu.jsonl" if args.gpu else "bloom.jsonl"), records, append=True)


if __name__ == "__main__":
    sys.exit(main())
