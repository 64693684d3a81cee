"""Reordering jagged values (`freescale.jagged.gather_runs`, used by permute, windows and the
balancer's exchange): one index gather against slices joined by `torch.cat`, over run counts
and lengths, on one CPU thread. The crossover sets `jagged.CAT_MIN_AVERAGE_RUN`; the last
column is what `gather_runs` picks."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CASES = ((512, 10), (128, 30), (1000, 100), (128, 200), (128, 400), (64, 1000), (16, 2000))  # (runs, mean length)


def _time_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1e6 * (time.perf_counter() - start) / repeats


def main() -> int:
    from freescale.jagged import CAT_MIN_AVERAGE_RUN, gather_runs, gather_runs_indexed
    from gpukernels_common.bench import BenchRecord, bench_args, write_records

    args = bench_args(gpu_help="(CPU only)")
    if args.gpu:
        print("bench_reorder: CPU only; nothing to run with --gpu")
        return 0
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    repeats = 20 if args.quick else 300
    records = []
    for runs, mean in CASES:
        lengths = torch.randint(0, 2 * mean + 1, (runs,), generator=g)
        values = torch.randint(0, 1 << 30, (int(lengths.sum()),), generator=g)
        order = torch.randperm(runs, generator=g)  # a reordering of every run
        starts, lengths = (torch.cumsum(lengths, 0) - lengths)[order], lengths[order]
        total = int(lengths.sum())
        joined = torch.cat([values[a : a + n] for a, n in zip(starts.tolist(), lengths.tolist())])
        if not (torch.equal(gather_runs_indexed(values, starts, lengths, total), joined)
                and torch.equal(gather_runs(values, starts, lengths), joined)):
            raise AssertionError(f"gather_runs disagrees with slicing for {runs} runs")
        index_us = _time_us(lambda: gather_runs_indexed(values, starts, lengths, total), repeats)
        cat_us = _time_us(lambda: torch.cat([values[a : a + n] for a, n in zip(starts.tolist(), lengths.tolist())]), repeats)
        picked = "cat" if total >= CAT_MIN_AVERAGE_RUN * runs else "index"
        print(f"{runs:5d} runs, mean {mean:5d}: index {index_us:7.1f} us  cat {cat_us:7.1f} us  gather_runs picks {picked}")
        records.append(BenchRecord("Reordering jagged values (gather_runs), 1 CPU thread", f"{runs} runs, mean length {mean}",
                                   {"values": total, "repeats": repeats},
                                   {"index_gather_us": round(index_us, 1), "slice_cat_us": round(cat_us, 1), "picked": picked}))
    if not args.quick:
        write_records(HERE / "results" / "reorder.jsonl", records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
