import pytest
import torch

from gpukernels_common import Backend
from gpukernels_common.bench import saved_tensor_bytes
from gpukernels_common.testing import assert_close
from moeblaze import experts, moe_experts, moe_reference
from moeblaze.experts import CHECKPOINTS
from moeblaze.naive import ACTIVATIONS

GRAD_NAMES = ["x", "weights", "w_gate", "w_up", "w_down"]
CASES = [  # tokens, d, d_ff, experts, top_k
    (19, 24, 40, 4, 2),  # odd sizes, tokens not a multiple of any block
    (7, 16, 33, 3, 3),  # top_k = n_experts
    (21, 20, 24, 5, 1),  # top_k = 1
]


def _inputs(t, d, f, e, k, dtype=torch.float32, activation="swiglu", routing="random", seed=0):
    """routing: "random"; "hot" (every token's first choice is expert 0, expert e-1 gets nothing);
    "single" (every token picks experts 0..k-1: with k = 1 one expert takes everything);
    "dropped" (random, then about a third of the slots dropped by a capacity: id e)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g).to(dtype).requires_grad_()
    if routing == "hot":
        ids = torch.stack([torch.cat([torch.tensor([0]), (torch.randperm(e - 2, generator=g) + 1)[: k - 1]]) for _ in range(t)])
    elif routing == "single":
        ids = torch.arange(k).repeat(t, 1)
    else:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    if routing == "dropped":
        ids[torch.rand(t, k, generator=g) < 0.3] = e
    w = torch.rand(t, k, generator=g).to(dtype).requires_grad_()
    wg = (torch.randn(e, d, f, generator=g) / d**0.5).to(dtype).requires_grad_()
    wu = (torch.randn(e, d, f, generator=g) / d**0.5).to(dtype).requires_grad_() if activation == "swiglu" else None
    wd = (torch.randn(e, f, d, generator=g) / f**0.5).to(dtype).requires_grad_()
    return x, ids.int(), w, wg, wu, wd


def _grads(out, inputs, g):
    live = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, live, g)


def _output_and_grads(inputs, g, activation="swiglu", checkpoint="preact"):
    """{"output": ..., "grad x": ..., ...} of moe_experts on the current backend."""
    x, ids, w, wg, wu, wd = inputs
    out = moe_experts(x, ids, w, wg, wu, wd, activation=activation, checkpoint=checkpoint)
    names = [n for n, t in zip(GRAD_NAMES, (x, w, wg, wu, wd)) if t is not None]
    return {"output": out, **{f"grad {n}": t for n, t in zip(names, _grads(out, [x, w, wg, wu, wd], g))}}


def _loop_output_and_grads(inputs, g, activation="swiglu"):
    x, ids, w, wg, wu, wd = inputs
    out = moe_reference(x, ids.long(), w, wg, wu, wd, activation)
    names = [n for n, t in zip(GRAD_NAMES, (x, w, wg, wu, wd)) if t is not None]
    return {"output": out, **{f"grad {n}": t for n, t in zip(names, _grads(out, [x, w, wg, wu, wd], g))}}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-d{}-f{}-E{}-k{}".format(*c))
@pytest.mark.parametrize("activation", ["swiglu", "silu", "gelu"])
def test_forward_and_grads_match_loop(backend, case, activation):
    x, ids, w, wg, wu, wd = _inputs(*case, activation=activation)
    out = moe_experts(x, ids, w, wg, wu, wd, activation=activation)
    ref = moe_reference(x, ids.long(), w, wg, wu, wd, activation)
    assert_close(out, ref, backend=backend, name="output")
    g = torch.randn_like(ref)
    names = ["x", "weights", "w_gate", "w_up", "w_down"]
    inputs = [x, w, wg, wu, wd]
    for name, a, b in zip([n for n, t in zip(names, inputs) if t is not None], _grads(out, inputs, g), _grads(ref, inputs, g)):
        assert_close(a, b, backend=backend, name=f"grad {name}")


@pytest.mark.parametrize("b2_reads_b1", [False, True], ids=["b2-recomputes", "b2-reads-b1"])
@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-d{}-f{}-E{}-k{}".format(*c))
def test_triton_backward_matches_reference_backward(case, activation, checkpoint, b2_reads_b1, monkeypatch, canary_allocations):
    """The Triton backward (B1-B4, interpreter) against the PyTorch reference backward, fp32 tight;
    every buffer either backend allocates starts NaN and sits between canaries. Both B2 schedules:
    recomputing the activation, or reading the s * h that B1 wrote (`B2_READS_B1_OUTPUT`)."""
    monkeypatch.setattr(experts, "B2_READS_B1_OUTPUT", b2_reads_b1)
    inputs = _inputs(*case, activation=activation)
    g = torch.randn(case[0], case[1], generator=torch.Generator().manual_seed(1))
    results = {}
    for backend in (Backend.REFERENCE, Backend.INTERPRET):
        monkeypatch.setenv("GKC_BACKEND", backend.value)
        results[backend] = _output_and_grads(inputs, g, activation, checkpoint)
    canary_allocations.check()
    for name, want in results[Backend.REFERENCE].items():
        assert_close(results[Backend.INTERPRET][name], want, backend=Backend.REFERENCE, name=f"{name} ({checkpoint})")


@pytest.mark.parametrize("routing, case", [
    ("hot", (23, 16, 24, 5, 2)),  # expert 0 in every token's choices, expert 4 empty
    ("single", (23, 16, 24, 5, 1)),  # expert 0 takes every token, the other four are empty
    ("dropped", (23, 16, 24, 5, 2)),  # slots dropped by a capacity: no output, zero routing-weight gradient
])
@pytest.mark.parametrize("b2_reads_b1", [False, True], ids=["b2-recomputes", "b2-reads-b1"])
def test_routing_extremes_match_loop(backend, routing, case, b2_reads_b1, monkeypatch, canary_allocations):
    monkeypatch.setattr(experts, "B2_READS_B1_OUTPUT", b2_reads_b1)
    inputs = _inputs(*case, routing=routing)
    ids, e = inputs[1], case[3]
    g = torch.randn(case[0], case[1], generator=torch.Generator().manual_seed(1))
    want = _loop_output_and_grads(inputs, g)
    empty = [i for i in range(e) if not (ids == i).any()]
    assert empty or routing == "dropped"
    for checkpoint in CHECKPOINTS:
        got = _output_and_grads(inputs, g, checkpoint=checkpoint)
        for name in want:
            assert_close(got[name], want[name], backend=backend, name=f"{name} ({checkpoint})")
        for name in ("grad w_gate", "grad w_up", "grad w_down"):  # experts without tokens: exact zeros
            assert torch.count_nonzero(got[name][empty]) == 0, name
        assert torch.count_nonzero(got["grad weights"][ids == e]) == 0  # dropped slots
    canary_allocations.check()


def test_strided_weight_views_are_read_in_place(backend, canary_allocations):
    """transformers' layout (gate_up [E, 2*d_ff, d], down [E, d, d_ff]) handed over as transposed
    views: the same gradients as the loop, and the weights are saved as views, not copies."""
    t, d, f, e, k = 19, 24, 40, 4, 2
    x, ids, w, wg, wu, wd = _inputs(t, d, f, e, k)
    gate_up = torch.cat([wg, wu], 2).transpose(1, 2).contiguous().detach().requires_grad_()
    down = wd.transpose(1, 2).contiguous().detach().requires_grad_()
    views = lambda: (gate_up[:, :f].transpose(1, 2), gate_up[:, f:].transpose(1, 2), down.transpose(1, 2))  # noqa: E731
    saved_storages = []

    def pack(saved):
        saved_storages.append(saved.untyped_storage().data_ptr())
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        out = moe_experts(x, ids, w, *views())
    assert gate_up.untyped_storage().data_ptr() in saved_storages and down.untyped_storage().data_ptr() in saved_storages
    g = torch.randn(t, d, generator=torch.Generator().manual_seed(1))
    want_out = moe_reference(x, ids.long(), w, *views())
    assert_close(out, want_out, backend=backend, name="output")
    for name, got, want in zip(["x", "weights", "gate_up", "down"], _grads(out, [x, w, gate_up, down], g),
                               _grads(want_out, [x, w, gate_up, down], g)):
        assert_close(got, want, backend=backend, name=f"grad {name}")
    canary_allocations.check()


def test_fp16(backend):
    inputs = _inputs(17, 16, 32, 4, 2, dtype=torch.float16)
    g = torch.randn(17, 16, generator=torch.Generator().manual_seed(1))
    want = _loop_output_and_grads([t.detach().float().requires_grad_() if t is not None and t.is_floating_point() else t
                                   for t in inputs], g)
    for checkpoint in CHECKPOINTS:
        got = _output_and_grads(inputs, g.half(), checkpoint=checkpoint)
        for name in want:
            assert got[name].dtype == torch.float16, name
            assert_close(got[name], want[name], dtype=torch.float16, backend=backend, name=f"{name} ({checkpoint})")


@pytest.mark.parametrize("checkpoint", ["recompute", "full"])
def test_checkpoint_modes_give_same_gradients(checkpoint):
    x, ids, w, wg, wu, wd = _inputs(19, 24, 40, 4, 2)
    g = torch.randn(19, 24)
    base = _grads(moe_experts(x, ids, w, wg, wu, wd, checkpoint="preact"), [x, w, wg, wu, wd], g)
    other = _grads(moe_experts(x, ids, w, wg, wu, wd, checkpoint=checkpoint), [x, w, wg, wu, wd], g)
    for a, b in zip(base, other):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_backward_twice_with_retained_graph(backend, checkpoint):
    """A second backward over a retained graph sees the saved tensors unchanged (the backward
    writes da and db over a and b only when they are its own recomputed buffers)."""
    x, ids, w, wg, wu, wd = _inputs(11, 16, 24, 3, 2)
    out = moe_experts(x, ids, w, wg, wu, wd, checkpoint=checkpoint)
    g = torch.randn(11, 16, generator=torch.Generator().manual_seed(1))
    first = torch.autograd.grad(out, [x, w, wg, wu, wd], g, retain_graph=True)
    second = torch.autograd.grad(out, [x, w, wg, wu, wd], g)
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, b), name


def test_saved_bytes_follow_checkpoint_mode():
    t, d, f, e, k = 32, 16, 24, 4, 2
    x, ids, w, wg, wu, wd = _inputs(t, d, f, e, k)
    params = (wg.numel() + wu.numel() + wd.numel()) * 4
    fixed = x.numel() * 4 + w.numel() * 4 + (t * k + e + 1) * 4  # x, routing weights, dispatch indices
    got = {m: saved_tensor_bytes(lambda m=m: moe_experts(x, ids, w, wg, wu, wd, checkpoint=m)) for m in ("preact", "recompute", "full")}
    assert got["recompute"] == params + fixed
    assert got["preact"] == params + fixed + 2 * t * k * f * 4  # a and b
    assert got["full"] == got["preact"] + t * k * f * 4  # plus h
    # never a [T*k, d] permuted copy: the recompute mode keeps only x-sized activations
    assert got["recompute"] - params < t * k * d * 4 + fixed


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: {**a, "w_gate": a["w_gate"][:, :-1]}, "w_gate must be"),
        (lambda a: {**a, "w_down": a["w_down"][:-1]}, "w_down must be"),
        (lambda a: {**a, "expert_ids": a["expert_ids"] + 10}, "expert_ids must be in"),
        (lambda a: {**a, "weights": a["weights"][:, :1]}, "expert_ids and weights"),
        (lambda a: {**a, "w_up": None}, "activation 'swiglu' needs w_up"),
        (lambda a: {**a, "activation": "relu"}, "activation must be"),
        (lambda a: {**a, "checkpoint": "some"}, "checkpoint must be"),
        (lambda a: {**a, "x": a["x"][0]}, "x must be"),
        (lambda a: {**a, "expert_ids": a["expert_ids"] - 1}, r"expert_ids must be in \[0, 3\]"),
        # dtypes: the reference loop failed in a matmul, the Triton path ran (even on integer x)
        (lambda a: {**a, "x": a["x"].detach().bfloat16()}, "w_gate must have x's dtype"),
        (lambda a: {**a, "w_down": a["w_down"].detach().double()}, "w_down must have x's dtype"),
        (lambda a: {**{k: v.detach().long() if k in ("x", "w_gate", "w_up", "w_down") else v for k, v in a.items()}},
         "x must be a floating-point"),
        (lambda a: {**a, "weights": a["weights"] > 0.5}, "weights .* floating-point"),
        (lambda a: {**a, "expert_ids": a["expert_ids"].float()}, "expert_ids must be an int32 or int64"),
        (lambda a: {**a, "expert_ids": a["expert_ids"].short()}, "expert_ids must be an int32 or int64"),
        (lambda a: {**a, "expert_ids": a["expert_ids"].to("meta")}, "expert_ids is on meta"),
        (lambda a: {**a, "expert_ids": a["expert_ids"][:, :0], "weights": a["weights"][:, :0]}, "top_k .* >= 1"),
    ],
)
def test_bad_inputs(backend, mutate, match):
    x, ids, w, wg, wu, wd = _inputs(5, 8, 8, 3, 2)
    args = dict(x=x, expert_ids=ids, weights=w, w_gate=wg, w_up=wu, w_down=wd)
    with pytest.raises(ValueError, match=match):
        moe_experts(**mutate(args))


@pytest.mark.parametrize("ids, activation, match", [
    ([[0, 1], [1, -1], [2, 0]], "swiglu", r"expert_ids must be in \[0, 3\]"),  # was skipped: no expert matches it
    ([[0, 1], [1, 4], [2, 0]], "swiglu", r"expert_ids must be in \[0, 3\]"),
    ([[0.0, 1.0], [1.0, 0.5], [2.0, 0.0]], "swiglu", "expert_ids must be an int32 or int64"),  # 0.5: skipped
    ([[3, 3], [3, 3], [3, 3]], "relu", "activation must be"),  # every slot dropped: no expert ran it
])
def test_reference_refuses_what_moe_experts_refuses(ids, activation, match):
    """moe_reference (what every test compares against) took ids outside [0, E] and float ids as
    matching no expert, and checked the activation only when some expert had tokens."""
    x, _, w, wg, wu, wd = _inputs(3, 8, 8, 3, 2)
    with pytest.raises(ValueError, match=match):
        moe_reference(x, torch.tensor(ids), w, wg, wu, wd, activation)


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_double_backward_is_refused_clearly(backend, checkpoint):
    """create_graph=True still gives the right first-order gradients, but differentiating them
    again raises (the hand-written backward is not itself differentiable)."""
    x, ids, w, wg, wu, wd = _inputs(9, 16, 24, 3, 2)
    out = moe_experts(x, ids, w, wg, wu, wd, checkpoint=checkpoint)
    want = moe_reference(x, ids.long(), w, wg, wu, wd)
    gx, = torch.autograd.grad(out.pow(2).sum(), [x], create_graph=True)
    gx_want, = torch.autograd.grad(want.pow(2).sum(), [x])
    assert_close(gx, gx_want, backend=backend, name="grad x")
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(gx.pow(2).sum(), [x, wg, wu])
    # also when the incoming gradient is a constant (the second-order graph then runs through
    # the saved inputs only)
    gw, = torch.autograd.grad(moe_experts(x, ids, w, wg, wu, wd, checkpoint=checkpoint).sum(), [wg], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(gw.sum(), [x])


def test_empty_batch_gives_an_empty_output_in_the_graph(backend):
    x, ids, w, wg, wu, wd = _inputs(5, 8, 8, 3, 2)
    out = moe_experts(x[:0], ids[:0], w[:0], wg, wu, wd)
    assert out.shape == (0, 8)
    grads = torch.autograd.grad(out.sum(), [x, w, wg, wu, wd])
    assert all(not g.any() for g in grads)  # zero gradients, as nn.Linear gives on an empty batch


def test_float64(backend):
    """float64: exact on the reference backend; the Triton kernels (fp32 inside) refuse it."""
    x, ids, w, wg, wu, wd = (t.detach().double().requires_grad_() if t.is_floating_point() else t
                             for t in _inputs(4, 5, 6, 3, 2))
    if backend is Backend.REFERENCE:
        assert torch.autograd.gradcheck(lambda *a: moe_experts(a[0], ids, *a[1:]), (x, w, wg, wu, wd))
    else:
        with pytest.raises(ValueError, match="float64.*GKC_BACKEND=reference"):
            moe_experts(x, ids, w, wg, wu, wd)


def test_autocast_computes_in_the_autocast_dtype(backend):
    """Under autocast, fp32 x and weights run (and save their pre-activations) in bf16, as an
    nn.Linear or the per-expert loop does, on both backends."""
    x, ids, w, wg, wu, wd = _inputs(9, 16, 24, 3, 2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = moe_experts(x, ids, w, wg, wu, wd)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = moe_reference(x, ids.long(), w, wg, wu, wd)  # its matmuls run in bf16
    assert out.dtype == torch.bfloat16
    assert torch.float32 not in saved
    torch.testing.assert_close(out.float(), want.float(), rtol=0.05, atol=0.05)
    grads = torch.autograd.grad(out.float().sum(), [x, wg])
    assert [g.dtype for g in grads] == [torch.float32, torch.float32]  # back in the parameters' dtype


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_autocast_casts_as_nn_linear(backend, autocast_dtype, dtype):
    """Autocast casts every floating operand but a float64 one (16-bit ones included); the
    experts follow nn.Linear under the same autocast (float64 was cast to 16 bits)."""
    x, ids, w, wg, wu, wd = (t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t
                             for t in _inputs(9, 16, 24, 3, 2))
    with torch.autocast("cpu", dtype=autocast_dtype):
        want_dtype = torch.nn.Linear(16, 24).to(dtype)(x).dtype
        if backend is Backend.INTERPRET and want_dtype == torch.float64:
            with pytest.raises(ValueError, match="float64"):  # the Triton kernels refuse float64
                moe_experts(x, ids, w, wg, wu, wd)
            return
        out = moe_experts(x, ids, w, wg, wu, wd)
    assert want_dtype == (torch.float64 if dtype == torch.float64 else autocast_dtype)
    assert out.dtype == want_dtype
    # the loop on the operands as autocast casts them (its index_add_ mixes dtypes under autocast)
    x, w, wg, wu, wd = (t.detach().to(want_dtype) for t in (x, w, wg, wu, wd))
    want = moe_reference(x, ids.long(), w, wg, wu, wd)
    assert_close(out, want, dtype=want_dtype, backend=backend, name="output")


class _PreactivationSpy:
    """Wraps both backends' forwards, recording whether each one returned stored a and b."""

    def __init__(self, monkeypatch):
        import moeblaze.experts as experts

        self.stored = []
        for name in ("_forward_torch", "_forward_triton"):
            monkeypatch.setattr(experts, name, self._wrap(getattr(experts, name)))

    def _wrap(self, forward):
        def spy(*args):
            out, a, b, h = forward(*args)
            self.stored.append((a is not None, b is not None))
            return out, a, b, h
        return spy


