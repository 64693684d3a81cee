"""Test helpers: tolerances per dtype and backend, RMS-relative assert_close, poisoned outputs."""

from __future__ import annotations

from pathlib import Path

import torch

from ..backend import Backend
from .launches import LaunchCounter

# (rms_tol, max_tol): relative-RMS error bound, and a bound on the worst element's error
# relative to the reference's largest magnitude. The GPU may run fp32 `tl.dot` in TF32 (its
# default; moeblaze follows torch's matmul precision instead), the interpreter computes it
# exactly in numpy, hence the separate tiers.
TOLERANCES: dict[tuple[torch.dtype, Backend], tuple[float, float]] = {
    (torch.float64, Backend.REFERENCE): (1e-12, 1e-10),
    (torch.float64, Backend.INTERPRET): (1e-12, 1e-10),
    (torch.float64, Backend.TRITON): (1e-12, 1e-10),
    (torch.float32, Backend.REFERENCE): (1e-6, 1e-5),
    (torch.float32, Backend.INTERPRET): (1e-5, 1e-4),
    (torch.float32, Backend.TRITON): (2e-3, 1e-2),
    (torch.float16, Backend.REFERENCE): (1e-3, 1e-2),
    (torch.float16, Backend.INTERPRET): (2e-3, 2e-2),
    (torch.float16, Backend.TRITON): (2e-3, 2e-2),
    (torch.bfloat16, Backend.REFERENCE): (1e-2, 5e-2),
    (torch.bfloat16, Backend.INTERPRET): (1.6e-2, 6e-2),
    (torch.bfloat16, Backend.TRITON): (1.6e-2, 6e-2),
}


def tolerance(dtype: torch.dtype, backend: Backend | str = Backend.REFERENCE) -> tuple[float, float]:
    backend = Backend(backend)
    if not dtype.is_floating_point:
        return (0.0, 0.0)
    if (dtype, backend) not in TOLERANCES:
        known = sorted({str(d) for d, _ in TOLERANCES})
        raise KeyError(f"no tolerance for {dtype} on the {backend.value} backend (TOLERANCES has {known}): "
                       f"pass rms_tol= and max_tol=")
    return TOLERANCES[(dtype, backend)]


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    backend: Backend | str = Backend.REFERENCE,
    rms_tol: float | None = None,
    max_tol: float | None = None,
    name: str = "tensor",
) -> None:
    """Compare by relative RMS error and worst-element error; report where it failed.

    NaN or inf in one tensor but not the other always fails. Integer and bool tensors must be
    equal (compared in their own dtypes: int64 values beyond 2**53 stay exact); a floating and a
    non-floating tensor never match. Complex tensors compare their real and imaginary parts.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.is_complex() != expected.is_complex() or actual.is_floating_point() != expected.is_floating_point():
        raise AssertionError(f"{name}: dtype {actual.dtype} is not comparable with expected {expected.dtype}")
    if actual.is_complex():
        actual, expected = torch.view_as_real(actual.resolve_conj()), torch.view_as_real(expected.resolve_conj())
        dtype = dtype.to_real() if dtype is not None else None
    dtype = dtype or expected.dtype
    if not actual.is_floating_point():
        common = torch.promote_types(actual.dtype, expected.dtype)
        a, e = actual.detach().to("cpu", common), expected.detach().to("cpu", common)
        _assert_equal(a, e, a != e, name)
        return
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if not dtype.is_floating_point:
        _assert_equal(a, e, (a != e) & ~(a.isnan() & e.isnan()), name)
        return
    default_rms, default_max = tolerance(dtype, backend)
    rms_tol = default_rms if rms_tol is None else rms_tol
    max_tol = default_max if max_tol is None else max_tol
    a_finite, e_finite = torch.isfinite(a), torch.isfinite(e)
    mismatch = (a_finite != e_finite) | (~a_finite & ~e_finite & ~((a == e) | (a.isnan() & e.isnan())))
    if mismatch.any():
        idx = tuple(int(i) for i in mismatch.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(mismatch.sum())} non-finite mismatches; first at {idx}: "
            f"{a[idx].item()} vs expected {e[idx].item()}"
        )
    both = a_finite & e_finite
    if not both.any():
        return
    diff = (a - e).where(both, torch.zeros_like(a))
    ref = e.where(both, torch.zeros_like(e))
    scale_rms = ref.pow(2).mean().sqrt().clamp_min(1e-30)
    scale_max = ref.abs().max().clamp_min(1e-30)
    rms_err = float(diff.pow(2).mean().sqrt() / scale_rms)
    max_err = float(diff.abs().max() / scale_max)
    if rms_err > rms_tol or max_err > max_tol:
        idx = tuple(int(i) for i in torch.unravel_index(diff.abs().argmax(), diff.shape))
        raise AssertionError(
            f"{name} ({dtype}, {Backend(backend).value}): relative RMS error {rms_err:.3e} (tol {rms_tol:.1e}), "
            f"worst element error {max_err:.3e} of max|ref| (tol {max_tol:.1e}) at index {idx}: "
            f"{a[idx].item():.6g} vs expected {e[idx].item():.6g}"
        )


def _assert_equal(a: torch.Tensor, e: torch.Tensor, bad: torch.Tensor, name: str) -> None:
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{name}: {int(bad.sum())}/{a.numel()} elements differ; first at {idx}: "
                             f"{a[idx].item()} != expected {e[idx].item()}")


def _poison_value(dtype: torch.dtype):
    if dtype.is_complex:  # NaN in both parts (torch.iinfo refused it: a TypeError)
        return complex(_poison_value(dtype.to_real()), _poison_value(dtype.to_real()))
    if dtype.is_floating_point:
        return float("nan") if torch.finfo(dtype).bits > 8 or _has_nan(dtype) else torch.finfo(dtype).max
    if dtype == torch.bool:
        return True
    info = torch.iinfo(dtype)
    return info.max if info.min == 0 else info.min  # unsigned: 0 would look like a written zero


def _has_nan(dtype: torch.dtype) -> bool:
    return bool(torch.tensor(float("nan")).to(dtype).float().isnan())


def _canary_value(dtype: torch.dtype):
    """A value the dtype holds exactly, unlike what kernels usually write."""
    if dtype == torch.bool:
        return False
    if dtype.is_complex:
        return _canary_value(dtype.to_real())
    if dtype.is_floating_point:
        return -12345.0 if torch.finfo(dtype).max > 12345.0 else -float(torch.finfo(dtype).max) / 2
    return -7 if torch.iinfo(dtype).min < 0 else 7


class CanaryBuffer:
    """An output tensor inside a larger buffer whose padding must stay untouched.

    The interpreter does not catch out-of-bounds stores; a kernel that writes past its
    output corrupts the padding, which `check()` detects. The output itself starts
    poisoned (see `poisoned_empty`) so unwritten elements show up.
    """

    def __init__(self, shape, dtype=torch.float32, device="cpu", pad: int = 1024, canary=None):
        self.shape = torch.Size(shape)
        numel = self.shape.numel()
        self.pad = pad
        if canary is None:
            canary = _canary_value(dtype)
        self.buffer = torch.full((numel + 2 * pad,), canary, dtype=dtype, device=device)
        self.canary = self.buffer[:1].clone()  # as the dtype holds it (compared in the dtype)
        self.tensor = self.buffer[pad : pad + numel].view(self.shape)
        self.tensor.fill_(_poison_value(dtype))

    def check(self, name: str = "output") -> None:
        for side, part in (("before", self.buffer[: self.pad]), ("after", self.buffer[self.pad + self.shape.numel() :])):
            same = part.view(torch.uint8) == self.canary.view(torch.uint8).repeat(len(part)) if _bytes_only(part) \
                else part == self.canary
            if not bool(same.all()):
                n = int((~same).sum())
                raise AssertionError(f"{name}: {n} canary elements {side} the buffer were overwritten (out-of-bounds store)")


def _bytes_only(t: torch.Tensor) -> bool:
    """float8 tensors have no `==` on every torch: compare their bytes."""
    return t.dtype.is_floating_point and t.element_size() == 1


def poisoned_empty(shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Like `torch.empty`, but filled with NaN (floats; the largest value where the dtype has no
    NaN), True (bool), or the dtype's minimum (signed integers) or maximum (unsigned)."""
    return torch.full(tuple(shape), _poison_value(dtype), dtype=dtype, device=device)


