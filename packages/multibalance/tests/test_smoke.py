"""Smoke test run from the built wheel in an isolated venv: public API + one tiny balanced step."""

import torch

import multibalance


def test_one_balanced_step():
    assert multibalance.__version__.count(".") == 2
    bottom, head_a, head_b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    bal = multibalance.MultiBalance(["a", "b"])
    rep = bal.attach(bottom(torch.randn(5, 3)))
    scales = bal.backward({"a": head_a(rep).pow(2).mean(), "b": 10 * head_b(rep).pow(2).mean()})
    assert set(scales) == {"a", "b"} and bottom.weight.grad is not None
