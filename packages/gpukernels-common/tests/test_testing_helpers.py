import pytest
import torch

from gpukernels_common import Backend
from gpukernels_common.testing import CanaryBuffer, assert_close, poison_grads, poisoned_empty, tolerance


def test_assert_close_passes_within_tolerance():
    x = torch.randn(100)
    assert_close(x + 1e-8, x)


def test_assert_close_fails_and_says_where():
    x = torch.randn(10, 10)
    y = x.clone()
    y[3, 7] += 10.0
    with pytest.raises(AssertionError, match=r"at index \(3, 7\)"):
        assert_close(y, x, name="scores")


def test_assert_close_nan_mismatch_fails():
    x = torch.zeros(4)
    y = x.clone()
    y[2] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(y, x)


def test_assert_close_integers_exact():
    with pytest.raises(AssertionError, match="1/3 elements differ"):
        assert_close(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]))


def test_tolerance_tiers():
    assert tolerance(torch.float32, Backend.TRITON)[0] > tolerance(torch.float32, Backend.INTERPRET)[0]
    assert tolerance(torch.bfloat16, "interpret")[0] >= 1.6e-2 - 1e-12
    assert tolerance(torch.int32) == (0.0, 0.0)


def test_canary_detects_out_of_bounds_write():
    buf = CanaryBuffer((3, 5), torch.float32)
    assert torch.isnan(buf.tensor).all()
    buf.tensor.fill_(1.0)
    buf.check()
    buf.buffer[buf.pad + 15] = 0.0  # one past the end
    with pytest.raises(AssertionError, match="after"):
        buf.check()


def test_poisoned_empty_and_grads():
    assert torch.isnan(poisoned_empty((2, 2))).all()
    assert (poisoned_empty((2,), torch.int32) == torch.iinfo(torch.int32).min).all()
    w = torch.zeros(3, requires_grad=True)
    w.sum().backward()
    poison_grads(w)
    assert torch.isnan(w.grad).all()


def test_quick_fixture_is_bool(quick):
    assert isinstance(quick, bool)


def test_run_workers_tolerates_only_a_teardown_abort_after_results(tmp_path):
    import sys

    from gpukernels_common.testing import GLOO_TEARDOWN_ABORT, run_workers

    result = tmp_path / "result.txt"
    abort = f"import sys; sys.stderr.write({GLOO_TEARDOWN_ABORT!r}); sys.exit(134)"
    with pytest.raises(AssertionError, match="terminate called"):
        run_workers([sys.executable, "-c", abort], result)  # no result written: a failure
    result.write_text("done")
    assert run_workers([sys.executable, "-c", abort], result).returncode == 134
    with pytest.raises(AssertionError, match="boom"):
        run_workers([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(1)"], result)
    assert run_workers([sys.executable, "-c", "raise SystemExit(3)"], result, check=False).returncode == 3


def test_run_workers_kills_every_process_of_a_hung_script(tmp_path):
    """A script whose ranks hang: past the timeout the launcher and its children are killed (the
    launcher alone was, and hung ranks ran on as orphans, loading the machine)."""
    import os
    import subprocess
    import sys
    import time

    from gpukernels_common.testing import run_workers

    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
              f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(600)")
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_workers([sys.executable, "-c", script], tmp_path / "result.pt", timeout=5)
    assert time.monotonic() - start < 60
    child = int(pid_file.read_text())
    stat = f"/proc/{child}/stat"
    for _ in range(50):  # gone, or a zombie not yet reaped by init
        try:
            with open(stat) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        raise AssertionError("the hung script's child process outlived run_workers")


def test_plugin_skips_by_marker_only_and_survives_a_bad_backend_setting(tmp_path):
    """A directory or parametrize id named `gpu` is not the `gpu` marker, and a GKC_BACKEND that
    cannot work on this machine shows in the header instead of stopping the run: the plugin loads
    in every pytest run of the environment, other projects' too."""
    import os
    import subprocess
    import sys

    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "test_cpu_only.py").write_text("def test_runs():\n    pass\n")
    (tmp_path / "test_ids.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('where', ['gpu', 'slow'])\ndef test_runs(where):\n    pass\n\n"
        "@pytest.mark.gpu\ndef test_marked():\n    pass\n")
    plugin = [] if "PYTHONPATH" not in os.environ else ["-p", "gpukernels_common.testing.plugin"]  # source-tree runs
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path), "-rs", "-p", "no:cacheprovider", "--gkc-quick", *plugin],
                         capture_output=True, text=True, cwd=tmp_path, env={**env, "GKC_BACKEND": "triton"}, timeout=120)
    assert "gpukernels: CPU misconfigured: GKC_BACKEND=triton" in out.stdout, out.stdout + out.stderr
    gpu_skipped = 0 if torch.cuda.is_available() else 1
    assert f"{4 - gpu_skipped} passed" in out.stdout and (f"{gpu_skipped} skipped" in out.stdout or not gpu_skipped), out.stdout


def test_assert_close_compares_integers_in_their_own_dtype():
    # int64 values past 2**53 differ in low bits a float64 copy would drop (Bloom words are such)
    with pytest.raises(AssertionError, match="2/2 elements differ"):
        assert_close(torch.tensor([2**62 + 1, -(2**63) + 1]), torch.tensor([2**62, -(2**63)]))
    assert_close(torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1, 2]))  # widths may differ


