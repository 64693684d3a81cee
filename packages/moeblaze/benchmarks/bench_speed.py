"""Forward+backward speed, TFLOP/s counted as 18*T*k*d*d_ff (SwiGLU), providers interleaved.

Providers on the same routed tokens (bf16): `moeblaze` (Triton kernels on a GPU, the reference
path on the CPU), `loop` (per-expert loop, moeblaze.moe_reference) and `grouped_mm
(torchtitan-style)` (permuted copy + torch._grouped_mm). ScatterMoE and Liger are not installed
here and are not measured. Without --gpu: one tiny CPU sanity timing (not a performance figure).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gpukernels_common.bench import BenchRecord, bench_args, time_fn, write_records
from moeblaze import moe_experts, moe_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import grouped_mm_path  # noqa: E402

HERE = Path(__file__).resolve().parent


def routing(tokens, e, k, skewed, device):
    if skewed:  # Zipf-like: expert i chosen with probability ~ 1/(i+1)
        p = 1.0 / torch.arange(1, e + 1, dtype=torch.float32)
        ids = torch.stack([torch.multinomial(p, k) for _ in range(tokens)])
    else:
        ids = torch.stack([torch.randperm(e)[:k] for _ in range(tokens)])
    return ids.int().to(device)


def main():
    args = bench_args()
    device = "cuda" if args.gpu else "cpu"
    if args.gpu:
        grid = [(32768, 2048, 8192, 16, 2), (24576, 1536, 1024, 32, 2), (40960, 768, 256, 128, 8), (16384, 4096, 1024, 64, 8)]
        if args.quick:
            grid = grid[:2]
    else:
        grid = [(256, 256, 512, 8, 2)]
    dtype = torch.bfloat16
    records = []
    for t, d, f, e, k in grid:
        for skewed in (False, True):
            torch.manual_seed(0)
            x = torch.randn(t, d, dtype=dtype, device=device, requires_grad=True)
            ids = routing(t, e, k, skewed, device)
            w = torch.rand(t, k, dtype=dtype, device=device, requires_grad=True)
            wg, wu = (torch.randn(e, d, f, dtype=dtype, device=device).mul_(d ** -0.5).requires_grad_() for _ in range(2))
            wd = torch.randn(e, f, d, dtype=dtype, device=device).mul_(f ** -0.5).requires_grad_()
            dy = torch.randn(t, d, dtype=dtype, device=device)
            providers = {
                "moeblaze": lambda: moe_experts(x, ids, w, wg, wu, wd).backward(dy),
                "loop": lambda: moe_reference(x, ids.long(), w, wg, wu, wd).backward(dy),
                "grouped_mm (torchtitan-style)": lambda: grouped_mm_path(x, ids, w, wg, wu, wd).backward(dy),
            }
            flops = 18 * t * k * d * f
            for name, fn in providers.items():
                ms = time_fn(fn, device=device)["ms"]
                tflops = flops / (ms * 1e-3) / 1e12
                print(f"T={t} d={d} d_ff={f} E={e} k={k} {'zipf' if skewed else 'uniform':7s} {name:30s} {ms:9.3f} ms {tflops:8.3f} TFLOP/s")
                records.append(BenchRecord("fwd+bwd speed (bf16)" + ("" if args.gpu else ", CPU sanity only"), name,
                                           {"T": t, "d": d, "d_ff": f, "experts": e, "top_k": k,
                                            "routing": "zipf" if skewed else "uniform"},
                                           {"ms": round(ms, 3), "tflops": round(tflops, 4)}))
            if not args.quick:  # a smoke run prints only; else after each config: a run cut short keeps what it measured
                write_records(HERE / "results" / ("speed_gpu.jsonl" if args.gpu else "speed.jsonl"), records)


if __name__ == "__main__":
    sys.exit(main())
