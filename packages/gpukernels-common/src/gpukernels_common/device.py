"""Device and toolchain facts that never import triton eagerly."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util

import torch


@functools.cache
def triton_available() -> bool:
    """True when `import triton` would succeed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


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
