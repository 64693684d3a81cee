import copy

import pytest
import torch

import multibalance
from multibalance import MultiBalance


def _losses(model, rep, y):
    return {f"t{i}": ((h(rep) - y[i]) ** 2).mean() for i, h in enumerate(model.heads)}


def test_matches_hand_computed_rule(toy):
    model, ids, x, y = toy
    ref = copy.deepcopy(model)
    bal = MultiBalance(["t0", "t1"], relax=0.6, beta=0.9, target="max")
    # step 1 through the balancer
    rep = bal.attach(model.shared(ids, x))
    bal.backward(_losses(model, rep, y))
    # by hand: per-task representation gradients, norms, scales, one backward
    z = ref.shared(ids, x)
    zd = z.detach().requires_grad_()
    losses = _losses(ref, zd, y)
    g = [torch.autograd.grad(loss, zd, retain_graph=True)[0] for loss in losses.values()]
    n = torch.stack([gi.norm() for gi in g])
    s = 0.6 * n.max() / n + 0.4
    z.backward(s[0] * g[0] + s[1] * g[1])
    sum(losses.values()).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert bal.last_scales()["t1"] == pytest.approx(1.0)  # the larger task is the max target
    assert bal.last_scales()["t0"] == pytest.approx(float(s[0]))


def test_ema_over_two_steps():
    bal = MultiBalance(["a", "b"], relax=1.0, beta=0.5, target="a")
    z = torch.ones(1, 2, requires_grad=True)
    for coef_b, expected_ema_b in ((2.0, 2.0), (4.0, 3.0)):
        rep = bal.attach(z * 1.0)
        bal.backward({"a": (rep * torch.tensor([1.0, 0.0])).sum(), "b": (rep * torch.tensor([0.0, coef_b])).sum()})
        assert float(bal.ema[0, 1]) == pytest.approx(expected_ema_b)
    # relax=1: b's gradient scaled to a's magnitude: scale = 1/3 -> G = (1, 4/3)
    assert bal.last_scales()["b"] == pytest.approx(1 / 3)


def _two_task_step(bal, z, coef_b, path):
    """Task a's representation gradient is (1, 0), b's (0, coef_b): norms 1 and coef_b."""
    rep = bal.attach(z * 1.0)
    if path == "factored":  # heads that open with a Linear layer
        head_a, head_b = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            head_a.weight.copy_(torch.tensor([[1.0, 0.0]]))
            head_b.weight.copy_(torch.tensor([[0.0, coef_b]]))
        scales = bal.backward({"a": head_a(rep).sum(), "b": head_b(rep).sum()})
    else:
        scales = bal.backward({"a": (rep * torch.tensor([1.0, 0.0])).sum(), "b": (rep * torch.tensor([0.0, coef_b])).sum()})
    assert bal.last_path == path
    return scales


@pytest.mark.parametrize("path", ["factored", "general"])
def test_norm_lag_averages_each_steps_norms_one_step_later(path):
    """relax=1, target a (norm 1): b's scale is 1 / its running norm. b's norms 2, 4, 8, 1 with
    beta=0.5: averages 2, 3, 5.5, 3.25 exactly; lagged, the scales use the average through the
    step before (the first step its own)."""
    exact = MultiBalance(["a", "b"], relax=1.0, beta=0.5, target="a")
    lagged = MultiBalance(["a", "b"], relax=1.0, beta=0.5, target="a", norm_lag=1)
    for coef_b, exact_ema, lagged_ema in ((2.0, 2.0, 2.0), (4.0, 3.0, 2.0), (8.0, 5.5, 3.0), (1.0, 3.25, 5.5)):
        z = torch.ones(1, 2, requires_grad=True)
        assert _two_task_step(exact, torch.ones(1, 2, requires_grad=True), coef_b, path)["b"] == pytest.approx(1 / exact_ema)
        assert _two_task_step(lagged, z, coef_b, path)["b"] == pytest.approx(1 / lagged_ema)
        assert float(lagged.ema[0, 1]) == pytest.approx(lagged_ema)
        torch.testing.assert_close(z.grad, torch.tensor([[1.0, coef_b / lagged_ema]]))


