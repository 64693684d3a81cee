"""What a step costs the host: no read from the device beyond the losses' check that equal
weights make too (on a GPU each read waits for the device), and the cheaper forms of the
per-step checks and constants give the same results."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import multibalance
from gpukernels_common.testing import LaunchCounter
from multibalance import MultiBalance
from multibalance.naive import running_average

# ops that copy a value to the host (`.item()`, `bool()`, `float()`, `.tolist()`) or size an output by
# the values (nonzero): on a GPU each waits for the device
_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique"}


class _DeviceReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _READS:
            self.reads.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


class _Model(torch.nn.Module):
    def __init__(self, first):
        super().__init__()
        torch.manual_seed(3)
        self.bottom = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh())
        self.heads = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(12, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
                                         for _ in range(3))
        self.first = first

    def losses(self, rep, y):
        inp = rep if self.first == "linear" else torch.tanh(rep)  # tanh first: the general path
        return {t: ((h(inp).squeeze(1) - y[i]) ** 2).mean() for i, (t, h) in enumerate(zip("abc", self.heads))}


def _reads_per_step(make, first, scaler=None, steps=4):
    model, bal = _Model(first), make()
    g = torch.Generator().manual_seed(4)
    counted = []
    for _ in range(steps):
        x, y = torch.randn(10, 5, generator=g), torch.randn(3, 10, generator=g)
        rep = bal.attach(model.bottom(x))
        losses = model.losses(rep, y)
        mode = _DeviceReads()
        with mode:
            bal.backward(losses, scaler=scaler)
        counted.append(mode.reads)
    return counted[2:], bal  # norm_lag=1 reads once whether its averages have started, until they have


@pytest.mark.parametrize("first", ["linear", "tanh"])
@pytest.mark.parametrize("kwargs", [{}, {"norm": "sample"}, {"norm_lag": 1}, {"target": "mean"}, {"target": "b"},
                                    {"warmup_steps": 3}, {"weights": {"a": 2.0, "c": 0.5}}, {"relax": 1.0, "beta": 0.5}])
def test_a_step_reads_nothing_from_the_device_but_the_loss_check(first, kwargs):
    """The losses' finiteness check (one read for all tasks, made by equal weights too) is the
    step's only read of the device: the norms, averages and coefficients stay on it."""
    equal, _ = _reads_per_step(lambda: multibalance.EqualWeights(list("abc")), first)
    balanced, bal = _reads_per_step(lambda: MultiBalance(list("abc"), **kwargs), first)
    assert bal.last_path == ("factored" if first == "linear" else "general")
    assert equal == [["_local_scalar_dense"]] * 2
    assert balanced == equal


def test_a_step_with_a_grad_scaler_reads_nothing_more():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    balanced, bal = _reads_per_step(lambda: MultiBalance(list("abc")), "linear", scaler=scaler)
    assert bal.last_path == "factored" and balanced == [["_local_scalar_dense"]] * 2


@pytest.mark.parametrize("values, finite", [([1.0, 2.0], True), ([-0.0, 0.0], True), ([3e38, 3e38], True),
                                            ([1.0, float("inf")], False), ([float("-inf"), 1.0], False),
                                            ([float("nan"), 1.0], False)])
def test_running_average_skips_exactly_the_non_finite_steps(values, finite):
    """Whether a step is averaged in: every value finite, also values whose sum overflows."""
    average = torch.tensor([[4.0, 8.0]])
    got = running_average(average, torch.tensor([values]), beta=0.5)
    expected = average.lerp(torch.tensor([values]), 0.5) if finite else average
    torch.testing.assert_close(got, expected, equal_nan=True)
    started = running_average(torch.full((1, 2), float("nan")), torch.tensor([values]), beta=0.5)
    torch.testing.assert_close(started, torch.tensor([values]) if finite else torch.full((1, 2), float("nan")),
                               equal_nan=True)


def test_per_sample_row_counts_of_many_batch_sizes():
    """The factored path keeps its per-sample row counts as tensors made once per batch size (a
    bounded number of them); with a new size every step its averages still match the general
    path, which counts the rows every step."""
    fast, slow = MultiBalance(list("abc"), norm="sample"), MultiBalance(list("abc"), norm="sample")
    slow.uses_norms_only = False
    model = _Model("linear")
    g = torch.Generator().manual_seed(5)
    for batch in range(1, 80):
        x, y = torch.randn(batch, 5, generator=g), torch.randn(3, batch, generator=g)
        for bal in (fast, slow):
            rep = bal.attach(model.bottom(x))
            bal.backward(model.losses(rep, y))
    assert fast.last_path == "factored" and slow.last_path == "general"
    assert len(fast._constants) <= 64
    torch.testing.assert_close(fast.ema, slow.ema, rtol=1e-5, atol=1e-7)


def test_losses_of_mixed_dtypes_are_checked_exactly():
    """The losses are checked together, in one stack: float16, bfloat16 and float64 losses (their
    largest finite values among them) pass, and a non-finite one is still named."""
    bal = multibalance.EqualWeights(list("abc"))
    z = torch.ones(3, requires_grad=True)
    big = torch.finfo(torch.float16).max
    rep = bal.attach(z * 1.0)
    bal.backward({"a": (rep.sum() * big / 3).half(), "b": rep.sum().bfloat16(), "c": rep.sum().double() * 1e300})
    rep = bal.attach(z * 1.0)
    with pytest.raises(ValueError, match="loss 'b' is not finite"):
        bal.backward({"a": rep.sum().half(), "b": (rep.sum() * 1e300).double() * 1e300, "c": rep.sum()})


@pytest.mark.parametrize("first,bound", [("linear", 3), ("tanh", 7)])
@pytest.mark.parametrize("kwargs", [{}, {"norm_lag": 1}])
def test_launches_beyond_equal_weights(monkeypatch, first, bound, kwargs):
    """On a Triton backend MultiBalance's statistics (norms to coefficients) are one kernel, and the
    factored path's norms another: a step launches at most `bound` kernels more than equal
    weights' (the factors side by side, their norms, the statistics, the combination); through
    the reference ops it was 16 and 19."""
    monkeypatch.setenv("GKC_BACKEND", "interpret")
    launches = LaunchCounter().count_triton_launches(monkeypatch)
    counts = {}
    for name, make in (("equal", lambda: multibalance.EqualWeights(list("abc"))),
                       ("multibalance", lambda: MultiBalance(list("abc"), **kwargs))):
        model, bal = _Model(first), make()
        g = torch.Generator().manual_seed(4)
        for _ in range(3):  # the last step counted: the averages started, constants made
            x, y = torch.randn(10, 5, generator=g), torch.randn(3, 10, generator=g)
            losses = model.losses(bal.attach(model.bottom(x)), y)
            launches.ops.clear()
            with launches:
                bal.backward(losses)
        counts[name] = launches.launches
    assert bal.last_path == ("factored" if first == "linear" else "general")
    assert counts["multibalance"] - counts["equal"] <= bound, counts
