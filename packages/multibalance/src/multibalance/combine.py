"""The weighted sums every balancer ends with: of the task losses, and of per-task gradients."""

from __future__ import annotations

import torch

from gpukernels_common import env, select_backend

from .naive import weighted_sum_reference


def weighted_loss(losses: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_t weights[t] * losses[t], skipping unit weights (no multiply, and no `0 + loss` as
    Python's sum() would start with: each op here is a node the backward visits)."""
    total = None
    for w, loss in zip(weights, losses):
        term = loss if w == 1.0 else w * loss
        total = term if total is None else total + term
    return total


def weighted_sum(grads: list[torch.Tensor], coeff: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t coeff[t] * grads[t] with the coefficients on the device (no host sync).

    Writes into `out`, by default into grads[0] (the per-task gradients are the balancer's own)
    when that is a contiguous tensor, else into a new one: `autograd.grad` may return an
    expanded view (a head that sum-pools its input), whose elements share memory.
    A Triton backend reads every gradient once and writes once, accumulating in fp32 (float64
    gradients take the reference); the reference chains in-place multiply-adds in the gradients' dtype (fp32 for fp16 and bf16 gradients).
    """
    if not grads:
        raise ValueError("grads must hold at least one tensor")
    first = grads[0]
    for t, g in enumerate(grads):
        if g.shape != first.shape or g.dtype != first.dtype or g.device != first.device:
            raise ValueError(f"grads[{t}] is {g.dtype} {tuple(g.shape)} on {g.device}; grads[0] is "
                             f"{first.dtype} {tuple(first.shape)} on {first.device}: all must match")
    if coeff.shape != (len(grads),) or not coeff.dtype.is_floating_point or coeff.device != first.device:
        raise ValueError(f"coeff must be a floating [{len(grads)}] tensor on {first.device}, got {coeff.dtype} "
                         f"{tuple(coeff.shape)} on {coeff.device}")
    if out is None:  # contiguous: no two elements share memory (an attribute check, no pass)
        out = first if first.is_contiguous() else torch.empty_like(first, memory_format=torch.contiguous_format)
    if out.shape != first.shape or out.dtype != first.dtype or out.device != first.device:
        raise ValueError(f"out must be {first.dtype} {tuple(first.shape)} on {first.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    # the kernel accumulates in fp32: float64 gradients take the reference, in float64
    if (not select_backend(first).uses_triton or first.dtype == torch.float64
            or not all(g.is_contiguous() for g in grads) or not out.is_contiguous()):
        return weighted_sum_reference(grads, coeff, out)
    import triton

    from . import kernels

    n = first.numel()
    block = 2048 if env.gpu_launch_shapes(first.device) else 8192  # the interpreter pays per program, not per element
    coeff = coeff.to(torch.float32).contiguous()
    for start in range(0, len(grads), kernels.MAX_INPUTS):
        part = grads[start: start + kernels.MAX_INPUTS]
        ptrs = part + [part[0]] * (kernels.MAX_INPUTS - len(part))  # unused slots are never read
        kernels.weighted_sum_kernel[(triton.cdiv(n, block),)](
            out, coeff[start:], *ptrs, n, N_IN=len(part), ACCUMULATE=start > 0, BLOCK=block)
    return out