def poison_grads(*tensors: torch.Tensor) -> None:
    """Set `.grad` to NaN so a backward that forgets to write (instead of accumulating) shows up."""
    for t in tensors:
        if t.grad is not None:
            t.grad.fill_(float("nan"))


_handed_out_ports: set[int] = set()


def _ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for torch.distributed tests' MASTER_PORT).

    Drawn at random below the kernel's ephemeral range: a port the kernel handed out for a
    bind to port 0 was free when checked but could be handed out again before the rendezvous
    bound it (gloo's own connections take ephemeral ports), which failed a CI run with
    EADDRINUSE. Below that range only another explicit bind can take it.
    """
    import random
    import socket

    low, high = _ephemeral_port_range()
    # outside the ephemeral range, above the well-known and most registered service ports
    candidates = range(10000, low) if low > 11000 else range(high + 1, 65536)
    if len(candidates) < 1000:  # an unusual range: let the kernel choose, as before
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for _ in range(200):
        port = random.choice(candidates)
        if port in _handed_out_ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out_ports.add(port)
        return port
    raise RuntimeError(f"free_port: no free TCP port found in {candidates}")


GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def run_workers(cmd, result, *, timeout: float = 180, env=None, check: bool = True):
    """Run a multi-process test script (e.g. torch.multiprocessing.spawn or torchrun) that writes
    `result` from rank 0 before the process groups are torn down; returns the CompletedProcess.

    With `check`, fail with the script's stderr unless it exited 0. One failure is tolerated:
    gloo aborting a rank during process-group teardown (GLOO_TEARDOWN_ABORT, seen under heavy
    load) after `result` was written, since the results are complete by then.
    Past `timeout` the script and every process it started (its ranks) are killed, then
    subprocess.TimeoutExpired is raised: killing the launcher alone left hung ranks running.
    """
    import os
    import signal
    import subprocess
    from pathlib import Path

    # a session of its own: the ranks it spawns share its process group, killed as one
    launched = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, start_new_session=True)
    try:
        out, err = launched.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launched.pid, signal.SIGKILL)
        out, err = launched.communicate()
        raise subprocess.TimeoutExpired(launched.args, timeout, output=out, stderr=err) from None
    proc = subprocess.CompletedProcess(launched.args, launched.returncode, out, err)
    if check:
        teardown_abort = GLOO_TEARDOWN_ABORT in proc.stderr and Path(result).exists()
        assert proc.returncode == 0 or teardown_abort, proc.stderr[-3000:]
    return proc


__all__ = ["free_port", "run_workers", "GLOO_TEARDOWN_ABORT", "TOLERANCES", "tolerance", "assert_close", "CanaryBuffer",
           "poisoned_empty", "poison_grads", "LaunchCounter"]


def report_rank(queue, job, rank, world, port, *args) -> None:
    """A `bench.spawn_jobs` target that reports who it was (importable by spawned processes)."""
    queue.put((job, rank, world, port, args))
