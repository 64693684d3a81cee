import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import compile_check  # noqa: E402
import launch_recorder  # noqa: E402

KERNELS = '''
import triton
import triton.language as tl

SCALE = 3  # a plain global: the interpreter reads it, the compiler refuses it


@triton.jit
def good_kernel(out_ptr, x_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2, mask=i < n)


@triton.jit
def global_kernel(out_ptr, x_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.load(x_ptr + i, mask=i < n) * SCALE, mask=i < n)
'''


@pytest.mark.parametrize("value, cls", [(1, 1), (32, 16), (7, 3), (2**33, 2**32), (2**33 + 1, 2**32 + 3), (-16, 16)])
def test_integers_are_recorded_by_their_specialisation_class(value, cls):
    assert launch_recorder._int_class(value) == cls


def _entry(name, dtype="float32"):
    tensor = {"tensor": dtype, "aligned": True}
    return {"module": "gkc_compile_check_kernels", "name": name, "options": {},
            "args": {"out_ptr": tensor, "x_ptr": tensor, "n": {"int": 3}, "BLOCK": 128}}


def test_a_kernel_only_the_interpreter_accepts_fails_the_check(tmp_path, monkeypatch, capsys):
    (tmp_path / "gkc_compile_check_kernels.py").write_text(KERNELS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the compile runs in child processes
    log = tmp_path / "launches.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in [_entry("good_kernel", "float16"), _entry("global_kernel")]))
    failures = compile_check.check(log, [90])
    out = capsys.readouterr().out
    assert failures == 1, out
    lines = {line.split()[2].split(".")[-1]: line for line in out.splitlines() if line[:4] in ("ok  ", "FAIL")
             and " sm_90 " in line}
    assert len([line for line in out.splitlines() if line.startswith("ok ")]) == 2  # fp16 and its bf16 twin
    assert lines["good_kernel"].startswith("ok") and "regs" in lines["good_kernel"]
    assert lines["global_kernel"].startswith("FAIL") and "SCALE" in lines["global_kernel"]


def test_only_packages_with_kernels_are_recorded_by_default():
    # a package without @triton.jit (freescale) would spend CI minutes recording nothing
    assert compile_check.with_kernels(compile_check.PACKAGES) == ["silvertorch", "moeblaze", "multibalance"]


def test_a_log_without_launches_is_a_clear_error(tmp_path):
    log = tmp_path / "launches.jsonl"
    log.write_text("")
    with pytest.raises(SystemExit, match="no Triton kernel launch to compile"):
        compile_check.check(log, [90])
