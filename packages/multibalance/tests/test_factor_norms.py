"""The factored path's task norms: the Triton kernel (two Gram matrices per task in registers)
against the PyTorch reference (batched matmuls) and against the norms of the formed gradients."""

import pytest
import torch

import multibalance.factor_norms as factor_norms_module
from gpukernels_common.testing import CanaryBuffer
from multibalance.factor_norms import MAX_WIDTH, factor_square_sums
from multibalance.naive import factor_square_sums_reference


def _factors(rows, n_tasks, width, d, seed):
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(rows, n_tasks * width, generator=gen)
    right = torch.randn(n_tasks * width, d, generator=gen)
    left[:, :width] = 0  # task 0 reads nothing: a zero norm, exactly
    return left, right


@pytest.mark.parametrize("rows,n_tasks,width,d", [(37, 3, 5, 70), (1, 1, 1, 3), (300, 2, 33, 17), (64, 5, 16, 129),
                                                  (9, 2, MAX_WIDTH, 300), (1500, 2, 3, 1100)])  # several tiles
def test_kernel_matches_reference_and_formed_gradients(monkeypatch, rows, n_tasks, width, d):
    monkeypatch.setenv("GKC_BACKEND", "interpret")
    canaries = []

    def output(n, like):
        canaries.append(CanaryBuffer((n,), dtype=like.dtype))
        return canaries[-1].tensor

    monkeypatch.setattr(factor_norms_module, "_output", output)
    left, right = _factors(rows, n_tasks, width, d, seed=rows + width)
    got = factor_square_sums(left, right, n_tasks)
    assert len(canaries) == 1 and got.data_ptr() == canaries[0].tensor.data_ptr()  # the kernel ran
    canaries[0].check("factor_square_sums")
    reference = factor_square_sums_reference(left, right, n_tasks)
    formed = torch.stack([(left[:, t * width:(t + 1) * width].double() @ right[t * width:(t + 1) * width].double())
                          .pow(2).sum() for t in range(n_tasks)]).float()
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, formed, rtol=1e-5, atol=1e-5)
    assert got[0] == 0


@pytest.mark.parametrize("where", ["left", "right"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_overflowing_factors_give_non_finite_norms(monkeypatch, where, bad):
    """An overflowing step (a GradScaler's inf factors) must give a non-finite norm, as the
    reference does, so that the moving averages skip it (a NaN clamped to 0 was averaged in)."""
    monkeypatch.setenv("GKC_BACKEND", "interpret")
    left, right = _factors(20, 3, 4, 11, seed=2)
    if where == "left":
        left[3, 5] = bad  # task 1's columns
    else:
        right[5, 3] = bad  # task 1's rows
    got = factor_square_sums(left, right, 3)
    expected = factor_square_sums_reference(left, right, 3)
    assert torch.isfinite(got).tolist() == torch.isfinite(expected).tolist() == [True, False, True]
    torch.testing.assert_close(got[[0, 2]], expected[[0, 2]], rtol=1e-5, atol=1e-5)


def test_wide_heads_and_float64_take_the_reference(monkeypatch):
    monkeypatch.setenv("GKC_BACKEND", "interpret")
    monkeypatch.setattr(factor_norms_module, "factor_square_sums_reference",
                        lambda *args: torch.full((2,), -1.0))  # stands for the reference: seen in the output
    left, right = _factors(7, 2, MAX_WIDTH + 1, 9, seed=1)
    assert factor_square_sums(left, right, 2).tolist() == [-1.0, -1.0]
    left, right = _factors(7, 2, 4, 9, seed=1)
    assert factor_square_sums(left.double(), right.double(), 2).tolist() == [-1.0, -1.0]
    assert factor_square_sums(left, right, 2).tolist() != [-1.0, -1.0]  # the kernel


def test_mismatched_factors_are_refused():
    with pytest.raises(ValueError, match=r"must share T\*width"):
        factor_square_sums(torch.ones(3, 6), torch.ones(5, 4), 2)
    with pytest.raises(ValueError, match=r"must share T\*width"):
        factor_square_sums(torch.ones(3, 6), torch.ones(6, 4), 4)
