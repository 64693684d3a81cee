import json

import numpy as np
import pytest
import torch

import moeblaze
from moeblaze import MoE, moe_reference, route


def test_router_topk_renorm_and_losses():
    logits = torch.randn(10, 6)
    r = route(logits, 3)
    assert r.expert_ids.shape == (10, 3) and r.expert_ids.dtype == torch.int32
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(10))
    uniform = route(torch.zeros(8, 4), 4)
    assert float(uniform.aux_loss) == pytest.approx(1.0)  # perfectly balanced -> E * sum(1/E * 1/E) * E ... = 1
    assert route(logits, 1, renormalize=False).weights.max() < 1
    # renormalize applies for top_k > 1 only: a top-1 weight stays the probability (Switch-style)
    torch.testing.assert_close(route(logits, 1).weights, route(logits, 1, renormalize=False).weights)
    with pytest.raises(ValueError, match="top_k"):
        route(logits, 7)
    for top_k in (2.0, True):  # as Router and MoE check it
        with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, n_experts=6\]"):
            route(logits, top_k)
    with pytest.raises(ValueError, match="NaN"):
        route(torch.full((2, 3), float("nan")), 1)
    with pytest.raises(ValueError, match="score"):
        route(logits, 1, score="relu")


def test_router_losses_and_the_layer_aux_loss_follow_their_formulas():
    """Unbalanced routing (the uniform case above is 1 whatever the counts' normalisation): the
    load-balancing loss E * sum_e frac_e * mean_prob_e, the z-loss mean(logsumexp^2), and MoE's
    aux_loss = aux_loss_coef * load-balancing + z_loss_coef * z-loss."""
    logits = torch.randn(13, 5, generator=torch.Generator().manual_seed(4)) * 2
    r = route(logits, 2)
    ids = logits.topk(2, dim=-1).indices
    frac = torch.bincount(ids.reshape(-1), minlength=5).double() / ids.numel()
    want_aux = 5 * (frac * logits.double().softmax(-1).mean(0)).sum()
    want_z = torch.logsumexp(logits.double(), -1).pow(2).mean()
    torch.testing.assert_close(r.aux_loss, want_aux.float())
    torch.testing.assert_close(r.z_loss, want_z.float())
    layer = MoE(6, 8, 5, 2, aux_loss_coef=0.3, z_loss_coef=0.07)
    x = torch.randn(4, 3, 6)
    layer(x)
    routing = layer.router(x.reshape(-1, 6))
    assert routing.aux_loss != routing.z_loss
    torch.testing.assert_close(layer.aux_loss, 0.3 * routing.aux_loss + 0.07 * routing.z_loss)


@pytest.mark.parametrize("default_dtype", [torch.bfloat16, torch.float16])
def test_load_balancing_loss_does_not_depend_on_the_default_dtype(default_dtype):
    """The expert counts were summed in the default dtype: with a bf16 (fp16) default, as for a
    model built directly in 16 bits, every count stopped at 256 (2048) slots and the loss was far off."""
    logits = torch.randn(3000, 4, generator=torch.Generator().manual_seed(0)) + torch.tensor([1.0, 0, 0, 0])
    want = route(logits, 2).aux_loss
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        got = route(logits, 2).aux_loss
    finally:
        torch.set_default_dtype(previous)
    ids = logits.topk(2, dim=-1).indices
    frac = torch.bincount(ids.reshape(-1), minlength=4).double() / ids.numel()
    assert frac.max() * ids.numel() > 2048  # past both 16-bit types' last exact step of 1
    torch.testing.assert_close(want, (4 * (frac * logits.double().softmax(-1).mean(0)).sum()).float())
    torch.testing.assert_close(got, want)


def test_module_matches_reference_and_backprops():
    torch.manual_seed(0)
    layer = MoE(16, 24, n_experts=4, top_k=2, n_shared_experts=1)
    x = torch.randn(3, 5, 16, requires_grad=True)
    out = layer(x)
    flat = x.reshape(-1, 16)
    r = layer.router(flat)
    ref = moe_reference(flat, r.expert_ids.long(), r.weights, layer.w_gate, layer.w_up, layer.w_down) + layer.shared[0](flat)
    torch.testing.assert_close(out.reshape(-1, 16), ref, rtol=1e-4, atol=1e-5)
    (out.sum() + layer.aux_loss).backward()
    assert all(p.grad is not None for p in layer.parameters())
    assert layer.router.proj.weight.grad.abs().sum() > 0  # router learns through the combine weights


