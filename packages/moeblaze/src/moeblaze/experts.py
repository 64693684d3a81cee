"""Routed experts: fused forward and backward, recompute-not-store.

Both directions run as Triton kernels (kernels.py) whenever a Triton backend is selected, else
as the per-expert PyTorch loop below (the reference backend; both give the same gradients).

Saved for backward per checkpoint mode (besides x, the weights and the int32 dispatch):
- "preact" (default): the pre-activations a (and b for SwiGLU), [T*k, d_ff] each;
- "recompute": nothing more: a and b are recomputed from x in backward (least memory);
- "full": a, b and the activation output h (for debugging).
When no backward can follow (torch.no_grad, inference_mode, no input requiring a gradient),
the forward stores no pre-activations, whatever the mode.
No [T*k, d] copy of x, of the expert outputs or of their gradients is ever kept: rows of x
are gathered per expert as they are needed, the router gradient is a dot product of dO with
recomputed expert outputs, and dx is accumulated per token.
"""

from __future__ import annotations

import torch

from gpukernels_common import Backend, env, grouped_blocks, select_backend, tracing

from .dispatch import _dispatch_unchecked
from .naive import activate, check_activation, check_expert_ids

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


def _expert_groups(offsets: torch.Tensor, sorted_slots: torch.Tensor, top_k: int):
    """(expert, first row, end row, slots, tokens) for every non-empty expert group."""
    bounds = offsets.tolist()
    for e in range(offsets.numel() - 1):
        r0, r1 = bounds[e], bounds[e + 1]
        if r0 < r1:
            slots = sorted_slots[r0:r1].long()
            yield e, r0, r1, slots, torch.div(slots, top_k, rounding_mode="floor")


# Compiled-kernel tiles for 16-bit inputs: rows per block (bm), reduction step (bk), output
# columns (bn, capped at the padded d or d_ff), and Triton's warps and pipeline stages. Chosen by
# benchmarks/sweep_tiles.py on an H200 (bf16 fwd+bwd, T=32768 d=2048 d_ff=8192 E=16 k=2: 78 ms
# against 98 ms at 64/64/64 with 4 warps; the fine-grained d=768 d_ff=256 E=128 k=8 config the same
# within 1%). fp32 inputs keep the smaller tiles: twice the bytes per stage would exceed the
# shared memory. Module state so that the sweep can try others in one process.
GPU_TILES = {"bm": 128, "bk": 64, "bn": 128, "num_warps": 8, "num_stages": 3}
GPU_TILES_FP32 = {"bm": 64, "bk": 64, "bn": 64, "num_warps": 4, "num_stages": 3}
INTERPRET_TILES = {"bm": 16, "bk": 32, "bn": 64}  # small: each interpreted program instance costs milliseconds
# B2 (the down projection's weight gradient) on 16-bit inputs: GPU_TILES with these replaced ("bd",
# "bf": its d and d_ff tiles, "bm": rows per step). It recomputes the activation once per d tile, so a wider d tile
# halves that work: 21.6 -> 15.7 ms of a 74 ms step at T=32768 d=2048 d_ff=8192 E=16 k=2 on an H200
# (sweep_tiles.py); B3 at these tiles slows from 13.0 to 23.2 ms (two [bd, bf] accumulators).
GPU_DOWN_WEIGHT_GRAD_TILES = {"bd": 256, "bm": 64}
# B1 (the activation's gradient, an epilogue-heavy product) on 16-bit inputs: GPU_TILES with these
# replaced ("bn": its d_ff tile, "num_warps", "num_stages"; its rows per block are the shared block
# schedule's). Empty until a GPU sweep picks otherwise: at bn=128 with 8 warps it compiles to 255
# registers for sm_90, at bn=64 to 182 (tools/compile_check.py).
GPU_ACT_GRAD_TILES: dict = {}
# B1 writes s * h (routing weight times activation, grouped rows, the input dtype) to a transient
# [T*k, d_ff] buffer and B2 reads it instead of recomputing the activation from a and b once per d
# tile: both of B2's operands then go to the dot as loaded. Costs that buffer's memory during the
# backward (not saved for it). Off until a GPU sweep shows it faster (sweep_tiles.py: with h saved,
# B2 took 11.2 ms against 15.9 recomputing, at T=32768 d=2048 d_ff=8192 E=16 k=2 on an H200).
B2_READS_B1_OUTPUT = False


