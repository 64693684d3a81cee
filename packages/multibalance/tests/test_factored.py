"""The factored path (heads that open with a Linear layer) against the general path, which forms
every task's representation gradient: same gradients everywhere, and the general path wherever
a head does not fit."""

import copy

import pytest
import torch
from torch import nn

from multibalance import MultiBalance


class Model(nn.Module):
    """A shared bottom with two representations and per-task MLP heads of the given widths;
    `reads[t]`: which representations task t reads (each through a Linear of its own)."""

    def __init__(self, widths, reads, d=(9, 6)):
        super().__init__()
        self.bottom = nn.Linear(5, d[0] + d[1])
        self.d = d
        self.reads = reads
        self.first = nn.ModuleList(nn.ModuleList(nn.Linear(d[j], w, bias=j == 0) for j in range(2)) for w in widths)
        self.out = nn.ModuleList(nn.Linear(w, 1) for w in widths)

    def shared(self, x):
        z = torch.tanh(self.bottom(x))
        return z[:, : self.d[0]], z[:, self.d[0] :]

    def losses(self, reps, y):
        out = {}
        for t, reads in enumerate(self.reads):
            h = sum(self.first[t][j](reps[j]) for j in reads)
            out[f"t{t}"] = ((self.out[t](torch.relu(h)).squeeze(1) - y[t]) ** 2).mean() * (3.0**t)
        return out


def _step(model, balancer, x, y, steps=2):
    for _ in range(steps):  # the second step uses the moving averages of the first
        model.zero_grad(set_to_none=True)
        reps = balancer.attach(*model.shared(x))
        balancer.backward(model.losses(reps, y))
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _general(**kwargs) -> MultiBalance:
    bal = MultiBalance(["t0", "t1", "t2"], **kwargs)
    bal.uses_norms_only = False  # forms every task's representation gradient
    return bal