def test_module_options_and_errors():
    assert MoE(8, 8, 4, 1, activation="gelu").w_up is None
    with pytest.raises(ValueError, match="top_k"):
        MoE(8, 8, 2, 3)
    with pytest.raises(ValueError, match="checkpoint"):
        MoE(8, 8, 2, 1, checkpoint="none")
    with pytest.raises(ValueError, match="d_model=8"):
        MoE(8, 8, 2, 1)(torch.randn(2, 7))
    assert "MoE" in moeblaze.__all__


def test_capacity_drops_later_tokens_overflow_in_token_order():
    logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0]])  # three tokens want expert 0
    r = route(logits, 1, capacity=2)
    assert r.expert_ids[:, 0].tolist() == [0, 0, 3, 1]  # the third token's slot is dropped (id E = 3)
    assert r.dropped[:, 0].tolist() == [False, False, True, False] and float(r.weights[2, 0]) == 0.0
    assert torch.equal(route(logits, 1).expert_ids[:, 0], torch.tensor([0, 0, 0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="capacity"):
        route(logits, 1, capacity=0)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(8, 8, 2, 1, capacity_factor=0.0)


@pytest.mark.parametrize("backend", ["reference", "interpret"])
@pytest.mark.parametrize("checkpoint", ["preact", "recompute"])
def test_capacity_factor_matches_reference_without_the_dropped_slots(monkeypatch, backend, checkpoint):
    monkeypatch.setenv("GKC_BACKEND", backend)
    torch.manual_seed(1)
    layer = MoE(12, 20, n_experts=4, top_k=2, checkpoint=checkpoint, capacity_factor=0.6)
    with torch.no_grad():
        layer.router.proj.weight[0] += 2.0  # a hot expert, so its overflow is dropped
    x = torch.randn(37, 12, requires_grad=True)
    out = layer(x)
    r = layer.router(x)
    capacity = moeblaze.router.expert_capacity(37, 2, 4, 0.6)
    kept = r.expert_ids[~r.dropped].long()
    assert int(layer.last_dropped) == int(r.dropped.sum()) > 0
    assert torch.bincount(kept, minlength=4).max() <= capacity
    ref = moe_reference(x, r.expert_ids.long(), r.weights, layer.w_gate, layer.w_up, layer.w_down)  # id E: skipped
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, layer.w_gate, layer.w_down, layer.router.proj.weight], go)
    want = torch.autograd.grad(ref, [x, layer.w_gate, layer.w_down, layer.router.proj.weight], go)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_empty_batch():
    """No tokens: an empty output (as nn.Linear gives) and losses 0, not NaN."""
    r = route(torch.randn(0, 4, requires_grad=True), 2)
    assert r.aux_loss.item() == 0 and r.z_loss.item() == 0
    layer = MoE(8, 12, 4, 2, n_shared_experts=1)
    out = layer(torch.randn(2, 0, 8))
    assert out.shape == (2, 0, 8)
    assert layer.aux_loss.item() == 0
    (out.sum() + layer.aux_loss).backward()
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())


def test_deepcopy_after_a_training_forward():
    """EMA / AveragedModel copies: aux_loss holds the forward's graph, which cannot be deep-copied."""
    import copy

    layer = MoE(8, 12, 4, 2)
    layer(torch.randn(5, 8))
    assert layer.aux_loss.grad_fn is not None
    twin = copy.deepcopy(layer)
    assert twin.aux_loss.grad_fn is None and torch.equal(twin.aux_loss, layer.aux_loss.detach())
    assert layer.aux_loss.grad_fn is not None  # the original keeps its graph
    torch.optim.swa_utils.AveragedModel(layer)