class _Launch:
    """Tile sizes and the host-free row-block schedule shared by the forward and backward kernels."""

    def __init__(self, x, offsets, n_experts, d, f, top_k):
        import triton

        self.interpret = not env.gpu_launch_shapes(x.device)
        # the interpreter's 16-bit tl.dot is wrong, so it gets fp32 operands; fp32 inputs stay fp32
        self.upcast = self.interpret or x.dtype == torch.float32
        # fp32 operands follow torch's matmul precision: exact under "highest" (torch's default), TF32
        # tensor cores under torch.set_float32_matmul_precision("high"); 16-bit operands take no such choice
        exact = self.upcast and torch.get_float32_matmul_precision() == "highest"
        self.precision = "ieee" if exact else "tf32"
        tiles = INTERPRET_TILES if self.interpret else GPU_TILES_FP32 if x.dtype == torch.float32 else GPU_TILES
        self.bm, self.bk = tiles["bm"], tiles["bk"]
        def capped(tile, n):  # a tile no wider than n padded to a power of two (16 at least)
            return min(tile, max(16, triton.next_power_of_2(n)))

        def meta(t):  # Triton's launch options, left to the interpreter's defaults there
            return {} if self.interpret else {"num_warps": t["num_warps"], "num_stages": t["num_stages"]}

        def own(overrides):  # a kernel's own 16-bit GPU tiles over the shared ones
            return {**tiles, **overrides} if tiles is GPU_TILES else tiles

        self.bn_f, self.bn_d = capped(tiles["bn"], f), capped(tiles["bn"], d)
        self.meta = meta(tiles)
        b2 = own(GPU_DOWN_WEIGHT_GRAD_TILES)
        self.b2_bm = b2["bm"]
        self.b2_bf, self.b2_bd = capped(b2.get("bf", b2["bn"]), f), capped(b2.get("bd", b2["bn"]), d)
        self.b2_meta = meta(b2)
        b1 = own(GPU_ACT_GRAD_TILES)
        self.b1_bn, self.b1_meta = capped(b1["bn"], f), meta(b1)
        self.rows = x.shape[0] * top_k
        counts = offsets[1:] - offsets[:-1]  # the experts' row groups (dropped slots past offsets[E] excluded)
        expert, row, self.n_blocks = grouped_blocks(offsets[:-1], counts, self.rows, self.bm)
        self.block_expert, self.block_row = expert.to(torch.int32), row.to(torch.int32)

    @staticmethod
    def weight_grad_grid(n_experts, f, d, bf, bd):
        """A weight-gradient kernel's grid, d tiles fastest (see `_expert_weight_tile`)."""
        import triton

        return triton.cdiv(d, bd), triton.cdiv(f, bf), n_experts


def _gate_up(launch, x, wg, wu, sorted_slots, offsets, top_k, activation, a, b, h):
    """Run the gate/up kernel: writes a and b when given, h when given."""
    import triton

    from . import kernels

    d, f = wg.shape[1:]
    gated = activation == "swiglu"
    placeholder = x.new_empty(1)
    kernels.gate_up_kernel[(launch.n_blocks, triton.cdiv(f, launch.bn_f))](
        x, wg, wu if gated else wg, sorted_slots, offsets, launch.block_expert, launch.block_row,
        placeholder if a is None else a, placeholder if b is None else b, placeholder if h is None else h, d, f, top_k,
        *wg.stride(), ACT=_ACT_CODE[activation], GATED=gated, STORE_PRE=a is not None, STORE_H=h is not None,
        UPCAST=launch.upcast, PRECISION=launch.precision, BM=launch.bm, BN=launch.bn_f, BK=launch.bk, **launch.meta)


def _combine_rows(launch, rows_out, position, offsets, n_experts, top_k, out):
    """out[t] = sum of token t's k grouped rows (dropped slots, past offsets[E], count as zero)."""
    import triton

    from . import kernels

    t, d = out.shape
    bt = 16
    kernels.combine_kernel[(triton.cdiv(t, bt), triton.cdiv(d, launch.bn_d))](
        rows_out, position, offsets[n_experts:], out, t, d, TOP_K=top_k, BT=bt, BD=launch.bn_d)
    return out


