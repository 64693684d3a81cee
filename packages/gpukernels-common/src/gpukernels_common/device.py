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


_COPY_ALIGN = 16  # bytes: every dtype's view of the packed buffer starts aligned


def to_device(tensors, device) -> tuple[torch.Tensor, ...]:
    """The host tensors `tensors` on `device`, contiguous, each with its dtype and shape, moved in
    one copy: packed into one pinned byte buffer and sent without blocking. A pageable `.to(cuda)`
    per tensor costs a copy and a host synchronisation each; this costs one copy and none (the
    caching host allocator keeps the pinned buffer until the copy has run). Tensors already on
    `device` are returned as they are (contiguous), tensors on another device moved with `.to`;
    everything is moved with `.to` when `device` is the CPU. A conjugate or negative view is
    packed as its values (it comes back resolved)."""
    device = torch.device(device)
    tensors = [t.contiguous() for t in tensors]
    if device.type != "cuda":
        return tuple(t.to(device) for t in tensors)
    return _packed_copy(tensors, device, pin_memory=True)


def _packed_copy(tensors: list, device: torch.device, pin_memory: bool) -> tuple[torch.Tensor, ...]:
    """`to_device`'s copy: the host tensors among the contiguous `tensors` packed into one byte
    buffer, moved at once, and viewed back with their dtypes and shapes."""
    host = [i for i, t in enumerate(tensors) if t.device.type == "cpu"]
    # another accelerator's (or a meta) tensor: moved on its own, not returned where it is; a
    # conjugate or negative view resolved (a byte view of one is refused, and would drop the bit)
    tensors = [t.resolve_conj().resolve_neg() if t.device.type == "cpu" else t.to(device) for t in tensors]
    if not host:
        return tuple(tensors)
    offsets, total = [], 0
    for i in host:
        offsets.append(total)
        total += -(-tensors[i].numel() * tensors[i].element_size() // _COPY_ALIGN) * _COPY_ALIGN
    packed = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=pin_memory)
    for i, at in zip(host, offsets):
        t = tensors[i]
        packed[at:at + t.numel() * t.element_size()].copy_(t.reshape(-1).view(torch.uint8))
    packed = packed.to(device, non_blocking=True)
    out = list(tensors)
    for i, at in zip(host, offsets):
        t = tensors[i]
        out[i] = packed[at:at + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
    return tuple(out)
