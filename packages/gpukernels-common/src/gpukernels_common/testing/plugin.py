"""pytest plugin (entry point `pytest11`): markers `gpu` and `slow`, `--gkc-quick`, fixtures.

- `gpu`: skipped with a visible reason when CUDA is absent.
- `slow`: runs by default; skipped with a visible reason under `--gkc-quick`.
- `--gkc-quick` (or GKC_QUICK=1): tests pick their small shape subsets through the `quick` fixture.

The plugin loads in every pytest run of an environment that has gpukernels-common installed, so
its option carries a prefix: a plain `--quick` would clash with other projects' own.
"""

from __future__ import annotations

import pytest
import torch

from .. import env
from ..backend import explain_backend


def pytest_addoption(parser):
    group = parser.getgroup("gpukernels")
    group.addoption("--gkc-quick", action="store_true", default=False, help="run the quick shape subsets; skip `slow` tests")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped visibly without one)")
    config.addinivalue_line("markers", "slow: long test (skipped visibly under --gkc-quick)")


def _quick(config) -> bool:
    return bool(config.getoption("--gkc-quick", default=False)) or env.quick()


def pytest_report_header(config):
    try:
        backend, why = explain_backend(device="cpu")
        cpu = f"backend={backend.value} ({why})"
    except (RuntimeError, ValueError) as err:  # a header must not stop the run (of any project in this env)
        cpu = f"misconfigured: {err}"
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return [f"gpukernels: CPU {cpu}; CUDA device: {cuda}; quick={_quick(config)}"]


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (marker `gpu`); none is available")
    quick_skip = pytest.mark.skip(reason="`slow` test skipped by --gkc-quick / GKC_QUICK=1")
    for item in items:
        # markers only: `item.keywords` also holds directory names and parametrize ids
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if item.get_closest_marker("slow") is not None and _quick(config):
            item.add_marker(quick_skip)


@pytest.fixture
def quick(request) -> bool:
    """True when the run asked for quick shape subsets."""
    return _quick(request.config)


@pytest.fixture
def seed() -> int:
    torch.manual_seed(0)
    return 0


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