def _forward_triton(x, route_w, wg, wu, wd, sorted_slots, offsets, position, top_k, activation, store_pre):
    import triton

    from . import kernels

    t, d = x.shape
    n_experts, _, f = wg.shape
    launch = _Launch(x, offsets, n_experts, d, f, top_k)
    gated = activation == "swiglu"
    a = x.new_empty(launch.rows, f) if store_pre else None
    b = x.new_empty(launch.rows, f) if (store_pre and gated) else None
    h = x.new_empty(launch.rows, f)
    _gate_up(launch, x, wg, wu, sorted_slots, offsets, top_k, activation, a, b, h)
    y = x.new_empty(launch.rows, d)
    kernels.down_kernel[(launch.n_blocks, triton.cdiv(d, launch.bn_d))](
        h, wd, sorted_slots, route_w, offsets, launch.block_expert, launch.block_row, y, d, f, *wd.stride(),
        UPCAST=launch.upcast, PRECISION=launch.precision, BM=launch.bm, BN=launch.bn_d, BK=launch.bk, **launch.meta)
    out = _combine_rows(launch, y, position, offsets, n_experts, top_k, x.new_empty(t, d))
    return out, a, b, h


def _backward_triton(grad_out, x, route_w, wg, wu, wd, sorted_slots, offsets, a, b, h, top_k, activation, checkpoint):
    """B1-B4 as Triton kernels; no host synchronisation, no atomics, fp32 accumulation."""
    import triton

    from . import kernels

    n_experts, d, f = wg.shape
    launch = _Launch(x, offsets, n_experts, d, f, top_k)
    gated = activation == "swiglu"
    placeholder = x.new_empty(1)
    go = grad_out.contiguous()  # e.g. out.sum().backward() hands in an expanded (stride 0) gradient
    if checkpoint == "recompute":
        a = x.new_empty(launch.rows, f)
        b = x.new_empty(launch.rows, f) if gated else None
        _gate_up(launch, x, wg, wu, sorted_slots, offsets, top_k, activation, a, b, None)
        # a and b are this backward's own buffers: B1 overwrites them with da and db
        da, db = a, b
    else:
        # a and b are saved tensors (a retain_graph=True caller runs backward again): fresh buffers
        da = torch.empty_like(a)
        db = torch.empty_like(b) if gated else None
    b_arg = b if gated else placeholder
    h_arg = h if checkpoint == "full" else placeholder
    flags = dict(ACT=_ACT_CODE[activation], GATED=gated, SAVED_H=checkpoint == "full", UPCAST=launch.upcast, PRECISION=launch.precision)

    dwd = wd.new_empty(wd.shape)  # contiguous, whatever the weight's strides
    scaled_h = x.new_empty(launch.rows, f) if B2_READS_B1_OUTPUT else None  # s * h, written by B1

    def down_weight_grad(h_in, scaled: bool):  # B2
        kernels.down_weight_grad_kernel[launch.weight_grad_grid(n_experts, f, d, launch.b2_bf, launch.b2_bd)](
            go, a, b_arg, h_in, sorted_slots, route_w, offsets, dwd, d, f, top_k, **flags, SCALED_H=scaled,
            BM=launch.b2_bm, BF=launch.b2_bf, BD=launch.b2_bd, **launch.b2_meta)

    if scaled_h is None:
        down_weight_grad(h_arg, False)  # first: it reads a and b, which B1 may overwrite
    f_tiles = triton.cdiv(f, launch.b1_bn)
    # each d_ff tile's share of the router gradient per grouped row (rows of dropped slots stay zero)
    droute_parts = torch.zeros(f_tiles, launch.rows, dtype=torch.float32, device=x.device)
    kernels.act_grad_kernel[(f_tiles * launch.n_blocks,)](
        go, wd, a, b_arg, h_arg, sorted_slots, route_w, offsets, launch.block_expert, launch.block_row, da,
        db if gated else placeholder, droute_parts, placeholder if scaled_h is None else scaled_h, d, f, top_k,
        launch.rows, *wd.stride(), **flags, STORE_SH=scaled_h is not None, BM=launch.bm, BN=launch.b1_bn, BK=launch.bk,
        **launch.b1_meta)
    if scaled_h is not None:
        down_weight_grad(scaled_h, True)
        del scaled_h  # freed before B3 and B4 allocate
    # grouped row r holds slot sorted_slots[r]: summed over the tiles in a fixed order, then put in slot order
    droute = torch.empty(route_w.numel(), dtype=route_w.dtype, device=x.device).index_copy_(0, sorted_slots.long(), droute_parts.sum(0).to(route_w.dtype))
    droute = droute.view(route_w.shape)
    dwg = wg.new_empty(wg.shape)
    dwu = wu.new_empty(wu.shape) if gated else None
    kernels.gate_up_weight_grad_kernel[launch.weight_grad_grid(n_experts, f, d, launch.bn_f, launch.bn_d)](
        x, da, db if gated else placeholder, sorted_slots, offsets, dwg, dwu if gated else placeholder, d, f, top_k,
        GATED=gated, UPCAST=launch.upcast, PRECISION=launch.precision, BM=launch.bm, BD=launch.bn_d, BF=launch.bn_f, **launch.meta)
    dx_rows = x.new_empty(launch.rows, d)  # transient [T*k, d], freed before returning
    kernels.input_grad_kernel[(launch.n_blocks, triton.cdiv(d, launch.bn_d))](
        da, db if gated else placeholder, wg, wu if gated else wg, offsets, launch.block_expert, launch.block_row, dx_rows,
        d, f, *wg.stride(), GATED=gated, UPCAST=launch.upcast, PRECISION=launch.precision, BM=launch.bm, BN=launch.bn_d, BK=launch.bk, **launch.meta)
    # slot s sits at grouped row position[s]; rebuilt from sorted_slots rather than saved
    position = torch.empty_like(sorted_slots).scatter_(
        0, sorted_slots.long(), torch.arange(launch.rows, dtype=sorted_slots.dtype, device=x.device))
    dx = _combine_rows(launch, dx_rows, position, offsets, n_experts, top_k, torch.empty_like(x))
    return dx, droute, dwg, dwu, dwd


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


