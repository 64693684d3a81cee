"""Counting what a call would launch on a GPU, on the CPU: the aten ops it dispatches that are no
views, plus its Triton kernel launches through the interpreter (whose own copies of a launch's
arguments are no launches), and the ops that read a value back to the host (a synchronisation
on a GPU). Tests bound these counts where a GPU step is launch-bound."""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..backend import select_backend
from ..registry import registered_ops

#: ops that copy a value to the host or size an output by the values: each waits for a GPU
#: (`equal` and `allclose` return a Python bool, `bincount` sizes its output by the max: on CUDA
#: each reads a value back inside the kernel's own op, which no `_local_scalar_dense` shows here)
SYNCING_OPS = frozenset({"_local_scalar_dense", "nonzero", "unique", "_unique2", "unique_consecutive", "unique_dim",
                         "masked_select", "equal", "allclose", "bincount"})
#: ops that make a view (or a detached alias): no launch
VIEW_OPS = frozenset({"view", "_unsafe_view", "reshape", "alias", "detach", "t", "unsqueeze", "squeeze", "expand",
                      "slice", "select", "permute", "transpose", "as_strided", "unbind", "split", "split_with_sizes",
                      "lift_fresh"})


class LaunchCounter(TorchDispatchMode):
    """`ops`: every aten op dispatched under the mode outside Triton launches, by name, and each
    Triton launch as "triton:<kernel>" (after `count_triton_launches`). A registered custom op
    (`register_op`) is counted by name but is no launch itself: its implementation runs under the
    counter, so that its own ops (each a launch on a GPU) are counted too (dispatched as the op,
    they would run past the mode unseen).

        counter = LaunchCounter().count_triton_launches(monkeypatch)
        with counter:
            step()
        assert counter.launches <= bound and not counter.syncs
    """

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.custom: set[str] = set()
        self.in_launch = 0
        self.active = 0  # inside `with counter:` (launches outside it are not counted)

    def __enter__(self):
        self.active += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self.active -= 1
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.in_launch:
            return func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        self.ops[name] += 1
        op = registered_ops().get(f"{func.namespace}::{name}")
        if op is None:
            return func(*args, **kwargs)
        self.custom.add(name)
        with self:  # the op's dispatch: the backend its tensors select
            return op.run(select_backend(*(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))),
                          *args, **kwargs)

    def count_triton_launches(self, monkeypatch) -> LaunchCounter:
        """Count the interpreter's Triton launches made under the counter too (pytest's
        `monkeypatch` undoes it)."""
        from triton.runtime.interpreter import GridExecutor

        launch, counter = GridExecutor.__call__, self

        def counted_launch(executor, *args, **kwargs):
            if not counter.active:
                return launch(executor, *args, **kwargs)
            counter.ops["triton:" + executor.fn.__name__] += 1
            counter.in_launch += 1
            try:
                return launch(executor, *args, **kwargs)
            finally:
                counter.in_launch -= 1

        monkeypatch.setattr(GridExecutor, "__call__", counted_launch)
        return self

    @property
    def syncs(self) -> dict:
        return {name: n for name, n in self.ops.items() if name in SYNCING_OPS}

    @property
    def launches(self) -> int:
        return sum(n for name, n in self.ops.items() if name not in VIEW_OPS and name not in self.custom)
