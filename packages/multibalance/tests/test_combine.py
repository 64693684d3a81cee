"""The weighted sum every combining balancer ends with: Triton kernel vs the PyTorch reference."""

import pytest
import torch

from gpukernels_common import select_backend
from gpukernels_common.testing import CanaryBuffer, assert_close
from multibalance.combine import weighted_sum
from multibalance.naive import weighted_sum_reference


def _inputs(n_tasks, shape, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(shape, generator=gen).to(device, dtype) for _ in range(n_tasks)]
    coeff = (torch.rand(n_tasks, generator=gen, dtype=torch.float64) * 3 - 1).to(device)
    expected = sum(c * g.double() for c, g in zip(coeff.tolist(), grads))
    return grads, coeff, expected


@pytest.mark.parametrize("n_tasks", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_reference_into_canary_output(monkeypatch, n_tasks, dtype):
    monkeypatch.setenv("GKC_BACKEND", "interpret")
    grads, coeff, expected = _inputs(n_tasks, (37, 291), dtype)  # 10,767 elements: a partial last block
    assert select_backend(grads[0]).uses_triton
    out = CanaryBuffer(grads[0].shape, dtype=dtype)
    result = weighted_sum(grads, coeff, out=out.tensor)
    out.check("weighted_sum")
    assert result is out.tensor
    assert_close(result, expected.to(dtype), dtype=dtype, backend="interpret", name="kernel")
    reference = weighted_sum_reference([g.clone() for g in grads], coeff, torch.full_like(grads[0], float("nan")))
    assert_close(result, reference, dtype=dtype, backend="interpret", name="kernel vs reference")


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_default_output_is_the_first_gradient(monkeypatch, backend):
    monkeypatch.setenv("GKC_BACKEND", backend)
    grads, coeff, expected = _inputs(10, (5, 3, 7), torch.float32)
    first = grads[0]
    result = weighted_sum(grads, coeff)
    assert result.data_ptr() == first.data_ptr()
    assert_close(result, expected.float(), name=backend)


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_float64_gradients_keep_float64_precision(monkeypatch, backend):
    """The kernel accumulates in fp32: float64 gradients (a float64 model) take the reference and
    keep their precision (through the kernel they were off by 1e-5 relative)."""
    monkeypatch.setenv("GKC_BACKEND", backend)
    grads, coeff, expected = _inputs(5, (37, 291), torch.float64)
    torch.testing.assert_close(weighted_sum(grads, coeff), expected, rtol=1e-13, atol=1e-13)


def test_nan_in_a_gradient_propagates(monkeypatch):
    monkeypatch.setenv("GKC_BACKEND", "interpret")
    grads, coeff, _ = _inputs(3, (4, 5), torch.float32)
    grads[2][1, 1] = float("nan")
    out = weighted_sum(grads, coeff)
    assert torch.isnan(out[1, 1]) and torch.isfinite(out).sum() == out.numel() - 1


def test_non_contiguous_gradients_use_the_reference(monkeypatch):
    monkeypatch.setenv("GKC_BACKEND", "interpret")
    grads, coeff, expected = _inputs(3, (6, 4), torch.float32)
    grads = [g.t() for g in grads]
    assert_close(weighted_sum(grads, coeff), expected.t().float())


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_expanded_first_gradient_is_not_written(monkeypatch, backend):
    """autograd.grad returns an expanded view for a head that sum-pools its input: its elements
    share memory, so the sum goes to a new tensor and the view is left as it was."""
    monkeypatch.setenv("GKC_BACKEND", backend)
    grads, coeff, _ = _inputs(3, (6, 1, 4), torch.float32)
    grads[0] = grads[0].expand(6, 5, 4)
    grads[1:] = [g.expand(6, 5, 4).contiguous() for g in grads[1:]]
    before = grads[0].clone()
    expected = sum(c * g.double() for c, g in zip(coeff.tolist(), grads))
    out = weighted_sum(grads, coeff)
    assert out.is_contiguous() and out.data_ptr() != grads[0].data_ptr()
    assert_close(out, expected.float(), name=backend)
    assert torch.equal(grads[0], before)


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_fp16_coefficient_past_fp16_range_on_a_zero_gradient(monkeypatch, backend):
    """A task whose gradient is zero gets a huge scale (5e10, inf in fp16): it contributes nothing
    (inf * 0 would be NaN everywhere)."""
    monkeypatch.setenv("GKC_BACKEND", backend)
    g = torch.randn(4, 6).half()
    for grads, coeff in (([g.clone(), torch.zeros_like(g)], [1.0, 5e10]), ([torch.zeros_like(g), g.clone()], [5e10, 1.0])):
        torch.testing.assert_close(weighted_sum(grads, torch.tensor(coeff)), g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_accumulates_half_precision_in_fp32(monkeypatch, dtype):
    """As the kernel (and the README's "Precision"): the sum is rounded to bf16/fp16 once. The
    reference chained bf16 multiply-adds, rounding at every task: 16 tasks came out 2.6x further
    from the exact sum than its rounding, most elements off by an ulp or more."""
    monkeypatch.setenv("GKC_BACKEND", "reference")
    grads, coeff, expected = _inputs(16, (64, 64), dtype)
    got = weighted_sum(grads, coeff)
    assert (got != expected.to(dtype)).float().mean() < 0.01  # an fp32 sum rounds otherwise only near a tie


@pytest.mark.parametrize("grads, coeff, out, match", [
    ([], torch.ones(0), None, "at least one"),
    ([torch.zeros(3), torch.zeros(4)], torch.ones(2), None, r"grads\[1\]"),
    ([torch.zeros(3), torch.zeros(3, dtype=torch.float64)], torch.ones(2), None, r"grads\[1\]"),
    ([torch.zeros(3)], torch.ones(2), None, "coeff must be"),
    ([torch.zeros(3)], torch.ones(1, dtype=torch.int64), None, "coeff must be"),
    ([torch.zeros(3)], torch.ones(1), torch.zeros(4), "out must be"),
])
def test_bad_arguments(grads, coeff, out, match):
    with pytest.raises(ValueError, match=match):
        weighted_sum(grads, coeff, out=out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_matches_reference_on_gpu(dtype):
    grads, coeff, expected = _inputs(11, (1027, 513), dtype, device="cuda")
    assert select_backend(grads[0]).value == "triton"
    out = weighted_sum(grads, coeff, out=torch.full_like(grads[0], float("nan")))
    assert_close(out, expected.to(dtype), dtype=dtype, backend="triton")
