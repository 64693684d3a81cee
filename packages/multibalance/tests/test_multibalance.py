import copy
import math

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


@pytest.mark.parametrize("first", ["linear", "tanh"])
@pytest.mark.parametrize("norm", ["batch", "sample"])
def test_float64_model_is_balanced_in_float64(toy, first, norm):
    """A float64 model's norms and combination stay float64 on both paths (they were fp32: 3e-7
    relative error, where float64's tolerance is 1e-7)."""
    model, ids, x, y = toy
    model, x, y = model.double(), x.double(), [t.double() for t in y]
    ref = copy.deepcopy(model)
    act = (lambda r: r) if first == "linear" else torch.tanh
    bal = MultiBalance(["t0", "t1"], relax=0.6, norm=norm)
    rep = bal.attach(model.shared(ids, x))
    bal.backward(_losses(model, act(rep), y))
    assert bal.last_path == ("factored" if first == "linear" else "general")
    z = ref.shared(ids, x)
    zd = z.detach().requires_grad_()
    losses = _losses(ref, act(zd), y)
    g = [torch.autograd.grad(loss, zd, retain_graph=True)[0] for loss in losses.values()]
    n = torch.stack([gi.norm() if norm == "batch" else gi.norm(dim=1).mean() for gi in g])
    s = 0.6 * n.max() / n + 0.4
    z.backward(s[0] * g[0] + s[1] * g[1])
    sum(losses.values()).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)  # fp32 misses by 1e-7


