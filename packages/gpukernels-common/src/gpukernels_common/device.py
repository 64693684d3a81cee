"""Device and toolchain facts that never import triton eagerly."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch

_TRITON_AVAILABLE: list[bool] = []  # a plain cache: torch.compile warns on lru_cache-wrapped calls it traces


def triton_available() -> bool:
    """True when `import triton` would succeed (checked without importing it, once)."""
    if not _TRITON_AVAILABLE:
        _TRITON_AVAILABLE.append(importlib.util.find_spec("triton") is not None)
    return _TRITON_AVAILABLE[0]


def triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def has_cuda() -> bool:
    return torch.cuda.is_available()


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device) if device is not None else None
    if (device is None or device.type == "cuda") and has_cuda():
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def supports_bf16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True
