"""Symmetric per-row int8 quantization: x ~= codes * scale, codes in [-127, 127]."""

from __future__ import annotations

import torch

from gpukernels_common import select_backend, tracing


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major codes and scales whatever the input's layout (a transposed view, a Fortran-ordered
    array): the scoring kernels index codes as row * D + d."""
    x = x.float().contiguous()
    scale = x.abs().amax(1).clamp_min(1e-12) / 127.0
    codes = torch.round(x / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return codes, scale


def quantize_queries(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows(x)`, in one kernel on a Triton backend run eagerly (`prepare_queries_kernel`:
    eight ops fewer per call; a traced graph keeps the PyTorch ops); the same codes and scales bit
    for bit."""
    if not select_backend(x).uses_triton or x.shape[0] == 0 or tracing():
        return quantize_rows(x)
    return launch_quantize(x)


def launch_quantize(x: torch.Tensor, ranges=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`prepare_queries_kernel` on x [Q >= 1, D]; `ranges` (the IVF search's): (clusters [Q, P],
    cluster_starts, cluster_sizes, starts, lengths, found) filled in the same launch
    (`ivf.index._prepare_queries`)."""
    import triton

    from .kernels import prepare_queries_kernel

    x = x.float().contiguous()
    q, d = x.shape
    q_codes = torch.empty(q, d, dtype=torch.int8, device=x.device)
    q_scales = torch.empty(q, dtype=torch.float32, device=x.device)
    clusters, cluster_starts, cluster_sizes, starts, lengths, found = ranges or (q_scales,) * 6  # (never read)
    p = clusters.shape[1] if ranges else 0
    bq = min(16, triton.next_power_of_2(q))
    prepare_queries_kernel[(triton.cdiv(q, bq),)](
        x, clusters, cluster_starts, cluster_sizes, q_codes, q_scales, starts, lengths, found, q, d, p,
        RANGES=ranges is not None, BQ=bq, BD=min(128, triton.next_power_of_2(max(d, 1))),
        BP=min(64, triton.next_power_of_2(max(p, 1))))
    return q_codes, q_scales
