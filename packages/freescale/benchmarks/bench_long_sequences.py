"""Floor-bound batches: when one sequence alone costs more than a rank's fair share, no placement
removes the bubble; capping or splitting it does (BatchBalancer(long_sequences=...)).

1. Simulator: MovieLens-100k history lengths, cost L^2 (attention-bound), 16 samples per rank
   at 16, 64 and 256 ranks; and freescale's Zipf lengths (alpha 1.2, max 4096, cost 256 L + L^2)
   at 16 x 16, to show whether that workload is floor-bound at all.
2. Real runs: 4 gloo ranks, 8 samples per rank, sleep-simulated compute, floor-bound global
   batches drawn from MovieLens-100k (cost L^2).
Columns: bubble ratio; bubble_floor (mean over steps of the least bubble any placement of whole
samples reaches); floor_bound_steps; compute_change_pct (split recomputes context but drops
attention across pieces; cap drops positions); positions_kept_pct (what the loss still sees).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from bench_bubbles import length_pool, real_run

from freescale import CostModel, bubble_reduction, simulate
from freescale.longseq import floor_of, long_sequence_windows
from gpukernels_common.bench import BenchRecord, bench_args, write_records

HERE = Path(__file__).resolve().parent
ATTENTION_COST = CostModel(a=0.0, b=1.0)
HSTU_COST = CostModel(a=256.0, b=1.0)
PROVIDERS = (("contiguous", "report"), ("lpt_equal", "report"), ("lpt_equal", "cap"), ("lpt_equal", "split"))


def cut_figures(batches, world, cost, mode) -> dict:
    """What capping/splitting does to the work: compute change and loss positions kept."""
    before = after = kept = total = 0.0
    for lengths in batches:
        windows = long_sequence_windows(mode, lengths, cost, world)
        before += float(cost(lengths).sum())
        total += float(lengths.sum())
        after += float(cost(lengths if windows is None else windows.lengths).sum())
        kept += float(lengths.sum()) if windows is None else windows.positions()
    floors = [floor_of(cost(b), world) for b in batches]
    return {"compute_change_pct": round(100 * (after / before - 1), 1), "positions_kept_pct": round(100 * kept / total, 1),
            "bubble_floor": round(sum(f["bubble_floor"] for f in floors) / len(floors), 4),
            "floor_bound_steps": sum(f["floor_bound"] for f in floors)}


def provider_name(method, mode):
    return method if mode == "report" else f"{method} + {mode}"


def main():
    args = bench_args(gpu_help="(no GPU path: this benchmark simulates compute)")
    records = []
    steps = 3 if args.quick else 10
    per_rank = 16
    for kind, cost, worlds in (("movielens", ATTENTION_COST, (16, 64, 256)), ("zipf", HSTU_COST, (16,))):
        for world in worlds:
            batches = list(length_pool(kind, world * per_rank * steps, seed=3).split(world * per_rank))
            naive = simulate(batches, world, cost, method="contiguous", seconds_per_cost=1e-9)
            for method, mode in PROVIDERS:
                r = simulate(batches, world, cost, method=method, seconds_per_cost=1e-9, long_sequences=mode)
                red = bubble_reduction(naive.bubble_ratio, r.bubble_ratio)
                figs = cut_figures(batches, world, cost, mode)
                print(f"sim  {kind:9s} W={world:3d} {provider_name(method, mode):18s} bubble {r.bubble_ratio:.4f} "
                      f"(floor {figs['bubble_floor']:.4f}, {figs['floor_bound_steps']}/{steps} floor-bound) reduction {100 * red:.1f}% "
                      f"compute {figs['compute_change_pct']:+.1f}% kept {figs['positions_kept_pct']:.1f}%")
                records.append(BenchRecord("floor-bound batches, simulator", provider_name(method, mode),
                                           {"lengths": kind, "cost": "L^2" if cost is ATTENTION_COST else "256L+L^2",
                                            "world": world, "samples_per_rank": per_rank, "steps": steps},
                                           {"bubble_ratio": round(r.bubble_ratio, 4), "bubble_reduction_pct": round(100 * red, 1),
                                            "samples_per_s_rel": round(r.samples_per_s / naive.samples_per_s, 3), **figs}))
    # real runs: floor-bound global batches (one history alone above a rank's fair share)
    world, per_rank, real_steps = 4, 8, (4 if args.quick else 12)
    pool = length_pool("movielens", 20000, seed=4)
    batches = [b for b in pool.split(world * per_rank) if floor_of(ATTENTION_COST(b), world)["floor_bound"]][:real_steps]
    sec_per_cost = 0.06 / float(sum(float(ATTENTION_COST(b).sum()) for b in batches) / (world * len(batches)))
    base = None
    for method, mode in PROVIDERS:
        s = real_run(world, method, batches, sec_per_cost, cost=ATTENTION_COST, long_sequences=mode)
        base = s["bubble_ratio"] if base is None else base
        red = bubble_reduction(base, s["bubble_ratio"])
        figs = cut_figures(batches, world, ATTENTION_COST, mode)
        print(f"real movielens W={world} {provider_name(method, mode):18s} bubble {s['bubble_ratio']:.3f} (floor {figs['bubble_floor']:.3f}) "
              f"step {s['step_ms']:.1f} ms {s['samples_per_s']:.0f} samples/s reduction {100 * red:.1f}%")
        records.append(BenchRecord(f"floor-bound batches, real gloo run, {world} ranks, sleep-simulated compute",
                                   provider_name(method, mode),
                                   {"lengths": "movielens (floor-bound batches)", "cost": "L^2", "world": world,
                                    "samples_per_rank": per_rank, "steps": len(batches)},
                                   {"bubble_ratio": round(s["bubble_ratio"], 4), "bubble_reduction_pct": round(100 * red, 1),
                                    "exposed_comm_ratio": round(s["exposed_comm_ratio"], 4), "step_ms": round(s["step_ms"], 2),
                                    "samples_per_s": round(s["samples_per_s"], 1), **figs}))
    if args.quick:  # a smoke run: print only, keep the full figures on disk
        return
    write_records(HERE / "results" / "long_sequences.jsonl", records)


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