def _backward_torch(grad_out, x, route_w, wg, wu, wd, sorted_slots, offsets, a, b, h, top_k, activation, checkpoint):
    """The reference backward: per-expert matmuls on gathered rows, dx accumulated per token."""
    gated = activation == "swiglu"
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    go_all = grad_out.to(acc)
    dx = torch.zeros(x.shape, dtype=acc, device=x.device)
    dwg = torch.zeros(wg.shape, dtype=acc, device=x.device)
    dwu = torch.zeros(wg.shape, dtype=acc, device=x.device) if gated else None
    dwd = torch.zeros(wd.shape, dtype=acc, device=x.device)
    droute = torch.zeros(route_w.shape, dtype=acc, device=x.device)
    for e, r0, r1, slots, tok in _expert_groups(offsets, sorted_slots, top_k):
        xe = x[tok].to(acc)
        wge, wde = wg[e].to(acc), wd[e].to(acc)
        wue = wu[e].to(acc) if gated else None
        if checkpoint == "recompute":
            ae = xe @ wge
            be = xe @ wue if gated else None
        else:
            ae = a[r0:r1].to(acc)
            be = b[r0:r1].to(acc) if gated else None
        he = h[r0:r1].to(acc) if checkpoint == "full" else activate(ae, be, activation)
        go = go_all[tok]
        droute[slots] = (go * (he @ wde)).sum(1)  # router gradient from recomputed expert outputs
        gy = go * route_w[slots].to(acc).unsqueeze(1)
        dwd[e] = he.T @ gy
        da, db = _activation_grad(ae, be, gy @ wde.T, activation)
        dwg[e] = xe.T @ da
        dxe = da @ wge.T
        if gated:
            dwu[e] = xe.T @ db
            dxe = dxe + db @ wue.T
        dx.index_add_(0, tok, dxe)
    return (dx.to(x.dtype), droute.to(route_w.dtype), dwg.to(wg.dtype), dwu.to(wu.dtype) if gated else None,
            dwd.to(wd.dtype))


class _Experts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, route_w, wg, wu, wd, sorted_slots, offsets, position, top_k, activation, checkpoint, use_triton,
                store_pre):
        impl = _forward_triton if use_triton else _forward_torch
        out, a, b, h = impl(x, route_w, wg, wu, wd, sorted_slots, offsets, position, top_k, activation, store_pre)
        ctx.top_k, ctx.activation, ctx.checkpoint, ctx.use_triton = top_k, activation, checkpoint, use_triton
        gated = activation == "swiglu"
        saved = [x, route_w, wg, wu if gated else None, wd, sorted_slots, offsets]
        saved += [a, b if gated else None, h if checkpoint == "full" else None]
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        impl = _backward_triton if ctx.use_triton else _backward_torch
        # the backward is hand-written (saved a and b are detached forward outputs): it is not
        # itself differentiable, so it runs without a graph and create_graph=True gets a clear error;
        # a backward called inside an autocast region keeps the forward's dtypes
        with torch.no_grad(), torch.autocast(grad_out.device.type, enabled=False):
            grads = impl(grad_out, *ctx.saved_tensors, ctx.top_k, ctx.activation, ctx.checkpoint)
        if torch.is_grad_enabled():  # create_graph=True
            inputs = [t for t in (grad_out, *ctx.saved_tensors) if t is not None and t.requires_grad]
            if inputs:
                grads = _refuse_double_backward(grads, inputs)
        return (*grads, None, None, None, None, None, None, None, None)


