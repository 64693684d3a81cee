"""Triton kernel (imported only when a Triton backend runs): the T-way weighted sum of the
per-task representation gradients in one pass (reads each gradient once, writes once), where
a chain of in-place multiply-adds reads and writes the accumulator T times."""

import triton
import triton.language as tl

#: gradients one launch reads; more tasks take further launches that add into the output
MAX_INPUTS = 8


@triton.jit
def _term(acc, coeff_ptr, g_ptr, offs, mask, INDEX: tl.constexpr, N_IN: tl.constexpr):
    if INDEX < N_IN:
        acc += tl.load(coeff_ptr + INDEX).to(tl.float32) * tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def weighted_sum_kernel(out_ptr, coeff_ptr, g0, g1, g2, g3, g4, g5, g6, g7, n,
                        N_IN: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    """out = [out +] sum_{i < N_IN} coeff[i] * g_i, fp32 in registers; out may alias g0."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if ACCUMULATE:
        acc = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
    acc = _term(acc, coeff_ptr, g0, offs, mask, 0, N_IN)
    acc = _term(acc, coeff_ptr, g1, offs, mask, 1, N_IN)
    acc = _term(acc, coeff_ptr, g2, offs, mask, 2, N_IN)
    acc = _term(acc, coeff_ptr, g3, offs, mask, 3, N_IN)
    acc = _term(acc, coeff_ptr, g4, offs, mask, 4, N_IN)
    acc = _term(acc, coeff_ptr, g5, offs, mask, 5, N_IN)
    acc = _term(acc, coeff_ptr, g6, offs, mask, 6, N_IN)
    acc = _term(acc, coeff_ptr, g7, offs, mask, 7, N_IN)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def balance_step_kernel(values_ptr, ema_ptr, ema_out_ptr, step_ptr, scales_ptr, coeff_ptr, weights_ptr,
                        R, T, lerp_weight, relax, keep, eps, warmup_steps, target_index,
                        KIND: tl.constexpr, HAS_EMA: tl.constexpr, TARGET: tl.constexpr, WARMUP: tl.constexpr,
                        WEIGHTED: tl.constexpr, BR: tl.constexpr, BT: tl.constexpr):
    """MultiBalance's per-step statistics in one program (about a dozen small ops otherwise, each
    a launch): the norms from the reduced statistics, the moving averages, the step count, the
    scales and the coefficients, over a [R reps, T tasks] tile. See `naive.balance_step_reference`.
    KIND: 0 no new norms (the averages as they are), 1 norms, 2 sums of squares, 3 per-sample
    sums then their row counts. TARGET: 0 max, 1 mean, 2 the task `target_index`."""
    r = tl.arange(0, BR)[:, None]
    t = tl.arange(0, BT)[None, :]
    mask = (r < R) & (t < T)
    idx = r * T + t
    if KIND == 0:
        avg = tl.load(ema_ptr + idx, mask=mask, other=0.0)
    else:
        if KIND == 1:
            v = tl.load(values_ptr + idx, mask=mask, other=0.0)
        elif KIND == 2:
            # correctly rounded, as torch's: tl.sqrt compiles to sqrt.approx.ftz, which flushes a
            # norm below ~1e-19 to 0 ("does not read" here) on a GPU; the interpreter hides it
            v = tl.sqrt_rn(tl.load(values_ptr + idx, mask=mask, other=0.0))
        else:
            rows = tl.load(values_ptr + R * T + idx, mask=mask, other=1.0)
            v = tl.div_rn(tl.load(values_ptr + idx, mask=mask, other=0.0), tl.maximum(rows, 1.0))
        # one non-finite norm anywhere (an overflowing step) leaves every average as it was
        bad = tl.sum(tl.sum(((v * 0.0) != 0.0).to(tl.int32), axis=1), axis=0)
        finite = bad == 0
        if HAS_EMA:
            old = tl.load(ema_ptr + idx, mask=mask, other=0.0)
            # torch.lerp's two-sided form, so the averages match the reference's bit for bit
            if lerp_weight < 0.5:
                mixed = old + lerp_weight * (v - old)
            else:
                mixed = v - (v - old) * (1.0 - lerp_weight)
            avg = tl.where(finite, tl.where(old != old, v, mixed), old)
        else:
            avg = tl.where(finite, v, float("nan"))
        tl.store(ema_out_ptr + idx, avg, mask=mask)
    step = tl.load(step_ptr) + 1
    tl.store(step_ptr, step)
    m = tl.where(avg != avg, avg, tl.maximum(avg, eps))  # clamp_min keeps NaN (averages not started)
    if TARGET == 0:
        top = tl.max(tl.where(mask, m, float("-inf")), axis=1)
        nans = tl.sum(((m != m) & mask).to(tl.int32), axis=1)
        target = tl.where(nans > 0, float("nan"), top)
    elif TARGET == 1:
        reads = (avg > 0.0) & mask
        total = tl.sum(tl.where(mask, m * reads.to(m.dtype), 0.0), axis=1)  # NaN * 0 stays NaN, as the reference
        target = tl.div_rn(total, tl.maximum(tl.sum(reads.to(m.dtype), axis=1), 1.0))
        target = tl.where(target != target, target, tl.maximum(target, eps))
    else:
        target = tl.sum(tl.where(t == target_index, m, 0.0), axis=1)
    scales = keep + relax * tl.div_rn(target[:, None], m)  # (div_rn: IEEE division, as torch's)
    if TARGET == 2:  # where the target task does not read a representation: scale 1 there
        reads_target = tl.sum(tl.where((t == target_index) & (avg > 0.0), 1, 0), axis=1)
        scales = tl.where(reads_target[:, None] > 0, scales, 1.0)
    if WARMUP:
        scales = tl.where(step <= warmup_steps, 1.0, scales)
    tl.store(scales_ptr + idx, scales, mask=mask)
    if WEIGHTED:
        tl.store(coeff_ptr + idx, scales * tl.load(weights_ptr + t, mask=t < T, other=0.0), mask=mask)


@triton.jit
def factor_square_sums_kernel(out_ptr, left_ptr, right_ptr, rows, width, d, stride_left, stride_right,
                              BB: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    """Program t: ||d_t @ W_t||^2 = <d_t^T d_t, W_t W_t^T> (clamped at 0), where d_t is columns
    [t*width, (t+1)*width) of `left` [rows, T*width] and W_t rows [t*width, (t+1)*width) of `right`
    [T*width, d]: two width x width Gram matrices in registers, where the reference takes two
    batched matmuls, a product, a sum and a clamp (five launches). fp32 products (`ieee`): the
    norms set the scales; TF32's 10-bit mantissa would move them by ~1e-3."""
    t = tl.program_id(0)
    h = tl.arange(0, BH)
    h_ok = h < width
    gram_d = tl.zeros((BH, BH), dtype=tl.float32)
    for start in range(0, rows, BB):
        b = start + tl.arange(0, BB)
        tile = tl.load(left_ptr + b[:, None].to(tl.int64) * stride_left + t * width + h[None, :],
                       mask=(b[:, None] < rows) & h_ok[None, :], other=0.0)  # [BB, BH]
        gram_d += tl.dot(tl.trans(tile), tile, input_precision="ieee")
    gram_w = tl.zeros((BH, BH), dtype=tl.float32)
    for start in range(0, d, BD):
        c = start + tl.arange(0, BD)
        tile = tl.load(right_ptr + (t * width + h[:, None]).to(tl.int64) * stride_right + c[None, :],
                       mask=h_ok[:, None] & (c[None, :] < d), other=0.0)  # [BH, BD]
        gram_w += tl.dot(tile, tl.trans(tile), input_precision="ieee")
    total = tl.sum(tl.sum(gram_d * gram_w, axis=1), axis=0)
    # clamped at 0 (rounding), keeping NaN: an overflowing step's norms must stay non-finite
    tl.store(out_ptr + t, tl.where(total != total, total, tl.maximum(total, 0.0)))
