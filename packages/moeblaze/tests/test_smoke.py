"""Smoke test run from the built wheel in an isolated venv: public API + one tiny layer call."""

import torch

import moeblaze


def test_moe_forward_backward():
    assert moeblaze.__version__.count(".") == 2
    layer = moeblaze.MoE(8, 16, n_experts=3, top_k=2)
    x = torch.randn(5, 8, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == x.shape
    d = moeblaze.dispatch(torch.tensor([[0, 2], [1, 0]], dtype=torch.int32), 3)
    assert d.expert_offsets.tolist() == [0, 2, 3, 4]
