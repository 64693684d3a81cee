"""Expert parallelism over 2 gloo processes equals the single-process layer (outputs and gradients)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from gpukernels_common.testing import free_port, run_workers
from moeblaze import moe_experts

WORKER = Path(__file__).with_name("ep_worker.py")
_spec = importlib.util.spec_from_file_location("moe_ep_worker", WORKER)
ep_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ep_worker)


def test_expert_parallel_equals_single_process(tmp_path):
    out = tmp_path / "ep.pt"
    run_workers([sys.executable, WORKER, free_port(), out], out)
    ranks = torch.load(out, weights_only=True)
    x, ids, w, wg, wu, wd = ep_worker.inputs()
    tensors = [t.clone().requires_grad_() for t in (x, w, wg, wu, wd)]
    y = moe_experts(tensors[0], ids, tensors[1], *tensors[2:])
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    y.backward(grad_out)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), tensors[0].grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["dw"] for r in ranks]), tensors[1].grad, rtol=1e-5, atol=1e-5)
    for i, full in enumerate(tensors[2:]):
        torch.testing.assert_close(torch.cat([r["dparams"][i] for r in ranks]), full.grad, rtol=1e-5, atol=1e-5)


def test_expert_parallel_needs_a_process_group():
    with pytest.raises((RuntimeError, ValueError)):
        from moeblaze import expert_parallel_experts

        x, ids, w, wg, wu, wd = ep_worker.inputs()
        expert_parallel_experts(x, ids, w, wg, wu, wd, n_experts=4)
