
import pytest
import torch

from gpukernels_common import Backend, inline_references, register_op

CALLS = []


def _ref(x: torch.Tensor, alpha: float) -> torch.Tensor:
    CALLS.append("reference")
    return x * alpha + 1


def _tri(x: torch.Tensor, alpha: float) -> torch.Tensor:
    CALLS.append("triton")
    return x * alpha + 1


OP = register_op("gkctest::axpb", reference=_ref, triton=_tri)


def _bwd(ctx, grad):
    return grad * ctx.alpha, None


def _setup(ctx, inputs, output):
    ctx.alpha = inputs[1]


OP.register_autograd(_bwd, setup_context=_setup)


def test_dispatch_follows_backend(monkeypatch):
    x = torch.randn(5)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("GKC_BACKEND", "auto")
    CALLS.clear()
    OP(x, 2.0)
    monkeypatch.setenv("GKC_BACKEND", "reference")
    OP(x, 2.0)
    assert CALLS == ["triton", "reference"]


def test_run_explicit_backend():
    CALLS.clear()
    OP.run(Backend.REFERENCE, torch.ones(2), 1.0)
    OP.run(Backend.INTERPRET, torch.ones(2), 1.0)
    assert CALLS == ["reference", "triton"]


def test_run_takes_a_backend_by_its_name():
    """The string "reference" (Backend is a str enum, as `tolerance` takes it) ran the Triton one."""
    CALLS.clear()
    OP.run("reference", torch.ones(2), 1.0)
    OP.run("interpret", torch.ones(2), 1.0)
    assert CALLS == ["reference", "triton"]
    with pytest.raises(ValueError, match=r"backend must be one of \['triton', 'interpret', 'reference'\], got 'Reference'"):
        OP.run("Reference", torch.ones(2), 1.0)


def test_autograd_and_registration_is_idempotent():
    assert register_op("gkctest::axpb", reference=_ref, triton=_tri) is OP  # a module imported again


def test_a_name_taken_by_other_implementations_is_refused():
    def other(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return x * alpha

    with pytest.raises(ValueError, match="'gkctest::axpb' is already registered with other implementations"):
        register_op("gkctest::axpb", reference=other, triton=_tri)
    with pytest.raises(ValueError, match="already registered"):
        register_op("gkctest::axpb", reference=_ref)  # the Triton implementation left out


@pytest.mark.parametrize("name", ["axpb", "gkctest:axpb", "::axpb", "gkctest::", "gkc-test::axpb", "gkctest::a.b", 3])
def test_a_malformed_name_is_named(name):
    # torch's own error for "axpb" was "not enough values to unpack (expected 2, got 1)"
    with pytest.raises(ValueError, match=r"name must be 'namespace::op'"):
        register_op(name, reference=_ref)


def test_autograd_of_the_registered_op():
    x = torch.randn(3, requires_grad=True)
    OP(x, 3.0).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 3.0))


def test_export_and_compile_see_one_op(monkeypatch):
    monkeypatch.setenv("GKC_BACKEND", "reference")

    class M(torch.nn.Module):
        def forward(self, x):
            return OP(x, 2.0).sum()

    ep = torch.export.export(M(), (torch.randn(4),))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert "gkctest.axpb.default" in targets
    x = torch.randn(4)
    torch.testing.assert_close(ep.module()(x), M()(x))
    compiled = torch.compile(M(), backend="eager")
    torch.testing.assert_close(compiled(x), M()(x))


def test_inline_references_traces_plain_ops(monkeypatch):
    """Inside inline_references() the op runs its reference even where the dispatcher would pick
    the Triton side, and an export holds aten ops only; outside, the custom op again."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("GKC_BACKEND", "auto")

    class M(torch.nn.Module):
        def forward(self, x):
            return OP(x, 2.0).sum()

    CALLS.clear()
    with inline_references():
        OP(torch.ones(2), 1.0)
        ep = torch.export.export(M(), (torch.randn(4),))
    OP(torch.ones(2), 1.0)
    assert CALLS[0] == "reference" and CALLS[-1] == "triton"
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert "gkctest.axpb.default" not in targets and "aten.mul.Tensor" in targets
    x = torch.randn(4)
    torch.testing.assert_close(ep.module()(x), (x * 2 + 1).sum())


def test_tracing_is_true_only_inside_a_trace():
    from gpukernels_common import tracing

    seen = []

    def f(x):
        seen.append(tracing())
        return x + 1

    assert not tracing()
    torch.compile(f, backend="eager", fullgraph=True)(torch.ones(2))
    assert seen == [True]


def _forgot_return(x: torch.Tensor) -> torch.Tensor:
    x * 2  # noqa: B018 (a launcher that forgot its return)


def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_a_triton_implementation_that_returns_no_tensor_is_named(monkeypatch):
    op = register_op("gkctest::forgot_return", reference=_double, triton=_forgot_return)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("GKC_BACKEND", "auto")
    with pytest.raises(TypeError, match="gkctest::forgot_return: the Triton implementation returned NoneType"):
        op(torch.ones(3))
    monkeypatch.setenv("GKC_BACKEND", "reference")
    assert op(torch.ones(3)).tolist() == [2.0, 2.0, 2.0]


def _pair_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x + 1, x * 2


def _pair_forgot_return(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x + 1  # a launcher without its `return`


PAIR = register_op("gkctest::pair", reference=_pair_ref, triton=_pair_forgot_return)


def test_a_launcher_without_return_is_named_for_tuple_ops_too(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("GKC_BACKEND", "auto")
    with pytest.raises(TypeError, match="gkctest::pair: the Triton implementation returned NoneType"):
        PAIR(torch.ones(2))