def test_ema_over_two_steps():
    bal = MultiBalance(["a", "b"], relax=1.0, beta=0.5, target="a")
    z = torch.ones(1, 2, requires_grad=True)
    for coef_b, expected_ema_b in ((2.0, 2.0), (4.0, 3.0)):
        rep = bal.attach(z * 1.0)
        bal.backward({"a": (rep * torch.tensor([1.0, 0.0])).sum(), "b": (rep * torch.tensor([0.0, coef_b])).sum()})
        assert float(bal.ema[0, 1]) == pytest.approx(expected_ema_b)
    # relax=1: b's gradient scaled to a's magnitude: scale = 1/3 -> G = (1, 4/3)
    assert bal.last_scales()["b"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("path", ["factored", "general"])
def test_ema_keeps_beta_of_the_old_average(path):
    """beta=0.75 (not 0.5, where swapping beta and 1 - beta changes nothing): b's norms 2 then 6
    average to 0.75*2 + 0.25*6 = 3, and b's scale (relax=1, target a of norm 1) is 1/3."""
    bal = MultiBalance(["a", "b"], relax=1.0, beta=0.75, target="a")
    for coef_b, expected in ((2.0, 2.0), (6.0, 3.0)):
        scales = _two_task_step(bal, torch.ones(1, 2, requires_grad=True), coef_b, path)
        assert float(bal.ema[0, 1]) == pytest.approx(expected)
    assert scales["b"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("path", ["factored", "general"])
def test_sample_norm_averages_are_means_over_samples(path):
    """norm="sample": the average holds the mean per-sample norm, not the sum over the batch (a
    sum scales with the batch size, and batches of other sizes then mix in the averages)."""
    bal = MultiBalance(["a", "b"], relax=1.0, beta=0.5, target="a", norm="sample")
    for batch in (3, 1):  # per-sample gradients (1, 0) and (0, 2) whatever the batch size
        _two_task_step(bal, torch.ones(batch, 2, requires_grad=True), 2.0, path)
        torch.testing.assert_close(bal.ema, torch.tensor([[1.0, 2.0]]))


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
    # a running balancer loading a checkpoint whose averages hold no finite step yet (its steps
    # overflowed) starts over: the next step uses its own norms, as a first step does
    state = bal.state_dict()
    state["ema"], state["lagged_norms"] = torch.full_like(state["ema"], float("nan")), torch.zeros(0)
    bal.load_state_dict(state)
    assert _two_task_step(bal, z, 8.0, "general")["b"] == pytest.approx(1 / 8)


ALL_BALANCERS = {  # name -> make(task_names, shared parameters)
    "MultiBalance": lambda n, p: MultiBalance(n, relax=1.0, beta=0.5),
    "EqualWeights": lambda n, p: multibalance.EqualWeights(n),
    "UncertaintyWeighting": lambda n, p: multibalance.UncertaintyWeighting(n),
    "GradNorm": lambda n, p: multibalance.GradNorm(n),
    "PCGrad": lambda n, p: multibalance.PCGrad(n),
    "MGDA": lambda n, p: multibalance.MGDA(n),
    "DBMTL": lambda n, p: multibalance.DBMTL(n),
    "FAMO": lambda n, p: multibalance.FAMO(n),
    "MetaBalance": lambda n, p: multibalance.MetaBalance(n, shared_parameters=p),
}


@pytest.mark.parametrize("name", ALL_BALANCERS)
def test_backward_returns_each_steps_own_scales(name):
    """The mapping backward returns keeps its step's values after later steps (read lazily), and
    has every task (as the README's `scales["like"]` reads it)."""
    z = torch.ones(1, 2, requires_grad=True)
    bal = ALL_BALANCERS[name](["a", "b"], [z])
    returned, logged = [], []
    for coef_b in (2.0, 8.0, 3.0):
        rep = bal.attach(z * 1.0)
        returned.append(bal.backward({"a": (rep * torch.tensor([1.0, 0.0])).sum(),
                                      "b": (rep * torch.tensor([0.0, coef_b])).sum()}))
        logged.append(bal.last_scales())
    for got, expected in zip(returned, logged):
        assert isinstance(got, multibalance.TaskScales)
        assert dict(got) == pytest.approx(expected)
        assert set(got) == {"a", "b"}
    if isinstance(bal, MultiBalance):
        assert logged[0] != pytest.approx(logged[1])  # the steps differ, so the check above could fail


@pytest.mark.parametrize("first", ["linear", "tanh"])
@pytest.mark.parametrize("name", ALL_BALANCERS)
def test_aux_loss_joins_the_bottoms_backward_unbalanced(toy, name, first):
    """`backward(losses, aux_loss=aux)`: a regulariser of the bottom alone (as an MoE layer's
    aux_loss) gets its plain gradient on top of the balanced step, in the bottom's one backward."""
    model, ids, x, y = toy
    ref = copy.deepcopy(model)
    act = (lambda r: r) if first == "linear" else torch.tanh
    grads = []
    for m, with_aux in ((model, True), (ref, False)):
        bal = ALL_BALANCERS[name](["t0", "t1"], [*m.emb.parameters(), *m.bottom.parameters()])
        z = m.shared(ids, x)
        aux = 0.1 * z.square().mean()  # computed in the bottom's forward, as a MoE layer's
        if not with_aux:  # the reference: aux's gradient first (the balancers add theirs to what .grad holds)
            aux.backward(retain_graph=True)
        rep = bal.attach(z)
        bal.backward(_losses(m, act(rep), y), aux_loss=aux if with_aux else None)
        grads.append({k: p.grad for k, p in m.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], msg=k)
    with pytest.raises(ValueError, match=r"aux_loss must be a scalar tensor \(0-d\) that requires grad, got shape \(13, 7\)"):
        rep = bal.attach(ref.shared(ids, x))
        bal.backward(_losses(ref, rep, y), aux_loss=ref.shared(ids, x))


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



@pytest.mark.parametrize("first", ["linear", "tanh"])
@pytest.mark.parametrize("norm", ["batch", "sample"])
def test_representations_of_mixed_dtypes_keep_float64_norms(first, norm):
    """An fp32 and a float64 representation: the float64 one's norms are float64 on both paths
    (the general path computed every norm in the first representation's fp32), and a step on the
    other path (here an empty batch, which takes the general path) goes on from the same averages."""
    torch.manual_seed(0)
    bottom = torch.nn.Linear(4, 6)
    heads = torch.nn.ModuleList(torch.nn.ModuleList([torch.nn.Linear(3, 2), torch.nn.Linear(3, 2).double()])
                                for _ in range(2))
    act = (lambda r: r) if first == "linear" else torch.tanh
    bal = MultiBalance(["a", "b"], norm=norm)
    for batch in (5, 0):
        z = bottom(torch.randn(batch, 4))
        r0, r1 = bal.attach(z[:, :3], z[:, 3:].double())
        ds = [r1.detach().requires_grad_()]
        losses = {n: (h[0](act(r0)).double().sum(1) + h[1](act(r1)).sum(1)).pow(2).sum() * (t + 1)
                  for t, (n, h) in enumerate(zip("ab", heads))}
        if batch:
            g = [torch.autograd.grad((h[1](act(ds[0])).sum(1) + h[0](act(r0)).double().sum(1).detach()).pow(2).sum()
                                     * (t + 1), ds[0])[0] for t, h in enumerate(heads)]
            expected = torch.stack([x.norm() if norm == "batch" else x.norm(dim=1).mean() for x in g])
        else:
            expected = 0.9 * expected  # the empty batch's norms are 0
        bal.backward(losses)
        assert bal.last_path == ("factored" if first == "linear" and batch else "general")
        assert bal.ema.dtype == torch.float64
        torch.testing.assert_close(bal.ema[1], expected, rtol=1e-12, atol=0)


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


def test_warmup_does_not_read_the_step_count_from_the_device():
    """With warmup_steps the scales came from `int(self.step)`, a wait for the GPU in every step's
    backward (the step keeps one synchronization point); on `meta` no value can be read."""
    bal = MultiBalance(["a", "b"], relax=1.0, warmup_steps=1)
    bal.ema, bal.step = torch.tensor([[1.0, 4.0]], device="meta"), bal.step.to("meta")  # the running state
    assert bal._step_coefficients().device == torch.device("meta")
    bal.ema, bal.step = torch.tensor([[1.0, 4.0]]), torch.zeros((), dtype=torch.long)  # the same on the host
    torch.testing.assert_close(bal._step_coefficients(), torch.ones(1, 2))
    torch.testing.assert_close(bal._step_coefficients(), torch.tensor([[4.0, 1.0]]))


def test_state_dict_roundtrip(toy):
    model, ids, x, y = toy
    bal = MultiBalance(["t0", "t1"])
    rep = bal.attach(model.shared(ids, x))
    bal.backward(_losses(model, rep, y))
    other = MultiBalance(["t0", "t1"])
    other.load_state_dict(bal.state_dict())
    torch.testing.assert_close(other.ema, bal.ema)
    assert int(other.step) == 1



@pytest.mark.parametrize("norm_lag", [0, 1])
def test_float64_state_dict_resumes_as_an_uninterrupted_run(toy, norm_lag):
    """A float64 model's checkpoint taken mid-training: the next steps equal an uninterrupted
    run's (the loaded averages were cast to the buffers' fp32, and the next step's float64 norms
    then failed to enter them: 'expected dtype float')."""
    model, ids, x, y = toy
    model, x, y = model.double(), x.double(), [t.double() for t in y]

    def run(resume_at):
        net = copy.deepcopy(model)
        bal = MultiBalance(["t0", "t1"], norm_lag=norm_lag)
        grads = []
        for i in range(4):
            if i == resume_at:
                state = copy.deepcopy(bal.state_dict())
                bal = MultiBalance(["t0", "t1"], norm_lag=norm_lag)
                bal.load_state_dict(state)
            net.zero_grad()
            rep = bal.attach(net.shared(ids, x * (1 + i)))
            bal.backward(_losses(net, rep, [t * (2 - i) for t in y]))
            grads.append(net.bottom[0].weight.grad.clone())
        assert bal.ema.dtype == torch.float64
        return grads

    for got, expected in zip(run(2), run(None)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


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
     ({"weights": {"zz": 1.0}}, "unknown tasks"), ({"norm_lag": 2}, "norm_lag"),
     ({"weights": {"a": float("nan")}}, r"weights must be finite numbers, got \{'a': nan\}"),
     ({"warmup_steps": -3}, "warmup_steps must be an integer >= 0, got -3"), ({"warmup_steps": 1.5}, "warmup_steps"),
     ({"weights": [1.0, 0.5]}, "weights must be a mapping from task name to a float .*got list"),
     ({"weights": torch.tensor([1.0, 0.5])}, "weights must be a mapping from task name to a float .*got Tensor"),
     ({"weights": {"a": "heavy"}}, "weights must be finite numbers"),
     ({"relax": "0.7"}, "relax must be a finite number"), ({"beta": None}, "beta must be a finite number"),
     ({"relax": float("nan")}, "relax must be a finite number")],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiBalance(["a", "b"], **kwargs)


def test_numpy_warmup_steps_are_taken_as_an_int():
    import numpy as np

    bal = MultiBalance(["a", "b"], warmup_steps=np.int64(3))
    assert bal.warmup_steps == 3 and type(bal.warmup_steps) is int


def test_task_names_must_not_be_a_bare_string():
    with pytest.raises(ValueError, match=r"got the string 'like' \(for one task: \['like'\]\)"):
        MultiBalance("like")


def test_bad_losses(toy):
    model, ids, x, y = toy
    bal = MultiBalance(["t0", "t1"])
    with pytest.raises(ValueError, match="distinct"):
        MultiBalance(["a", "a"])
    with pytest.raises(RuntimeError, match="attach"):
        bal.backward({"t0": torch.tensor(1.0), "t1": torch.tensor(1.0)})
    stray = (model.heads[0].weight ** 2).sum()  # does not read the representation
    for bad, match in ((lambda ls: {**ls, "zz": ls["t0"]}, "unknown tasks \\['zz'\\]"),
                       (lambda ls: {"t0": ls["t0"] * float("nan"), "t1": ls["t1"]}, "not finite"),
                       (lambda ls: {"t0": ls["t0"], "t1": ls["t1"] * float("inf")}, "loss 't1' is not finite \\(inf\\)"),
                       (lambda ls: {"t0": ls["t0"], "t1": stray}, "does not depend on the attached representation")):
        rep = bal.attach(model.shared(ids, x))
        losses = _losses(model, rep, y)
        with pytest.raises(ValueError, match=match):
            bal.backward(bad(losses))
        with pytest.raises(RuntimeError, match="attach"):  # a refused backward ends the step's attachments
            bal.backward(losses)
    with pytest.raises(ValueError, match="requires grad"):
        bal.attach(torch.zeros(3))
    rep = bal.attach(model.shared(ids, x))
    with pytest.raises(ValueError, match=r"loss 't1' must be a scalar tensor .*got shape \(13, 1\)"):
        bal.backward({"t0": losses["t0"], "t1": (model.heads[1](rep) - y[1]) ** 2})


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan")])
def test_eps_must_be_positive(eps):
    """At eps=0 a task whose gradient is zero on a representation (one it does not read) got the
    scale inf there, and inf * 0 made the bottom's whole gradient NaN, silently."""
    with pytest.raises(ValueError, match="^eps must be a finite number > 0"):
        MultiBalance(["a", "b"], eps=eps)
    bal = MultiBalance(["a", "b"], eps=1e-30)
    z = torch.ones(2, 3, requires_grad=True)
    rep = bal.attach(z * 1.0)
    bal.backward({"a": (rep * 2).sum(), "b": (rep * 0).sum()})
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
@pytest.mark.parametrize("make", [MultiBalance, multibalance.DBMTL, multibalance.FAMO, multibalance.GradNorm])
def test_a_cast_model_keeps_the_balancer_statistics_dtypes(make, cast):
    """A balancer inside a model cast as a whole (`model.bfloat16()` for pure bf16 training), then
    resumed from a checkpoint: the statistics were cast too, and MultiBalance's, DBMTL's and FAMO's
    next step failed ("expected dtype c10::BFloat16 for `end` but got dtype float")."""
    torch.manual_seed(0)
    bottom, heads = torch.nn.Linear(4, 6), torch.nn.ModuleList([torch.nn.Linear(6, 1) for _ in range(2)])

    def step(bal):
        rep = bal.attach(bottom(torch.randn(5, 4)))
        losses = {t: head(rep).pow(2).mean() + 1.0 for t, head in zip("ab", heads)}
        scales = bal.backward(losses)
        if isinstance(bal, multibalance.FAMO):
            bal.update({t: loss.detach() * 0.9 for t, loss in losses.items()})
        return scales

    trained = make(["a", "b"])
    step(trained)
    dtypes = {k: v.dtype for k, v in trained.state_dict().items() if isinstance(v, torch.Tensor)}
    resumed = getattr(torch.nn.ModuleDict({"balancer": make(["a", "b"])}), cast)()["balancer"]
    resumed.load_state_dict(trained.state_dict())
    for _ in range(2):
        assert all(math.isfinite(v) for v in step(resumed).values())
    assert {k: v.dtype for k, v in resumed.state_dict().items() if isinstance(v, torch.Tensor)} == dtypes


@pytest.mark.parametrize("norm", ["batch", "sample"])
def test_an_empty_batch_counts_as_norms_of_zero(norm):
    """A batch with no samples (an uneven last batch, a filter that kept nothing) has norm 0 for
    every task, with either norm; norm="sample" failed on it ("cannot reshape tensor of 0
    elements into shape [0, -1]")."""
    torch.manual_seed(0)
    bottom, heads = torch.nn.Linear(4, 6), torch.nn.ModuleList([torch.nn.Linear(6, 1) for _ in range(2)])
    bal = MultiBalance(["a", "b"], norm=norm, beta=0.5)
    for batch in (0, 3):
        rep = bal.attach(bottom(torch.ones(batch, 4)))
        scales = bal.backward({t: head(rep).pow(2).sum() + 1.0 for t, head in zip("ab", heads)})
        if batch == 0:
            assert bal.ema.tolist() == [[0.0, 0.0]] and dict(scales) == {"a": 1.0, "b": 1.0}
    assert all(math.isfinite(v) and v >= 1.0 for v in scales.values())


def test_attach_under_no_grad_says_gradients_are_disabled():
    """A model whose forward calls attach(), run for evaluation under no_grad: the error said the
    bottom's output must be the bottom's output ("a tensor that requires grad")."""
    bottom = torch.nn.Linear(4, 3)
    bal = MultiBalance(["a", "b"])
    with torch.no_grad(), pytest.raises(ValueError, match=r"requires_grad=False; gradients are disabled here \(torch.no_grad"):
        bal.attach(bottom(torch.ones(2, 4)))
    with pytest.raises(ValueError, match=r"representation 0 .*got a tensor with requires_grad=False$"):
        bal.attach(bottom(torch.ones(2, 4)).detach())
    with pytest.raises(ValueError, match=r"representation 1 .*got list$"):
        bal.attach(bottom(torch.ones(2, 4)), [1.0])


@pytest.mark.parametrize("stray", ["constant", "head parameters only"])
def test_a_loss_that_misses_the_representation_leaves_no_gradient(toy, stray):
    """The error comes before any backward: no head has gradients from the failed step."""
    model, ids, x, y = toy
    bal = MultiBalance(["t0", "t1"])
    rep = bal.attach(model.shared(ids, x))
    bad = torch.tensor(0.3) if stray == "constant" else (model.heads[1].weight ** 2).sum()
    with pytest.raises(ValueError, match="loss 't1' does not depend on the attached representation"):
        bal.backward({"t0": ((model.heads[0](rep) - y[0]) ** 2).mean(), "t1": bad})
    assert all(p.grad is None for p in model.parameters())


def test_public_api():
    assert {"MultiBalance", "PCGrad", "MGDA", "FAMO", "MetaBalance"} <= set(multibalance.__all__)


class _Heads(torch.nn.Module):
    """A shared bottom and three MLP heads: Linear first (the factored path) or tanh first (general)."""

    def __init__(self, first="linear"):
        super().__init__()
        torch.manual_seed(5)
        self.bottom = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh())
        self.first = first
        self.heads = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
                                         for _ in range(3))

    def losses(self, rep, y, big=1.0):
        inp = rep if self.first == "linear" else torch.tanh(rep)
        return {t: ((h(inp).squeeze(1) - y[i]) ** 2).mean() * (big if t == "b" else 1.0)
                for i, (t, h) in enumerate(zip("abc", self.heads))}


