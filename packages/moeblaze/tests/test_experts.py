import pytest
import torch

from gpukernels_common import Backend
from gpukernels_common.bench import saved_tensor_bytes
from gpukernels_common.testing import assert_close, poison_grads
from moeblaze import moe_experts, moe_reference

CASES = [  # tokens, d, d_ff, experts, top_k
    (19, 24, 40, 4, 2),  # odd sizes, tokens not a multiple of any block
    (7, 16, 33, 3, 3),  # top_k = n_experts
    (21, 20, 24, 5, 1),  # top_k = 1
]


def _inputs(t, d, f, e, k, dtype=torch.float32, activation="swiglu", hot=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g).to(dtype).requires_grad_()
    if hot:  # every token's first choice is expert 0, and expert e-1 gets nothing
        ids = torch.stack([torch.cat([torch.tensor([0]), (torch.randperm(e - 2, generator=g) + 1)[: k - 1]]) for _ in range(t)])
    else:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g).to(dtype).requires_grad_()
    wg = (torch.randn(e, d, f, generator=g) / d**0.5).to(dtype).requires_grad_()
    wu = (torch.randn(e, d, f, generator=g) / d**0.5).to(dtype).requires_grad_() if activation == "swiglu" else None
    wd = (torch.randn(e, f, d, generator=g) / f**0.5).to(dtype).requires_grad_()
    return x, ids.int(), w, wg, wu, wd


def _grads(out, inputs, g):
    live = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, live, g)


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


def test_hot_expert_and_empty_expert(backend):
    x, ids, w, wg, wu, wd = _inputs(23, 16, 24, 5, 2, hot=True)
    out = moe_experts(x, ids, w, wg, wu, wd)
    ref = moe_reference(x, ids.long(), w, wg, wu, wd)
    assert_close(out, ref, backend=backend)
    grads = _grads(out, [x, w, wg, wu, wd], torch.ones_like(out))
    assert torch.count_nonzero(grads[2][4]) == 0  # the empty expert gets an exact zero gradient


def test_fp16(backend):
    x, ids, w, wg, wu, wd = _inputs(17, 16, 32, 4, 2, dtype=torch.float16)
    out = moe_experts(x, ids, w, wg, wu, wd)
    ref = moe_reference(*(t.float() if t is not None and t.is_floating_point() else t for t in (x, ids.long(), w, wg, wu, wd)))
    assert out.dtype == torch.float16
    assert_close(out, ref, dtype=torch.float16, backend=backend, rms_tol=3e-3, max_tol=3e-2)


@pytest.mark.parametrize("checkpoint", ["recompute", "full"])
def test_checkpoint_modes_give_same_gradients(checkpoint):
    x, ids, w, wg, wu, wd = _inputs(19, 24, 40, 4, 2)
    g = torch.randn(19, 24)
    base = _grads(moe_experts(x, ids, w, wg, wu, wd, checkpoint="preact"), [x, w, wg, wu, wd], g)
    other = _grads(moe_experts(x, ids, w, wg, wu, wd, checkpoint=checkpoint), [x, w, wg, wu, wd], g)
    for a, b in zip(base, other):
        torch.testing.assert_close(a, b)


def test_grads_are_written_not_accumulated_into_poison():
    x, ids, w, wg, wu, wd = _inputs(11, 16, 16, 3, 2)
    out = moe_experts(x, ids, w, wg, wu, wd)
    out.sum().backward()
    poison_grads(x, w, wg, wu, wd)
    for t in (x, w, wg, wu, wd):
        t.grad = None
    moe_experts(x, ids, w, wg, wu, wd).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (x, w, wg, wu, wd))


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
        (lambda a: {**a, "w_up": None}, "swiglu needs w_up"),
        (lambda a: {**a, "activation": "relu"}, "activation must be"),
        (lambda a: {**a, "checkpoint": "some"}, "checkpoint must be"),
        (lambda a: {**a, "x": a["x"][0]}, "x must be"),
    ],
)
def test_bad_inputs(mutate, match):
    x, ids, w, wg, wu, wd = _inputs(5, 8, 8, 3, 2)
    args = dict(x=x, expert_ids=ids, weights=w, w_gate=wg, w_up=wu, w_down=wd)
    with pytest.raises(ValueError, match=match):
        moe_experts(**mutate(args))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_kernels_on_gpu(dtype):
    x, ids, w, wg, wu, wd = (t.cuda() if t is not None else None for t in _inputs(300, 128, 256, 8, 2))
    args = [t.detach().to(dtype).requires_grad_() if t is not None and t.is_floating_point() else t for t in (x, ids, w, wg, wu, wd)]
    out = moe_experts(*args)
    ref = moe_reference(*(t.float() if t is not None and t.is_floating_point() else t for t in (args[0], ids.long(), *args[2:])))
    assert_close(out, ref, dtype=dtype, backend=Backend.TRITON)
    out.float().sum().backward()
