import pytest
import torch

from gpukernels_common import Backend
from gpukernels_common.testing import CanaryBuffer


@pytest.fixture(params=[Backend.REFERENCE, Backend.INTERPRET], ids=["reference", "interpret"])
def backend(request, monkeypatch):
    """Run a test through the PyTorch reference and through the Triton kernels (interpreter)."""
    monkeypatch.setenv("GKC_BACKEND", "reference" if request.param is Backend.REFERENCE else "interpret")
    return request.param


class _CanaryAllocations:
    """Every `torch.empty_like` / `Tensor.new_empty` becomes a NaN-poisoned view inside a
    canary-padded buffer: an element a kernel forgets to write stays NaN, and a store past the
    end of its output (which the interpreter does not catch) overwrites a canary."""

    def __init__(self, monkeypatch):
        self.buffers = []

        def poisoned_empty_like(t, *, dtype=None, device=None, **_):
            return self._alloc(t.shape, dtype or t.dtype, device or t.device)

        def poisoned_new_empty(t, *size, dtype=None, device=None, **_):
            shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
            return self._alloc(shape, dtype or t.dtype, device or t.device)

        # dynamo maps torch's functions to its rules once per process, by identity: built while
        # torch.empty_like is patched, the map holds the stand-in, and a later torch.compile of
        # code calling the real one fails ("marked as skipped"). Built first, it holds the real one.
        torch._dynamo.trace_rules.get_torch_obj_rule_map()
        monkeypatch.setattr(torch, "empty_like", poisoned_empty_like)
        monkeypatch.setattr(torch.Tensor, "new_empty", poisoned_new_empty)

    def _alloc(self, shape, dtype, device):
        buf = CanaryBuffer(shape, dtype=dtype, device=device, pad=256)
        self.buffers.append(buf)
        return buf.tensor

    def check(self):
        assert self.buffers, "nothing was allocated through the poisoned allocators"
        for i, buf in enumerate(self.buffers):
            buf.check(f"allocation {i} {tuple(buf.shape)}")


@pytest.fixture
def canary_allocations(monkeypatch):
    """NaN-poisoned, canary-padded allocations for the test's duration; call `.check()` at the end."""
    return _CanaryAllocations(monkeypatch)