def _batches(n):
    g = torch.Generator().manual_seed(6)
    return [(torch.randn(9, 5, generator=g), torch.randn(3, 9, generator=g)) for _ in range(n)]


# fp32 losses whose scaled value overflows: the scaler's default scale 2^16 times 1e35 is past fp32's range
OVERFLOW = 1e35


@pytest.mark.parametrize("name", ["MultiBalance general", *ALL_BALANCERS])
def test_grad_scaler_recipe_with_an_overflow_step(name):
    """The README's AMP recipe, `backward(losses, scaler=scaler)`, `scaler.step`, `scaler.update`, for
    four steps; the second overflows: the scaler skips it (the scale halves, the parameters stay)
    and the balancer's running statistics stay finite, so the steps after it are taken."""
    model = _Heads("tanh" if name.endswith("general") else "linear")
    bal = ALL_BALANCERS[name.split()[0]](["a", "b", "c"], list(model.bottom.parameters()))
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    for step, (x, y) in enumerate(_batches(4)):
        opt.zero_grad()
        rep = bal.attach(model.bottom(x))
        scales = bal.backward(model.losses(rep, y, big=OVERFLOW if step == 1 else 1.0), scaler=scaler)
        before, params = scaler.get_scale(), [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        skipped = scaler.get_scale() < before
        if name not in ("FAMO", "DBMTL"):  # they weigh each loss by 1/L (log losses): the big loss does not overflow
            assert skipped == (step == 1), step
        if skipped:
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
        else:
            assert all(math.isfinite(v) for v in scales.values()), (step, dict(scales))
            assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
        for buffer_name, buf in bal.named_buffers():
            if buf.is_floating_point():
                assert torch.isfinite(buf).all(), (step, buffer_name, buf)
    if name.startswith("MultiBalance"):
        assert bal.last_path == ("general" if name.endswith("general") else "factored")


@pytest.mark.parametrize("first", ["linear", "tanh"])
@pytest.mark.parametrize("norm_lag", [0, 1])
def test_overflowing_norms_are_not_averaged_in(first, norm_lag):
    """Overflowing steps (the first one among them: the averages start at the first finite norm)
    leave the moving averages as if they had not run."""
    model = _Heads(first)
    (x1, y1), (x2, y2) = _batches(2)
    emas = []
    for steps in ([(x1, y1, OVERFLOW), (x1, y1, 1.0), (x2, y2, OVERFLOW), (x2, y2, 1.0), (x1, y1, 1.0)],
                  [(x1, y1, 1.0), (x2, y2, 1.0), (x1, y1, 1.0)]):
        bal, scaler = MultiBalance(["a", "b", "c"], beta=0.5, norm_lag=norm_lag), torch.amp.GradScaler("cpu")
        for x, y, big in steps:
            rep = bal.attach(model.bottom(x))
            bal.backward(model.losses(rep, y, big), scaler=scaler)
        assert bal.last_path == ("factored" if first == "linear" else "general")
        emas.append(bal.ema.clone())
    assert torch.isfinite(emas[0]).all()
    torch.testing.assert_close(emas[0], emas[1])


@pytest.mark.parametrize("name", ["MultiBalance", "MultiBalance general", "GradNorm", "DBMTL"])
def test_zero_weight_task_trains_nothing(name):
    """Static weight 0: the task's head gets zero gradients (as with equal weights) and the
    bottom only the other tasks' (balanced) gradients."""
    model = _Heads("tanh" if name.endswith("general") else "linear")
    x, y = _batches(1)[0]
    bal = ALL_BALANCERS[name.split()[0]](["a", "b", "c"], None)
    bal = type(bal)(["a", "b", "c"], weights={"b": 0.0})
    rep = bal.attach(model.bottom(x))
    bal.backward(model.losses(rep, y))
    assert bal.last_path == "general"
    for p in model.heads[1].parameters():
        assert p.grad is None or not p.grad.any()
    assert all(p.grad.any() for h in (model.heads[0], model.heads[2]) for p in h.parameters())


def test_general_path_writes_no_expanded_task_gradient(monkeypatch):
    """Under torch.distributed the general path takes the task gradients with autograd.grad, which
    returns an expanded view for a head that sum-pools a [B, S, D] representation: the
    combination must not write into it. (One process made to take that path.)"""
    torch.manual_seed(7)
    bottom, heads = torch.nn.Linear(4, 6), [torch.nn.Linear(6, 1) for _ in range(2)]
    x, y = torch.randn(8, 3, 4), torch.randn(2, 8, 1) * torch.tensor([1.0, 5.0]).view(2, 1, 1)
    grads = []
    for data_parallel in (False, True):
        monkeypatch.setattr(MultiBalance, "_data_parallel", staticmethod(lambda dp=data_parallel: dp))
        bottom.zero_grad()
        bal = MultiBalance(["a", "b"])
        rep = bal.attach(torch.tanh(bottom(x)))
        bal.backward({t: ((h(rep.sum(1)) - y[i]) ** 2).mean() for i, (t, h) in enumerate(zip("ab", heads))})
        assert bal.last_path == "general"
        grads.append(bottom.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_state_dict_of_another_task_set_is_refused():
    for make in (lambda n: MultiBalance(n), lambda n: multibalance.GradNorm(n), lambda n: multibalance.FAMO(n)):
        three = make(["a", "b", "c"])
        z = torch.ones(2, 3, requires_grad=True)
        rep = three.attach(z * 1.0)
        three.backward({t: (rep * (i + 1)).sum() for i, t in enumerate("abc")})
        two = make(["a", "b"])
        with pytest.raises(ValueError, match=r"of tasks \['a', 'b', 'c'\]; this one's tasks are \['a', 'b'\]"):
            two.load_state_dict(three.state_dict())
        old = {k: v for k, v in three.state_dict().items() if k != "_extra_state"}  # a checkpoint without names
        with pytest.raises(RuntimeError, match=r"checkpoint is of a balancer with 3 tasks; this one has 2"):
            two.load_state_dict(old)
        with pytest.raises(RuntimeError, match=r"with 3 tasks"):  # the task count from a running statistic alone
            two.load_state_dict({k: v for k, v in old.items() if k != "static_weights"}, strict=False)


@pytest.mark.parametrize("make", [lambda n: MultiBalance(n, weights={n[0]: 2.0}), lambda n: multibalance.GradNorm(n),
                                  lambda n: multibalance.FAMO(n), lambda n: multibalance.DBMTL(n)])
def test_state_dict_is_matched_to_tasks_by_name(make):
    """A checkpoint keeps the task names: the same tasks in another order get their own statistics,
    another task set is refused naming both, and a checkpoint from before the names loads by position."""
    saved = make(["like", "love"])
    z = torch.ones(4, 3, requires_grad=True)
    rep = saved.attach(z * 1.0)
    saved.backward({"like": (rep * 100).sum() + 1.0, "love": (rep * 1).sum() + 30.0})
    state = saved.state_dict()
    assert state["_extra_state"] == {"task_names": ["like", "love"]}
    swapped = make(["love", "like"])
    swapped.load_state_dict(state)
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() and value.shape[-1] == 2:
            torch.testing.assert_close(swapped.state_dict()[key], value.flip(-1), msg=key)
    if isinstance(saved, MultiBalance):  # its scales are state; the others' are the last step's only
        for name in ("like", "love"):
            assert swapped.last_scales()[name] == pytest.approx(saved.last_scales()[name])
    with pytest.raises(ValueError, match=r"\['like', 'love'\].*\['click', 'buy'\]"):
        make(["click", "buy"]).load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "_extra_state"}
    same = make(["like", "love"])
    same.load_state_dict(old)  # strict: a checkpoint without names still loads
    for key, value in old.items():
        torch.testing.assert_close(same.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("make", [MultiBalance, multibalance.GradNorm, multibalance.MGDA, multibalance.FAMO,
                                  multibalance.EqualWeights])
def test_static_weights_come_from_the_constructor_not_the_checkpoint(make):
    """`weights=` is an option, as relax or target: a resumed run with new weights keeps them (the
    checkpoint's silently replaced them). A checkpoint that holds static weights (from before)
    still loads, strictly, and its task count is still checked."""
    old = make(["a", "b"])
    z = torch.ones(2, 3, requires_grad=True)
    rep = old.attach(z * 1.0)
    old.backward({"a": (rep * 1).sum() + 1.0, "b": (rep * 2).sum() + 1.0})
    state = old.state_dict()
    new = make(["a", "b"], weights={"b": 5.0})
    new.load_state_dict(state)
    assert new.static_weight_list() == [1.0, 5.0]
    assert "static_weights" not in state
    legacy = {**state, "static_weights": torch.ones(2)}  # a checkpoint from before
    new = make(["b", "a"], weights={"b": 5.0})
    new.load_state_dict(legacy)
    assert new.static_weight_list() == [5.0, 1.0]
    with pytest.raises(RuntimeError, match="with 3 tasks"):
        make(["a", "b"]).load_state_dict({k: v for k, v in legacy.items() if k != "_extra_state"} | {"static_weights": torch.ones(3)},
                                         strict=False)


@pytest.mark.parametrize("first", ["linear", "tanh"])
def test_norm_lag_after_an_overflowing_first_step(first):
    """norm_lag=1 and a GradScaler whose first step overflows: the averages are still NaN at the next
    (finite) step, which then uses its own norms as a first step does, rather than NaN scales."""
    model = _Heads(first)
    batches = _batches(4)
    runs = []
    for overflow_first in (True, False):
        bal, scaler = MultiBalance(["a", "b", "c"], beta=0.5, norm_lag=1), torch.amp.GradScaler("cpu", init_scale=2.0**16)
        steps = [(*batches[0], OVERFLOW)] if overflow_first else []
        out = []
        for x, y, big in steps + [(x, y, 1.0) for x, y in batches[1:]]:
            model.zero_grad()
            rep = bal.attach(model.bottom(x))
            scales = bal.backward(model.losses(rep, y, big), scaler=scaler)
            out.append((dict(scales), model.bottom[0].weight.grad.clone()))  # the scale stays 2^16 (no update)
        assert bal.last_path == ("factored" if first == "linear" else "general")
        runs.append(out[1:] if overflow_first else out)
    for (s1, g1), (s2, g2) in zip(*runs):  # after the overflow: as a run that starts there
        assert all(math.isfinite(v) for v in s1.values()) and torch.isfinite(g1).all()
        assert s1 == pytest.approx(s2)
        torch.testing.assert_close(g1, g2)


class _TwoReps(torch.nn.Module):
    """Tasks like/love/dislike read `rep`; only like reads `wide` too. Heads open with a Linear
    (the factored path) or a tanh (the general path)."""

    def __init__(self, first):
        super().__init__()
        torch.manual_seed(0)
        self.first = first
        self.bottom, self.wide_bottom = torch.nn.Linear(4, 8), torch.nn.Linear(4, 8)
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(8, 1) for t in ("like", "love", "dislike")})
        self.wide_head = torch.nn.Linear(8, 1)

    def losses(self, rep, wide, y):
        f = (lambda r: r) if self.first == "linear" else torch.tanh
        return {"like": ((self.heads["like"](f(rep)) + self.wide_head(f(wide)) - y[:, :1]) ** 2).mean(),
                "love": ((self.heads["love"](f(rep)) - 3 * y[:, 1:2]) ** 2).mean(),
                "dislike": ((self.heads["dislike"](f(rep)) - y[:, 2:]) ** 2).mean()}


