"""Each baseline against its published update rule on a toy problem with hand-derived values."""

import math

import pytest
import torch

from multibalance import (
    DBMTL,
    FAMO,
    MGDA,
    EqualWeights,
    GradNorm,
    MetaBalance,
    PCGrad,
    UncertaintyWeighting,
    min_norm_weights,
)

A = torch.tensor([[1.0, 0.0]])
B = torch.tensor([[-1.0, 1.0]])


def _linear_step(bal, coefs, scales=(1.0, 1.0), returned=None):
    """Rep z (1x2) with L_t = s_t * <z, a_t>: the representation gradient of task t is s_t*a_t.
    `returned`, a list, gets what backward returned."""
    z = torch.ones(1, 2, requires_grad=True)
    rep = bal.attach(z * 1.0)
    out = bal.backward([s * (rep * c).sum() for s, c in zip(scales, coefs)])
    if returned is not None:
        returned.append(dict(out))
    return z.grad


def test_equal_weights_is_plain_sum():
    returned = []
    torch.testing.assert_close(_linear_step(EqualWeights(["a", "b"], weights={"b": 2.0}), [A, B], returned=returned), A + 2 * B)
    assert returned == [{"a": 1.0, "b": 1.0}]  # the scale on top of the static weights


def test_pcgrad_projects_conflicts():
    # a.b = -1 < 0: a' = a + b/2 = (0.5, 0.5); b' = b + a = (0, 1); sum (0.5, 1.5)
    returned = []
    torch.testing.assert_close(_linear_step(PCGrad(["a", "b"]), [A, B], returned=returned), torch.tensor([[0.5, 1.5]]))
    assert returned == [{"a": 1.0, "b": 1.0}]  # no per-task scalar


def test_pcgrad_no_conflict_is_sum():
    torch.testing.assert_close(_linear_step(PCGrad(["a", "b"]), [A, torch.tensor([[1.0, 1.0]])]), torch.tensor([[2.0, 1.0]]))


def test_mgda_min_norm_two_tasks():
    # min over a in [0,1] of ||a*A + (1-a)*B||: a = (B.B - A.B)/||A-B||^2 = (2+1)/5 = 0.6 -> (0.2, 0.4)
    bal = MGDA(["a", "b"])
    torch.testing.assert_close(_linear_step(bal, [A, B]), torch.tensor([[0.2, 0.4]]))
    assert bal.last_scales()["a"] == pytest.approx(0.6)


def _min_norm_by_enumeration(gram: torch.Tensor) -> torch.Tensor:
    """The simplex min-norm weights by trying every support: its affine minimiser from the KKT
    system, kept when non-negative; the least objective wins (exact, 2^T solves)."""
    t, best, best_value = gram.shape[0], None, math.inf
    for mask in range(1, 2**t):
        support = [i for i in range(t) if mask >> i & 1]
        k = len(support)
        system = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        system[:k, :k] = gram[support][:, support]
        system[:k, k] = system[k, :k] = 1.0
        rhs = torch.zeros(k + 1, dtype=torch.float64)
        rhs[k] = 1.0
        w = torch.linalg.lstsq(system, rhs.unsqueeze(1)).solution[:k, 0]
        if bool((w >= -1e-12).all()):
            a = torch.zeros(t, dtype=torch.float64)
            a[support] = w.clamp_min(0) / w.clamp_min(0).sum()
            value = float(a @ gram @ a)
            if value < best_value:
                best, best_value = a, value
    return best


@pytest.mark.parametrize("spread", [1.0, 1e2, 1e4])
@pytest.mark.parametrize("tasks", [3, 4, 6])
def test_min_norm_weights_are_exact_for_any_norm_spread(tasks, spread):
    """Task gradients whose norms differ by `spread`: the solver's objective equals the exact
    minimum (projected gradient stalled there: a third of 3-task cases 1-76% above it at 100x)."""
    gen = torch.Generator().manual_seed(tasks * 7 + int(math.log10(spread)))
    for _ in range(20):
        g = torch.randn(tasks, 16, dtype=torch.float64, generator=gen)
        g = g * spread ** torch.rand(tasks, 1, dtype=torch.float64, generator=gen)
        gram = g @ g.T
        a, exact = min_norm_weights(gram), _min_norm_by_enumeration(gram)
        assert a.min() >= 0 and float(a.sum()) == pytest.approx(1.0, abs=1e-12)
        assert float(a @ gram @ a) <= float(exact @ gram @ exact) * (1 + 1e-9) + 1e-12 * float(gram.diagonal().max())
        if spread <= 1e2:  # 16 > T dims: the minimiser is unique (at 1e4 the objective is flat along some weights)
            torch.testing.assert_close(a, exact, rtol=0, atol=1e-6)


