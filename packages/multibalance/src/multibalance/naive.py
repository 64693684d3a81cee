"""PyTorch reference for the kernels in kernels.py."""

from __future__ import annotations

import torch


def weighted_sum_reference(grads: list[torch.Tensor], coeff: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = sum_t coeff[t] * grads[t] by in-place multiply-adds (out may be grads[0])."""
    c = coeff.to(out.dtype)
    if out.data_ptr() == grads[0].data_ptr():
        out.mul_(c[0])
    else:
        torch.mul(grads[0], c[0], out=out)
    for t in range(1, len(grads)):
        out.addcmul_(grads[t], c[t])
    return out