@pytest.mark.parametrize("first", ["linear", "tanh"])
@pytest.mark.parametrize("target", ["max", "mean", "love", "like"])
def test_target_over_the_tasks_that_read_the_representation(first, target):
    """On a representation only `like` reads there is nothing to balance: its gradient is the plain
    one whatever the target (the tasks that do not read it are left out of the mean; a named target
    that does not read it leaves the scales at 1 there). On the representation every task reads,
    the target is as before."""
    model = _TwoReps(first)
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), torch.randn(16, 3, generator=torch.Generator().manual_seed(2))
    grads = {}
    for relax in (0.0, 0.7):
        model.zero_grad()
        bal = MultiBalance(["like", "love", "dislike"], relax=relax, target=target)
        rep, wide = bal.attach(model.bottom(x), model.wide_bottom(x))
        bal.backward(model.losses(rep, wide, y))
        assert bal.last_path == ("factored" if first == "linear" else "general")
        grads[relax] = model.wide_bottom.weight.grad.clone()
    torch.testing.assert_close(grads[0.7], grads[0.0])
    m = bal.ema[0]  # on `rep`, every task reads: the usual target
    expect = {"max": m.max(), "mean": m.mean(), "love": m[1], "like": m[0]}[target]
    torch.testing.assert_close(bal.scales[0], 0.7 * expect / m + 0.3)
    assert bal.scales[1].tolist()[0] == pytest.approx(1.0)