def test_min_norm_weights_of_dependent_gradients():
    """Collinear and repeated task gradients (a singular Gram): still on the simplex at the minimum."""
    base = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    for g in (torch.stack([base, 2 * base, -base]), torch.stack([base, base, base, -0.5 * base]),
              torch.zeros(3, 3, dtype=torch.float64)):
        a = min_norm_weights(g @ g.T)
        assert a.min() >= 0 and float(a.sum()) == pytest.approx(1.0)
        assert float(a @ g @ g.T @ a) <= 1e-18 + float(_min_norm_by_enumeration(g @ g.T) @ g @ g.T
                                                        @ _min_norm_by_enumeration(g @ g.T)) + 1e-12


def test_uncertainty_weighting_gradients():
    bal = UncertaintyWeighting(["a", "b"])
    with torch.no_grad():
        bal.log_vars.copy_(torch.tensor([0.0, math.log(2.0)]))
    z = torch.ones(1, 2, requires_grad=True)
    rep = bal.attach(z * 1.0)
    la, lb = (rep * A).sum() * 3, (rep * B).sum() + 5
    bal.backward([la, lb])
    torch.testing.assert_close(z.grad, 3 * A + 0.5 * B)
    # d/ds (e^-s L + s) = 1 - e^-s L: a: 1 - 3 = -2; b: 1 - 0.5 * (0 + 5) = -1.5
    torch.testing.assert_close(bal.log_vars.grad, torch.tensor([-2.0, -1.5]))


def test_gradnorm_weight_update():
    bal = GradNorm(["a", "b"], alpha=1.0, lr=0.1)
    returned = []
    g = _linear_step(bal, [A, B], scales=(1.0, 1.0), returned=returned)
    torch.testing.assert_close(g, A + B)  # first step: weights 1
    assert returned == [{"a": 1.0, "b": 1.0}]  # the weights it applied, not the next step's
    # norms 1, sqrt2; equal loss ratios -> targets = mean(G) = (1+sqrt2)/2
    # a below target -> w_a += 0.1*1, b above -> w_b -= 0.1*sqrt2; renormalise to sum 2
    wa, wb = 1.1, 1 - 0.1 * math.sqrt(2)
    expect = torch.tensor([wa, wb], dtype=torch.float64) * 2 / (wa + wb)
    torch.testing.assert_close(bal.task_weights, expect)


def test_gradnorm_targets_follow_the_relative_loss_ratios():
    """Second step: loss ratios L/L(0) of (2, 1), relative to their mean (4/3, 2/3), set the targets."""
    c = torch.tensor([[0.0, 2.0]])
    bal = GradNorm(["a", "b"], alpha=1.0, lr=0.1)
    _linear_step(bal, [A, c])  # losses (1, 2), norms (1, 2): a below the target 1.5, b above
    w = torch.tensor([1.1, 0.8], dtype=torch.float64) * 2 / 1.9
    torch.testing.assert_close(bal.task_weights, w)
    g = _linear_step(bal, [A, c], scales=(2.0, 1.0))  # losses (2, 2): ratios (2, 1); norms (2, 2)
    torch.testing.assert_close(g, (w[0] * 2 * A + w[1] * c).float())
    # G = 2w, mean 2; targets 2 * (4/3, 2/3): a below (+0.1 * 2), b above (-0.1 * 2); the sum stays 2
    torch.testing.assert_close(bal.task_weights, w + torch.tensor([0.2, -0.2], dtype=torch.float64))


def test_uncertainty_weighting_combine_scales_by_the_precisions():
    """combine() (which backward() does not need: the weights sit in the loss) used directly."""
    bal = UncertaintyWeighting(["a", "b"])
    with torch.no_grad():
        bal.log_vars.copy_(torch.tensor([0.0, math.log(2.0)]))
    out = bal.combine([[A.clone()], [B.clone()]], [torch.tensor(1.0), torch.tensor(1.0)])
    torch.testing.assert_close(out[0], A + 0.5 * B)


