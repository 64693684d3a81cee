"""Smoke test run from the built wheel in an isolated venv: public API + tiny calls."""

import torch

import freescale


def test_partition_simulate_and_model():
    assert freescale.__version__.count(".") == 2
    part = freescale.partition([5.0, 1.0, 4.0, 2.0], 2, method="kk_equal")
    assert sorted(torch.cat(part.assignments).tolist()) == [0, 1, 2, 3]
    res = freescale.simulate([torch.tensor([10, 1, 8, 2])], 2, freescale.CostModel(a=1.0, b=0.1), method="lpt_equal")
    assert 0 <= res.bubble_ratio < 1
    model = freescale.HSTURecommender(n_items=10, d_model=8, n_layers=1, n_heads=2)
    logits = model(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([2, 3]))
    assert logits.shape == (2, 10)