DOUBLE_BACKWARD_ERROR = ("moeblaze.moe_experts: double backward is not supported (a gradient built with "
                         "create_graph=True was differentiated again); use moeblaze.moe_reference for higher-order "
                         "gradients")


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the gradients, linked to everything they depend on, whose backward raises
    DOUBLE_BACKWARD_ERROR (torch.autograd.function.once_differentiable's idea, but reachable from
    x and the weights, so a second torch.autograd.grad gets this error rather than a graph one)."""

    @staticmethod
    def forward(ctx, n, *tensors):
        return tuple(t.detach() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def _refuse_double_backward(grads, inputs):
    present = [i for i, g in enumerate(grads) if g is not None]
    errored = _NoDoubleBackward.apply(len(present), *(grads[i] for i in present), *inputs)
    out = list(grads)
    for i, g in zip(present, errored):
        out[i] = g
    return tuple(out)


def check_expert_inputs(x, expert_ids, weights, w_gate, w_up, w_down, activation, checkpoint, n_experts, world=None):
    """Argument checks shared by the routed-experts layer and its expert-parallel form (`world`
    given), where this rank holds n_experts / world of the experts (expert ids count all n_experts)."""
    check_activation(activation)
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, d_model], got shape {tuple(x.shape)}")
    t, d = x.shape
    local = n_experts // (world or 1)
    where = "n_experts" if world is None else f"n_experts / world = {local}"
    if w_gate.dim() != 3 or w_gate.shape[:2] != (local, d) or local == 0:
        raise ValueError(f"w_gate must be [{where}, d_model={d}, d_ff], got {tuple(w_gate.shape)}")
    f = w_gate.shape[2]
    if w_down.shape != (local, f, d):
        raise ValueError(f"w_down must be [{local}, {f}, {d}], got {tuple(w_down.shape)}")
    if (w_up is not None) != (activation == "swiglu") or (w_up is not None and w_up.shape != w_gate.shape):
        expected = f"w_up of shape {tuple(w_gate.shape)}" if activation == "swiglu" else "w_up=None"
        raise ValueError(f"activation {activation!r} needs {expected}, got {None if w_up is None else tuple(w_up.shape)}")
    if expert_ids.dim() != 2 or expert_ids.shape[0] != t or expert_ids.shape != weights.shape:
        raise ValueError(f"expert_ids and weights must both be [{t}, top_k], got {tuple(expert_ids.shape)} and "
                         f"{tuple(weights.shape)}")
    if expert_ids.shape[1] < 1:
        raise ValueError(f"top_k (expert_ids.shape[1]) must be >= 1, got {expert_ids.shape[1]}")
    # top_k may exceed n_experts: a token may pick an expert twice, and transformers' expert
    # parallelism hands each rank's experts module local ids (E_local of them, plus the sentinel
    # E_local for other ranks' experts) with the global top_k (route() and MoE refuse top_k > E)
    # dtypes: both backends would otherwise disagree (one errors in a matmul, the other casts silently)
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w is not None and w.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype}, got {w.dtype} (cast the weights, or run under "
                             "torch.autocast, which casts both)")
    if not weights.is_floating_point():
        raise ValueError(f"weights (the routing weights) must be a floating-point tensor, got {weights.dtype}")
    if expert_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_ids must be an int32 or int64 tensor, got {expert_ids.dtype}")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down), ("weights", weights),
                    ("expert_ids", expert_ids)):
        if w is not None and w.device != x.device:
            raise ValueError(f"{name} is on {w.device}, x is on {x.device}")
    # the range needs the ids' values (a host synchronisation): eager only, not while torch.compile /
    # torch.export trace (fullgraph) nor on meta tensors (shape inference)
    if not (tracing() or expert_ids.is_meta):
        check_expert_ids(expert_ids, n_experts)


def moe_experts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor,
                w_up: torch.Tensor | None, w_down: torch.Tensor, activation: str = "swiglu",
                checkpoint: str = "preact") -> torch.Tensor:
    """Functional routed-experts layer.

    x [T, d]; expert_ids [T, k] (int; E marks a slot dropped by the capacity); weights [T, k];
    w_gate [E, d, d_ff]; w_up [E, d, d_ff] (SwiGLU only, else None); w_down [E, d_ff, d], each with
    any strides (the kernels read views such as transposed slices in place). Returns [T, d].
    """
    x, w_gate, w_up, w_down = _autocast(x, w_gate, w_up, w_down)
    check_expert_inputs(x, expert_ids, weights, w_gate, w_up, w_down, activation, checkpoint, w_gate.shape[0] if w_gate.dim() == 3 else 0)
    n_experts = w_gate.shape[0]
    backend = select_backend(x)
    if backend is Backend.INTERPRET and tracing():  # Dynamo would trace into the interpreter and fail obscurely
        raise RuntimeError("torch.compile / torch.export of moeblaze's experts on the Triton interpreter backend "
                           "(TRITON_INTERPRET=1 on CPU tensors) is not supported: set GKC_BACKEND=reference to trace "
                           "on the CPU, or compile on a GPU")
    use_triton = backend.uses_triton
    if use_triton and x.dtype == torch.float64:  # the kernels accumulate in fp32: float64 would be silently fp32
        raise ValueError("x is float64, which the Triton kernels do not support (they compute in fp32); "
                         "run float64 (e.g. gradcheck) with GKC_BACKEND=reference")
    weights = weights.to(x.dtype)  # the kernels and the loop both combine in x's dtype
    if not use_triton and (tracing() or x.is_meta):
        # the per-expert loop needs each expert's row count on the host: traced (or on meta) the
        # reference runs every expert on every token, masked by the routing (E/k times the FLOPs)
        return _dense_reference(x, expert_ids, weights, w_gate, w_up, w_down, activation)
    if x.shape[0] == 0:  # no tokens: an empty output (as nn.Linear gives), still in the graph of every input
        linked = sum(w[:0].sum() for w in (w_gate, w_up, w_down, weights) if w is not None)
        return x + linked
    # one more group collects the dropped slots (id n_experts); the experts see only the first
    # n_experts groups, so dropped slots are neither computed nor combined. The range of
    # expert_ids was checked above (the one host sync), so the dispatch does not check it again.
    disp = _dispatch_unchecked(expert_ids, n_experts + 1)
    if w_up is not None and w_up.stride() != w_gate.stride():  # the kernels read gate and up with one set of strides
        w_gate, w_up = w_gate.contiguous(), w_up.contiguous()
    # the weights stay as given (any strides: a view needs no copy); x and the routing weights contiguous
    tensors = [x.contiguous(), weights.reshape(-1).contiguous(), w_gate, w_up, w_down]
    # a and b are kept for a backward only: none can follow under no_grad / inference_mode or
    # when nothing requires a gradient (the forward then skips their [T*k, d_ff] stores)
    store_pre = checkpoint != "recompute" and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)
    return _Experts.apply(*tensors, disp.sorted_slots, disp.expert_offsets[: n_experts + 1].clone(), disp.slot_position,
                          expert_ids.shape[1], activation, checkpoint, use_triton, store_pre)


def _dense_reference(x, expert_ids, weights, w_gate, w_up, w_down, activation):
    """The reference without host synchronisation (for tracing and meta tensors): each expert
    on every token, weighted by the token's total routing weight on it (0 if it did not pick
    it; duplicates add up; dropped slots, id E, match no expert). Plain autograd."""
    out = x.new_zeros(x.shape)
    for e in range(w_gate.shape[0]):
        coef = torch.where(expert_ids == e, weights, torch.zeros_like(weights)).sum(1, keepdim=True)
        h = activate(x @ w_gate[e], x @ w_up[e] if w_up is not None else None, activation)
        out = out + coef * (h @ w_down[e])
    return out


def _autocast(x, w_gate, w_up, w_down):
    """Under torch.autocast, x and the expert weights cast as nn.Linear's operands are, so both
    backends compute and save in that dtype; unchanged otherwise. Autocast casts each floating
    operand but a float64 one (16-bit ones too: fp16 under a bf16 autocast becomes bf16)."""
    device = x.device.type
    if device == "meta" or not (x.is_floating_point() and torch.is_autocast_enabled(device)):
        return x, w_gate, w_up, w_down
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in (x, w_gate, w_up, w_down))