def test_dbmtl_log_losses_and_max_norm():
    bal = DBMTL(["a", "b"])
    z = torch.ones(1, 2, requires_grad=True)
    rep = bal.attach(z * 1.0)
    la = (rep * A).sum() + 1.0  # value 2, grad A -> log-grad A/2, norm 0.5
    lb = (rep * B).sum() + 4.0  # value 4, grad B -> log-grad B/4, norm sqrt2/4
    returned = bal.backward([la, lb])
    m = max(0.5, math.sqrt(2) / 4)
    expect = (m / 0.5) * A / 2 + (m / (math.sqrt(2) / 4)) * B / 4
    torch.testing.assert_close(z.grad, expect)
    assert dict(returned) == pytest.approx({"a": (m / 0.5) / 2, "b": (m / (math.sqrt(2) / 4)) / 4})  # factor on g_t


def test_famo_weights_and_update():
    bal = FAMO(["a", "b"], lr=0.5, gamma=0.0)
    z = torch.ones(1, 2, requires_grad=True)
    rep = bal.attach(z * 1.0)
    la, lb = (rep * A).sum() + 1.0, (rep * B).sum() + 3.0  # values 2, 3
    returned = bal.backward([la, lb])
    c = torch.tensor([0.5 / 2, 0.5 / 3])
    c = c / c.sum()
    torch.testing.assert_close(z.grad, c[0] * A + c[1] * B)
    assert dict(returned) == pytest.approx({"a": float(c[0]), "b": float(c[1])})
    bal.update([torch.tensor(1.0), torch.tensor(3.0)])  # a improved (log 2), b did not
    # the first Adam step moves every logit by lr against the sign of its gradient J^T delta
    delta = torch.tensor([math.log(2.0), 0.0], dtype=torch.float64)
    zsm = torch.tensor([0.5, 0.5], dtype=torch.float64)
    grad = zsm * (delta - (zsm * delta).sum())
    torch.testing.assert_close(bal.logits, -0.5 * grad / (grad.abs() + 1e-8))
    assert bal.logits[1] > bal.logits[0]  # the task that improved less gains weight


def test_famo_update_is_the_published_adam_rule():
    """The official FAMO (Cranial-XIX/FAMO, famo.py) steps the logits w with
    torch.optim.Adam(lr=w_lr, weight_decay=gamma) on d = J_softmax(w)^T delta; here that optimizer
    runs beside the balancer, and the balancer's Adam state goes through a state_dict midway."""
    bal = FAMO(["a", "b", "c"], lr=0.025, gamma=0.01)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.025, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    for step in range(30):
        before = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
        after = before * (1 - 0.05 * torch.rand(3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.2, 0.5], dtype=torch.float64))
        before, after = before.float().double(), after.float().double()  # the losses are fp32
        z = torch.ones(1, 2, requires_grad=True)
        rep = bal.attach(z * 1.0)
        bal.backward({t: (rep * 0).sum() + float(before[i]) for i, t in enumerate("abc")})
        bal.update({t: torch.tensor(float(after[i])) for i, t in enumerate("abc")})
        delta = (before + 1e-8).log() - (after + 1e-8).log()
        d = torch.autograd.grad(torch.softmax(w, -1), w, grad_outputs=delta)[0]
        opt.zero_grad()
        w.grad = d
        opt.step()
        torch.testing.assert_close(bal.logits, w.detach(), rtol=1e-9, atol=1e-12, msg=f"step {step}")
        if step == 14:  # resume from a checkpoint: the Adam moments come with it
            resumed = FAMO(["a", "b", "c"], lr=0.025, gamma=0.01)
            resumed.load_state_dict(bal.state_dict())
            bal = resumed
    assert float(w.detach()[0]) < float(w.detach()[1])  # sanity: a improves fastest and loses weight


def test_famo_total_loss_reads_the_weights_from_the_device_once(monkeypatch):
    """FAMO's weighted loss reads its T weights to the host in one read (it read them one by one:
    on a GPU a wait per task), with the same weights as before (static weights included)."""
    bal = FAMO(["a", "b", "c"], weights={"c": 2.0})
    z = torch.ones(1, 2, requires_grad=True)
    losses = [(z * A).sum() + 1.0, (z * B).sum() + 3.0, (z * A).sum() + 4.0]  # values 2, 3, 5
    reads = []
    for name in ("__float__", "item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name: reads.append(_name) or _real(self, *a))
    total = bal.total_loss(losses)
    monkeypatch.undo()
    assert len(reads) == 1, reads
    c = torch.tensor([1 / 2, 1 / 3, 1 / 5], dtype=torch.float64)  # softmax of zero logits is uniform
    c = (c / c.sum() * torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)).tolist()
    torch.testing.assert_close(total, c[0] * losses[0] + c[1] * losses[1] + c[2] * losses[2])


