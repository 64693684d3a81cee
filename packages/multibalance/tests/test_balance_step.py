"""MultiBalance's per-step statistics: the one-program Triton kernel against the PyTorch reference
(`naive.balance_step_reference`, the ops the balancer ran before), on odd [reps, tasks] tiles."""

import pytest
import torch

import multibalance.balance_step as balance_step_module
from gpukernels_common.testing import CanaryBuffer
from multibalance import MultiBalance
from multibalance.balance_step import balance_step


def _case(kind, reps, tasks, has_ema, seed, bad=None):
    gen = torch.Generator().manual_seed(seed)
    norms = torch.rand(reps, tasks, generator=gen) * 10
    norms[0, -1] = 0.0  # a task that does not read representation 0
    if kind == "norms":
        values = norms
    elif kind == "squares":
        values = norms * norms
    elif kind == "per_sample":
        rows = torch.randint(0, 40, (reps, tasks), generator=gen).float()  # 0 rows: clamped to 1
        values = torch.stack([norms * rows.clamp_min(1), rows])
    else:
        values = None
    if bad is not None and values is not None:
        values.view(-1)[values.numel() // 3] = bad
    ema = torch.rand(reps, tasks, generator=gen) * 5 if has_ema or kind == "none" else torch.zeros(0)
    if ema.numel():
        ema[0, -1] = 0.0  # ... and never did: its average there is 0 (no scale to match for a target task)
    if has_ema == "nan":  # every earlier step overflowed: the averages are NaN until one is finite
        ema.fill_(float("nan"))
    step = torch.tensor(int(torch.randint(0, 6, (), generator=gen)), dtype=torch.long)
    return values, ema, step


def _run(monkeypatch, backend, values, kind, ema, step, canaries=None, **options):
    monkeypatch.setenv("GKC_BACKEND", backend)
    if canaries is not None:
        def output(shape, like):
            canaries.append(CanaryBuffer(shape, dtype=like.dtype))
            return canaries[-1].tensor
        monkeypatch.setattr(balance_step_module, "_output", output)
    step = step.clone()
    ema_out, scales, coeff = balance_step(None if values is None else values.clone(), kind, ema.clone(), step, **options)
    return ema_out, scales, coeff, step


KINDS = ["none", "norms", "squares", "per_sample"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", ["max", "mean", 0, 4])
@pytest.mark.parametrize("reps,tasks", [(1, 2), (3, 5), (2, 17)])
def test_kernel_matches_reference(monkeypatch, kind, target, reps, tasks):
    if isinstance(target, int) and target >= tasks:
        target = tasks - 1  # the last task: it does not read representation 0
    values, ema, step = _case(kind, reps, tasks, has_ema=True, seed=reps * 100 + tasks)
    gen = torch.Generator().manual_seed(tasks)
    weights = torch.rand(tasks, generator=gen) + 0.5 if tasks % 2 else None
    options = dict(beta=0.9, relax=0.7, eps=1e-12, target=target, warmup_steps=2 if reps > 1 else 0, weights=weights)
    canaries = []
    got = _run(monkeypatch, "interpret", values, kind, ema, step, canaries, **options)
    for i, c in enumerate(canaries):
        c.check(f"output {i}")
    expected = _run(monkeypatch, "reference", values, kind, ema, step, **options)
    for name, g, e in zip(("ema", "scales", "coeff", "step"), got, expected):
        torch.testing.assert_close(g, e, rtol=2e-6, atol=1e-6, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")
    assert got[3] == step + 1
    if weights is None:
        assert got[2] is got[1]


@pytest.mark.parametrize("kind", ["norms", "squares", "per_sample"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("has_ema", [True, False, "nan"])
def test_non_finite_norms_and_fresh_averages(monkeypatch, kind, bad, has_ema):
    """A step with a non-finite norm keeps the averages (NaN before any finite step); the first
    step starts them; NaN averages give NaN scales on both paths."""
    for poison in (None, bad):
        values, ema, step = _case(kind, 2, 3, has_ema, seed=7, bad=poison)
        options = dict(beta=0.8, relax=1.0, eps=1e-12, target="max", warmup_steps=0, weights=None)
        got = _run(monkeypatch, "interpret", values, kind, ema, step, **options)
        expected = _run(monkeypatch, "reference", values, kind, ema, step, **options)
        for name, g, e in zip(("ema", "scales", "coeff", "step"), got, expected):
            torch.testing.assert_close(g, e, rtol=2e-6, atol=1e-6, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")
        if poison is not None and has_ema is True:
            assert torch.equal(got[0], ema)  # left as it was


def test_beta_at_or_below_one_half_takes_lerps_other_side(monkeypatch):
    """torch.lerp's two-sided form: at beta = 0 the average is the new norm exactly (the one-sided
    form, old + 1 * (new - old), can miss it by an ulp)."""
    values, ema, step = _case("norms", 2, 3, True, seed=3)
    for beta in (0.5, 0.2, 0.0):
        options = dict(beta=beta, relax=0.5, eps=1e-12, target="mean", warmup_steps=0, weights=None)
        got = _run(monkeypatch, "interpret", values, "norms", ema, step, **options)
        expected = _run(monkeypatch, "reference", values, "norms", ema, step, **options)
        torch.testing.assert_close(got[0], expected[0], rtol=2e-7, atol=0)
        if beta == 0.0:
            assert torch.equal(got[0], values)


def test_float64_statistics_take_the_reference(monkeypatch):
    values, ema, step = _case("squares", 2, 3, True, seed=1)
    values, ema = values.double(), ema.double()
    options = dict(beta=0.9, relax=0.7, eps=1e-12, target="max", warmup_steps=0, weights=None)
    got = _run(monkeypatch, "interpret", values, "squares", ema, step, **options)
    expected = _run(monkeypatch, "reference", values, "squares", ema, step, **options)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)



@pytest.mark.parametrize("ema_dtype, values_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_averages_of_another_dtype_follow_the_norms(monkeypatch, ema_dtype, values_dtype):
    """Averages of another dtype than the norms (an older checkpoint, or a step on the other path
    with representations of mixed dtypes) take the reference, which averages the norms in (it
    raised 'expected dtype ... for `end`')."""
    values, ema, step = _case("squares", 2, 3, True, seed=1)
    options = dict(beta=0.9, relax=0.7, eps=1e-12, target="max", warmup_steps=0, weights=None)
    expected = _run(monkeypatch, "reference", values.to(values_dtype), "squares", ema.to(values_dtype),
                    step.clone(), **options)
    for backend in ("interpret", "reference"):
        got = _run(monkeypatch, backend, values.to(values_dtype), "squares", ema.to(ema_dtype), step.clone(),
                   **options)
        assert [g.dtype for g in got[:3]] == [values_dtype] * 3
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=0)


def test_bad_arguments_are_named():
    ema, step = torch.ones(1, 2), torch.zeros((), dtype=torch.long)
    options = dict(beta=0.9, relax=0.7, eps=1e-12)
    with pytest.raises(ValueError, match="kind must be one of"):
        balance_step(ema, "sums", ema, step, target="max", **options)
    with pytest.raises(ValueError, match="values must be None exactly when kind is 'none'"):
        balance_step(ema, "none", ema, step, target="max", **options)
    with pytest.raises(ValueError, match="target must be"):
        balance_step(ema, "norms", ema, step, target="min", **options)
    with pytest.raises(ValueError, match=r"values must be \[2, reps, tasks\]"):
        balance_step(ema, "per_sample", ema, step, target="max", **options)
    for index in (-1, 2):  # a negative index read an empty column (scales 1 everywhere), silently
        with pytest.raises(ValueError, match=r"target must be a task index in \[0, 2\)"):
            balance_step(ema, "norms", ema, step, target=index, **options)


@pytest.mark.parametrize("target", ["max", "mean", "b"])
@pytest.mark.parametrize("norm_lag", [0, 1])
def test_balancer_steps_agree_across_backends(monkeypatch, target, norm_lag):
    """The balancer through the kernel and through the reference, over steps that start the
    averages, overflow once and warm up: the same scales and state every step."""
    states = {}
    for backend in ("interpret", "reference"):
        monkeypatch.setenv("GKC_BACKEND", backend)
        torch.manual_seed(0)
        bal = MultiBalance(["a", "b", "c"], target=target, norm_lag=norm_lag, warmup_steps=1,
                           weights={"a": 1.0, "b": 2.0, "c": 0.5})
        lin = torch.nn.Linear(4, 6)
        seen = []
        for i in range(5):
            x = torch.randn(9, 4)
            rep = bal.attach(lin(x))
            # step 2 overflows: a finite loss whose gradient is NaN (sqrt's slope at 0, times 0)
            first = (rep[:, :2] * 0).sqrt().sum() if i == 2 else rep[:, :2].pow(2).sum()
            losses = [first, (rep * 3).sum(), rep[:, 3].tanh().sum() * 0.1]
            bal.backward(losses)
            seen.append((bal.scales.clone(), bal.ema.clone(), bal.step.clone(), lin.weight.grad.clone()))
            assert torch.isfinite(bal.ema).all()
            lin.weight.grad = None
        states[backend] = seen
    for got, expected in zip(states["interpret"], states["reference"]):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=2e-6, atol=1e-6, equal_nan=True)