def test_norm_lag_state_dict_keeps_the_pending_norms():
    """A checkpoint taken between steps carries the norms not yet averaged in."""
    bal = MultiBalance(["a", "b"], relax=1.0, beta=0.5, target="a", norm_lag=1)
    z = torch.ones(1, 2, requires_grad=True)
    for coef_b in (2.0, 4.0):
        _two_task_step(bal, z, coef_b, "general")
    resumed = MultiBalance(["a", "b"], relax=1.0, beta=0.5, target="a", norm_lag=1)
    resumed.load_state_dict(bal.state_dict())
    for b in (bal, resumed):  # both average in the 4 of the step before: (2 + 4) / 2
        assert _two_task_step(b, z, 8.0, "general")["b"] == pytest.approx(1 / 3)
    fresh = MultiBalance(["a", "b"])
    fresh.load_state_dict({k: v for k, v in MultiBalance(["a", "b"]).state_dict().items() if k != "lagged_norms"})


@pytest.mark.parametrize("make", [lambda n: MultiBalance(n, relax=1.0, beta=0.5), lambda n: multibalance.MGDA(n),
                                  lambda n: multibalance.UncertaintyWeighting(n), lambda n: multibalance.GradNorm(n),
                                  lambda n: multibalance.EqualWeights(n)])
def test_backward_returns_each_steps_own_scales(make):
    """The mapping backward returns keeps its step's values after later steps (read lazily)."""
    bal = make(["a", "b"])
    z = torch.ones(1, 2, requires_grad=True)
    returned, logged = [], []
    for coef_b in (2.0, 8.0, 3.0):
        rep = bal.attach(z * 1.0)
        returned.append(bal.backward({"a": (rep * torch.tensor([1.0, 0.0])).sum(),
                                      "b": (rep * torch.tensor([0.0, coef_b])).sum()}))
        logged.append(bal.last_scales())
    for got, expected in zip(returned, logged):
        assert isinstance(got, multibalance.TaskScales)
        assert dict(got) == pytest.approx(expected)
        assert set(got) == (set() if isinstance(bal, multibalance.EqualWeights) else {"a", "b"})
    if isinstance(bal, MultiBalance):
        assert logged[0] != pytest.approx(logged[1])  # the steps differ, so the check above could fail


def test_equal_tasks_leave_gradient_unchanged(toy):
    model, ids, x, y = toy
    ref = copy.deepcopy(model)
    bal = MultiBalance(["t0", "t1"], relax=0.7)
    rep = bal.attach(model.shared(ids, x))
    head = model.heads[0]
    bal.backward({"t0": ((head(rep) - y[0]) ** 2).mean(), "t1": ((head(rep) - y[0]) ** 2).mean()})
    z = ref.shared(ids, x)
    (2 * ((ref.heads[0](z) - y[0]) ** 2).mean()).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)


def test_several_representations_balanced_separately():
    bal = MultiBalance(["a", "b"], relax=1.0, target="max")
    z1 = torch.ones(2, 3, requires_grad=True)
    z2 = torch.ones(2, 3, requires_grad=True)
    r1, r2 = bal.attach(z1 * 1.0, z2 * 1.0)
    bal.backward({"a": r1.sum() + 10 * r2.sum(), "b": 3 * r1.sum() + r2.sum()})
    # rep 1: norms a=sqrt(6), b=3*sqrt(6): a scaled x3 -> 3 + 3 = 6 per element
    torch.testing.assert_close(z1.grad, torch.full((2, 3), 6.0))
    # rep 2: a=10, b=1 -> b scaled x10 -> 10 + 10 = 20
    torch.testing.assert_close(z2.grad, torch.full((2, 3), 20.0))


def test_sample_norm_and_static_weights():
    bal = MultiBalance(["a", "b"], relax=0.0, norm="sample", weights={"b": 0.5})
    z = torch.ones(4, 2, requires_grad=True)
    rep = bal.attach(z * 1.0)
    bal.backward({"a": rep.sum(), "b": rep.sum()})
    torch.testing.assert_close(z.grad, torch.full((4, 2), 1.5))