def test_assert_close_refuses_a_floating_and_an_integer_tensor():
    with pytest.raises(AssertionError, match="not comparable"):
        assert_close(torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1.0, 2.0]))


def test_assert_close_compares_complex_parts():
    assert_close(torch.tensor([1 + 1j]), torch.tensor([1 + 1j]))
    with pytest.raises(AssertionError, match="relative RMS error"):
        assert_close(torch.tensor([1 + 1j]), torch.tensor([1 + 5j]))


def test_float64_has_a_tolerance_on_every_backend():
    for backend in Backend:
        assert tolerance(torch.float64, backend)[0] <= 1e-10
    assert_close(torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), backend="interpret")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8, torch.int8, torch.bool,
                                   torch.complex64, torch.complex128])
def test_canary_and_poison_fit_every_dtype(dtype):
    buf = CanaryBuffer((5,), dtype, pad=4)
    buf.check()
    poison = buf.tensor[:1].clone()
    if dtype == torch.uint8:
        assert int(poison) == 255  # not 0: a correct zero must not look unwritten
    if dtype.is_complex:  # NaN in both parts, as poisoned_empty gives
        assert torch.view_as_real(poison.to(torch.complex64)).isnan().all()
        assert torch.view_as_real(poisoned_empty((2,), dtype).to(torch.complex64)).isnan().all()
    buf.buffer[-1] = poison  # overwrite a canary
    with pytest.raises(AssertionError, match="after"):
        buf.check()


def test_free_port_stays_out_of_the_ephemeral_range_and_is_not_handed_out_twice():
    """A port from the ephemeral range can be taken by any connection (gloo's own) between the
    check and the rendezvous bind: a CI run failed with EADDRINUSE that way."""
    import socket

    from gpukernels_common.testing import _ephemeral_port_range, free_port

    low, high = _ephemeral_port_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        assert not low <= port <= high, (port, low, high)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # still free


def test_stand_in_device_refuses_host_tensors_as_cuda_does():
    from gpukernels_common.testing.devices import device_factories, on_device

    with device_factories():
        x = on_device(torch.arange(4.0))
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.ones(4)  # a 1-d host tensor
        with pytest.raises(RuntimeError, match="same device"):
            torch.arange(4)[on_device(torch.tensor([1]))]  # a host tensor indexed by device indices
        assert (x + torch.tensor(1.0)).tolist() == [1.0, 2.0, 3.0, 4.0]  # 0-d host tensors are fine
        assert x[torch.tensor([3, 0])].tolist() == [3.0, 0.0]  # so are host indices
        made = torch.zeros(2, device=x.device) + torch.ones(2).to(x.device)
        assert made.device == x.device and made.tolist() == [1.0, 1.0]
        host = x.to("cpu")
        assert type(host) is torch.Tensor and host.tolist() == [0.0, 1.0, 2.0, 3.0]
        assert bool((x > 2).any()) and int(x.sum()) == 6  # values are read as from a GPU


def _counted_op(x: torch.Tensor) -> torch.Tensor:
    return x.mul(2).add(1)  # two launches on a GPU


_COUNTED = None


def test_launch_counter_counts_launches_views_syncs_and_custom_ops_inner_ops(monkeypatch):
    """The CPU stand-in for a GPU call's launches: non-view aten ops plus Triton launches (not the
    interpreter's own copies of their arguments), syncing reads apart, and a registered custom
    op's own ops counted through it (the op itself is no launch)."""
    global _COUNTED
    from gpukernels_common import env, register_op, select_backend
    from gpukernels_common._probe import probe_kernel
    from gpukernels_common.testing import LaunchCounter

    if _COUNTED is None:
        _COUNTED = register_op("gkctest::counted", reference=_counted_op)
    counter = LaunchCounter()
    if env.triton_interpret():
        counter.count_triton_launches(monkeypatch)
    x, out = torch.arange(6.0), torch.zeros(4, dtype=torch.int32)
    select_backend(x)  # warm-up: the backend's one-off check of the interpreter (a probe launch) is not counted
    with counter:
        y = x.view(2, 3).t()  # views: no launch
        z = (y + 1).sum()  # two launches
        float(z)  # a read back: a sync (an op too)
        _COUNTED(x)  # the custom op: its two inner ops
        if env.triton_interpret():
            probe_kernel[(1,)](out, 3, BLOCK=4)
    assert counter.syncs == {"_local_scalar_dense": 1}
    assert "counted" in counter.custom and counter.ops["counted"] == 1
    expected = 2 + 1 + 2 + (1 if env.triton_interpret() else 0)
    assert counter.launches == expected, str(sorted(counter.ops.items()))
    assert counter.ops["triton:probe_kernel"] == (1 if env.triton_interpret() else 0)


def test_launch_counter_counts_ops_that_read_back_inside_one_op_as_syncs():
    """torch.equal / allclose (a Python bool) and bincount (sized by the max) each wait for a GPU,
    but dispatch as one op on the CPU: they were counted as launches and not as syncs."""
    from gpukernels_common.testing import LaunchCounter

    x = torch.tensor([1, 2, 0, 3])
    counter = LaunchCounter()
    with counter:
        torch.equal(x, x)
        torch.allclose(x.double(), x.double())
        torch.bincount(x, minlength=8)
        x.add(1)  # no sync
    assert counter.syncs == {"equal": 1, "allclose": 1, "bincount": 1}, dict(counter.ops)
