"""Routed experts: fused forward (Triton or grouped torch), recompute-not-store backward.

Saved for backward per checkpoint mode (besides x, the weights and the int32 dispatch):
- "preact" (default): the pre-activations a (and b for SwiGLU), [T*k, d_ff] each;
- "recompute": nothing more: a and b are recomputed from x in backward (least memory);
- "full": a, b and the activation output h (for debugging).
No [T*k, d] copy of x, of the expert outputs or of their gradients is ever kept: rows of x
are gathered per expert as they are needed, the router gradient is a dot product of dO with
recomputed expert outputs, and dx is accumulated per token.
"""

from __future__ import annotations

import torch

from gpukernels_common import select_backend

from .dispatch import dispatch
from .naive import ACTIVATIONS, activate

CHECKPOINTS = ("preact", "recompute", "full")
_ACT_CODE = {"swiglu": 0, "silu": 1, "gelu": 2}


def _activation_grad(a, b, dh, activation):
    """(dL/da, dL/db) from dL/dh, recomputing the elementwise activation from a (and b)."""
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(a * 0.7071067811865476))
        pdf = torch.exp(-0.5 * a * a) * 0.3989422804014327
        return dh * (cdf + a * pdf), None
    sig = torch.sigmoid(a)
    dsilu = sig * (1 + a * (1 - sig))
    if activation == "silu":
        return dh * dsilu, None
    return dh * b * dsilu, dh * a * sig


def _block_schedule(offsets: torch.Tensor, n_rows: int, n_experts: int, block_m: int):
    """Row blocks of every expert's group, from device tensors only (the grid is an upper bound)."""
    counts = (offsets[1:] - offsets[:-1]).long()
    blocks = (counts + block_m - 1) // block_m
    cum = torch.cumsum(blocks, 0)
    n_blocks = (n_rows + block_m - 1) // block_m + n_experts
    b = torch.arange(n_blocks, device=offsets.device)
    e = torch.searchsorted(cum, b, right=True)
    valid = e < n_experts
    e_c = e.clamp(max=n_experts - 1)
    row = offsets[e_c].long() + (b - (cum[e_c] - blocks[e_c])) * block_m
    return torch.where(valid, e_c, -1).to(torch.int32), torch.where(valid, row, 0).to(torch.int32), n_blocks


def _expert_groups(offsets: torch.Tensor, sorted_slots: torch.Tensor, top_k: int):
    """(expert, first row, end row, slots, tokens) for every non-empty expert group."""
    bounds = offsets.tolist()
    for e in range(offsets.numel() - 1):
        r0, r1 = bounds[e], bounds[e + 1]
        if r0 < r1:
            slots = sorted_slots[r0:r1].long()
            yield e, r0, r1, slots, torch.div(slots, top_k, rounding_mode="floor")


def _forward_triton(x, route_w, wg, wu, wd, sorted_slots, offsets, position, top_k, activation, store_pre):
    import triton

    from . import kernels

    t, d = x.shape
    n_experts, _, f = wg.shape
    rows = t * top_k
    interpret = x.device.type == "cpu"
    upcast = interpret or x.dtype == torch.float32
    bm = 16 if interpret else 64
    block_expert, block_row, n_blocks = _block_schedule(offsets, rows, n_experts, bm)
    gated = activation == "swiglu"
    a = x.new_empty(rows, f) if store_pre else x.new_empty(1)
    b = x.new_empty(rows, f) if (store_pre and gated) else x.new_empty(1)
    h = x.new_empty(rows, f)
    bn = min(64, max(16, triton.next_power_of_2(f)))
    bk = 32 if interpret else 64
    kernels.gate_up_kernel[(n_blocks, triton.cdiv(f, bn))](
        x, wg, wu if gated else wg, sorted_slots, offsets, block_expert, block_row, a, b, h, d, f, top_k,
        ACT=_ACT_CODE[activation], GATED=gated, STORE_PRE=store_pre, UPCAST=upcast, BM=bm, BN=bn, BK=bk)
    y = x.new_empty(rows, d)
    bn_d = min(64, max(16, triton.next_power_of_2(d)))
    kernels.down_kernel[(n_blocks, triton.cdiv(d, bn_d))](
        h, wd, sorted_slots, route_w, offsets, block_expert, block_row, y, d, f, UPCAST=upcast, BM=bm, BN=bn_d, BK=bk)
    out = x.new_empty(t, d)
    bt = 16
    kernels.combine_kernel[(triton.cdiv(t, bt), triton.cdiv(d, bn_d))](y, position, offsets[n_experts:], out, t, d, TOP_K=top_k,
                                                                       BT=bt, BD=bn_d)
    return out, (a if store_pre else None), (b if store_pre and gated else None), h


def _forward_torch(x, route_w, wg, wu, wd, sorted_slots, offsets, position, top_k, activation, store_pre):
    t, d = x.shape
    rows, f = t * top_k, wg.shape[2]
    gated = activation == "swiglu"
    a = x.new_empty(rows, f) if store_pre else None
    b = x.new_empty(rows, f) if store_pre and gated else None
    h = x.new_empty(rows, f)
    y = x.new_zeros(rows, d)  # rows of dropped slots (past offsets[E]) stay zero
    for e, r0, r1, slots, tokens in _expert_groups(offsets, sorted_slots, top_k):
        xe = x[tokens]
        ae = xe @ wg[e]
        be = xe @ wu[e] if gated else None
        he = activate(ae, be, activation)
        if store_pre:
            a[r0:r1] = ae
            if gated:
                b[r0:r1] = be
        h[r0:r1] = he
        y[r0:r1] = (he @ wd[e]) * route_w[slots].unsqueeze(1)
    out = y[position.long()].view(t, top_k, d).sum(1)
    return out, a, b, h


