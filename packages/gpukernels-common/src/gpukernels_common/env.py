"""Environment knobs, read at call time so tests can flip them with monkeypatch.

Every variable is documented in the package README (one table).
"""

from __future__ import annotations

import math
import os

import torch

BACKEND_CHOICES = ("auto", "triton", "interpret", "reference")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def requested_backend() -> str:
    """`GKC_BACKEND`: auto (default), triton, interpret or reference."""
    value = os.environ.get("GKC_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKEND_CHOICES:
        raise ValueError(f"GKC_BACKEND={value!r} is not one of {BACKEND_CHOICES}")
    return value


# What the installed Triton reads as "interpret" when it defines a kernel: Triton 3.1-3.3 take
# exactly "1"; later ones (triton.knobs) also take true/yes/on/y in any case, unstripped. Reading
# it the same way keeps the backend choice in step with what the kernels actually became.
_TRITON_TRUE: list = []


def _triton_true_values() -> tuple[str, ...]:
    if not _TRITON_TRUE:
        import importlib.util

        try:
            has_knobs = importlib.util.find_spec("triton.knobs") is not None
        except (ImportError, ValueError):
            has_knobs = False
        _TRITON_TRUE.append(("1", "true", "yes", "on", "y") if has_knobs else ("1",))
    return _TRITON_TRUE[0]


def triton_interpret() -> bool:
    """`TRITON_INTERPRET=1`: Triton kernels run on the CPU through the interpreter (the value is
    read as the installed Triton reads it)."""
    value = os.environ.get("TRITON_INTERPRET", "")
    return value == "1" or (value.lower() in _triton_true_values())


def gpu_launch_shapes(device) -> bool:
    """Whether launches on `device` take the compiled-GPU tile sizes and operand dtypes: CUDA
    devices, or any device under `GKC_GPU_LAUNCH_SHAPES=1`. `tools/compile_check.py` sets it to
    record the GPU specialisations through the interpreter; what the interpreter computes with
    them is not checked (its 16-bit `tl.dot` is wrong)."""
    return torch.device(device).type == "cuda" or _flag("GKC_GPU_LAUNCH_SHAPES")


def quick() -> bool:
    """`GKC_QUICK=1`: tests use their shape subsets (same as `pytest --gkc-quick`)."""
    return _flag("GKC_QUICK")


def _milliseconds(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        ms = float(value)
    except ValueError:
        ms = float("nan")
    if not math.isfinite(ms) or ms < 0:
        raise ValueError(f"{name}={value!r} is not a number of milliseconds >= 0")
    return ms


def bench_warmup_ms() -> float:
    """`GKC_BENCH_WARMUP_MS`: warm-up time of each CPU timing (default 25)."""
    return _milliseconds("GKC_BENCH_WARMUP_MS", 25.0)


def bench_rep_ms() -> float:
    """`GKC_BENCH_REP_MS`: measuring time of each CPU timing (default 100)."""
    return _milliseconds("GKC_BENCH_REP_MS", 100.0)