def test_famo_defaults_are_the_official_ones():
    bal = FAMO(["a", "b"])
    assert (bal.lr, bal.gamma) == (0.025, 0.01)


@pytest.mark.parametrize(("weights", "expected"), [
    ({}, [[0.2, 0.4]]),
    # w_a g_a = (10, 0), g_b = (-1, 1): a = (2 + 10) / (100 + 20 + 2) on w_a g_a
    ({"a": 10.0}, [[12 / 122 * 10 - 110 / 122, 110 / 122]]),
    ({"b": 0.0}, [[1.0, 0.0]]),  # b left out: the min-norm problem of a alone
    ({"a": 0.0, "b": 0.0}, [[0.0, 0.0]]),
])
def test_mgda_uses_the_static_weights(weights, expected):
    bal = MGDA(["a", "b"], weights=weights)
    torch.testing.assert_close(_linear_step(bal, [A, B]), torch.tensor(expected))
    if weights.get("b") == 0.0:
        assert bal.last_scales()["b"] == 0.0


def test_pcgrad_state_dict_restores_the_projection_order():
    coefs = [torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[-1.0, 1.0, 0.2]]), torch.tensor([[0.3, -1.0, 1.0]])]

    def step(bal):
        z = torch.ones(1, 3, requires_grad=True)
        rep = bal.attach(z * 1.0)
        bal.backward({t: (rep * c).sum() for t, c in zip("abc", coefs)})
        return z.grad

    straight = PCGrad(list("abc"))
    uninterrupted = [step(straight) for _ in range(8)]
    first = PCGrad(list("abc"))
    resumed_run = [step(first) for _ in range(3)]
    resumed = PCGrad(list("abc"))
    step(resumed)  # its generator has moved on: the checkpoint sets it back
    resumed.load_state_dict(first.state_dict())
    resumed_run += [step(resumed) for _ in range(5)]
    for i, (a, b) in enumerate(zip(uninterrupted, resumed_run)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"step {i}")
    assert len({tuple(g.flatten().tolist()) for g in uninterrupted}) > 1  # the order matters here


@pytest.mark.parametrize("name", ["EqualWeights", "UncertaintyWeighting", "FAMO"])
@pytest.mark.parametrize("case", ["reads the input", "reads the bottom's own output"])
def test_balancers_without_task_gradients_check_the_losses_read_the_representation(name, case):
    """As every balancer: a loss that does not read what attach() returned is refused before any backward."""
    torch.manual_seed(0)
    bottom, head_a, head_b, other = (torch.nn.Linear(4, 6), torch.nn.Linear(6, 1), torch.nn.Linear(6, 1),
                                     torch.nn.Linear(4, 1))
    x = torch.randn(5, 4)
    bal = {"EqualWeights": EqualWeights, "UncertaintyWeighting": UncertaintyWeighting, "FAMO": FAMO}[name](["a", "b"])
    rep = bal.attach(bottom(x))
    # positive losses: FAMO refuses a loss <= 0
    loss_b = other(x).square().mean() if case == "reads the input" else head_b(bottom(x)).square().mean()
    with pytest.raises(ValueError, match="loss 'b' does not depend on the attached representation"):
        bal.backward({"a": head_a(rep).square().mean(), "b": loss_b})
    assert all(p.grad is None for m in (bottom, head_a, head_b, other) for p in m.parameters())
    # a loss that reads the representation (also alongside another input) is accepted
    rep = bal.attach(bottom(x))
    bal.backward({"a": head_a(rep).square().mean(), "b": (head_b(rep) + other(x)).square().mean()})
    assert bottom.weight.grad is not None and other.weight.grad is not None


def test_metabalance_on_parameters():
    w = torch.nn.Parameter(torch.ones(2))
    bal = MetaBalance(["a", "b"], shared_parameters=[w], relax=0.5, beta=0.0)
    rep = bal.attach(w * 1.0)
    returned = bal.backward([(rep * torch.tensor([3.0, 4.0])).sum(), (rep * torch.tensor([0.0, 10.0])).sum()])
    # target a: |g_a| = 5, |g_b| = 10 -> s_b = 0.5*5/10 + 0.5 = 0.75 -> (3, 4) + (0, 7.5)
    torch.testing.assert_close(w.grad, torch.tensor([3.0, 11.5]))
    assert dict(returned) == pytest.approx({"a": 1.0, "b": 0.75})


