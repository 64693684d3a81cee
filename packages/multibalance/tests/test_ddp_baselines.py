"""The baselines under DDP (2 gloo processes): every rank keeps the same state and the gradients of
one process on the global batch, or the balancer refuses to run (the parameter-level forms)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from gpukernels_common.testing import free_port, run_workers

WORKER = Path(__file__).with_name("ddp_baselines_worker.py")
sys.path.insert(0, str(WORKER.parent))
_spec = importlib.util.spec_from_file_location("mb_ddp_baselines_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

PARAMETER_LEVEL = [n for n in worker.NAMES if n.endswith("(params)")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_baselines") / "results.pt"
    run_workers([sys.executable, WORKER, free_port(), out], out, timeout=300)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("name", [n for n in worker.NAMES if n not in PARAMETER_LEVEL])
def test_ddp_baseline_equals_single_process(ranks, name):
    net = worker.Net()
    expected_grads, expected_state = worker.train(name, net, net, *worker.data())
    for rank, results in enumerate(ranks):
        assert not isinstance(results[name], str), results[name]
        grads, state = results[name]
        for k in expected_grads:
            torch.testing.assert_close(grads[k], expected_grads[k], rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}: {k}")
        assert set(state) == set(expected_state)
        for k in expected_state:
            torch.testing.assert_close(state[k], expected_state[k].to(state[k].dtype), rtol=1e-5, atol=1e-6,
                                       msg=f"rank {rank} {name}: state {k}")


@pytest.mark.parametrize("name", PARAMETER_LEVEL)
def test_parameter_level_balancers_refuse_ddp(ranks, name):
    cls = name.split("(")[0]
    for results in ranks:
        assert isinstance(results[name], str), f"{name} ran under DDP"
        assert results[name].startswith("RuntimeError"), results[name]
        assert f"{cls} with shared_parameters=" in results[name] and "world size 2" in results[name]
        assert "Under DDP use MultiBalance" in results[name]
