"""Activation memory: bytes saved for backward per token (saved-tensor hooks, exact on the CPU).

Providers on the same routed tokens (bf16):
- `moeblaze preact` / `moeblaze recompute`: this package's experts (the Triton kernels save the
  same tensors as the reference path measured here);
- `loop`: a per-expert loop with ordinary autograd (moeblaze.moe_reference);
- `grouped_mm (torchtitan-style)`: permute x into a [T*k, d] buffer, torch._grouped_mm for the
  gate/up/down projections, SiLU*up, then weight and un-permute (the common PyTorch path).
Parameters are excluded; routing indices count. Floor: 2d + 4k*d_ff bytes per token (bf16 x
plus the pre-activations a and b) plus routing indices.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from gpukernels_common.bench import BenchRecord, bench_args, write_records
from moeblaze import dispatch, moe_experts, moe_reference

HERE = Path(__file__).resolve().parent


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


def main():
    args = bench_args(gpu_help="(memory is measured exactly on the CPU)")
    dtype = torch.bfloat16
    grid = [(d, 4 * d, e, k) for d in (512, 1024, 2048) for e in (4, 8, 16) for k in (1, 2, 4)]
    grid.append((1536, 256, 128, 8))
    if args.quick:
        grid = [(512, 2048, 8, 2), (1536, 256, 128, 8)]
    tokens = 64
    records = []
    for d, f, e, k in grid:
        torch.manual_seed(0)
        x = torch.randn(tokens, d, dtype=dtype, requires_grad=True)
        ids = torch.stack([torch.randperm(e)[:k] for _ in range(tokens)]).int()
        w = torch.rand(tokens, k, dtype=dtype, requires_grad=True)
        wg, wu = (torch.randn(e, d, f, dtype=dtype, requires_grad=True) for _ in range(2))
        wd = torch.randn(e, f, d, dtype=dtype, requires_grad=True)
        params = [wg, wu, wd]
        floor = 2 * d + 4 * k * f + 4 * k * 3 // 1  # + int32 routing indices (slots, positions, ids) per token
        providers = {
            "moeblaze preact": lambda: moe_experts(x, ids, w, wg, wu, wd, checkpoint="preact"),
            "moeblaze recompute": lambda: moe_experts(x, ids, w, wg, wu, wd, checkpoint="recompute"),
            "loop": lambda: moe_reference(x, ids.long(), w, wg, wu, wd),
            "grouped_mm (torchtitan-style)": lambda: grouped_mm_path(x, ids, w, wg, wu, wd),
        }
        per_token = {name: activation_bytes(fn, params) / tokens for name, fn in providers.items()}
        gm = per_token["grouped_mm (torchtitan-style)"]
        for name, b in per_token.items():
            print(f"d={d:5d} d_ff={f:5d} E={e:3d} k={k}  {name:30s} {b:10.0f} B/token  vs floor {b / floor:5.2f}x  vs grouped_mm {b / gm:5.2f}x")
            records.append(BenchRecord("activation bytes saved for backward per token (bf16)", name,
                                       {"d": d, "d_ff": f, "experts": e, "top_k": k},
                                       {"bytes_per_token": round(b, 1), "floor_bytes": floor, "x_floor": round(b / floor, 3),
                                        "x_grouped_mm": round(b / gm, 3)}))
    if args.quick:  # a smoke run: print only, keep the full figures on disk
        return
    write_records(HERE / "results" / "memory.jsonl", records)


if __name__ == "__main__":
    sys.exit(main())
