"""MultiBalance's per-step statistics (norms -> moving averages -> scales -> coefficients) as one
kernel on a Triton backend: on a GPU the dozen small ops of the reference are a dozen launches,
each costing more host time than the tiny [reps, tasks] tile they compute."""

from __future__ import annotations

import torch

from gpukernels_common import select_backend

from .naive import BALANCE_INPUTS, balance_step_reference

#: the largest [reps, tasks] tile one program holds; larger ones take the reference
MAX_TILE = 1 << 14


def _output(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """A new [R, T] output (the tests put canary-padded ones here)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def balance_step(values: torch.Tensor | None, kind: str, ema: torch.Tensor, step: torch.Tensor, *, beta: float,
                 relax: float, eps: float, target: str | int, warmup_steps: int = 0,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(new averages, scales, coefficients), each [R, T]; `step` (0-d int64) is incremented in
    place. `values`: [R, T] norms or sums of squares, or [2, R, T] per-sample norm sums and row
    counts (`kind`, one of BALANCE_INPUTS), or None with kind "none" (the averages as they are).
    `ema`: the [R, T] averages (another shape starts them from these norms). `target`: "max",
    "mean" or a task index. `weights`: [T] static weights, or None for unit weights (then the
    coefficients are the scales tensor itself). See `naive.balance_step_reference`."""
    if kind not in BALANCE_INPUTS:
        raise ValueError(f"kind must be one of {BALANCE_INPUTS}, got {kind!r}")
    if (kind == "none") != (values is None):
        raise ValueError(f"values must be None exactly when kind is 'none', got kind {kind!r} and "
                         f"{'None' if values is None else 'a tensor'}")
    if not (target in ("max", "mean") or (isinstance(target, int) and not isinstance(target, bool))):
        raise ValueError(f"target must be 'max', 'mean' or a task index, got {target!r}")
    stats = ema if values is None else values
    shape = stats.shape[-2:]
    if stats.dim() != (3 if kind == "per_sample" else 2) or (kind == "per_sample" and stats.shape[0] != 2):
        raise ValueError(f"values must be [{'2, ' if kind == 'per_sample' else ''}reps, tasks] for kind {kind!r}, "
                         f"got {tuple(stats.shape)}")
    if kind == "none" and ema.dim() != 2:
        raise ValueError(f"ema must be [reps, tasks] when no new norms are given, got {tuple(ema.shape)}")
    if isinstance(target, int) and not 0 <= target < shape[1]:
        raise ValueError(f"target must be a task index in [0, {shape[1]}), got {target}")
    device = stats.device
    args = dict(beta=beta, relax=relax, eps=eps, target=target, warmup_steps=warmup_steps, weights=weights)
    # averages of another dtype (an old checkpoint) or shape (the first step): only the latter the kernel starts
    has_ema = ema.shape == shape and ema.dtype == stats.dtype
    # the kernel computes in fp32 (its scalar arguments are fp32): float64 statistics take the reference
    if (not select_backend(stats).uses_triton or stats.dtype != torch.float32 or step.device != device
            or step.dtype != torch.int64 or shape.numel() > MAX_TILE or shape.numel() == 0
            or (ema.shape == shape and not has_ema)
            or (weights is not None and (weights.device != device or weights.shape != shape[1:]))):
        return balance_step_reference(values, kind, ema, step, **args)
    import triton

    from .kernels import balance_step_kernel

    reps, tasks = shape
    ema_in = (ema.to(device) if has_ema else stats).contiguous()  # (never read without has_ema)
    ema_out = ema_in if kind == "none" else _output(shape, stats)
    scales = _output(shape, stats)
    coeff = scales if weights is None else _output(shape, stats)
    w = scales if weights is None else weights.to(stats.dtype).contiguous()  # (never read without weights)
    balance_step_kernel[(1,)](
        stats.contiguous(), ema_in, ema_out, step, scales, coeff, w, reps, tasks, 1 - beta, relax, 1 - relax, eps,
        warmup_steps, target if isinstance(target, int) else 0,
        KIND=BALANCE_INPUTS.index(kind), HAS_EMA=has_ema, TARGET={"max": 0, "mean": 1}.get(target, 2),
        WARMUP=warmup_steps > 0, WEIGHTED=weights is not None, BR=triton.next_power_of_2(reps),
        BT=triton.next_power_of_2(tasks))
    return ema_out, scales, coeff
