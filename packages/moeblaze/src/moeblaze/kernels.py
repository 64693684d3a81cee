"""Triton kernels (imported only when a Triton backend runs).

Activations are computed in fp32 registers; under the interpreter every operand is upcast to
fp32 before `tl.dot` (its bf16 dot is wrong), on the GPU 16-bit operands go to the tensor cores.
Rows are in expert-grouped order (row r reads token sorted_slots[r] // top_k); the row-block
kernels take their expert and first row from the host-free block schedule. Expert weights are
read through their strides (gate and up share one set), so views such as transformers'
transposed, concatenated layout need no copy; weight gradients are written contiguous.

Backward (no atomics, every reduction in a fixed order, so gradients are deterministic):
- `down_weight_grad_kernel` (B2): dW_down[e] = (s * h)^T dO, h recomputed from a (and b), or
  s * h read from a buffer B1 wrote (`experts.B2_READS_B1_OUTPUT`; B1 then runs first);
- `act_grad_kernel` (B1): dh = dO W_down^T, router gradient <dh, h> (per d_ff tile, summed
  after), then da (and db);
- `gate_up_weight_grad_kernel` (B3): dW_gate[e], dW_up[e] = x^T [da | db];
- `input_grad_kernel` (B4): per grouped row da W_gate^T + db W_up^T, then `combine_kernel`
  sums each token's k rows.
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
def _act_grad(a, b, dh, ACT: tl.constexpr):
    """(dL/da, dL/db) from dL/dh, recomputing the activation's derivative from a (and b);
    the non-gated activations return dL/da twice (the second is unused)."""
    if ACT == 2:
        cdf = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476))
        pdf = tl.exp(-0.5 * a * a) * 0.3989422804014327
        da = dh * (cdf + a * pdf)
        return da, da
    sig = tl.sigmoid(a)
    dsilu = sig * (1.0 + a * (1.0 - sig))
    if ACT == 1:
        return dh * dsilu, dh * dsilu
    return dh * b * dsilu, dh * a * sig


@triton.jit
def _mm_operand(t, UPCAST: tl.constexpr):
    """A `tl.dot` operand: upcast to fp32 under the interpreter (its 16-bit dot is wrong), else as is."""
    if UPCAST:  # one return statement: the compiler checks every return's type, taken or not
        t = t.to(tl.float32)
    return t


@triton.jit
def _rows_times_weight(acc, a_ptr, rows, rmask, w_ptr, w_base, stride_k, stride_n, cols, cmask, K,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr, BK: tl.constexpr):
    """acc += A[rows, :K] @ W[:K, cols]: A row-major [*, K], W read through its strides (so a
    transposed or sliced weight view needs no copy)."""
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        at = tl.load(a_ptr + rows.to(tl.int64)[:, None] * K + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(w_ptr + w_base + kk[:, None] * stride_k + cols[None, :] * stride_n,
                     mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.dot(_mm_operand(at, UPCAST), _mm_operand(wt, UPCAST), input_precision=PRECISION)
    return acc


@triton.jit
def _expert_weight_tile(offsets_ptr, F, D, BF: tl.constexpr, BD: tl.constexpr):
    """A weight-gradient program (d tile, d_ff tile, expert e): e, the tiles' columns and masks,
    and the first and end row of e's group (loop bounds read on the device). d tiles vary fastest,
    so the programs running together share an expert's d_ff tile (its activation rows, the
    largest read) in L2: 79.5 -> 73.8 ms fwd+bwd against experts fastest (sweep_tiles.py, H200)."""
    fcols = tl.program_id(1) * BF + tl.arange(0, BF)
    dcols = tl.program_id(0) * BD + tl.arange(0, BD)
    e = tl.program_id(2)
    return e, fcols, fcols < F, dcols, dcols < D, tl.load(offsets_ptr + e), tl.load(offsets_ptr + e + 1)


@triton.jit
def _activation_tile(a_ptr, b_ptr, h_ptr, offs, mask, ACT: tl.constexpr, GATED: tl.constexpr, SAVED_H: tl.constexpr):
    """(a, b, h) in fp32 at `offs`: h loaded when saved (checkpoint "full"), else recomputed."""
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = a
    if GATED:
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SAVED_H:
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        h = _act(a, b, ACT)
    return a, b, h


@triton.jit
def _block_rows(block_expert_ptr, block_row_ptr, offsets_ptr, block, BM: tl.constexpr):
    """Row block `block`'s rows of one expert's group (from the host-free block schedule)."""
    e = tl.load(block_expert_ptr + block)
    row0 = tl.load(block_row_ptr + block)
    e_safe = tl.maximum(e, 0)
    end = tl.load(offsets_ptr + e_safe + 1)
    rows = row0 + tl.arange(0, BM)
    rmask = rows < tl.where(e >= 0, end, 0)  # idle blocks (e = -1) touch nothing
    return e_safe, rows, rmask


@triton.jit
def gate_up_kernel(x_ptr, wg_ptr, wu_ptr, slots_ptr, offsets_ptr, block_expert_ptr, block_row_ptr,
                   a_ptr, b_ptr, h_ptr, D, F, TOP_K, w_stride_e, w_stride_d, w_stride_f,
                   ACT: tl.constexpr, GATED: tl.constexpr, STORE_PRE: tl.constexpr, STORE_H: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Rows of one expert's group: gather x rows while loading, gate and up GEMMs share each x tile.
    The forward stores h (and a, b unless checkpoint="recompute"); the recompute backward only a, b."""
    pid_n = tl.program_id(1)
    e_safe, rows, rmask = _block_rows(block_expert_ptr, block_row_ptr, offsets_ptr, tl.program_id(0), BM)
    tokens = tl.load(slots_ptr + rows, mask=rmask, other=0) // TOP_K
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < F
    acc_a = tl.zeros((BM, BN), dtype=tl.float32)
    acc_b = tl.zeros((BM, BN), dtype=tl.float32)
    w_base = e_safe.to(tl.int64) * w_stride_e
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < D
        xt = tl.load(x_ptr + tokens.to(tl.int64)[:, None] * D + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & cmask[None, :]
        w_offs = w_base + kk[:, None] * w_stride_d + cols[None, :] * w_stride_f
        wg = tl.load(wg_ptr + w_offs, mask=wmask, other=0.0)
        xt = _mm_operand(xt, UPCAST)
        acc_a += tl.dot(xt, _mm_operand(wg, UPCAST), input_precision=PRECISION)
        if GATED:
            wu = tl.load(wu_ptr + w_offs, mask=wmask, other=0.0)
            acc_b += tl.dot(xt, _mm_operand(wu, UPCAST), input_precision=PRECISION)
    out = rows.to(tl.int64)[:, None] * F + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    if STORE_PRE:
        tl.store(a_ptr + out, acc_a.to(a_ptr.dtype.element_ty), mask=omask)
        if GATED:
            tl.store(b_ptr + out, acc_b.to(b_ptr.dtype.element_ty), mask=omask)
    if STORE_H:
        tl.store(h_ptr + out, _act(acc_a, acc_b, ACT).to(h_ptr.dtype.element_ty), mask=omask)


@triton.jit
def down_kernel(h_ptr, wd_ptr, slots_ptr, route_w_ptr, offsets_ptr, block_expert_ptr, block_row_ptr, y_ptr, D, F,
                wd_stride_e, wd_stride_f, wd_stride_d, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y[row] = routing_weight[slot] * (h[row] @ W_down[e]), rows in expert-grouped order."""
    pid_n = tl.program_id(1)
    e_safe, rows, rmask = _block_rows(block_expert_ptr, block_row_ptr, offsets_ptr, tl.program_id(0), BM)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < D
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _rows_times_weight(acc, h_ptr, rows, rmask, wd_ptr, e_safe.to(tl.int64) * wd_stride_e, wd_stride_f, wd_stride_d,
                             cols, cmask, F, UPCAST, PRECISION, BK)
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


@triton.jit
def down_weight_grad_kernel(go_ptr, a_ptr, b_ptr, h_ptr, slots_ptr, route_w_ptr, offsets_ptr, dwd_ptr, D, F, TOP_K,
                            ACT: tl.constexpr, GATED: tl.constexpr, SAVED_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                            SCALED_H: tl.constexpr, BM: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr):
    """B2, program (d tile, f tile, e): dW_down[e] = (s * h)^T dO[token] over expert e's rows.
    SCALED_H: h_ptr holds s * h, written by B1 (both operands go to the dot as loaded); else
    h is recomputed from a (and b), or loaded when saved, and scaled here. An expert without rows
    writes zeros."""
    e, fcols, fmask, dcols, dmask, start, end = _expert_weight_tile(offsets_ptr, F, D, BF, BD)
    acc = tl.zeros((BF, BD), dtype=tl.float32)
    for r0 in range(start, end, BM):
        rows = r0 + tl.arange(0, BM)
        rmask = rows < end
        slots = tl.load(slots_ptr + rows, mask=rmask, other=0)
        tokens = slots // TOP_K
        go = tl.load(go_ptr + tokens.to(tl.int64)[:, None] * D + dcols[None, :], mask=rmask[:, None] & dmask[None, :],
                     other=0.0)
        # (s * h)^T tile [BF, BM], loaded transposed
        h_offs = rows.to(tl.int64)[None, :] * F + fcols[:, None]
        h_mask = fmask[:, None] & rmask[None, :]
        if SCALED_H:
            sht = tl.load(h_ptr + h_offs, mask=h_mask, other=0.0).to(go.dtype)  # in dO's dtype, as below
        else:
            # the routing weight scales h, already in fp32 registers, so that dO goes to the dot as
            # loaded (no register round trip of the larger tile)
            rw = tl.load(route_w_ptr + slots, mask=rmask, other=0.0).to(tl.float32)
            _, _, ht = _activation_tile(a_ptr, b_ptr, h_ptr, h_offs, h_mask, ACT, GATED, SAVED_H)
            sht = (ht * rw[None, :]).to(go.dtype)  # operands in the input dtype, as in the forward
        acc += tl.dot(_mm_operand(sht, UPCAST), _mm_operand(go, UPCAST), input_precision=PRECISION)
    tl.store(dwd_ptr + e.to(tl.int64) * F * D + fcols[:, None] * D + dcols[None, :], acc.to(dwd_ptr.dtype.element_ty),
             mask=fmask[:, None] & dmask[None, :])


@triton.jit
def act_grad_kernel(go_ptr, wd_ptr, a_ptr, b_ptr, h_ptr, slots_ptr, route_w_ptr, offsets_ptr, block_expert_ptr,
                    block_row_ptr, da_ptr, db_ptr, droute_parts_ptr, sh_ptr, D, F, TOP_K, n_rows, wd_stride_e, wd_stride_f,
                    wd_stride_d, ACT: tl.constexpr, GATED: tl.constexpr, SAVED_H: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr, STORE_SH: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """B1, program (d_ff tile, row block), d_ff tiles fastest (the programs running together share
    the block's gathered dO rows): dh = dO[token] W_down[e]^T for the tile; the tile's share of the
    router gradient <dh, h> goes to its own row of droute_parts [d_ff tiles, rows], summed after in
    a fixed order (deterministic, no atomics); da (and db) from s * dh. One program per tile, not
    per row block: the tiles' epilogues (a, b in, da, db out) overlap other programs' products.
    da/db may alias a/b: each tile is read before it is overwritten, by this program only.
    STORE_SH: also writes s * h to sh_ptr (grouped rows, [rows, F]) for B2 to read."""
    n_tiles = tl.cdiv(F, BN)
    f_tile = tl.program_id(0) % n_tiles
    e_safe, rows, rmask = _block_rows(block_expert_ptr, block_row_ptr, offsets_ptr, tl.program_id(0) // n_tiles, BM)
    slots = tl.load(slots_ptr + rows, mask=rmask, other=0)
    tokens = slots // TOP_K
    rw = tl.load(route_w_ptr + slots, mask=rmask, other=0.0).to(tl.float32)
    w_base = e_safe.to(tl.int64) * wd_stride_e
    cols = f_tile * BN + tl.arange(0, BN)
    cmask = cols < F
    dh = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < D
        go = tl.load(go_ptr + tokens.to(tl.int64)[:, None] * D + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                     other=0.0)
        wdt = tl.load(wd_ptr + w_base + cols[None, :] * wd_stride_f + kk[:, None] * wd_stride_d,
                      mask=kmask[:, None] & cmask[None, :], other=0.0)
        dh += tl.dot(_mm_operand(go, UPCAST), _mm_operand(wdt, UPCAST), input_precision=PRECISION)
    out = rows.to(tl.int64)[:, None] * F + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    a, b, h = _activation_tile(a_ptr, b_ptr, h_ptr, out, omask, ACT, GATED, SAVED_H)
    tl.store(droute_parts_ptr + f_tile.to(tl.int64) * n_rows + rows, tl.sum(dh * h, axis=1), mask=rmask)
    if STORE_SH:
        tl.store(sh_ptr + out, (h * rw[:, None]).to(sh_ptr.dtype.element_ty), mask=omask)
    da, db = _act_grad(a, b, dh * rw[:, None], ACT)
    tl.store(da_ptr + out, da.to(da_ptr.dtype.element_ty), mask=omask)
    if GATED:
        tl.store(db_ptr + out, db.to(db_ptr.dtype.element_ty), mask=omask)


@triton.jit
def gate_up_weight_grad_kernel(x_ptr, da_ptr, db_ptr, slots_ptr, offsets_ptr, dwg_ptr, dwu_ptr, D, F, TOP_K,
                               GATED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                               BM: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    """B3, program (d tile, f tile, e): dW_gate[e] = x[token]^T da, dW_up[e] = x[token]^T db over
    expert e's rows, sharing each gathered x tile. An expert without rows writes zeros."""
    e, fcols, fmask, dcols, dmask, start, end = _expert_weight_tile(offsets_ptr, F, D, BF, BD)
    acc_g = tl.zeros((BD, BF), dtype=tl.float32)
    acc_u = tl.zeros((BD, BF), dtype=tl.float32)
    for r0 in range(start, end, BM):
        rows = r0 + tl.arange(0, BM)
        rmask = rows < end
        tokens = tl.load(slots_ptr + rows, mask=rmask, other=0) // TOP_K
        # x^T tile [BD, BM], gathered and loaded transposed
        xt = tl.load(x_ptr + tokens.to(tl.int64)[None, :] * D + dcols[:, None], mask=dmask[:, None] & rmask[None, :],
                     other=0.0)
        xt = _mm_operand(xt, UPCAST)
        offs = rows.to(tl.int64)[:, None] * F + fcols[None, :]
        gmask = rmask[:, None] & fmask[None, :]
        da = tl.load(da_ptr + offs, mask=gmask, other=0.0)
        acc_g += tl.dot(xt, _mm_operand(da, UPCAST), input_precision=PRECISION)
        if GATED:
            db = tl.load(db_ptr + offs, mask=gmask, other=0.0)
            acc_u += tl.dot(xt, _mm_operand(db, UPCAST), input_precision=PRECISION)
    w_offs = e.to(tl.int64) * D * F + dcols[:, None] * F + fcols[None, :]
    wmask = dmask[:, None] & fmask[None, :]
    tl.store(dwg_ptr + w_offs, acc_g.to(dwg_ptr.dtype.element_ty), mask=wmask)
    if GATED:
        tl.store(dwu_ptr + w_offs, acc_u.to(dwu_ptr.dtype.element_ty), mask=wmask)


@triton.jit
def input_grad_kernel(da_ptr, db_ptr, wg_ptr, wu_ptr, offsets_ptr, block_expert_ptr, block_row_ptr, dx_rows_ptr, D, F,
                      w_stride_e, w_stride_d, w_stride_f, GATED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """B4, one row block: dx_rows[row] = da W_gate[e]^T + db W_up[e]^T (grouped order; summed per
    token afterwards by `combine_kernel`)."""
    pid_n = tl.program_id(1)
    e_safe, rows, rmask = _block_rows(block_expert_ptr, block_row_ptr, offsets_ptr, tl.program_id(0), BM)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < D
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    w_base = e_safe.to(tl.int64) * w_stride_e
    # W^T tiles [BK, BN]: the reduction runs over d_ff (stride f), the output columns over d
    acc = _rows_times_weight(acc, da_ptr, rows, rmask, wg_ptr, w_base, w_stride_f, w_stride_d, cols, cmask, F, UPCAST, PRECISION, BK)
    if GATED:
        acc = _rows_times_weight(acc, db_ptr, rows, rmask, wu_ptr, w_base, w_stride_f, w_stride_d, cols, cmask, F, UPCAST, PRECISION, BK)
    tl.store(dx_rows_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], acc.to(dx_rows_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])
