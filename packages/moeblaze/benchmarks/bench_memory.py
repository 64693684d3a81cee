"""Activation memory: bytes saved for backward per token (saved-tensor hooks, exact on the CPU).

Providers on the same routed tokens (bf16):
- `moeblaze preact` / `moeblaze recompute`: this package's experts (the Triton kernels save the
  same tensors as the reference path measured here);
- `loop`: a per-expert loop with ordinary autograd (moeblaze.moe_reference);
- `grouped_mm (torchtitan-style)`: permute x into a [T*k, d] buffer, torch._grouped_mm for the
  gate/up/down projections, SiLU*up, then weight and un-permute (the common PyTorch path);
- `scattermoe GLUMLP` where `scattermoe` is importable (anchors.py; `bash tools/gpu_session.sh
  --fetch-deps` exports it into .gpu-deps/anchors/src): its Triton kernels through the interpreter
  (bf16 values wrong there, the saved tensors' sizes exact), so at 16 tokens (the interpreter
  takes seconds per expert and tile row: about 9 minutes for the whole grid on two cores);
  its first config also at 64 tokens, to show the bytes per token do not depend on the count.
  With it, moeblaze runs its PyTorch path (GKC_BACKEND=reference), as it does on the CPU anyway.
Parameters are excluded; routing indices count. Floor: 2d + 4k*d_ff bytes per token (bf16 x
plus the pre-activations a and b) plus routing indices.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from gpukernels_common.bench import BenchRecord, bench_args, write_records
from moeblaze import dispatch, moe_experts, moe_reference

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from anchors import scattermoe_provider, scattermoe_weights  # noqa: E402

SCATTERMOE_TOKENS = 16  # each interpreted kernel program costs the same at 16 tokens as at 64 for k <= 2


def activation_bytes(fn, params) -> int:
    """Distinct storages saved for backward, excluding parameter storages."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def grouped_mm_path(x, ids, w, wg, wu, wd):
    e = wg.shape[0]
    disp = dispatch(ids, e)
    tokens = disp.sorted_tokens.long()
    x_perm = x[tokens]  # the routing buffer: [T*k, d]
    offs = disp.expert_offsets[1:].to(torch.int32)
    a = torch._grouped_mm(x_perm, wg, offs=offs)
    b = torch._grouped_mm(x_perm, wu, offs=offs)
    h = F.silu(a) * b
    y = torch._grouped_mm(h, wd, offs=offs)
    y = y * w.reshape(-1)[disp.sorted_slots.long()].unsqueeze(1)
    return torch.zeros_like(x).index_add(0, tokens, y)


def routed_problem(tokens, d, f, e, k, dtype):
    torch.manual_seed(0)
    x = torch.randn(tokens, d, dtype=dtype, requires_grad=True)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(tokens)]).int()
    w = torch.rand(tokens, k, dtype=dtype, requires_grad=True)
    wg, wu = (torch.randn(e, d, f, dtype=dtype, requires_grad=True) for _ in range(2))
    wd = torch.randn(e, f, d, dtype=dtype, requires_grad=True)
    return x, ids, w, wg, wu, wd


def scattermoe_bytes(scattermoe, tokens, d, f, e, k, dtype) -> float:
    x, ids, w, wg, wu, wd = routed_problem(tokens, d, f, e, k, dtype)
    w_in, w_out = scattermoe_weights(wg, wu, wd)
    return activation_bytes(lambda: scattermoe(x, ids, w, w_in, w_out), [w_in, w_out]) / tokens


def main():
    args = bench_args(gpu_help="(memory is measured exactly on the CPU)")
    dtype = torch.bfloat16
    grid = [(d, 4 * d, e, k) for d in (512, 1024, 2048) for e in (4, 8, 16) for k in (1, 2, 4)]
    grid.append((1536, 256, 128, 8))
    if args.quick:
        grid = [(512, 2048, 8, 2), (1536, 256, 128, 8)]
    tokens = 64
    scattermoe = scattermoe_provider(interpret=True)
    if scattermoe is not None:
        os.environ["GKC_BACKEND"] = "reference"  # moeblaze's kernels were defined compiled; the interpreter is on now
    records = []
    for d, f, e, k in grid:
        x, ids, w, wg, wu, wd = routed_problem(tokens, d, f, e, k, dtype)
        params = [wg, wu, wd]
        floor = 2 * d + 4 * k * f + 4 * k * 3 // 1  # + int32 routing indices (slots, positions, ids) per token
        providers = {
            "moeblaze preact": lambda: moe_experts(x, ids, w, wg, wu, wd, checkpoint="preact"),
            "moeblaze recompute": lambda: moe_experts(x, ids, w, wg, wu, wd, checkpoint="recompute"),
            "loop": lambda: moe_reference(x, ids.long(), w, wg, wu, wd),
            "grouped_mm (torchtitan-style)": lambda: grouped_mm_path(x, ids, w, wg, wu, wd),
        }
        per_token = {(name, tokens): activation_bytes(fn, params) / tokens for name, fn in providers.items()}
        if scattermoe is not None:
            counts = (SCATTERMOE_TOKENS, tokens) if (d, f, e, k) == grid[0] else (SCATTERMOE_TOKENS,)
            for n in counts:
                per_token["scattermoe GLUMLP", n] = scattermoe_bytes(scattermoe, n, d, f, e, k, dtype)
        gm = per_token["grouped_mm (torchtitan-style)", tokens]
        for (name, n), b in per_token.items():
            print(f"d={d:5d} d_ff={f:5d} E={e:3d} k={k} T={n:3d}  {name:30s} {b:10.0f} B/token  vs floor {b / floor:5.2f}x  "
                  f"vs grouped_mm {b / gm:5.2f}x", flush=True)
            records.append(BenchRecord("activation bytes saved for backward per token (bf16)", name,
                                       {"d": d, "d_ff": f, "experts": e, "top_k": k, "tokens": n},
                                       {"bytes_per_token": round(b, 1), "floor_bytes": floor, "x_floor": round(b / floor, 3),
                                        "x_grouped_mm": round(b / gm, 3)}))
        if not args.quick:  # as it goes: a run cut short keeps what it measured
            write_records(HERE / "results" / "memory.jsonl", records)


if __name__ == "__main__":
    sys.exit(main())