@pytest.mark.parametrize("checkpoint", ["preact", "full"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no input requires grad"])
def test_no_backward_no_stored_preactivations(backend, checkpoint, mode, monkeypatch, canary_allocations):
    """When no backward can follow, the forward skips the [T*k, d_ff] pre-activation buffers
    (it allocated and wrote them under no_grad), with the same output: the kernels' path
    without those stores."""
    inputs = _inputs(19, 24, 40, 4, 2)
    x, ids, w, wg, wu, wd = inputs
    spy = _PreactivationSpy(monkeypatch)
    with_grad = moe_experts(x, ids, w, wg, wu, wd, checkpoint=checkpoint)
    assert spy.stored == [(True, True)]  # the seam sees the stores when a backward may follow
    if mode == "no input requires grad":
        x, w, wg, wu, wd = (t.detach() for t in (x, w, wg, wu, wd))
        out = moe_experts(x, ids, w, wg, wu, wd, checkpoint=checkpoint)
    else:
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            out = moe_experts(x, ids, w, wg, wu, wd, checkpoint=checkpoint)
    assert spy.stored[1:] == [(False, False)]
    assert torch.equal(out, with_grad.detach())
    assert_close(out, moe_reference(x, ids.long(), w, wg, wu, wd).detach(), backend=backend, name="output")
    canary_allocations.check()


# the backward schedules sweep_tiles.py chooses between: module settings of moeblaze.experts
SCHEDULES = {"chosen": {}, "b2-reads-b1": {"B2_READS_B1_OUTPUT": True}, "b1-bn64": {"GPU_ACT_GRAD_TILES": {"bn": 64}}}


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_kernels_on_gpu(dtype, checkpoint, schedule, monkeypatch):
    """The compiled forward and backward kernels in 16 bits against the fp32 reference loop, under
    each backward schedule the tile sweep tries; the backward runs without a host synchronisation."""
    for name, value in SCHEDULES[schedule].items():
        monkeypatch.setattr(experts, name, value)
    inputs = _inputs(300, 128, 256, 8, 2, routing="hot")
    g = torch.randn(300, 128, generator=torch.Generator().manual_seed(1)).cuda()
    x, ids, w, wg, wu, wd = (t.detach().cuda().to(dtype).requires_grad_() if t.is_floating_point() else t.cuda()
                             for t in inputs)
    want = _loop_output_and_grads([t.detach().float().requires_grad_() if t.is_floating_point() else t
                                   for t in (x, ids, w, wg, wu, wd)], g)
    out = moe_experts(x, ids, w, wg, wu, wd, checkpoint=checkpoint)
    torch.cuda.set_sync_debug_mode("error")
    try:
        grads = torch.autograd.grad(out, [x, w, wg, wu, wd], g.to(dtype))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = {"output": out, **{f"grad {n}": t for n, t in zip(GRAD_NAMES, grads)}}
    for name in want:
        assert got[name].dtype == dtype, name
        assert_close(got[name], want[name], dtype=dtype, backend=Backend.TRITON, name=f"{name} ({checkpoint})")


@pytest.fixture
def matmul_precision():
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


def test_fp32_dot_precision_follows_torch(matmul_precision, monkeypatch):
    """fp32 operands are multiplied exactly under torch's default matmul precision ("highest")
    and as TF32 under "high", as torch's own matmuls are; 16-bit operands keep the tensor cores."""
    from moeblaze.experts import _Launch

    monkeypatch.setenv("GKC_GPU_LAUNCH_SHAPES", "1")  # the launch a GPU takes
    offsets = torch.tensor([0, 4, 6], dtype=torch.int32)
    for setting, fp32 in [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")]:
        matmul_precision(setting)
        assert _Launch(torch.zeros(3, 8), offsets, 2, 8, 16, 2).precision == fp32, setting
        for dtype in (torch.bfloat16, torch.float16):
            assert _Launch(torch.zeros(3, 8, dtype=dtype), offsets, 2, 8, 16, 2).precision == "tf32", (setting, dtype)


def test_act_grad_tiles_replace_the_chosen_ones_on_gpu_launches(monkeypatch):
    """GPU_ACT_GRAD_TILES reaches B1's launch (16-bit inputs, GPU shapes), and only B1's."""
    from moeblaze.experts import _Launch

    monkeypatch.setenv("GKC_GPU_LAUNCH_SHAPES", "1")  # the launch a GPU takes
    offsets = torch.tensor([0, 4, 6], dtype=torch.int32)
    x = torch.zeros(3, 256, dtype=torch.bfloat16)
    chosen = _Launch(x, offsets, 2, 256, 512, 2)
    monkeypatch.setattr(experts, "GPU_ACT_GRAD_TILES", {"bn": 64, "num_warps": 4})
    changed = _Launch(x, offsets, 2, 256, 512, 2)
    assert (chosen.b1_bn, changed.b1_bn) == (experts.GPU_TILES["bn"], 64)
    assert changed.b1_meta == {"num_warps": 4, "num_stages": experts.GPU_TILES["num_stages"]}
    assert (changed.bn_f, changed.meta) == (chosen.bn_f, chosen.meta)


@pytest.mark.gpu
@pytest.mark.parametrize("setting", ["highest", "high"])
def test_compiled_fp32_kernels_follow_matmul_precision_on_gpu(setting, matmul_precision):
    """fp32 on the GPU: exact products under "highest" (the interpreter's tier; TF32 fails it),
    TF32's tier under "high"."""
    matmul_precision(setting)
    inputs = _inputs(300, 128, 256, 8, 2)
    g = torch.randn(300, 128, generator=torch.Generator().manual_seed(1))
    want = _loop_output_and_grads([t.detach().double().requires_grad_() if t.is_floating_point() else t for t in inputs],
                                  g.double())
    x, ids, w, wg, wu, wd = (t.detach().cuda().requires_grad_() if t.is_floating_point() else t.cuda() for t in inputs)
    out = moe_experts(x, ids, w, wg, wu, wd)
    grads = torch.autograd.grad(out, [x, w, wg, wu, wd], g.cuda())
    got = {"output": out, **{f"grad {n}": t for n, t in zip(GRAD_NAMES, grads)}}
    tier = Backend.INTERPRET if setting == "highest" else Backend.TRITON
    # TF32 rounds each operand to 10 mantissa bits; three chained products (gate/up, down, and the
    # backward's) measured 2.3e-3 relative RMS on the output on an H200: above the one-product tier
    tf32 = {} if setting == "highest" else {"rms_tol": 5e-3, "max_tol": 2e-2}
    for name in want:
        assert_close(got[name], want[name], dtype=torch.float32, backend=tier, name=f"{name} ({setting})", **tf32)


def test_top_k_above_the_expert_count(backend):
    """transformers' expert parallelism hands each rank's experts module local ids with the
    global top_k, which may exceed the rank's expert count (here 1 local expert, top-2, the
    sentinel id E for other ranks' experts); repeated ids likewise give k > E. Was refused."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g, requires_grad=True)
    wg, wu = ((torch.randn(1, 8, 12, generator=g) / 8**0.5).requires_grad_() for _ in range(2))
    wd = (torch.randn(1, 12, 8, generator=g) / 12**0.5).requires_grad_()
    ids = torch.tensor([[0, 1], [1, 1], [0, 1], [1, 0], [0, 0]], dtype=torch.int32)  # 1: another rank's expert
    w = torch.rand(5, 2, generator=g).masked_fill(ids == 1, 0.0).requires_grad_()
    inputs = [x, w, wg, wu, wd]
    out = moe_experts(x, ids, w, wg, wu, wd)
    ref = moe_reference(x, ids.long(), w, wg, wu, wd)
    assert_close(out, ref, backend=backend, name="output")
    go = torch.randn_like(ref)
    for name, a, b in zip(GRAD_NAMES, _grads(out, inputs, go), _grads(ref, inputs, go)):
        assert_close(a, b, backend=backend, name=f"grad {name}")
