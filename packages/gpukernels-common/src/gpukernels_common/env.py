"""Environment knobs, read at call time so tests can flip them with monkeypatch.

Every variable is documented in the package README (one table).
"""

from __future__ import annotations

import os

BACKEND_CHOICES = ("auto", "triton", "interpret", "reference")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def requested_backend() -> str:
    """`GKC_BACKEND`: auto (default), triton, interpret or reference."""
    value = os.environ.get("GKC_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKEND_CHOICES:
        raise ValueError(f"GKC_BACKEND={value!r} is not one of {BACKEND_CHOICES}")
    return value


def triton_interpret() -> bool:
    """`TRITON_INTERPRET=1`: Triton kernels run on the CPU through the interpreter."""
    return _flag("TRITON_INTERPRET")


def gpu_launch_shapes(device) -> bool:
    """Whether launches on `device` take the compiled-GPU tile sizes and operand dtypes: CUDA
    devices, or any device under `GKC_GPU_LAUNCH_SHAPES=1`. `tools/compile_check.py` sets it to
    record the GPU specialisations through the interpreter; what the interpreter computes with
    them is not checked (its 16-bit `tl.dot` is wrong)."""
    return getattr(device, "type", device) == "cuda" or _flag("GKC_GPU_LAUNCH_SHAPES")


def quick() -> bool:
    """`GKC_QUICK=1`: tests use their shape subsets (same as `pytest --quick`)."""
    return _flag("GKC_QUICK")


def bench_warmup_ms() -> float:
    return float(os.environ.get("GKC_BENCH_WARMUP_MS", "25"))


def bench_rep_ms() -> float:
    return float(os.environ.get("GKC_BENCH_REP_MS", "100"))
