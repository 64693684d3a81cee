import pytest

from gpukernels_common import Backend


@pytest.fixture(params=[Backend.REFERENCE, Backend.INTERPRET], ids=["reference", "interpret"])
def backend(request, monkeypatch):
    """Run a test through the PyTorch reference and through the Triton kernels (interpreter)."""
    monkeypatch.setenv("GKC_BACKEND", "reference" if request.param is Backend.REFERENCE else "interpret")
    return request.param
