"""`python -m gpukernels_common info`: which backend a call would use, and why."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import __version__, env
from .backend import explain_backend
from .device import device_name, has_cuda, triton_available, triton_version


def info() -> str:
    lines = [f"gpukernels-common {__version__}", f"torch {torch.__version__}", f"triton {triton_version() or 'not installed'}"]
    for var in ("GKC_BACKEND", "TRITON_INTERPRET", "GKC_QUICK", "GKC_GPU_LAUNCH_SHAPES"):
        lines.append(f"{var}={os.environ.get(var, '')!s}")
    devices = ["cpu"] + (["cuda"] if has_cuda() else [])
    for dev in devices:
        try:
            backend, why = explain_backend(device=dev)
            lines.append(f"{dev}: backend={backend.value} because {why} [{device_name(dev)}]")
        except (RuntimeError, ValueError) as err:  # a bad GKC_BACKEND is what this command should explain
            lines.append(f"{dev}: misconfigured: {err}")
    try:
        requested = env.requested_backend()
    except ValueError as err:
        requested = f"misconfigured: {err}"
    lines.append(f"triton importable: {triton_available()}; requested backend: {requested}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpukernels_common")
    parser.add_argument("command", choices=["info"])
    parser.parse_args(argv)
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
