"""PyTorch reference for the kernels in kernels.py."""

from __future__ import annotations

import torch


def weighted_sum_reference(grads: list[torch.Tensor], coeff: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = sum_t coeff[t] * grads[t] by in-place multiply-adds (out may be grads[0]).

    fp16 and bf16 accumulate in fp32, as the kernel does: a coefficient past fp16's range (a task
    whose gradient is zero gets a huge scale) would be inf there, and inf * 0 is NaN; a chain of
    bf16 multiply-adds rounds to bf16's 8 bits at every task (2-3x the error of one rounding)."""
    if out.dtype in (torch.float16, torch.bfloat16):
        c = coeff.to(torch.float32)
        acc = grads[0].float().mul_(c[0])  # fp32 in place: the products are computed in fp32
        for t in range(1, len(grads)):
            acc.addcmul_(grads[t], c[t])
        return out.copy_(acc)
    c = coeff.to(out.dtype)
    if out.data_ptr() == grads[0].data_ptr():
        out.mul_(c[0])
    else:
        torch.mul(grads[0], c[0], out=out)
    for t in range(1, len(grads)):
        out.addcmul_(grads[t], c[t])
    return out
