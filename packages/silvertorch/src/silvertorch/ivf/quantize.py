"""Symmetric per-row int8 quantization: x ~= codes * scale, codes in [-127, 127]."""

from __future__ import annotations

import torch


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major codes and scales whatever the input's layout (a transposed view, a Fortran-ordered
    array): the scoring kernels index codes as row * D + d."""
    x = x.float().contiguous()
    scale = x.abs().amax(1).clamp_min(1e-12) / 127.0
    codes = torch.round(x / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return codes, scale
