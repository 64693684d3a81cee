"""pytest plugin: record every Triton kernel launch the tests make through the interpreter.

    TRITON_INTERPRET=1 GKC_LAUNCH_LOG=launches.jsonl PYTHONPATH=tools \
        pytest packages/moeblaze/tests -p launch_recorder

Each distinct specialisation (kernel, argument dtypes, integer specialisation classes, constexpr
values) is written once as a JSON line; `tools/compile_check.py` then compiles them for a GPU
target without a GPU. Integers are recorded by the class Triton specialises on (1, a multiple of
16, other; 32- or 64-bit), not by value, so one kernel does not yield a line per test shape.
"""

from __future__ import annotations

import inspect
import json
import os

import torch

_seen: set[str] = set()


def _is_constexpr(param: inspect.Parameter) -> bool:
    ann = param.annotation
    return "constexpr" in (ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann)))


def _int_class(v: int) -> int:
    big = not -(2**31) <= v < 2**31
    if v == 1:
        return 1
    if v % 16 == 0:
        return 2**32 if big else 16
    return 2**32 + 3 if big else 3


def _encode(value, constexpr: bool):
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if value is None or isinstance(value, (bool, float, str)):
        return value
    if isinstance(value, int):
        return value if constexpr else {"int": _int_class(value)}
    if hasattr(value, "value"):  # tl.constexpr wrapper
        return _encode(value.value, True)
    name = getattr(value, "name", None)  # tl.dtype
    if isinstance(name, str):
        return {"tl_dtype": name}
    raise TypeError(f"launch_recorder cannot encode argument of type {type(value).__name__}")


def _record(fn, args, kwargs, log_path: str) -> None:
    params = list(inspect.signature(fn.fn).parameters.values())
    bound = {}
    for p, v in zip(params, args):
        bound[p.name] = _encode(v, _is_constexpr(p))
    by_name = {p.name: p for p in params}
    options = {}
    for k, v in kwargs.items():
        if k in by_name:
            bound[k] = _encode(v, _is_constexpr(by_name[k]))
        else:  # launch options: num_warps, num_stages, ...
            options[k] = _encode(v, True)
    entry = {"module": fn.fn.__module__, "name": fn.fn.__qualname__, "args": bound, "options": options}
    line = json.dumps(entry, sort_keys=True)
    if line not in _seen:
        _seen.add(line)
        with open(log_path, "a") as f:
            f.write(line + "\n")


def pytest_configure(config):
    log_path = os.environ.get("GKC_LAUNCH_LOG")
    if not log_path:
        raise RuntimeError("launch_recorder needs GKC_LAUNCH_LOG=<path of the JSON-lines log>")
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("launch_recorder records interpreter launches: set TRITON_INTERPRET=1")
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        _record(self, args, kwargs, log_path)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
