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


def _all_finite(values: torch.Tensor) -> torch.Tensor:
    """0-d bool on `values`' device: no inf or NaN in it. 0 * x is 0 (or -0) unless x is inf or
    NaN: three ops, where isfinite().all() is five (isfinite is composite: abs, ne, eq, and), each
    a kernel launch on a GPU."""
    return values.mul(0).sum().eq(0)


def running_average(average: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """The moving average of `values` (rate 1 - beta), from the first step whose values are all
    finite (NaN until then; an empty or other-shaped `average` starts it), left as it was on a step
    with a non-finite value (its gradients overflowed: a GradScaler skips that step). Tensor ops
    on `values`' device only: no host sync."""
    finite = _all_finite(values)
    if average.shape != values.shape:
        return torch.where(finite, values, float("nan"))
    # e.g. loaded from a checkpoint onto another device, or of another dtype (an fp32 checkpoint
    # resumed in float64, or the other path's step with representations of mixed dtypes): kept,
    # in the norms' dtype (lerp refuses mixed dtypes)
    average = average.to(values.device, values.dtype)
    return torch.where(finite, torch.where(average.isnan(), values, average.lerp(values, 1 - beta)), average)


#: what `balance_step` is given: nothing new (the averages as they are), norms, sums of squares
#: (batch norms before their square root), or per-sample norm sums stacked on their row counts
BALANCE_INPUTS = ("none", "norms", "squares", "per_sample")


def norms_from(values: torch.Tensor, kind: str) -> torch.Tensor:
    """[R, T] norms from the statistics `kind` names (see BALANCE_INPUTS; not "none")."""
    if kind == "norms":
        return values
    return values.sqrt() if kind == "squares" else values[0] / values[1].clamp_min(1)


def balance_step_reference(values: torch.Tensor | None, kind: str, ema: torch.Tensor, step: torch.Tensor, *,
                           beta: float, relax: float, eps: float, target: str | int, warmup_steps: int,
                           weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One MultiBalance step from its [R, T] statistics: (new averages, scales, coefficients).

    The norms (from `values` as `kind` says) enter the moving averages (`running_average`); the
    step count `step` goes up by one in place; per representation r the target M_r (the max or
    the mean over the tasks that read r, or task `target`'s average) gives the scales
    s = (1 - relax) + relax * M_r / max(m, eps), 1 during the first `warmup_steps` steps and, for a
    target task, where that task does not read r; the coefficients are s times `weights` (or s)."""
    if kind != "none":
        ema = running_average(ema, norms_from(values, kind), beta)
    step.add_(1)  # in place: the caller's buffer
    m = ema.clamp_min(eps)
    # a task reads representation r once its average norm there is positive: the target is
    # taken over the readers only (a task that does not read r has norm 0 there)
    if target == "max":
        top = m.amax(dim=1, keepdim=True)
    elif target == "mean":
        reads = ema > 0
        top = ((m * reads).sum(dim=1, keepdim=True) / reads.sum(dim=1, keepdim=True).clamp_min(1)).clamp_min_(eps)
    else:
        top = m[:, target: target + 1]
    scales = torch.add(1 - relax, torch.div(top, m), alpha=relax)  # (1 - relax) + relax * (target / m) in two ops
    if not isinstance(target, str):  # where the target task does not read: nothing to match, scale 1
        scales = torch.where(ema[:, target: target + 1] > 0, scales, 1.0)
    if warmup_steps:  # on the device: reading the step count would wait for a GPU every step
        scales = torch.where(step <= warmup_steps, 1.0, scales)
    return ema, scales, scales if weights is None else scales * weights.to(scales.dtype)


def factor_square_sums_reference(left: torch.Tensor, right: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """[T]: ||d_t @ W_t||^2 for d_t the t-th block of `width` columns of `left` [rows, T*width]
    and W_t the t-th block of `width` rows of `right` [T*width, D], from two batched Gram
    matrices: <d^T d, W W^T> (clamped at 0: rounding can take a zero norm below it)."""
    width = left.shape[1] // n_tasks
    ds = left.view(left.shape[0], n_tasks, width).transpose(0, 1)  # [T, rows, h]
    ws = right.view(n_tasks, width, -1)  # [T, h, D]
    gram_w = torch.bmm(ws, ws.transpose(1, 2))
    return (torch.bmm(ds.transpose(1, 2), ds) * gram_w).sum((1, 2)).clamp_min(0)

