"""Tile sweep for the compiled kernels (GPU only): fwd+bwd time and each kernel's share on a
large and a fine-grained config (bf16). By default: the chosen tiles with B2's variants
(`experts.GPU_DOWN_WEIGHT_GRAD_TILES`, and B2 reading the s * h that B1 writes:
`experts.B2_READS_B1_OUTPUT`) and B1's (`experts.GPU_ACT_GRAD_TILES`), then under the "full" and "recompute" checkpoints; `--tiles` sweeps `experts.GPU_TILES` settings instead. Prints a table;
records nothing (the chosen tiles' figures come from bench_speed). `--seconds` caps the sweep.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

from gpukernels_common.bench import device_time_us, time_fn
from moeblaze import experts, moe_experts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import problem  # noqa: E402

KEYS = ("bm", "bn", "bk", "num_warps", "num_stages")
SETTINGS = [  # in KEYS order
    (64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 8, 4), (64, 128, 64, 4, 3), (128, 128, 32, 8, 4),
]
CONFIGS = [(32768, 2048, 8192, 16, 2), (40960, 768, 256, 128, 8)]
# (label, GPU_DOWN_WEIGHT_GRAD_TILES, GPU_ACT_GRAD_TILES, checkpoint) under the chosen GPU_TILES
# (None: the chosen one); "B2 reads B1" sets experts.B2_READS_B1_OUTPUT (B1 writes s * h, B2 reads it
# instead of recomputing the activation). B2's earlier tile variants (bd=128 bm=128, 4 stages,
# bm=32, bf=64) lost to the chosen bd=256 bm=64 on an H200 and are not repeated.
VARIANTS = [
    ("chosen", None, None, "preact"),
    ("B2 reads B1", None, None, "preact"),
    ("B2 reads B1 bd=128 bm=128", {}, None, "preact"),
    ("B1 bn=64", None, {"bn": 64}, "preact"),
    ("B1 bn=64 4 stages", None, {"bn": 64, "num_stages": 4}, "preact"),
    ("B2 reads B1, B1 bn=64", None, {"bn": 64}, "preact"),
    ("h saved", None, None, "full"),
    ("chosen", None, None, "recompute"),
]


def kernel_ms(fn, reps=3) -> dict:
    """CUDA milliseconds per call of each kernel, by the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = collections.Counter()
    for event in prof.key_averages():
        total = device_time_us(event)
        if total:
            out[event.key[:28]] += total / 1e3 / reps
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--tiles", action="store_true", help="sweep GPU_TILES settings (default: weight-gradient variants)")
    args = parser.parse_args()
    start = time.time()
    dtype, device = torch.bfloat16, "cuda"
    inputs = []
    for shape in CONFIGS:
        inputs.append((shape, *problem(*shape, False, dtype, device)))
    chosen, chosen_b2, chosen_b1 = dict(experts.GPU_TILES), dict(experts.GPU_DOWN_WEIGHT_GRAD_TILES), dict(experts.GPU_ACT_GRAD_TILES)
    first = {}
    if args.tiles:
        runs = [(f"tiles={setting}", dict(zip(KEYS, setting)), chosen_b2, chosen_b1, "preact") for setting in SETTINGS]
    else:
        runs = [(label, chosen, chosen_b2 if b2 is None else b2, chosen_b1 if b1 is None else b1, mode)
                for label, b2, b1, mode in VARIANTS]
    for label, tiles, b2, b1, mode in runs:
        if time.time() - start > args.seconds:
            print(f"stopped: {args.seconds:.0f} s spent")
            break
        experts.GPU_TILES.update(tiles)
        experts.GPU_DOWN_WEIGHT_GRAD_TILES = b2
        experts.GPU_ACT_GRAD_TILES = b1
        experts.B2_READS_B1_OUTPUT = label.startswith("B2 reads B1")
        label = f"{label} checkpoint={mode}"
        for shape, tensors, dy in inputs:
            t, d, f, e, k = shape

            def step(tensors=tensors, dy=dy):
                moe_experts(*tensors, checkpoint=mode).backward(dy)

            try:
                leaves = [t for t in tensors if t.requires_grad]
                for leaf in leaves:
                    leaf.grad = None
                out = moe_experts(*tensors, checkpoint=mode)
                out.backward(dy)
                got = [out.detach().float()] + [leaf.grad.float() for leaf in leaves]
                ref = first.setdefault(shape, got)  # the first run's output and gradients
                err = max(float((g - r).norm() / r.norm()) for g, r in zip(got, ref))
                ms = time_fn(step, device=device)["ms"]
                kernels = kernel_ms(step)
            except Exception as error:  # a setting past the chip's shared memory or registers
                print(f"{label} T={t} d={d} d_ff={f} E={e} k={k}: {type(error).__name__}: {str(error)[:200]}")
                continue
            tflops = 18 * t * k * d * f / (ms * 1e-3) / 1e12
            top = " ".join(f"{name.split('(')[0]}={v:.2f}" for name, v in kernels.most_common(7))
            print(f"{label} T={t} d={d} d_ff={f} E={e} k={k}: {ms:8.3f} ms {tflops:6.1f} TFLOP/s err(out, grads)={err:.1e} | {top}")

if __name__ == "__main__":
    sys.exit(main())