def test_metabalance_relax_and_beta_over_two_steps():
    """relax=0.8 and beta=0.75 (at 0.5 swapping either with 1 minus it changes nothing): the
    averages are m <- 0.75*m + 0.25*|g| from zero, and s_b = 0.8*m_a/m_b + 0.2."""
    w = torch.nn.Parameter(torch.ones(2))
    bal = MetaBalance(["a", "b"], shared_parameters=[w], relax=0.8, beta=0.75)
    m = torch.zeros(2, dtype=torch.float64)
    for coef_b in (10.0, 20.0):  # |g_a| = 5, |g_b| = coef_b
        w.grad = None
        rep = bal.attach(w * 1.0)
        returned = bal.backward([(rep * torch.tensor([3.0, 4.0])).sum(), (rep * torch.tensor([0.0, coef_b])).sum()])
        m = 0.75 * m + 0.25 * torch.tensor([5.0, coef_b], dtype=torch.float64)
        s_b = float(0.8 * m[0] / m[1] + 0.2)
        torch.testing.assert_close(bal.ema[0], m)
        assert dict(returned) == pytest.approx({"a": 1.0, "b": s_b})
        torch.testing.assert_close(w.grad, torch.tensor([3.0, 4.0 + s_b * coef_b]))


def test_parameter_level_pcgrad_and_mgda_need_full_backward():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    head_a, head_b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    x = torch.randn(5, 3)
    for cls in (PCGrad, MGDA):
        lin.zero_grad()
        head_a.zero_grad()
        bal = cls(["a", "b"], shared_parameters=list(lin.parameters()))
        rep = bal.attach(lin(x))
        bal.backward([head_a(rep).pow(2).mean(), head_b(rep).mean()])
        assert lin.weight.grad is not None and head_a.weight.grad is not None


def test_metabalance_needs_parameters():
    with pytest.raises(ValueError, match="shared_parameters"):
        MetaBalance(["a", "b"], shared_parameters=[])


@pytest.mark.parametrize("make", [PCGrad, MGDA, MetaBalance])
def test_parameter_level_frozen_and_unused_shared_parameters(make):
    """Parameter level: a frozen shared parameter is left alone (autograd.grad refused it with a
    message naming nothing), an unused one keeps grad None (it got zeros, and AdamW's weight decay
    moved it); the trainable ones get the balanced gradient."""
    torch.manual_seed(0)
    frozen, used, unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 6), torch.nn.Linear(4, 6)
    frozen.requires_grad_(False)
    heads = [torch.nn.Linear(6, 1) for _ in range(2)]
    shared = [*frozen.parameters(), *used.parameters(), *unused.parameters()]
    bal = make(["a", "b"], shared_parameters=shared)
    rep = bal.attach(used(frozen(torch.randn(5, 4))))
    bal.backward({"a": heads[0](rep).mean(), "b": (heads[1](rep) ** 2).mean()})
    assert all(p.grad is None for p in frozen.parameters()) and all(p.grad is None for p in unused.parameters())
    assert all(p.grad is not None and p.grad.any() for p in used.parameters())
    frozen.requires_grad_(True)  # unfrozen later (fine-tuning schedules): balanced from then on
    rep = bal.attach(used(frozen(torch.randn(5, 4))))
    bal.backward({"a": heads[0](rep).mean(), "b": (heads[1](rep) ** 2).mean()})
    assert all(p.grad is not None and p.grad.any() for p in frozen.parameters())
    with pytest.raises(ValueError, match="every shared parameter is frozen"):
        for p in shared:
            p.requires_grad_(False)
        rep = bal.attach(used(frozen(torch.randn(5, 4))) * torch.ones(1, requires_grad=True))
        bal.backward({"a": heads[0](rep).mean(), "b": heads[1](rep).mean()})


