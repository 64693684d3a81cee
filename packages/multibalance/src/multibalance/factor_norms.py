"""The task norms of the factored path (`multibalance.factored`) as one kernel on a Triton
backend: ||d_t @ W_t||^2 from two small Gram matrices per task, one program per task."""

from __future__ import annotations

import torch

from gpukernels_common import env, select_backend

from .naive import factor_square_sums_reference

#: the widest head layer the kernel holds (two width x width fp32 Gram matrices in registers)
MAX_WIDTH = 64


def _output(n_tasks: int, like: torch.Tensor) -> torch.Tensor:
    """The [T] output (the tests put canary-padded ones here)."""
    return torch.empty(n_tasks, dtype=like.dtype, device=like.device)


def factor_square_sums(left: torch.Tensor, right: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """[T] sums of squares of the task gradients d_t @ W_t: `left` [rows, T*width] holds the d_t
    side by side, `right` [T*width, D] the W_t stacked (`factored.Factors` of equal widths). See
    `naive.factor_square_sums_reference`."""
    if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0] or left.shape[1] % max(n_tasks, 1):
        raise ValueError(f"left [rows, T*width] and right [T*width, D] must share T*width (T = {n_tasks}), got "
                         f"{tuple(left.shape)} and {tuple(right.shape)}")
    width = left.shape[1] // n_tasks if n_tasks else 0
    if (not select_backend(left).uses_triton or left.dtype != torch.float32 or right.dtype != torch.float32
            or right.device != left.device or not 0 < width <= MAX_WIDTH or left.shape[0] == 0
            or left.stride(1) != 1 or right.stride(1) != 1):
        return factor_square_sums_reference(left, right, n_tasks)
    import triton

    from .kernels import factor_square_sums_kernel

    out = _output(n_tasks, left)
    rows, d = left.shape[0], right.shape[1]
    gpu = env.gpu_launch_shapes(left.device)  # the interpreter pays per loop step: larger tiles there
    bb = 64 if gpu else max(16, min(1024, triton.next_power_of_2(rows)))
    bd = 64 if gpu else max(16, min(1024, triton.next_power_of_2(d)))
    factor_square_sums_kernel[(n_tasks,)](out, left, right, rows, width, d, left.stride(0), right.stride(0),
                                          BB=bb, BH=max(16, triton.next_power_of_2(width)), BD=bd)
    return out
