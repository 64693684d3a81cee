"""Triton kernels (imported only when a Triton backend runs).

Activations are computed in fp32 registers; under the interpreter every operand is upcast to
fp32 before `tl.dot` (its bf16 dot is wrong), on the GPU 16-bit operands go to the tensor cores.
"""

import triton
import triton.language as tl

SWIGLU, SILU, GELU = 0, 1, 2


@triton.jit
def dispatch_kernel(ids_ptr, n, sorted_ptr, pos_ptr, offsets_ptr, E, BLOCK: tl.constexpr):
    # program e: offset = #slots routed to experts < e; then place e's slots in slot order
    e = tl.program_id(0)
    start = 0
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        v = tl.load(ids_ptr + offs, mask=offs < n, other=E)
        start += tl.sum((v < e).to(tl.int32), axis=0)
    tl.store(offsets_ptr + e, start)
    if e == E - 1:
        tl.store(offsets_ptr + E, n)
    running = start
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        v = tl.load(ids_ptr + offs, mask=offs < n, other=E)
        sel = v == e
        rank = tl.cumsum(sel.to(tl.int32), axis=0)
        dst = running + rank - 1
        tl.store(sorted_ptr + dst, offs, mask=sel)
        tl.store(pos_ptr + offs, dst, mask=sel)
        running += tl.sum(sel.to(tl.int32), axis=0)


@triton.jit
def _act(a, b, ACT: tl.constexpr):
    if ACT == 0:
        return a * tl.sigmoid(a) * b
    elif ACT == 1:
        return a * tl.sigmoid(a)
    else:
        return 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))


@triton.jit
def _block_rows(block_expert_ptr, block_row_ptr, offsets_ptr, BM: tl.constexpr):
    """This program's rows of one expert's group (from the host-free block schedule)."""
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m)
    row0 = tl.load(block_row_ptr + pid_m)
    e_safe = tl.maximum(e, 0)
    end = tl.load(offsets_ptr + e_safe + 1)
    rows = row0 + tl.arange(0, BM)
    rmask = rows < tl.where(e >= 0, end, 0)  # idle blocks (e = -1) touch nothing
    return e_safe, rows, rmask


@triton.jit
def gate_up_kernel(x_ptr, wg_ptr, wu_ptr, slots_ptr, offsets_ptr, block_expert_ptr, block_row_ptr,
                   a_ptr, b_ptr, h_ptr, D, F, TOP_K,
                   ACT: tl.constexpr, GATED: tl.constexpr, STORE_PRE: tl.constexpr, UPCAST: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Rows of one expert's group: gather x rows while loading, gate and up GEMMs share each x tile."""
    pid_n = tl.program_id(1)
    e_safe, rows, rmask = _block_rows(block_expert_ptr, block_row_ptr, offsets_ptr, BM)
    tokens = tl.load(slots_ptr + rows, mask=rmask, other=0) // TOP_K
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < F
    acc_a = tl.zeros((BM, BN), dtype=tl.float32)
    acc_b = tl.zeros((BM, BN), dtype=tl.float32)
    w_base = e_safe.to(tl.int64) * D * F
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < D
        xt = tl.load(x_ptr + tokens.to(tl.int64)[:, None] * D + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & cmask[None, :]
        wg = tl.load(wg_ptr + w_base + kk[:, None] * F + cols[None, :], mask=wmask, other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wg = wg.to(tl.float32)
        acc_a += tl.dot(xt, wg)
        if GATED:
            wu = tl.load(wu_ptr + w_base + kk[:, None] * F + cols[None, :], mask=wmask, other=0.0)
            if UPCAST:
                wu = wu.to(tl.float32)
            acc_b += tl.dot(xt, wu)
    h = _act(acc_a, acc_b, ACT)
    out = rows.to(tl.int64)[:, None] * F + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    if STORE_PRE:
        tl.store(a_ptr + out, acc_a.to(a_ptr.dtype.element_ty), mask=omask)
        if GATED:
            tl.store(b_ptr + out, acc_b.to(b_ptr.dtype.element_ty), mask=omask)
    tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=omask)


@triton.jit
def down_kernel(h_ptr, wd_ptr, slots_ptr, route_w_ptr, offsets_ptr, block_expert_ptr, block_row_ptr, y_ptr, D, F,
                UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y[row] = routing_weight[slot] * (h[row] @ W_down[e]), rows in expert-grouped order."""
    pid_n = tl.program_id(1)
    e_safe, rows, rmask = _block_rows(block_expert_ptr, block_row_ptr, offsets_ptr, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < D
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    w_base = e_safe.to(tl.int64) * F * D
    for k0 in range(0, F, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < F
        ht = tl.load(h_ptr + rows.to(tl.int64)[:, None] * F + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wd = tl.load(wd_ptr + w_base + kk[:, None] * D + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:
            ht = ht.to(tl.float32)
            wd = wd.to(tl.float32)
        acc += tl.dot(ht, wd)
    slots = tl.load(slots_ptr + rows, mask=rmask, other=0)
    rw = tl.load(route_w_ptr + slots, mask=rmask, other=0.0).to(tl.float32)
    acc = acc * rw[:, None]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def combine_kernel(y_ptr, pos_ptr, kept_ptr, out_ptr, T, D, TOP_K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """out[t] = sum_j y[position[t*k + j]]: a deterministic gather-sum back to token order. Rows at
    or past *kept_ptr (slots dropped by the capacity, never computed) count as zero."""
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    tmask = tok < T
    mask = tmask[:, None] & (cols < D)[None, :]
    kept = tl.load(kept_ptr)
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for j in range(TOP_K):
        p = tl.load(pos_ptr + tok * TOP_K + j, mask=tmask, other=0)
        acc += tl.load(y_ptr + p.to(tl.int64)[:, None] * D + cols[None, :], mask=mask & (p < kept)[:, None], other=0.0).to(tl.float32)
    tl.store(out_ptr + tok.to(tl.int64)[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