def test_loaded_statistics_stay_on_the_module_device():
    """Statistics sized on first use take the checkpoint's shape on the balancer's device (meta
    here, as a stand-in for a GPU)."""
    bal = MultiBalance(["a", "b"])
    z = torch.ones(2, 3, requires_grad=True)
    rep = bal.attach(z * 1.0)
    bal.backward({"a": rep.sum(), "b": (rep * 2).sum()})
    moved = MultiBalance(["a", "b"]).to("meta")
    with pytest.warns(UserWarning, match="meta"):  # torch: copying into a meta tensor is a no-op
        moved.load_state_dict(bal.state_dict())
    assert moved.ema.device.type == "meta" and moved.ema.shape == (1, 2)
    assert moved.scales.device.type == "meta"


@pytest.mark.parametrize("first", ["linear", "tanh"])
@pytest.mark.parametrize("name", ["MultiBalance", "EqualWeights", "PCGrad", "MGDA", "GradNorm"])
def test_attach_twice_before_backward_balances_both(name, first):
    """A bottom run twice in a step (pairwise heads), each output attached on its own: the same
    gradients as one attach of both (a second attach() replaced the first, whose gradient never
    reached the bottom)."""
    x1, x2, y = torch.randn(9, 5), torch.randn(9, 5), torch.randn(3, 9)
    grads = []
    for separately in (False, True):
        model = _Heads(first)
        bal = ALL_BALANCERS[name](["a", "b", "c"], None)
        if separately:
            r1 = bal.attach(model.bottom(x1))
            r2 = bal.attach(model.bottom(x2))
        else:
            r1, r2 = bal.attach(model.bottom(x1), model.bottom(x2))
        losses = model.losses(r1, y)
        bal.backward({t: loss + other for (t, loss), other in zip(losses.items(), model.losses(r2, y, big=3.0).values())})
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_refused_backward_ends_the_steps_attachments():
    """backward() refusing the losses (NaN) ends the step: the next step's attach() starts afresh
    (its gradients equal a fresh balancer's), not on top of the refused step's representation."""
    model, x, y = _Heads(), torch.randn(9, 5), torch.randn(3, 9)
    bal = MultiBalance(["a", "b", "c"])
    rep = bal.attach(model.bottom(x))
    with pytest.raises(ValueError, match="not finite"):
        bal.backward({**model.losses(rep, y), "a": torch.tensor(float("nan"))})
    model.zero_grad()
    rep = bal.attach(model.bottom(x))
    bal.backward(model.losses(rep, y))
    got = model.bottom[0].weight.grad.clone()
    model.zero_grad()
    fresh = MultiBalance(["a", "b", "c"])
    rep = fresh.attach(model.bottom(x))
    fresh.backward(model.losses(rep, y))
    torch.testing.assert_close(got, model.bottom[0].weight.grad)


