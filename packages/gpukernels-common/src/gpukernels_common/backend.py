"""Per-call backend choice: compiled Triton, Triton interpreter, or PyTorch reference."""

from __future__ import annotations

import enum
import os

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


def tracing() -> bool:
    """Whether `torch.compile` or `torch.export` is tracing the caller, or a CUDA graph is being
    captured on the current stream: code that may take data-dependent, eager-only shortcuts (a
    value read back to the host) asks this first. (`torch.compiler.is_exporting` exists from torch
    2.6 on; torch 2.5's strict export traces through dynamo, which `is_compiling` sees.)"""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.compiler.is_compiling() or (is_exporting is not None and is_exporting()) or capturing()


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (no value can be read back:
    an argument check on values belongs before the capture, or to the graph's caller)."""
    # no capture can run before CUDA is initialised (and the check would initialise it)
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


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
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {dev} was asked for, but torch sees no CUDA device (torch {torch.__version__})")
        if env.triton_interpret():
            raise RuntimeError("TRITON_INTERPRET=1 is set but the tensors are on CUDA; unset it to compile kernels")
        if wanted == "interpret":
            raise RuntimeError("GKC_BACKEND=interpret needs CPU tensors")
        return Backend.TRITON, f"CUDA tensors on {torch.cuda.get_device_name(dev)} and triton installed"
    if dev.type == "cpu":
        if env.triton_interpret():
            # not while tracing: a trace's tensors are fake (the eager calls before it run the probe)
            fault = None if _INTERPRETER_WORKS[0] or tracing() else interpreter_fault()
            if fault is not None:
                raise RuntimeError(fault)
            return Backend.INTERPRET, "CPU tensors and TRITON_INTERPRET=1"
        if wanted in ("triton", "interpret"):
            raise RuntimeError(
                f"GKC_BACKEND={wanted} on CPU tensors needs TRITON_INTERPRET=1 set before the kernels are imported"
            )
        return Backend.REFERENCE, "CPU tensors without TRITON_INTERPRET=1"
    if wanted in ("triton", "interpret"):
        raise RuntimeError(f"GKC_BACKEND={wanted} is not supported on device {dev}")
    return Backend.REFERENCE, f"device {dev.type} has no Triton path"


_INTERPRETER_WORKS = [False]  # set once a probe succeeds; a failure is probed again (and raised) each call


def interpreter_fault() -> str | None:
    """Why the Triton interpreter computes wrong results in this environment, or None when a probe
    kernel (a masked load and store) gives the right ones. Some Triton/numpy pairs break it: the
    interpreter of Triton 3.1 under numpy 2 drops every store without an error, so each kernel
    would leave its output as allocated."""
    if _INTERPRETER_WORKS[0]:
        return None
    fault = _probe_interpreter()
    _INTERPRETER_WORKS[0] = fault is None
    return fault


def _probe_interpreter() -> str | None:
    import numpy
    import triton
    from triton.runtime.jit import JITFunction

    from ._probe import probe_kernel

    if isinstance(probe_kernel, JITFunction):
        # defined while TRITON_INTERPRET read as off (set after triton's import, or a value this
        # Triton does not take): the kernels are compiled ones, whatever numpy is
        return (f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} reads as on here, but triton "
                f"{triton.__version__} defined the kernels for compiling: set TRITON_INTERPRET=1 before "
                f"anything imports triton, or run the PyTorch references with GKC_BACKEND=reference")
    out = torch.full((3,), 10, dtype=torch.int32)
    try:
        probe_kernel[(1,)](out, 3, BLOCK=4)
        error = None if out.tolist() == [10, 11, 12] else f"a probe kernel's stores came back as {out.tolist()}"
    except Exception as e:  # noqa: BLE001 (any failure of the probe is reported the same way)
        error = f"a probe kernel raised {type(e).__name__}: {e}"
    if error is None:
        return None
    return (f"the Triton interpreter does not work with triton {triton.__version__} and numpy {numpy.__version__} "
            f"({error}): Triton 3.1's interpreter needs numpy < 2 and Triton 3.6's numpy < 2.4; or run the "
            f"PyTorch references with GKC_BACKEND=reference")


def select_backend(*tensors: torch.Tensor, device: torch.device | str | None = None) -> Backend:
    return explain_backend(*tensors, device=device)[0]