def test_warmup_uses_plain_sum():
    bal = MultiBalance(["a", "b"], relax=1.0, warmup_steps=1)
    z = torch.ones(1, 1, requires_grad=True)
    rep = bal.attach(z * 1.0)
    bal.backward([rep.sum(), 5 * rep.sum()])
    torch.testing.assert_close(z.grad, torch.full((1, 1), 6.0))


def test_state_dict_roundtrip(toy):
    model, ids, x, y = toy
    bal = MultiBalance(["t0", "t1"])
    rep = bal.attach(model.shared(ids, x))
    bal.backward(_losses(model, rep, y))
    other = MultiBalance(["t0", "t1"])
    other.load_state_dict(bal.state_dict())
    torch.testing.assert_close(other.ema, bal.ema)
    assert int(other.step) == 1


def test_grad_scaler_path_matches_unscaled(toy):
    model, ids, x, y = toy
    ref = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    a, b = MultiBalance(["t0", "t1"]), MultiBalance(["t0", "t1"])
    rep = a.attach(model.shared(ids, x))
    a.backward(_losses(model, rep, y), scaler=scaler)
    rep = b.attach(ref.shared(ids, x))
    b.backward(_losses(ref, rep, y))
    torch.testing.assert_close(a.ema, b.ema)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad / 2.0**10, q.grad)


def test_autocast_bf16_finite(toy):
    model, ids, x, y = toy
    bal = MultiBalance(["t0", "t1"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rep = bal.attach(model.shared(ids, x))
        losses = {k: v.float() for k, v in _losses(model, rep, y).items()}
    bal.backward(losses)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_gradient_accumulation_adds(toy):
    model, ids, x, y = toy
    bal = MultiBalance(["t0", "t1"], beta=0.0)
    for _ in range(2):
        rep = bal.attach(model.shared(ids, x))
        bal.backward(_losses(model, rep, y))
    acc = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    rep = bal.attach(model.shared(ids, x))
    bal.backward(_losses(model, rep, y))
    for a, p in zip(acc, model.parameters()):
        torch.testing.assert_close(a, 2 * p.grad)


def test_torch_compile_model(toy):
    model, ids, x, y = toy
    shared = torch.compile(model.shared, backend="aot_eager")
    bal = MultiBalance(["t0", "t1"])
    rep = bal.attach(shared(ids, x))
    bal.backward(_losses(model, rep, y))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [({"relax": 1.5}, "relax"), ({"beta": 1.0}, "beta"), ({"target": "nope"}, "target"), ({"norm": "l1"}, "norm"),
     ({"weights": {"zz": 1.0}}, "unknown tasks"), ({"norm_lag": 2}, "norm_lag")],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiBalance(["a", "b"], **kwargs)


def test_bad_losses(toy):
    model, ids, x, y = toy
    bal = MultiBalance(["t0", "t1"])
    with pytest.raises(ValueError, match="distinct"):
        MultiBalance(["a", "a"])
    with pytest.raises(RuntimeError, match="attach"):
        bal.backward({"t0": torch.tensor(1.0), "t1": torch.tensor(1.0)})
    rep = bal.attach(model.shared(ids, x))
    losses = _losses(model, rep, y)
    with pytest.raises(ValueError, match="unknown tasks \\['zz'\\]"):
        bal.backward({**losses, "zz": losses["t0"]})
    with pytest.raises(ValueError, match="not finite"):
        bal.backward({"t0": losses["t0"] * float("nan"), "t1": losses["t1"]})
    with pytest.raises(ValueError, match="loss 't1' is not finite \\(inf\\)"):
        bal.backward({"t0": losses["t0"], "t1": losses["t1"] * float("inf")})
    stray = (model.heads[0].weight ** 2).sum()  # does not read the representation
    with pytest.raises(ValueError, match="does not depend on the attached representation"):
        bal.backward({"t0": losses["t0"], "t1": stray})
    with pytest.raises(ValueError, match="requires grad"):
        bal.attach(torch.zeros(3))


def test_public_api():
    assert {"MultiBalance", "PCGrad", "MGDA", "FAMO", "MetaBalance"} <= set(multibalance.__all__)