@pytest.mark.parametrize("name", ["MultiBalance", "GradNorm", "DBMTL", "PCGrad", "MGDA"])
def test_zero_weight_task_is_the_same_under_data_parallel(name, monkeypatch):
    """Static weight 0 on the path torch.distributed takes (autograd.grad per task): the task's
    gradient counts as zero, as in one process (its real norm set MultiBalance's max target there:
    12x the gradient). One process made to take that path."""
    model, (x, y) = _Heads("tanh"), _batches(1)[0]
    grads = []
    for data_parallel in (False, True):
        monkeypatch.setattr(multibalance.base.Balancer, "_data_parallel", staticmethod(lambda dp=data_parallel: dp))
        bal = type(ALL_BALANCERS[name](["a", "b", "c"], None))(["a", "b", "c"], weights={"b": 0.0})
        for _ in range(3):  # GradNorm's weights and the EMAs move with the steps' norms
            model.zero_grad()
            rep = bal.attach(model.bottom(x))
            bal.backward(model.losses(rep, y, big=50.0))
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("first", ["linear", "tanh"])
def test_a_hook_on_the_attached_representation_runs(first):
    """A gradient hook on what attach() returned (clipping, gradient reversal): honoured on both
    paths (the factored path never formed that gradient and skipped the hook)."""
    model, (x, y) = _Heads(first), _batches(1)[0]
    bal, calls = MultiBalance(["a", "b", "c"]), []
    rep = bal.attach(model.bottom(x))
    rep.register_hook(lambda g: (calls.append(1), g * 0)[1])
    bal.backward(model.losses(rep, y))
    assert calls and bal.last_path == "general"
    assert not model.bottom[0].weight.grad.any()
    assert all(p.grad.any() for p in model.heads.parameters() if p.dim() == 2)  # the heads still train


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", ["MultiBalance general", *ALL_BALANCERS])
def test_every_balancer_on_the_device_matches_a_cpu_run(name, device):
    """A model on `device` with the balancer left where it was made (the README's examples do not
    move it): two steps give the CPU run's gradients (MGDA mixed its CPU weights into the device
    gradients)."""
    runs = []
    for where in ("cpu", device):
        model = _Heads("tanh" if name.endswith("general") else "linear").to(where)
        x, y = (t.to(where) for t in _batches(1)[0])
        bal = ALL_BALANCERS[name.split()[0]](["a", "b", "c"], list(model.bottom.parameters()))
        for _ in range(2):
            model.zero_grad()
            rep = bal.attach(model.bottom(x))
            bal.backward(model.losses(rep, y))
        runs.append([p.grad.cpu() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def _stale_setup(act=torch.tanh):
    torch.manual_seed(0)
    bottom, heads = torch.nn.Linear(4, 6), torch.nn.ModuleList([torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)])
    xs = [torch.randn(5, 4) for _ in range(3)]

    def losses(rep):
        return {t: head(act(rep)).pow(2).mean() * (1 + 4 * i) for i, (t, head) in enumerate(zip("ab", heads))}

    return bottom, heads, xs, losses


@pytest.mark.parametrize(("make", "path"), [(MultiBalance, "general"), (MultiBalance, "factored"),
                                            (multibalance.PCGrad, "general")])
def test_a_step_that_never_reached_backward_is_dropped_with_a_warning(make, path):
    """A step attached, then raised or was skipped (a non-finite loss) before backward(): its
    attachment stayed, and the next backward() back-propagated it too: MultiBalance's averages
    restarted (an extra representation) and that step's graph was mixed in, silently."""
    bottom, heads, xs, losses = _stale_setup(torch.tanh if path == "general" else (lambda r: r))

    def run(skip):
        bal = make(["a", "b"])
        for i, x in enumerate(xs):
            bottom.zero_grad()
            rep = bal.attach(bottom(x))
            if i == 1 and skip:
                losses(rep)  # skipped: no backward
                continue
            bal.backward(losses(rep))
        return bal, bottom.weight.grad.clone()

    clean, clean_grad = run(skip=False)
    # the clean run without step 1: the same steps balanced
    bal = make(["a", "b"])
    for i, x in enumerate(xs):
        bottom.zero_grad()
        if i != 1:
            bal.backward(losses(bal.attach(bottom(x))))
    expected_grad = bottom.weight.grad.clone()
    with pytest.warns(RuntimeWarning, match=r"representation\(s\) \[0\] \(of 2\) are read by no task's loss and were "
                                            r"dropped.*Call balancer.discard\(\)"):
        skipped, grad = run(skip=True)
    torch.testing.assert_close(grad, expected_grad)
    assert skipped.last_path == path
    if make is MultiBalance:
        assert skipped.ema.shape == clean.ema.shape == (1, 2)
        torch.testing.assert_close(skipped.ema, bal.ema)


def test_discard_drops_the_steps_attachments():
    """`discard()` in a skipped step: the next step runs as if the skipped one never attached (no
    warning), and backward() right after discard() asks for attach()."""
    import warnings

    bottom, heads, xs, losses = _stale_setup()
    bal, ref = MultiBalance(["a", "b"]), MultiBalance(["a", "b"])
    ref.backward(losses(ref.attach(bottom(xs[0]))))
    bal.backward(losses(bal.attach(bottom(xs[0]))))
    rep = bal.attach(bottom(xs[1]))
    bal.discard()
    with pytest.raises(RuntimeError, match="call attach"):
        bal.backward(losses(rep))
    bal.attach(bottom(xs[1]))
    bal.discard()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bal.backward(losses(bal.attach(bottom(xs[2]))))
    ref.backward(losses(ref.attach(bottom(xs[2]))))
    torch.testing.assert_close(bal.ema, ref.ema)


@pytest.mark.parametrize("path", ["factored", "general"])
def test_a_representation_of_this_step_no_loss_reads_is_kept(path):
    """A head that reads a representation only for some batches: in a step where no task's loss
    reads it, backward() dropped it with a warning, as if an earlier step had left it, and
    MultiBalance's averages restarted at every change of the number of representations. It is
    balanced with a zero gradient, as before: the same averages and gradients as a step whose loss
    reads it with a weight of 0."""
    import warnings

    bottom, heads, xs, _ = _stale_setup()
    act = torch.tanh if path == "general" else (lambda r: r)

    def run(reads_with_zero):
        bal = MultiBalance(["a", "b"])
        for i, x in enumerate(xs):
            bottom.zero_grad()
            z1, z2 = bal.attach(bottom(x), bottom(x) * 2)
            loss_b = heads[1](act(z1)).pow(2).mean()
            if i != 1:
                loss_b = loss_b + heads[0](act(z2)).pow(2).mean()
            elif reads_with_zero:
                loss_b = loss_b + 0 * heads[0](act(z2)).pow(2).mean()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                bal.backward({"a": heads[0](act(z1)).pow(2).mean(), "b": loss_b})
            assert bal.ema.shape == (2, 2)
        return bal.ema, bottom.weight.grad.clone()

    ema, grad = run(reads_with_zero=False)
    expected_ema, expected_grad = run(reads_with_zero=True)
    torch.testing.assert_close(ema, expected_ema)
    torch.testing.assert_close(grad, expected_grad)


def test_two_attachments_of_one_step_both_read_give_no_warning():
    """attach() calls of one step still add up (a bottom run twice): no warning when each is read."""
    import warnings

    bottom, heads, xs, losses = _stale_setup()
    bal = MultiBalance(["a", "b"])
    r1, r2 = bal.attach(bottom(xs[0])), bal.attach(bottom(xs[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bal.backward({"a": heads[0](r1 - r2).pow(2).mean(), "b": heads[1](r2).pow(2).mean()})
    assert bal.ema.shape == (2, 2)
