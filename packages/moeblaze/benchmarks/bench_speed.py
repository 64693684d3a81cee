"""Forward+backward speed, TFLOP/s counted as 18*T*k*d*d_ff (SwiGLU), providers interleaved.

Providers on the same routed tokens (bf16): `moeblaze` (Triton kernels on a GPU, the reference
path on the CPU), `loop` (per-expert loop, moeblaze.moe_reference), `grouped_mm
(torchtitan-style)` (permuted copy + torch._grouped_mm) and, on a GPU where `liger-kernel` is
importable, Liger-Kernel's fused MoE (`LigerFusedMoEFunction`, Triton; its autotuning off, as
`LIGER_FUSED_MOE_AUTOTUNE=0` pins one config per kernel, so that a time-boxed GPU session is not
spent in its autotuner) and, where `scattermoe` is importable, ScatterMoE's `GLUMLP` (Triton; no
wheel: `bash tools/gpu_session.sh --fetch-deps` exports its source from a local mirror into
.gpu-deps/anchors/src, which the GPU session puts on PYTHONPATH; anchors.py maps the weights). Each
anchor first prints its relative difference from moeblaze's output on the config. Without --gpu:
one tiny CPU sanity timing (not a performance figure).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from gpukernels_common.bench import BenchRecord, bench_args, time_fn, write_records
from moeblaze import moe_experts, moe_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchors import scattermoe_provider, scattermoe_weights  # noqa: E402
from bench_memory import grouped_mm_path  # noqa: E402

HERE = Path(__file__).resolve().parent


def routing(tokens, e, k, skewed, device):
    """(tokens, k) distinct experts per token: uniform, or Zipf-like (expert i ~ 1/(i+1))."""
    p = 1.0 / torch.arange(1, e + 1, dtype=torch.float32) if skewed else torch.ones(e)
    return torch.multinomial(p.expand(tokens, e), k).int().to(device)


def problem(t, d, f, e, k, skewed, dtype, device):
    """((x, ids, w, wg, wu, wd), dy): one config's inputs, weights scaled to unit-variance outputs."""
    torch.manual_seed(0)
    x = torch.randn(t, d, dtype=dtype, device=device, requires_grad=True)
    ids = routing(t, e, k, skewed, device)
    w = torch.rand(t, k, dtype=dtype, device=device, requires_grad=True)
    wg, wu = (torch.randn(e, d, f, dtype=dtype, device=device).mul_(d ** -0.5).requires_grad_() for _ in range(2))
    wd = torch.randn(e, f, d, dtype=dtype, device=device).mul_(f ** -0.5).requires_grad_()
    return (x, ids, w, wg, wu, wd), torch.randn(t, d, dtype=dtype, device=device)


def liger_provider():
    """Liger-Kernel's fused MoE as `fn(x, ids, w, gate_up, down)` (its weight layout), or None where it
    is not importable."""
    os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except ImportError as error:
        print(f"liger-kernel not importable ({error}): not measured")
        return None

    def run(x, ids, w, gate_up, down):
        return LigerFusedMoEFunction.apply(x, gate_up, down, ids, w)

    return run


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
    liger = liger_provider() if args.gpu else None
    scattermoe = scattermoe_provider() if args.gpu else None
    records = []
    for t, d, f, e, k in grid:
        for skewed in (False, True):
            (x, ids, w, wg, wu, wd), dy = problem(t, d, f, e, k, skewed, dtype, device)
            providers = {
                "moeblaze": lambda: moe_experts(x, ids, w, wg, wu, wd).backward(dy),
                "loop": lambda: moe_reference(x, ids.long(), w, wg, wu, wd).backward(dy),
                "grouped_mm (torchtitan-style)": lambda: grouped_mm_path(x, ids, w, wg, wu, wd).backward(dy),
            }
            if liger is not None:
                # its layout: gate and up stacked as (E, 2*d_ff, d), down as (E, d, d_ff)
                gate_up = torch.cat([wg.detach().transpose(1, 2), wu.detach().transpose(1, 2)], dim=1).contiguous().requires_grad_()
                down = wd.detach().transpose(1, 2).contiguous().requires_grad_()
                with torch.no_grad():  # the same function, or its timing means nothing
                    ours, theirs = moe_experts(x, ids, w, wg, wu, wd).float(), liger(x, ids, w, gate_up, down).float()
                    print(f"liger fused_moe vs moeblaze: relative difference {float((theirs - ours).norm() / ours.norm()):.2e}")
                providers["liger fused_moe 0.8 (autotune off)"] = lambda: liger(x, ids, w, gate_up, down).backward(dy)
            if scattermoe is not None:
                w_in, w_out = scattermoe_weights(wg, wu, wd)  # [E, 2*d_ff, d] (up, then gate), [E, d, d_ff]
                try:  # source from a mirror, its torch.compile'd sort on this machine: a failure drops it, not the run
                    with torch.no_grad():
                        ours, theirs = moe_experts(x, ids, w, wg, wu, wd).float(), scattermoe(x, ids, w, w_in, w_out).float()
                    print(f"scattermoe GLUMLP vs moeblaze: relative difference {float((theirs - ours).norm() / ours.norm()):.2e}")
                    scattermoe(x, ids, w, w_in, w_out).backward(dy)  # its backward too, before any timing
                    providers["scattermoe GLUMLP"] = lambda: scattermoe(x, ids, w, w_in, w_out).backward(dy)
                except Exception as error:  # noqa: BLE001 (whatever it raises, the other providers still run)
                    print(f"scattermoe GLUMLP failed ({type(error).__name__}: {error}): not measured from here on")
                    scattermoe = None
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