class _Experts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, route_w, wg, wu, wd, sorted_slots, offsets, position, top_k, activation, checkpoint, use_triton):
        impl = _forward_triton if use_triton else _forward_torch
        store_pre = checkpoint != "recompute"
        out, a, b, h = impl(x, route_w, wg, wu, wd, sorted_slots, offsets, position, top_k, activation, store_pre)
        ctx.top_k, ctx.activation, ctx.checkpoint = top_k, activation, checkpoint
        ctx.gated = activation == "swiglu"
        saved = [x, route_w, wg, wu if ctx.gated else None, wd, sorted_slots, offsets]
        saved += [a, b if ctx.gated else None, h if checkpoint == "full" else None]
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, route_w, wg, wu, wd, sorted_slots, offsets, a, b, h = ctx.saved_tensors
        k, act = ctx.top_k, ctx.activation
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        go_all = grad_out.to(acc)
        dx = torch.zeros(x.shape, dtype=acc, device=x.device)
        dwg = torch.zeros(wg.shape, dtype=acc, device=x.device)
        dwu = torch.zeros(wg.shape, dtype=acc, device=x.device) if ctx.gated else None
        dwd = torch.zeros(wd.shape, dtype=acc, device=x.device)
        droute = torch.zeros(route_w.shape, dtype=acc, device=x.device)
        for e, r0, r1, slots, tok in _expert_groups(offsets, sorted_slots, k):
            xe = x[tok].to(acc)
            wge, wde = wg[e].to(acc), wd[e].to(acc)
            wue = wu[e].to(acc) if ctx.gated else None
            if ctx.checkpoint == "recompute":
                ae = xe @ wge
                be = xe @ wue if ctx.gated else None
            else:
                ae = a[r0:r1].to(acc)
                be = b[r0:r1].to(acc) if ctx.gated else None
            he = h[r0:r1].to(acc) if ctx.checkpoint == "full" else activate(ae, be, act)
            go = go_all[tok]
            droute[slots] = (go * (he @ wde)).sum(1)  # router gradient from recomputed expert outputs
            gy = go * route_w[slots].to(acc).unsqueeze(1)
            dwd[e] = he.T @ gy
            da, db = _activation_grad(ae, be, gy @ wde.T, act)
            dwg[e] = xe.T @ da
            dxe = da @ wge.T
            if ctx.gated:
                dwu[e] = xe.T @ db
                dxe = dxe + db @ wue.T
            dx.index_add_(0, tok, dxe)
        return (dx.to(x.dtype), droute.to(route_w.dtype), dwg.to(wg.dtype), dwu.to(wu.dtype) if ctx.gated else None,
                dwd.to(wd.dtype), None, None, None, None, None, None, None)


def moe_experts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor,
                w_up: torch.Tensor | None, w_down: torch.Tensor, activation: str = "swiglu",
                checkpoint: str = "preact") -> torch.Tensor:
    """Functional routed-experts layer.

    x [T, d]; expert_ids [T, k] (int; E marks a slot dropped by the capacity); weights [T, k];
    w_gate [E, d, d_ff]; w_up [E, d, d_ff] (SwiGLU only, else None); w_down [E, d_ff, d]. Returns [T, d].
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, d_model], got shape {tuple(x.shape)}")
    t, d = x.shape
    if w_gate.dim() != 3 or w_gate.shape[1] != d:
        raise ValueError(f"w_gate must be [n_experts, d_model={d}, d_ff], got {tuple(w_gate.shape)}")
    n_experts, _, f = w_gate.shape
    if w_down.shape != (n_experts, f, d):
        raise ValueError(f"w_down must be [{n_experts}, {f}, {d}], got {tuple(w_down.shape)}")
    if activation == "swiglu":
        if w_up is None or w_up.shape != w_gate.shape:
            raise ValueError(f"swiglu needs w_up of shape {tuple(w_gate.shape)}, got {None if w_up is None else tuple(w_up.shape)}")
    elif w_up is not None:
        raise ValueError(f"activation {activation!r} takes no w_up (pass None)")
    if expert_ids.shape != weights.shape or expert_ids.shape[0] != t:
        raise ValueError(f"expert_ids and weights must both be [{t}, top_k], got {tuple(expert_ids.shape)} and {tuple(weights.shape)}")
    if expert_ids.shape[1] > n_experts:
        raise ValueError(f"top_k={expert_ids.shape[1]} exceeds n_experts={n_experts}")
    if expert_ids.numel() and (int(expert_ids.min()) < 0 or int(expert_ids.max()) > n_experts):
        raise ValueError(f"expert_ids must be in [0, {n_experts}] ({n_experts}: a slot dropped by the capacity)")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down), ("weights", weights)):
        if w is not None and (w.device != x.device):
            raise ValueError(f"{name} is on {w.device}, x is on {x.device}")
    # one more group collects the dropped slots (id n_experts); the experts see only the first
    # n_experts groups, so dropped slots are neither computed nor combined
    disp = dispatch(expert_ids, n_experts + 1)
    use_triton = select_backend(x).uses_triton
    tensors = [t_.contiguous() if t_ is not None else None for t_ in (x, weights.reshape(-1), w_gate, w_up, w_down)]
    return _Experts.apply(*tensors, disp.sorted_slots, disp.expert_offsets[: n_experts + 1].clone(), disp.slot_position,
                          expert_ids.shape[1], activation, checkpoint, use_triton)
