"""Per-call backend choice: compiled Triton, Triton interpreter, or PyTorch reference."""

from __future__ import annotations

import enum

import torch

from . import env
from .device import triton_available


class Backend(str, enum.Enum):
    TRITON = "triton"  # compiled Triton kernels on a CUDA device
    INTERPRET = "interpret"  # Triton kernels run by the interpreter on the CPU
    REFERENCE = "reference"  # plain PyTorch

    @property
    def uses_triton(self) -> bool:
        return self is not Backend.REFERENCE


def _device_of(tensors) -> torch.device:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def explain_backend(*tensors: torch.Tensor, device: torch.device | str | None = None) -> tuple[Backend, str]:
    """Return the backend a call on these tensors would use, and why."""
    dev = torch.device(device) if device is not None else _device_of(tensors)
    wanted = env.requested_backend()
    if wanted == "reference":
        return Backend.REFERENCE, "GKC_BACKEND=reference"
    if dev.type == "meta":
        return Backend.REFERENCE, "meta tensors (shape propagation) use the reference"
    if not triton_available():
        if wanted in ("triton", "interpret"):
            raise RuntimeError(f"GKC_BACKEND={wanted} but triton is not installed (pip install triton)")
        return Backend.REFERENCE, "triton is not installed"
    if dev.type == "cuda":
        if env.triton_interpret():
            raise RuntimeError("TRITON_INTERPRET=1 is set but the tensors are on CUDA; unset it to compile kernels")
        if wanted == "interpret":
            raise RuntimeError("GKC_BACKEND=interpret needs CPU tensors")
        return Backend.TRITON, f"CUDA tensors on {torch.cuda.get_device_name(dev)} and triton installed"
    if dev.type == "cpu":
        if env.triton_interpret():
            return Backend.INTERPRET, "CPU tensors and TRITON_INTERPRET=1"
        if wanted in ("triton", "interpret"):
            raise RuntimeError(
                f"GKC_BACKEND={wanted} on CPU tensors needs TRITON_INTERPRET=1 set before the kernels are imported"
            )
        return Backend.REFERENCE, "CPU tensors without TRITON_INTERPRET=1"
    if wanted in ("triton", "interpret"):
        raise RuntimeError(f"GKC_BACKEND={wanted} is not supported on device {dev}")
    return Backend.REFERENCE, f"device {dev.type} has no Triton path"


def select_backend(*tensors: torch.Tensor, device: torch.device | str | None = None) -> Backend:
    return explain_backend(*tensors, device=device)[0]
