import importlib
import os
import subprocess
import sys

import pytest
import torch

# the probe module imported at collection, under the session's TRITON_INTERPRET: `_forget_probe_module`
# then puts it back after each test that redefines the probe kernel (a worker that first imported it
# inside such a test kept its compiled-mode kernel, and every later interpreter call there failed: triton 3.6)
import gpukernels_common._probe  # noqa: F401
from gpukernels_common import Backend, explain_backend, select_backend


def test_reference_forced(monkeypatch):
    monkeypatch.setenv("GKC_BACKEND", "reference")
    assert select_backend(torch.zeros(2)) is Backend.REFERENCE


def test_cpu_with_interpreter(monkeypatch):
    monkeypatch.setenv("GKC_BACKEND", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend, why = explain_backend(torch.zeros(2))
    assert backend is Backend.INTERPRET and "TRITON_INTERPRET" in why


def test_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("GKC_BACKEND", "auto")
    assert select_backend(torch.zeros(2)) is Backend.REFERENCE


@pytest.mark.parametrize("forced", ["triton", "interpret"])
def test_forcing_triton_on_cpu_without_interpreter_is_an_error(monkeypatch, forced):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("GKC_BACKEND", forced)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_backend(torch.zeros(2))


def test_bad_backend_value(monkeypatch):
    monkeypatch.setenv("GKC_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="GKC_BACKEND"):
        select_backend(torch.zeros(2))


@pytest.mark.parametrize("backend", ["auto", "triton", "interpret"])
def test_meta_tensors_use_reference(monkeypatch, backend):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("GKC_BACKEND", backend)  # shape propagation, whatever runs the real tensors
    assert select_backend(torch.empty(2, device="meta")) is Backend.REFERENCE


def test_the_interpreter_backend_refuses_cuda_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("GKC_BACKEND", "interpret")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # reached before any CUDA call
    with pytest.raises(RuntimeError, match="GKC_BACKEND=interpret needs CPU tensors"):
        select_backend(device="cuda")


def test_import_does_not_import_triton():
    code = "import sys, gpukernels_common, gpukernels_common.testing, gpukernels_common.bench; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _pythonpath() -> dict:
    # a source checkout run without installing (the GPU machine) finds the packages through it
    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}


def test_info_cli_names_backend_and_reason():
    out = subprocess.run([sys.executable, "-m", "gpukernels_common", "info"], capture_output=True, text=True, check=True,
                         env={"TRITON_INTERPRET": "1", "PATH": "", **_pythonpath()})
    assert "cpu: backend=interpret because CPU tensors and TRITON_INTERPRET=1" in out.stdout


def test_info_cli_explains_a_bad_backend_setting():
    out = subprocess.run([sys.executable, "-m", "gpukernels_common", "info"], capture_output=True, text=True, check=True,
                         env={"GKC_BACKEND": "bogus", "PATH": "", **_pythonpath()})
    assert "cpu: misconfigured: GKC_BACKEND='bogus' is not one of" in out.stdout
    assert "requested backend: misconfigured" in out.stdout


@pytest.mark.gpu
def test_cuda_tensors_pick_compiled_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("GKC_BACKEND", "auto")
    assert select_backend(torch.zeros(2, device="cuda")) is Backend.TRITON


def _forget_probe_module(monkeypatch):
    """The next import defines the probe kernel afresh; the test's end puts the old module back."""
    import gpukernels_common

    monkeypatch.delitem(sys.modules, "gpukernels_common._probe", raising=False)
    monkeypatch.delattr(gpukernels_common, "_probe", raising=False)


def test_the_interpreter_probe_passes_here(monkeypatch):
    from gpukernels_common import backend

    # on its own, whatever ran before it: the probe kernel defined afresh under the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backend, "_INTERPRETER_WORKS", [False])
    _forget_probe_module(monkeypatch)
    assert backend.interpreter_fault() is None  # the tests run the interpreter: it must compute


def test_kernels_defined_for_compiling_are_not_blamed_on_numpy(monkeypatch):
    """TRITON_INTERPRET set after triton defined the kernels: they are compiled ones, which the
    probe says instead of suspecting the interpreter's numpy."""
    from gpukernels_common import backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _forget_probe_module(monkeypatch)
    importlib.import_module("gpukernels_common._probe")  # defined afresh, for compiling

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fault = backend._probe_interpreter()
    assert "defined the kernels for compiling" in fault and "numpy" not in fault


@pytest.mark.parametrize("value, on", [("1", True), ("0", False), ("", False), (" 1", False), ("2", False)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, on):
    from gpukernels_common import env

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert env.triton_interpret() is on


class _KernelThatStoresNothing:
    """What Triton 3.1's interpreter does under numpy 2: the launch returns, no store lands."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_an_interpreter_that_drops_stores_is_refused_with_its_versions(monkeypatch):
    from gpukernels_common import _probe, backend

    monkeypatch.setattr(_probe, "probe_kernel", _KernelThatStoresNothing())
    fault = backend._probe_interpreter()
    assert "stores came back as [10, 10, 10]" in fault and "numpy" in fault and "GKC_BACKEND=reference" in fault
    # a failed probe is not remembered: probed again (and raised) on the next call
    answers = [fault, None]
    monkeypatch.setattr(backend, "_probe_interpreter", lambda: answers.pop(0))
    monkeypatch.setattr(backend, "_INTERPRETER_WORKS", [False])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("GKC_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match="the Triton interpreter does not work"):
        select_backend(torch.zeros(2))
    assert select_backend(torch.zeros(2)) is Backend.INTERPRET and not answers
    assert select_backend(torch.zeros(2)) is Backend.INTERPRET  # a success is remembered: no third probe


def test_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
        explain_backend(device="cuda")


def test_bench_timing_variables_name_themselves(monkeypatch):
    from gpukernels_common import env

    monkeypatch.setenv("GKC_BENCH_REP_MS", "")
    assert env.bench_rep_ms() == 100.0  # empty: the default, as the other variables
    monkeypatch.setenv("GKC_BENCH_REP_MS", "nan")
    with pytest.raises(ValueError, match="GKC_BENCH_REP_MS='nan'"):
        env.bench_rep_ms()


def test_gpu_launch_shapes_takes_device_strings_with_an_index(monkeypatch):
    from gpukernels_common import env

    monkeypatch.delenv("GKC_GPU_LAUNCH_SHAPES", raising=False)
    assert env.gpu_launch_shapes("cuda:0") and env.gpu_launch_shapes(torch.device("cuda", 1))
    assert not env.gpu_launch_shapes("cpu")