def test_compile_fullgraph_and_export_match_eager(monkeypatch):
    """torch.compile(fullgraph=True) and torch.export trace through the router and the experts:
    the host-side checks (finite logits, the expert-id range) and the per-expert loop's row
    counts are eager-only (on the reference backend the traced experts run masked, densely)."""
    import warnings

    monkeypatch.setenv("GKC_BACKEND", "reference")
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoE(8, 12, 4, 2, n_shared_experts=1, capacity_factor=1.0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    want = layer(x)
    want_aux, want_dropped = layer.aux_loss, int(layer.last_dropped)
    params = [x, *layer.parameters()]
    go = torch.randn_like(want)
    want_grads = torch.autograd.grad((want * go).sum() + want_aux, params)
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.aux_loss, want_aux)
    assert int(layer.last_dropped) == want_dropped
    for g, w in zip(torch.autograd.grad((got * go).sum() + layer.aux_loss, params), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # aux_loss and last_dropped are assigned during export
        exported = torch.export.export(layer.eval(), (x.detach(),))
    torch.testing.assert_close(exported.module()(x.detach()), want.detach(), rtol=1e-5, atol=1e-6)


def test_compile_dynamic_fullgraph_with_a_capacity_factor(monkeypatch):
    """torch.compile(dynamic=True) traces a float attribute as a symbolic float: the router took
    the capacity factor's decimal form (repr) from it and fullgraph failed ("repr_impl not
    implemented"). The router keeps that exact form, and a new factor is still taken."""
    monkeypatch.setenv("GKC_BACKEND", "reference")
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoE(6, 8, 4, 2, capacity_factor=0.7)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for tokens, cf in ((9, 0.7), (13, 0.7), (13, 0.3)):
        layer.router.capacity_factor = cf
        x = torch.randn(tokens, 6)
        got = compiled(x)
        got_dropped = int(layer.last_dropped)
        want = layer(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert got_dropped == int(layer.last_dropped) > 0
    assert layer.router.capacity_factor == 0.3
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0"):
        layer.router.capacity_factor = 0.0


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compile_on_the_interpreter_backend_is_a_clear_error(fullgraph, monkeypatch):
    """Under TRITON_INTERPRET=1 Dynamo traced into the interpreter and failed with KeyError(torch.uint64):
    now an error that says what to do (refused before any kernel: the backend is chosen as the
    interpreter here on any machine)."""
    from gpukernels_common import Backend

    monkeypatch.setattr(moeblaze.experts, "select_backend", lambda *tensors, **kw: Backend.INTERPRET)
    torch._dynamo.reset()
    layer = MoE(8, 12, 4, 2)
    with pytest.raises(RuntimeError, match="Triton interpreter backend .* set GKC_BACKEND=reference .* or compile on a GPU"):
        torch.compile(layer, fullgraph=fullgraph, backend="eager")(torch.randn(5, 8))


@pytest.mark.parametrize("cf, tokens, k, n_experts, want", [
    (1.1, 100, 2, 4, 55),  # 1.1 * 100 = 110.00000000000001 in floats: ceil gave 56
    (1.1, 100, 1, 1, 110),
    (1.1, 1000, 8, 64, 138),
    (1.25, 37, 2, 4, 24),  # ceil(23.125)
    (0.6, 37, 2, 4, 12),  # ceil(11.1)
    (0.01, 10, 1, 4, 1),  # at least one slot
])
def test_expert_capacity_is_the_exact_ceiling(cf, tokens, k, n_experts, want):
    assert moeblaze.router.expert_capacity(tokens, k, n_experts, cf) == want


def test_capacity_factor_keeps_exactly_the_documented_slots():
    layer = MoE(8, 16, 2, 1, capacity_factor=1.1)
    with torch.no_grad():
        layer.router.proj.weight.zero_()
        layer.router.proj.weight[0, 0] = 10.0
    x = torch.randn(100, 8)
    x[:, 0] = x[:, 0].abs() + 1  # every token picks expert 0
    layer(x)
    assert 100 - int(layer.last_dropped) == 55  # ceil(1.1 * 100 * 1 / 2)


def test_meta_device_init_then_reset_parameters_equals_a_normal_build():
    """The FSDP2 / torchtitan flow: build on meta, to_empty(), reset_parameters()."""
    kwargs = dict(d_model=8, d_ff=12, n_experts=4, top_k=2, n_shared_experts=1)
    torch.manual_seed(3)
    normal = MoE(**kwargs)
    with torch.device("meta"):
        layer = MoE(**kwargs)
    assert layer.w_gate.is_meta
    x = torch.randn(2, 3, 8)
    assert layer(x.to("meta")).shape == (2, 3, 8)  # shape inference on meta
    layer.to_empty(device="cpu")
    torch.manual_seed(3)
    layer.reset_parameters()
    for (name, p), q in zip(layer.named_parameters(), normal.parameters()):
        assert torch.equal(p, q), name
    torch.testing.assert_close(layer(x), normal(x))
    assert abs(float(layer.w_gate.detach().std()) - 8**-0.5) < 0.05 and abs(float(layer.w_down.detach().std()) - 12**-0.5) < 0.05


def _sigmoid_route_reference(logits, top_k, renormalize):
    """route(score="sigmoid") in float64, where sigmoids of logits down to about -745 do not underflow."""
    probs = logits.double().sigmoid()
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize and top_k > 1:
        weights = weights / weights.sum(-1, keepdim=True)
    frac = torch.bincount(ids.reshape(-1), minlength=logits.shape[1]).double() / ids.numel()
    aux = logits.shape[1] * (frac * (probs / probs.sum(-1, keepdim=True)).mean(0)).sum()
    return ids, weights, aux


@pytest.mark.parametrize("shift", [0.0, -150.0, -600.0])  # -150, -600: every fp32 sigmoid underflows to 0
@pytest.mark.parametrize("renormalize", [True, False])
def test_sigmoid_routing_matches_a_float64_reference_where_scores_underflow(shift, renormalize):
    """Sigmoid scores of very negative logits underflow in fp32: renormalising gave 0/0 = NaN
    weights and a NaN aux loss from finite logits."""
    logits = (torch.randn(40, 6, generator=torch.Generator().manual_seed(0)) * 3 + shift).requires_grad_()
    r = route(logits, 3, score="sigmoid", renormalize=renormalize)
    ids, weights, aux = _sigmoid_route_reference(logits.detach(), 3, renormalize)
    assert torch.equal(r.expert_ids.long(), ids)
    torch.testing.assert_close(r.weights, weights.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r.aux_loss, aux.float())
    grad, = torch.autograd.grad(r.weights.sum() + r.aux_loss + r.z_loss, [logits])
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("renormalize", [True, False])
def test_sigmoid_top1_weight_stays_the_sigmoid(renormalize):
    """renormalize applies for top_k > 1 only, for sigmoid scores as for softmax: a renormalised
    top-1 weight would be the constant 1 (no router gradient from the task loss)."""
    logits = torch.randn(11, 5, generator=torch.Generator().manual_seed(2))
    r = route(logits, 1, score="sigmoid", renormalize=renormalize)
    ids, weights, _ = _sigmoid_route_reference(logits, 1, renormalize)
    assert torch.equal(r.expert_ids.long(), ids)
    torch.testing.assert_close(r.weights, weights.float())
    assert (r.weights < 1).all()


def test_sigmoid_layer_output_and_gradients_stay_finite_for_very_negative_logits():
    layer = MoE(4, 8, 4, 2, score="sigmoid")
    with torch.no_grad():
        layer.router.proj.weight.copy_(-100 * torch.eye(4))  # x = 2: every logit -200
    x = torch.full((3, 4), 2.0, requires_grad=True)
    out = layer(x)
    r = layer.router(x.detach())
    want = moe_reference(x, r.expert_ids.long(), r.weights, layer.w_gate, layer.w_up, layer.w_down)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(out).all() and out.abs().sum() > 0 and torch.isfinite(layer.aux_loss)
    (out.sum() + layer.aux_loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_route_refuses_integer_logits():
    """Integer logits gave all-zero integer weights."""
    with pytest.raises(ValueError, match="logits must be a floating-point tensor, got torch.int64"):
        route(torch.tensor([[0, 5, 1, 3], [2, 0, 7, 1]]), 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(capacity_factor=float("inf")), "capacity_factor must be a finite number > 0"),  # failed at forward
    (dict(capacity_factor=float("nan")), "capacity_factor must be a finite number > 0"),
    (dict(capacity_factor="1.5"), "capacity_factor must be a finite number > 0"),
    (dict(score="bogus"), "score must be 'softmax' or 'sigmoid', got 'bogus'"),  # failed at forward
    (dict(renormalize="no"), "renormalize must be True or False, got 'no'"),  # read as true, silently
    (dict(d_ff=0), "d_ff must be an integer >= 1, got 0"),  # a ZeroDivisionError
    (dict(d_model=0), "d_model must be an integer >= 1, got 0"),
    (dict(d_ff=8.0), "d_ff must be an integer >= 1, got 8.0"),
    (dict(n_experts=0, top_k=0), "n_experts must be an integer >= 1, got 0"),
    (dict(top_k=1.0), r"top_k must be an integer in \[1, n_experts=2\], got 1.0"),
    (dict(n_shared_experts=-1), "n_shared_experts must be an integer >= 0, got -1"),
    (dict(aux_loss_coef=float("nan")), "aux_loss_coef must be a finite number >= 0, got nan"),  # a NaN aux_loss
    (dict(z_loss_coef=float("inf")), "z_loss_coef must be a finite number >= 0, got inf"),
    (dict(aux_loss_coef="0.01"), "aux_loss_coef must be a finite number >= 0, got '0.01'"),  # failed at forward
    (dict(z_loss_coef=-0.001), "z_loss_coef must be a finite number >= 0, got -0.001"),
])
def test_constructor_refuses_bad_arguments(kwargs, match):
    """Checked at construction, before anything is built, not at the first forward."""
    args = {**dict(d_model=8, d_ff=8, n_experts=2, top_k=1), **kwargs}
    with pytest.raises(ValueError, match=match):
        MoE(**args)
    if not set(kwargs) & {"d_ff", "n_shared_experts", "aux_loss_coef", "z_loss_coef"}:  # the Router's own arguments
        router_args = {k: v for k, v in args.items() if k not in ("d_ff",)}
        with pytest.raises(ValueError, match=match):
            moeblaze.Router(**router_args)


def test_route_refuses_a_renormalize_that_is_not_a_bool():
    with pytest.raises(ValueError, match="renormalize must be True or False, got 1"):
        route(torch.randn(4, 3), 2, renormalize=1)


@pytest.mark.parametrize("capacity", [1.5, True, 0, "2"])
def test_route_refuses_a_capacity_that_is_not_a_positive_integer(capacity):
    """1.5 kept 2 slots and True kept 1, silently."""
    with pytest.raises(ValueError, match=r"capacity must be an integer >= 1 slot per expert \(or None: dropless\)"):
        route(torch.randn(4, 3), 1, capacity=capacity)


def test_sizes_are_stored_as_python_ints():
    """numpy sizes were stored as numpy ints (which a JSON config refuses)."""
    layer = MoE(np.int64(8), np.int64(8), np.int64(4), np.int64(2))
    assert all(type(v) is int for v in (layer.d_model, layer.d_ff, layer.n_experts, layer.top_k, layer.router.top_k))
    json.dumps(dict(d_model=layer.d_model, top_k=layer.top_k))


@pytest.mark.parametrize("x, match", [
    (torch.randn(()), r"x must be \[\.\.\., d_model=8\], got shape \(\)"),  # an IndexError
    (torch.ones(2, 8, dtype=torch.long), "x must be a floating-point tensor, got torch.int64"),  # a matmul error
    (torch.randn(2, 8, dtype=torch.bfloat16), "x is torch.bfloat16 but the layer's parameters are torch.float32"),
])
def test_module_refuses_bad_x_naming_it(x, match):
    with pytest.raises(ValueError, match=match):
        MoE(8, 8, 4, 2)(x)


def test_module_takes_16_bit_x_under_autocast(monkeypatch):
    """The dtype check leaves autocast alone: it casts x and the parameters, as for nn.Linear."""
    monkeypatch.setenv("GKC_BACKEND", "reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert MoE(8, 8, 4, 2)(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("x, match", [
    # a 3-D x reached `route` and failed as "router logits must be [tokens, experts], got shape (2, 3, 4)"
    (torch.randn(2, 3, 8), r"x must be \[tokens, d_model=8\] \(2-D: flatten leading dimensions first, "
                           r"e\.g\. x\.reshape\(-1, 8\), as MoE does\), got shape \(2, 3, 8\)"),
    (torch.randn(8), r"x must be \[tokens, d_model=8\].*got shape \(8,\)"),
    (torch.randn(3, 7), r"x must be \[tokens, d_model=8\].*got shape \(3, 7\)"),  # a bare matmul error
    (torch.ones(2, 8, dtype=torch.long), "x must be a floating-point tensor, got torch.int64"),
    (torch.randn(2, 8, dtype=torch.float64), "x is torch.float64 but the layer's parameters are torch.float32"),
])
def test_router_refuses_bad_x_naming_it(x, match):
    """A standalone Router takes flattened tokens; what it refuses, it says, naming x."""
    with pytest.raises(ValueError, match=match):
        moeblaze.Router(8, 4, 2)(x)
    with pytest.raises(ValueError, match=match):  # also where the capacity is computed from x first
        moeblaze.Router(8, 4, 2, capacity_factor=1.0)(x)
    assert moeblaze.Router(8, 4, 2)(torch.randn(5, 8)).expert_ids.shape == (5, 2)
