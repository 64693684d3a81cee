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