@pytest.mark.parametrize("value", [0.0, -1.0])
@pytest.mark.parametrize("make", [FAMO, DBMTL])
def test_log_balancers_refuse_a_loss_at_or_below_its_bound(make, value):
    """FAMO and DBMTL take log(L - min_loss): a loss <= its bound (0 by default) is refused before any
    backward (it gave NaN logits, or a -1e28 scale), naming the task, the value and `min_losses`."""
    bal = make(["a", "b"])
    z = torch.ones(1, 2, requires_grad=True)
    rep = bal.attach(z * 1.0)
    with pytest.raises(ValueError, match=rf"loss 'b' is {value}, not above its lower bound min_losses\['b'\] = 0.0.*"
                                         rf"min_losses=\{{'b': m\}}"):
        bal.backward({"a": (rep * A).sum() + 1.0, "b": (rep * 0).sum() + value})
    assert z.grad is None
    if make is FAMO:  # and so is a new loss <= 0 in `update`
        rep = bal.attach(z * 1.0)
        bal.backward({"a": (rep * A).sum() + 1.0, "b": (rep * B).sum() + 2.0})
        with pytest.raises(ValueError, match="loss 'b' is -1.0, not above"):
            bal.update({"a": torch.tensor(1.0), "b": torch.tensor(-1.0)})


@pytest.mark.parametrize("make", [FAMO, DBMTL])
def test_log_balancers_min_losses_shift_the_log(make):
    """With min_losses={'b': -3.0} a loss b = -1 is taken as L - min_loss = 2 (the official FAMO's
    log(L - min_loss + eps)): the same step as b = 2 with the default bound 0."""
    grads, scales = [], []
    for shift, kw in ((0.0, {}), (-3.0, {"min_losses": {"b": -3.0}})):
        bal = make(["a", "b"], **kw)
        z = torch.ones(1, 2, requires_grad=True)
        rep = bal.attach(z * 1.0)
        scales.append(dict(bal.backward({"a": (rep * A).sum() + 1.0, "b": (rep * B).sum() + 1.0 + shift})))
        grads.append(z.grad)
    torch.testing.assert_close(grads[1], grads[0])
    assert scales[1] == pytest.approx(scales[0])
    with pytest.raises(ValueError, match="min_losses names unknown tasks"):
        make(["a", "b"], min_losses={"c": 0.0})


def test_dbmtl_heads_train_on_the_log_losses():
    """DB-MTL (LibMTL DB_MTL.py) trains every parameter on log(L_t + eps): a head gets
    grad L_t / (L_t + eps), not grad L_t (off by L_t, 1.6e4 in the review's case)."""
    torch.manual_seed(0)
    shared, heads = torch.nn.Linear(4, 8), torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(2))
    x, ys = torch.randn(16, 4), [torch.randn(16, 1), 100 * torch.randn(16, 1)]
    bal = DBMTL(["a", "b"])
    rep = bal.attach(shared(x))
    bal.backward([((h(rep) - y) ** 2).mean() for h, y in zip(heads, ys)])
    for h, y in zip(heads, ys):
        expected = torch.autograd.grad(torch.log(((h(shared(x).detach()) - y) ** 2).mean() + 1e-8), list(h.parameters()))
        for p, e in zip(h.parameters(), expected):
            torch.testing.assert_close(p.grad, e)


def test_pcgrad_on_device_gradients():
    """PCGrad on GPU gradients: its projection coefficients were made on the host and multiplied
    with the device Gram matrix. Run on a stand-in device that refuses host tensors as CUDA does."""
    from gpukernels_common.testing.devices import device_factories, on_device

    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(4, 3, generator=g)] for _ in range(3)]
    want = PCGrad(list("abc")).combine([[x.clone() for x in gt] for gt in grads], None)
    with device_factories():
        got = PCGrad(list("abc")).combine([[on_device(x) for x in gt] for gt in grads], None)
        assert got[0].device == torch.device("meta")
        got = got[0].to("cpu")
    torch.testing.assert_close(got, want[0])


@pytest.mark.parametrize("make, arg", [
    (lambda: GradNorm(["a", "b"], alpha=float("nan")), "alpha"),
    (lambda: GradNorm(["a", "b"], lr=-1.0), "lr"),
    (lambda: DBMTL(["a", "b"], beta=1.5), "beta"),
    (lambda: DBMTL(["a", "b"], eps=float("inf")), "eps"),
    (lambda: FAMO(["a", "b"], lr=float("nan")), "lr"),
    (lambda: FAMO(["a", "b"], gamma=-0.01), "gamma"),
    (lambda: PCGrad(["a", "b"], seed=1.5), "seed"),
])
def test_hyperparameters_are_checked(make, arg):
    """A NaN, infinite or negative rate was accepted and spread into the weights (NaN logits after
    FAMO's first update, a diverging DBMTL average)."""
    with pytest.raises(ValueError, match=f"^{arg} must be"):
        make()
