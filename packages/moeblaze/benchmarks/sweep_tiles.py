"""Tile sweep for the compiled kernels (GPU only): fwd+bwd time and each kernel's share, per
`moeblaze.experts.GPU_TILES` setting, on a large and a fine-grained config (bf16), then the chosen
tiles under the "full" and "recompute" checkpoints. Prints a table; records nothing (the chosen
tiles' figures come from bench_speed). `--seconds` caps the sweep.
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
    args = parser.parse_args()
    start = time.time()
    dtype, device = torch.bfloat16, "cuda"
    inputs = []
    for shape in CONFIGS:
        inputs.append((shape, *problem(*shape, False, dtype, device)))
    chosen = dict(experts.GPU_TILES)
    first = {}
    # the tile settings under the default checkpoint, then the chosen tiles under the other two:
    # "full" keeps h, so its backward shows what the recomputation of the activation costs
    runs = [(setting, "preact") for setting in SETTINGS] + [(None, "full"), (None, "recompute")]
    for setting, mode in runs:
        if time.time() - start > args.seconds:
            print(f"stopped: {args.seconds:.0f} s spent")
            break
        setting = setting or tuple(chosen[name] for name in KEYS)
        experts.GPU_TILES.update(zip(KEYS, setting))
        label = f"tiles={setting} checkpoint={mode}"
        for shape, tensors, dy in inputs:
            t, d, f, e, k = shape

            def step(tensors=tensors, dy=dy):
                moe_experts(*tensors, checkpoint=mode).backward(dy)

            try:
                out = moe_experts(*tensors, checkpoint=mode)
                ref = first.setdefault(shape, out.detach().float())
                err = float((out.detach().float() - ref).norm() / ref.norm())
                ms = time_fn(step, device=device)["ms"]
                kernels = kernel_ms(step)
            except Exception as error:  # a setting past the chip's shared memory or registers
                print(f"{label} T={t} d={d} d_ff={f} E={e} k={k}: {type(error).__name__}: {str(error)[:200]}")
                continue
            tflops = 18 * t * k * d * f / (ms * 1e-3) / 1e12
            top = " ".join(f"{name.split('(')[0]}={v:.2f}" for name, v in kernels.most_common(7))
            print(f"{label} T={t} d={d} d_ff={f} E={e} k={k}: {ms:8.3f} ms {tflops:6.1f} TFLOP/s err={err:.1e} | {top}")

if __name__ == "__main__":
    sys.exit(main())
