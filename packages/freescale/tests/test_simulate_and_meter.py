import json
import time

import pytest
import torch

from freescale import BubbleMeter, CostModel, bubble_reduction, simulate
from freescale.data import zipf_lengths


def test_simulator_balanced_reduces_bubble_at_scale():
    world, per = 64, 64
    batches = list(zipf_lengths(world * per * 3, seed=1, max_len=1024).split(world * per))
    cost = CostModel(a=256.0, b=1.0)
    naive = simulate(batches, world, cost, method="contiguous")
    bal = simulate(batches, world, cost, method="lpt_equal")
    assert naive.bubble_ratio > 0.1
    assert bubble_reduction(naive.bubble_ratio, bal.bubble_ratio) > 0.8
    assert abs(naive.bubble_ratio + naive.exposed_comm_ratio + naive.busy_ratio - 1) < 1e-9


def test_sm_free_removes_overlap_slowdown():
    batches = [torch.full((8,), 100)]
    kw = dict(world_size=2, cost_model=CostModel(a=1.0), seconds_per_cost=1e-3, embedding_bytes_per_token=1000.0, link_bandwidth=1e6)
    sm = simulate(batches, **kw, overlap_slowdown=0.4, sm_free=False)
    free = simulate(batches, **kw, overlap_slowdown=0.4, sm_free=True)
    # compute 0.4 s per rank, comm 0.4 s fully overlapped: SM-based compute slows by 40%
    assert sm.step_times[0] == pytest.approx(0.56) and free.step_times[0] == pytest.approx(0.4)


def test_meter_parts_add_up(tmp_path):
    meter = BubbleMeter()
    for i in range(3):
        with meter.step(samples=4):
            with meter.compute():
                time.sleep(0.01 * (i + 1))
            meter.sync(lambda: time.sleep(0.005))
    s = meter.summary()
    assert s["busy_ratio"] + s["bubble_ratio"] + s["exposed_comm_ratio"] + s["untracked_ratio"] == pytest.approx(1.0)
    assert s["untracked_ratio"] < 0.05 and s["exposed_comm_ratio"] > 0.1
    trace = json.loads(meter.chrome_trace(tmp_path / "t.json").read_text())
    assert {e["name"] for e in trace["traceEvents"]} >= {"step", "compute", "collective"}


def test_simulate_bad_inputs():
    with pytest.raises(ValueError, match="world_size"):
        simulate([torch.tensor([1])], 0, CostModel())
    with pytest.raises(ValueError, match="empty"):
        simulate([], 2, CostModel())
    with pytest.raises(ValueError, match="link_bandwidth must be > 0"):
        simulate([torch.tensor([1, 2])], 2, CostModel(), embedding_bytes_per_token=1, link_bandwidth=0)
    with pytest.raises(ValueError, match="overlap_slowdown must be a finite fraction >= 0, got -1"):
        simulate([torch.tensor([1, 2])], 2, CostModel(), overlap_slowdown=-1)
    with pytest.raises(ValueError, match="world_size must be an int >= 1, got 2.0"):
        simulate([torch.tensor([1, 2])], 2.0, CostModel())


def test_simulate_zero_lengths_and_a_2d_batch_tensor():
    zero = simulate([torch.zeros(4, dtype=torch.long)], 2, CostModel(a=1.0, b=1.0))  # nothing to compute
    assert zero.step_times == [0.0] and zero.bubble_ratio == 0.0
    rows = torch.tensor([[1, 2], [3, 4]])  # one global batch per row
    assert simulate(rows, 2, CostModel()).step_times == simulate(list(rows), 2, CostModel()).step_times


def test_meter_steps_do_not_nest():
    """A step inside a step overwrote the outer one's record and crashed on its exit with a
    TypeError; now the inner one is refused, naming the TrainPipeline case, and the outer one is kept."""
    meter = BubbleMeter()
    with meter.step(samples=3):
        with pytest.raises(RuntimeError, match="steps do not nest"):
            with meter.step():
                pass
        meter.add_samples(2)
    assert len(meter.steps) == 1 and meter.steps[0]["samples"] == 5
    with pytest.raises(RuntimeError, match="no step is open"):
        meter.add_samples(1)


@pytest.mark.parametrize("lengths, expected", [([-10, 20, 30, 40], "batches\\[1\\] must be non-negative"),
                                               ([1.5, 20.0, 30.0, 40.0], "batches\\[1\\] must be integer counts")])
def test_simulate_refuses_lengths_that_are_not_counts(lengths, expected):
    """Negative lengths were simulated at a positive cost and float ones at fractional positions."""
    with pytest.raises(ValueError, match=expected):
        simulate([torch.tensor([1, 2]), torch.tensor(lengths)], 2, CostModel(a=1.0, b=1.0))


@pytest.mark.parametrize("kwargs, named", [({"alpha": 1.0}, "alpha"), ({"alpha": 0.5}, "alpha"),
                                           ({"min_len": 0}, "min_len"), ({"max_len": 10}, "max_len")])
def test_zipf_lengths_checks_its_arguments(kwargs, named):
    """alpha = 1 was a ZeroDivisionError, alpha < 1 gave lengths below min_len, max_len < min_len
    lengths above max_len."""
    with pytest.raises(ValueError, match=named):
        zipf_lengths(5, **kwargs)


def test_meter_compute_waits_for_the_gpu(monkeypatch):
    """On a GPU the kernels launched in `compute()` run after their launches return: the meter
    waits for them inside compute, else their time counted as the next barrier's straggler wait."""
    synced = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: (time.sleep(0.05), synced.append(True)))
    meter = BubbleMeter()
    with meter.step():
        with meter.compute():
            pass
    assert synced == [True]
    assert meter.steps[0]["compute"] >= 0.05  # the wait is compute time


@pytest.mark.parametrize("skip", [-1, 1.5, True])
def test_meter_summary_refuses_a_skip_that_is_not_a_count(skip):
    meter = BubbleMeter()
    for _ in range(3):
        with meter.step():
            pass
    with pytest.raises(ValueError, match="skip must be an integer >= 0"):
        meter.summary(skip=skip)
    assert meter.summary(skip=3)["step_ms"] == 0.0  # every step skipped: nothing to average