@pytest.mark.parametrize("widths", [(4, 4, 4), (3, 5, 2)])  # one batched op for all tasks; per task
@pytest.mark.parametrize("norm", ["batch", "sample"])
@pytest.mark.parametrize("reads", [((0, 1), (0, 1), (0, 1)), ((0,), (0, 1), (1,))])
def test_factored_equals_general(widths, norm, reads):
    torch.manual_seed(len(widths) + widths[1])
    model = Model(widths, reads)
    ref = copy.deepcopy(model)
    x, y = torch.randn(11, 5), torch.randn(3, 11)
    kwargs = dict(relax=0.6, beta=0.8, norm=norm, weights={"t1": 0.5, "t2": 2.0})
    fast = MultiBalance(["t0", "t1", "t2"], **kwargs)
    got = _step(model, fast, x, y)
    slow = _general(**kwargs)
    expected = _step(ref, slow, x, y)
    assert fast.last_path == "factored" and slow.last_path == "general"
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(fast.ema, slow.ema, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("widths", [(3, 3, 3), (2, 3, 4)])  # one batched op for all tasks; per task
@pytest.mark.parametrize("norm", ["batch", "sample"])
def test_sequence_representation(norm, widths):
    """A [B, S, D] representation read by Linear heads on its last dimension (S rows per sample)."""
    torch.manual_seed(4)
    bottom, heads = nn.Linear(5, 8), nn.ModuleList(nn.Linear(8, w) for w in widths)
    x, y = torch.randn(6, 4, 5), torch.randn(3, 6)
    fast, slow = MultiBalance(["t0", "t1", "t2"], norm=norm, relax=0.9), _general(norm=norm, relax=0.9)
    grads = []
    for bal in (fast, slow):
        for m in (bottom, heads):
            m.zero_grad()
        for _ in range(2):
            rep = bal.attach(torch.tanh(bottom(x)))
            bal.backward({f"t{t}": ((heads[t](rep).sum((1, 2)) - y[t]) ** 2).mean() * (t + 1) for t in range(3)})
        grads.append([p.grad.clone() for m in (bottom, heads) for p in m.parameters()])
    assert fast.last_path == "factored" and slow.last_path == "general"
    torch.testing.assert_close(fast.ema, slow.ema, rtol=1e-5, atol=1e-7)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_factored_with_grad_scaler_and_autocast():
    torch.manual_seed(1)
    model = Model((4, 4, 4), ((0,), (0, 1), (1,)))
    ref = copy.deepcopy(model)
    x, y = torch.randn(11, 5), torch.randn(3, 11)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    fast, slow = MultiBalance(["t0", "t1", "t2"]), _general()
    for m, bal in ((model, fast), (ref, slow)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reps = bal.attach(*m.shared(x))
            losses = {k: v.float() for k, v in m.losses(reps, y).items()}
        bal.backward(losses, scaler=scaler)
    assert fast.last_path == "factored"
    torch.testing.assert_close(fast.ema, slow.ema, rtol=2e-2, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is None:  # a first layer of a representation its task does not read
            continue
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, q.grad, rtol=3e-2, atol=3e-2 * float(q.grad.abs().max()), msg=name)


@pytest.mark.parametrize("kind", ["nonlinear", "two linear layers", "wide", "frozen without bias", "scaled addmm"])
def test_other_heads_take_the_general_path(kind):
    """Heads that do not read the representation through one Linear layer of their own (or
    through one whose backward node would not run in the heads' backward)."""
    torch.manual_seed(2)
    bottom, first, second, wide = nn.Linear(5, 9), nn.Linear(9, 4), nn.Linear(9, 4), nn.Linear(9, 9)
    frozen = nn.Linear(9, 4, bias=False).requires_grad_(False)
    x, y = torch.randn(11, 5), torch.randn(3, 11)
    fast, slow = MultiBalance(["t0", "t1", "t2"], relax=1.0), _general(relax=1.0)
    grads = []
    for bal in (fast, slow):
        bottom.zero_grad()
        rep = bal.attach(torch.tanh(bottom(x)))
        if kind == "nonlinear":
            heads = [torch.tanh(rep).sum(1) * (t + 1) for t in range(3)]
        elif kind == "wide":  # a first layer as wide as the representation
            heads = [wide(rep).sum(1) * (t + 1) if t == 0 else first(rep).sum(1) * (t + 1) for t in range(3)]
        elif kind == "frozen without bias":  # no parameter gradient: the heads' backward skips its node
            heads = [frozen(rep).sum(1) * (t + 1) if t == 0 else first(rep).sum(1) * (t + 1) for t in range(3)]
        elif kind == "scaled addmm":  # a linear layer written as addmm(b, rep, W.T, alpha=2): rep's gradient is 2 g W
            heads = [torch.addmm(first.bias, rep, first.weight.T, alpha=2.0).sum(1) * (t + 1) if t == 0
                     else second(rep).sum(1) * (t + 1) for t in range(3)]
        else:  # one task reads it through two layers
            heads = [(first(rep) + second(rep)).sum(1) * (t + 1) for t in range(3)]
        bal.backward({f"t{t}": ((h - y[t]) ** 2).mean() for t, h in enumerate(heads)})
        grads.append(bottom.weight.grad.clone())
    assert fast.last_path == "general"
    torch.testing.assert_close(grads[0], grads[1])


def test_a_layer_shared_between_tasks_takes_the_general_path():
    torch.manual_seed(3)
    bottom, first = nn.Linear(5, 9), nn.Linear(9, 4)
    x = torch.randn(11, 5)
    bal = MultiBalance(["a", "b"], relax=1.0)
    rep = bal.attach(torch.tanh(bottom(x)))
    h = first(rep)  # one node that both tasks read
    bal.backward({"a": h[:, 0].pow(2).mean(), "b": h[:, 1].pow(2).mean() * 10})
    assert bal.last_path == "general"


def test_empty_batch_takes_the_general_path():
    bottom, heads = nn.Linear(5, 8), nn.ModuleList(nn.Linear(8, 3) for _ in range(2))
    bal = MultiBalance(["a", "b"])
    rep = bal.attach(torch.tanh(bottom(torch.randn(0, 5))))
    bal.backward({"a": heads[0](rep).sum(), "b": heads[1](rep).sum()})
    assert bal.last_path == "general" and torch.equal(bottom.weight.grad, torch.zeros_like(bottom.weight))


@pytest.mark.parametrize("kind", ["factored", "general"])
def test_huge_grad_scaler_scale(kind):
    """A scale of 2^80 (its square is past fp32's range): the norms are of the unscaled
    gradients and the gradients are those of the scaled losses, as with no scaler."""
    torch.manual_seed(8)
    model = Model((4, 4, 4), ((0,), (0, 1), (1,)))
    ref = copy.deepcopy(model)
    x, y = torch.randn(11, 5), torch.randn(3, 11)
    make = (lambda: MultiBalance(["t0", "t1", "t2"])) if kind == "factored" else _general
    scaled, plain = make(), make()
    for m, bal, scaler in ((model, scaled, torch.amp.GradScaler("cpu", init_scale=2.0**80)), (ref, plain, None)):
        reps = bal.attach(*m.shared(x))
        bal.backward(m.losses(reps, y), scaler=scaler)
    assert scaled.last_path == ("factored" if kind == "factored" else "general")
    torch.testing.assert_close(scaled.ema, plain.ema)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad / 2.0**80, q.grad, msg=name)


@pytest.mark.parametrize("first", ["linear", "tanh"])
@pytest.mark.parametrize("readers", ["a", "b", "ab"])
def test_a_head_reading_the_bottom_directly_is_named(first, readers):
    """A head that also reads a tensor of the shared bottom (a wide input) other than what attach()
    returned: a clear error naming the task, or, attached as a second representation, it works."""
    torch.manual_seed(9)
    emb, bottom = nn.Embedding(10, 4), nn.Linear(4, 16)
    heads = {t: nn.Linear(16, 2) for t in "ab"}
    wide = {t: nn.Linear(4, 2) for t in "ab"}
    ids = torch.randint(0, 10, (8,))
    act = (lambda r: r) if first == "linear" else torch.tanh

    def losses(rep, e):
        return {t: (heads[t](act(rep)) + (wide[t](e) if t in readers else 0)).pow(2).mean() for t in "ab"}

    e = emb(ids)
    bal = MultiBalance(["a", "b"])
    rep = bal.attach(torch.tanh(bottom(e)))
    if readers != "a" or first == "linear":  # (the general path runs task a's head backward keeping the graph)
        with pytest.raises(ValueError, match=f"loss '{readers[0]}' reads a tensor of the shared bottom other than "
                                             f"what attach\\(\\) returned.*a loss of the bottom alone .* goes to "
                                             f"`balancer.backward\\(losses, aux_loss=aux\\)`"):
            bal.backward(losses(rep, e))
    else:
        bal.discard()  # a step that does not reach backward()
    e = emb(ids)
    rep, e_leaf = bal.attach(torch.tanh(bottom(e)), e)
    bal.backward(losses(rep, e_leaf))
    assert bal.last_path == "general" or first == "linear"
    assert emb.weight.grad is not None


class _Node:
    """An autograd node as torch < 2.13 hands them to Python: a fresh wrapper on every
    `next_functions` read, freed when nothing holds it (so its id is soon reused)."""

    def __init__(self, children):
        self._children = children

    @property
    def next_functions(self):
        return tuple((None if c is None else c(), 0) for c in self._children)


class MulBackward0(_Node):
    pass


class SumBackward0(_Node):
    pass


class AccumulateGrad(_Node):
    def __init__(self, variable):
        super().__init__([])
        self.variable = variable


def test_graph_walks_hold_the_nodes_they_have_seen():
    # loss = sum(rep * c) * s: the walk meets a fresh wrapper per node; with only their ids kept,
    # the leaf's wrapper took a freed node's id and the walk skipped it ("does not depend on")
    from multibalance import factored

    rep = torch.ones(2)
    leaf = lambda: AccumulateGrad(rep)  # noqa: E731
    inner = lambda: MulBackward0([leaf, None])  # noqa: E731
    total = lambda: SumBackward0([inner])  # noqa: E731
    loss = type("Loss", (), {"grad_fn": MulBackward0([total, None])})()
    assert all(factored.reaches(loss, {id(rep)}) for _ in range(20))
    assert not factored.reaches(loss, {id(torch.ones(2))})
