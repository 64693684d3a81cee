"""DDP over 2 gloo processes gives the same gradients as one process on the global batch."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from gpukernels_common.testing import free_port, run_workers

WORKER = Path(__file__).with_name("ddp_worker.py")
_spec = importlib.util.spec_from_file_location("mb_ddp_worker", WORKER)
ddp_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ddp_worker)




@pytest.mark.parametrize(("norm", "path", "ddp_options", "norm_lag"), [
    *[(norm, path, "default", 0) for norm in ("batch", "sample") for path in ("factored", "general", "tanh heads")],
    # the heads' backward and the bottom's are two autograd calls: DDP still reduces each gradient once
    ("batch", "factored", "small buckets", 0),
    ("batch", "factored", "static graph", 0),
    # the norms' sum over ranks awaited a step later
    ("batch", "factored", "default", 1),
    ("sample", "general", "default", 1),
    ("batch", "sum-pooled heads", "default", 0),
    # a regulariser of the bottom alone (an MoE aux loss) joins the bottom's one backward
    ("batch", "factored + aux_loss", "default", 0),
    ("batch", "tanh heads + aux_loss", "default", 0),
])  # the worker asserts the path each side took
def test_ddp_equals_single_process(tmp_path, norm, path, ddp_options, norm_lag):
    out = tmp_path / "grads.pt"
    run_workers([sys.executable, WORKER, free_port(), norm, path, out, ddp_options, norm_lag], out)
    got = torch.load(out, weights_only=True)
    net = ddp_worker.Net()
    expected = ddp_worker.train(net, net, norm, path, *ddp_worker.data(), norm_lag)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=f"{norm} {path}: {k}")


def test_a_representation_read_on_some_ranks_only_keeps_the_ranks_in_step(tmp_path):
    """A step in which no task reads one representation on rank 1 (a head that reads it only for
    some batches) while rank 0's do: backward() dropped it on rank 1 alone, so the ranks' norms
    all-reduces differed in size and rank 0 waited in it until the group's timeout. It is kept
    (a zero gradient, as before the drop of stale attachments), on every rank alike."""
    out = tmp_path / "states.pt"
    run_workers([sys.executable, Path(__file__).with_name("ddp_unread_worker.py"), free_port(), out], out, timeout=120)
    (ema0, grad0), (ema1, grad1) = torch.load(out, weights_only=True)
    assert ema0.shape == (2, 2)
    torch.testing.assert_close(ema1, ema0)  # the same averages on both ranks
    assert grad0.shape == grad1.shape == (6, 4)
