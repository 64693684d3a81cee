"""A function of CUDA tensors recorded once as a CUDA graph and replayed: one launch per call
instead of one per kernel, for host-bound paths (many small kernels) such as a retrieval forward.

    graphed = GraphedCall(fn, example_a, example_b)   # fn(a, b) -> tensor or tuple/list of tensors
    out = graphed(a, b)                                # same shapes and dtypes as the examples

What `fn` does must not depend on its inputs' values on the host (no `.item()`, no `nonzero`,
no shapes read from data): `tracing()` is true while it is captured, so code of these packages
takes its static-shape path. Outputs are copies, not the graph's own buffers, which the next
call overwrites. One caller at a time: the captured input buffers are shared (a server calls it
from one worker).

Graphs of one function at several sizes can share one memory pool (`pool=torch.cuda.graph_pool_handle()`,
passed to each): their intermediates then take the memory of one graph, not of each. Safe as long as
no two of them replay at once and none reads another's outputs (each call's outputs are copies),
in whatever order they replay.
"""

from __future__ import annotations

import torch

WARMUP_CALLS = 3  # on a side stream before capture: Triton compiles, the allocator settles


def _flat_outputs(out):
    if isinstance(out, torch.Tensor):
        return [out], lambda xs: xs[0]
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        kind = type(out)
        return list(out), lambda xs: kind(xs)
    raise TypeError(f"fn must return a tensor or a tuple/list of tensors, got {type(out).__name__}")


def padded_batch(rows: torch.Tensor, size: int) -> torch.Tensor:
    """`rows` [q, ...] followed by copies of its last row up to `size` rows (q <= size): a smaller
    batch run through a graph captured for `size` (its outputs cut back to q after)."""
    q = rows.shape[0] if rows.dim() else 0
    # checked here: q > size took expand's -1 as "keep" (size - q = -1 gave q + 1 rows, silently)
    if not 1 <= q <= size:
        raise ValueError(f"rows must hold 1 to size={size} rows, got {q}")
    extra = size - q
    return torch.cat([rows, rows[-1:].expand(extra, *rows.shape[1:])]) if extra else rows.contiguous()


class GraphedCall:
    """`fn` captured as a CUDA graph for inputs shaped like `examples` (see the module docs);
    `pool`: a `torch.cuda.graph_pool_handle()` token shared with other graphs that never replay at the same time."""

    def __init__(self, fn, *examples: torch.Tensor, pool=None):
        for i, t in enumerate(examples):
            if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
                where = t.device if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"example {i} must be a CUDA tensor (CUDA graphs record GPU work), got {where}")
        if not examples:
            raise ValueError("GraphedCall needs at least one example input")
        self.fn = fn
        self.inputs = [t.detach().clone() for t in examples]
        stream = torch.cuda.Stream(device=self.inputs[0].device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_CALLS):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            out = fn(*self.inputs)
        self.outputs, self._rebuild = _flat_outputs(out)

    def __call__(self, *args: torch.Tensor):
        if len(args) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} inputs (as captured), got {len(args)}")
        for i, (arg, static) in enumerate(zip(args, self.inputs)):
            if not isinstance(arg, torch.Tensor) or arg.shape != static.shape or arg.dtype != static.dtype:
                got = f"{arg.dtype} {tuple(arg.shape)}" if isinstance(arg, torch.Tensor) else type(arg).__name__
                raise ValueError(f"input {i} must be {static.dtype} {tuple(static.shape)} (as captured), got {got}")
            static.copy_(arg)
        self.graph.replay()
        return self._rebuild([t.clone() for t in self.outputs])
