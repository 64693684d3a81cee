"""Top-k selection over long candidate rows: silvertorch.topk's methods against torch.topk.

Q rows of M random float32 scores (Q=4, M=2,000,000; --quick: 2 x 200,000), k from 100 to
1,000,000. Providers: torch.topk (anchor; its tie order is unspecified), the full stable sort
(`select_topk_reference`), two_level and radix. Every silvertorch result is checked equal to
the reference before it is timed. On the CPU the radix histograms run in PyTorch; `--gpu`
times CUDA tensors, where radix uses the Triton histogram kernel.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gpukernels_common.bench import BenchRecord, bench_args, time_fn, write_records
from silvertorch.topk import select_topk, select_topk_reference

HERE = Path(__file__).resolve().parent


def main():
    args = bench_args()
    device = "cuda" if args.gpu else "cpu"
    rows, columns, ks = (2, 200_000, (100, 4096, 20_000)) if args.quick else (4, 2_000_000, (100, 4096, 100_000, 1_000_000))
    scores = torch.randn(rows, columns, generator=torch.Generator().manual_seed(0)).to(device)
    radix_name = "silvertorch radix (" + ("triton histograms" if args.gpu else "torch histograms") + ")"
    providers = {
        "torch.topk (anchor)": lambda k: torch.topk(scores, k, dim=1),
        "full stable sort (reference)": lambda k: select_topk_reference(scores, k),
        "silvertorch two_level": lambda k: select_topk(scores, k, "two_level"),
        radix_name: lambda k: select_topk(scores, k, "radix"),
    }
    threads = "" if args.gpu else f", {torch.get_num_threads()} CPU threads"  # the CPU's figures depend on them
    bench = f"top-k selection ({device}, {rows} x {columns:,} random float32{threads})"
    records, table = [], []
    for k in ks:
        reference = select_topk_reference(scores, k)
        anchor_ms = None
        for provider, run in providers.items():
            if provider.startswith("silvertorch"):
                got = run(k)
                if not (torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1])):
                    raise AssertionError(f"{provider} differs from the reference at k={k}")
            figures = time_fn(lambda: run(k), device=device)
            anchor_ms = figures["ms"] if anchor_ms is None else anchor_ms
            figures["x_torch_topk"] = round(figures["ms"] / anchor_ms, 2)
            figures = {name: round(value, 3) for name, value in figures.items()}
            table.append((k, provider, figures["ms"], figures["ms_p20"], figures["ms_p80"], figures["x_torch_topk"]))
            records.append(BenchRecord(bench, provider, {"k": k}, figures))
        if not args.quick:  # after each k: a run cut short (a time-boxed GPU session) keeps what it measured
            write_records(HERE / "results" / ("topk_gpu.jsonl" if args.gpu else "topk.jsonl"), records)
    print(bench)
    print(f"{'k':>9}  {'provider':<40} {'ms':>9} {'p20':>9} {'p80':>9} {'x topk':>7}")
    for k, provider, ms, p20, p80, ratio in table:
        print(f"{k:>9}  {provider:<40} {ms:>9.1f} {p20:>9.1f} {p80:>9.1f} {ratio:>7.2f}")


if __name__ == "__main__":
    sys.exit(main())
