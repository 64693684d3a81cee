"""Pair a Triton implementation with its PyTorch reference as one `torch.library` custom op.

`torch.compile` and `torch.export` see a single op; which implementation runs is decided
per call by `select_backend` from the tensors' device and `GKC_BACKEND`. Inside
`inline_references()` a call runs the reference's plain torch ops instead, so a trace holds no
custom op: what AOTInductor needs to compile a graph into a package that runs without Python.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import typing
from collections.abc import Callable, Iterable, Iterator

import torch

from .backend import Backend, select_backend

_REGISTERED: dict[str, RegisteredOp] = {}
# how many inline_references() blocks are open: a plain global, which torch.compile and
# torch.export read (and guard on) while tracing, where a ContextVar cannot be traced
_INLINE_DEPTH = [0]


@contextlib.contextmanager
def inline_references() -> Iterator[None]:
    """Within the block, registered ops run their PyTorch reference directly instead of the custom
    op (e.g. around `torch.export.export`, so that the exported graph is made of aten ops only
    and AOTInductor can compile all of it; the hand-written kernels are then not used).
    Process-wide while open: meant for a trace, not for concurrent serving threads."""
    _INLINE_DEPTH[0] += 1
    try:
        yield
    finally:
        _INLINE_DEPTH[0] -= 1


class RegisteredOp:
    """A custom op plus direct handles on both implementations (for tests and benchmarks)."""

    def __init__(self, name: str, op, reference: Callable, triton: Callable | None, fake: Callable | None = None):
        self.name = name
        self.op = op
        self.reference = reference
        self.triton = triton
        self.fake = fake

    def __call__(self, *args, **kwargs):
        if _INLINE_DEPTH[0]:
            return self.reference(*args, **kwargs)
        return self.op(*args, **kwargs)

    def run(self, backend: Backend | str, *args, **kwargs):
        """Run one implementation explicitly, bypassing dispatch."""
        # as a Backend: the string "reference" is not `Backend.REFERENCE` and ran the Triton one
        if backend not in tuple(Backend):
            raise ValueError(f"backend must be one of {[b.value for b in Backend]}, got {backend!r}")
        backend = Backend(backend)
        if backend is Backend.REFERENCE or self.triton is None:
            return self.reference(*args, **kwargs)
        return self.triton(*args, **kwargs)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)

    def __repr__(self) -> str:
        return f"RegisteredOp({self.name!r}, triton={'yes' if self.triton else 'no'})"


def _tensors(args: Iterable) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


def _origins(*functions) -> list[str | None]:
    """Where each function is defined, comparable across a module reload (new function objects)."""
    return [None if f is None else f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}" for f in functions]


def register_op(
    name: str,
    *,
    reference: Callable,
    triton: Callable | None = None,
    fake: Callable | None = None,
    mutates_args: Iterable[str] = (),
) -> RegisteredOp:
    """Register `name` ("namespace::op") with a reference and an optional Triton implementation.

    The op's schema comes from `reference`'s type annotations. `fake` computes output
    metadata for tracing; it defaults to the reference, which works for ops whose output
    shapes follow from their input shapes.
    """
    namespace, sep, op_name = name.partition("::") if isinstance(name, str) else ("", "", "")
    if not (sep and namespace.isidentifier() and op_name.isidentifier()):  # torch: "not enough values to unpack"
        raise ValueError(f"name must be 'namespace::op' (two Python identifiers, e.g. 'mypkg::scale'), got {name!r}")
    if name in _REGISTERED:  # the same module imported again (a reload): the op it registered before
        op = _REGISTERED[name]
        if _origins(op.reference, op.triton, op.fake) != _origins(reference, triton, fake):
            raise ValueError(f"op {name!r} is already registered with other implementations "
                             f"({_origins(op.reference, op.triton, op.fake)}, now {_origins(reference, triton, fake)}): "
                             f"another module registers this name, or one module was imported under two names "
                             f"(e.g. from a source tree and an installed copy); register each op once")
        return op

    hints = typing.get_type_hints(reference)
    sig = inspect.signature(reference)
    sig = sig.replace(
        parameters=[p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()],
        return_annotation=hints.get("return", sig.return_annotation),
    )

    returns_tensor = sig.return_annotation is torch.Tensor
    returns_something = sig.return_annotation not in (None, type(None), inspect.Signature.empty)

    @functools.wraps(reference)
    def dispatch(*args, **kwargs):
        backend = select_backend(*_tensors(list(args) + list(kwargs.values())))
        if backend.uses_triton and triton is not None:
            out = triton(*args, **kwargs)
            # custom_op does not check an eager result against the schema: a launcher that forgot
            # its `return` would hand None on as the op's output
            if (returns_tensor and not isinstance(out, torch.Tensor)) or (returns_something and out is None):
                raise TypeError(f"{name}: the Triton implementation returned {type(out).__name__}, expected "
                                f"{sig.return_annotation} (the reference's return annotation)")
            return out
        return reference(*args, **kwargs)

    dispatch.__signature__ = sig
    dispatch.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()}
    dispatch.__annotations__["return"] = sig.return_annotation
    op = torch.library.custom_op(name, dispatch, mutates_args=tuple(mutates_args))
    op.register_fake(fake or reference)
    registered = RegisteredOp(name, op, reference, triton, fake)
    _REGISTERED[name] = registered
    return registered


def registered_ops() -> dict[str, RegisteredOp]:
    return dict(_REGISTERED)
