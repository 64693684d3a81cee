"""Per-task representation gradients in factored form, for heads that open with a Linear layer.

When task t's head reads representation j through one linear layer h = r @ W.T (+ b), its
representation gradient is g_tj = d_tj @ W, with d_tj = dL_t/dh of shape [B, h_t]. When
h_t < D (the usual narrow head on a wide representation) everything MultiBalance needs comes
from the factors without ever forming the [B, D] gradients:

- ||g||^2 = <d^T d, W W^T> (two h_t x h_t Gram matrices), per sample (d (W W^T)) . d summed
  over the sample's rows (a [B, S, D] representation read by a Linear on its last dimension has
  S rows per sample);
- the combination sum_t c_t g_tj = [c_1 d_1j, ..., c_T d_Tj] @ [W_1; ...; W_T], one matmul of
  the same size as the heads' own representation-gradient matmuls, with no per-task buffer and no
  accumulation passes.

The heads' parameters get their gradients from ONE backward over the weighted losses, told to
stop at the parameters (`inputs=`), so autograd never computes a per-task representation
gradient; a pre-hook on each head's first linear node keeps d_tj. The shared bottom then gets one
backward, as on the general path, in one process and under DDP alike (each parameter still gets
its gradient once: see `multibalance.base`). Any other head shape (a non-linear first op, a layer shared
between tasks, a representation read twice by one task, a compiled head, a first layer at least
as wide as the representation, where the factors are no smaller than the gradient) takes the
general path.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .combine import weighted_loss
from .factor_norms import factor_square_sums

# linear nodes: the index of their input ("mat1") edge and where its [rows, features] size is
# saved; the weight is saved as mat2 = W.T
_LINEAR_INPUT = {"AddmmBackward0": (1, "_saved_mat1_sym_sizes"), "MmBackward0": (0, "_saved_self_sym_sizes")}
# what may stand between a representation and its linear layer: a dtype cast (autocast) and the
# flattening of leading dimensions ([B, S, D] -> [B*S, D]), which keeps each sample's rows together
_PASS_THROUGH = ("ToCopyBackward0", "ViewBackward0")


@dataclasses.dataclass
class _Consumer:
    node: object  # the head's first linear node
    weight_t: torch.Tensor  # W.T, [D, h], as the node saved it (e.g. the autocast copy): no op to read it
    rows: int  # rows of the linear layer's input: the representation's samples x positions


_KINDS: dict = {}  # autograd node class -> "leaf" (AccumulateGrad), "pass" (_PASS_THROUGH) or "" (anything else)


def _kind(node) -> str:
    cls = type(node)
    kind = _KINDS.get(cls)
    if kind is None:
        name = cls.__name__
        kind = _KINDS[cls] = "leaf" if name == "AccumulateGrad" else "pass" if name in _PASS_THROUGH else ""
    return kind


def _leaf_index(node, leaf_ids: dict) -> int | None:
    """The representation index `node` leads to directly or through casts and views (the leaves
    are leaf tensors: their node is their AccumulateGrad)."""
    for _ in range(len(_PASS_THROUGH) + 1):
        kind = _kind(node)
        if kind == "leaf":
            return leaf_ids.get(id(node.variable))
        if kind != "pass":
            return None
        children = node.next_functions
        if len(children) != 1 or children[0][0] is None:
            return None
        node = children[0][0]
    return None


def reaches(loss: torch.Tensor, leaf_ids: set[int]) -> bool:
    """Whether `loss` depends on one of the leaf tensors whose ids are `leaf_ids` (the detached
    representations): a walk of its graph that stops at the first one found, so it visits
    little more than the head in front of it."""
    return _walk_finds(loss, leaf_ids, set())


def depends_on(loss: torch.Tensor, tensors: list[torch.Tensor]) -> bool:
    """Whether `loss` depends on one of `tensors` (leaf tensors, or outputs of the graph: their
    nodes), by a walk of its graph that stops at the first one found; for the balancers that do
    not detach the representation (`reaches` is the walk for detached leaves)."""
    leaf_ids = {id(t) for t in tensors if t.grad_fn is None}
    # `t.grad_fn` may hand out a new Python wrapper each time: keep the ones whose ids are compared
    # alive through the walk (a freed wrapper's id goes to the next wrapper made, a false match)
    nodes = [t.grad_fn for t in tensors if t.grad_fn is not None]
    found = _walk_finds(loss, leaf_ids, {id(n) for n in nodes})
    del nodes
    return found


def leaves_read(losses: list[torch.Tensor], leaves: list[torch.Tensor]) -> list[bool]:
    """Per leaf tensor (the detached representations), whether some loss depends on it: one walk
    of the losses' graphs (nodes shared between them visited once), ended as soon as every leaf
    is found, so with heads that read every representation it visits little more than the heads."""
    index = {id(leaf): j for j, leaf in enumerate(leaves)}
    found, left = [False] * len(leaves), len(leaves)
    seen, stack = {}, [loss.grad_fn for loss in losses if loss.grad_fn is not None]  # id -> node: see find_linear_consumers
    while stack and left:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None or id(child) in seen:
                continue
            seen[id(child)] = child
            if _kind(child) == "leaf":
                j = index.get(id(child.variable))
                if j is not None and not found[j]:
                    found[j], left = True, left - 1
            else:
                stack.append(child)
    return found


def _walk_finds(loss: torch.Tensor, leaf_ids: set[int], node_ids: set[int]) -> bool:
    if loss.grad_fn is None:
        return False
    if id(loss.grad_fn) in node_ids:
        return True
    seen, stack = {}, [loss.grad_fn]  # id -> node: see find_linear_consumers
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None or id(child) in seen:
                continue
            seen[id(child)] = child
            if id(child) in node_ids:
                return True
            if _kind(child) == "leaf":
                if id(child.variable) in leaf_ids:
                    return True
            else:
                stack.append(child)
    return False


def _linear_consumer(node, index: int, children, leaf: torch.Tensor) -> _Consumer | None:
    """`node` as the linear layer reading `leaf` through its input edge `index`, or None when the
    factors would not give that layer's representation gradient."""
    linear = _LINEAR_INPUT.get(type(node).__name__)
    if linear is None or linear[0] != index:
        return None  # not a linear layer's input
    if all(e is None for i, (e, _) in enumerate(children) if i != index):
        return None  # a frozen layer without bias: its node would not run
    if getattr(node, "_saved_alpha", 1) != 1:
        return None  # addmm(..., alpha=a) scales the layer: not the plain W the factors use
    weight_t = node._saved_mat2
    if weight_t.shape[1] >= weight_t.shape[0]:
        return None  # a layer as wide as the representation: the factors save nothing
    rows, features = getattr(node, linear[1])
    if leaf.numel() == 0 or rows * features != leaf.numel() or rows % leaf.shape[0]:
        return None  # a view that does not keep each sample's rows together
    return _Consumer(node, weight_t, rows)


def find_linear_consumers(losses: list[torch.Tensor], leaves: list[torch.Tensor]):
    """Per task and representation: the one linear node reading it (or None when the task does
    not read it), plus the heads' parameters; None when any head does not fit (see module docs).
    `leaves` are leaf tensors (the detached representations the heads read)."""
    leaf_ids = {id(leaf): j for j, leaf in enumerate(leaves)}
    kinds = _KINDS  # `_kind` inlined: this loop visits every node of the heads, every step
    consumers: list[list[_Consumer | None]] = []
    params: dict[int, torch.Tensor] = {}
    owner: set[int] = set()  # the heads' first linear nodes
    for loss in losses:
        found: list[_Consumer | None] = [None] * len(leaves)
        if loss.grad_fn is None:
            return None  # the general path names the task that does not read the representation
        # id -> node: a node's Python wrapper lives only while referenced, and a freed one's id is
        # reused by the next wrapper made, so the walk holds every node it has seen
        seen, stack = {}, [loss.grad_fn]
        while stack:  # runs every step: a node's next_functions are built once, no exception per node
            node = stack.pop()
            if id(node) in seen:
                continue
            seen[id(node)] = node
            children = node.next_functions
            for index, (child, _) in enumerate(children):
                if child is None:
                    continue
                kind = kinds.get(type(child))
                if kind is None:
                    kind = _kind(child)
                if kind == "leaf":
                    variable = child.variable
                    j = leaf_ids.get(id(variable))
                    if j is None:  # a head parameter
                        params[id(variable)] = variable
                        continue
                elif kind == "pass":
                    j = _leaf_index(child, leaf_ids)
                    if j is None:
                        stack.append(child)
                        continue
                else:
                    stack.append(child)
                    continue
                if found[j] is not None or id(node) in owner:
                    return None  # read twice, or a layer shared by tasks
                consumer = _linear_consumer(node, index, children, leaves[j])
                if consumer is None:
                    return None
                owner.add(id(node))
                found[j] = consumer
        if all(c is None for c in found):
            return None  # the general path names the task that does not read the representation
        consumers.append(found)
    for j in range(len(leaves)):  # the combination stacks the factors of one representation side by side
        if len({row[j].rows for row in consumers if row[j] is not None}) > 1:
            return None
    if not params:
        return None
    return consumers, list(params.values())


def keep_deltas(consumers, when_complete=None) -> tuple[list[list[torch.Tensor | None]], list]:
    """Pre-hooks on the heads' first linear nodes that keep d_tj when the backward reaches them:
    the table they fill, and the hook handles (remove them after the backward).
    `when_complete(table)`, if given, runs in the hook that fills the table's last entry."""
    deltas: list[list[torch.Tensor | None]] = [[None] * len(row) for row in consumers]
    missing = [sum(c is not None for row in consumers for c in row)]
    handles = []
    for t, row in enumerate(consumers):
        for j, c in enumerate(row):
            if c is not None:
                def keep(grad_outputs, t=t, j=j):
                    first = deltas[t][j] is None
                    deltas[t][j] = grad_outputs[0]
                    if first:
                        missing[0] -= 1
                        if not missing[0] and when_complete is not None:
                            when_complete(deltas)
                handles.append(c.node.register_prehook(keep))
    return deltas, handles


def head_backward(losses: list[torch.Tensor], weights: list[float], consumers, params,
                  when_complete=None) -> list[list[torch.Tensor | None]]:
    """One backward over sum_t w_t L_t into the heads' parameters only; returns d_tj (of w_t L_t).
    `when_complete`: see `keep_deltas`."""
    deltas, handles = keep_deltas(consumers, when_complete)
    try:
        torch.autograd.backward(weighted_loss(losses, weights), inputs=params)
    finally:
        for h in handles:
            h.remove()
    return deltas


@functools.cache  # `promote_types` is a dispatched op: this runs for every representation, every step
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What norms and combinations are computed in: fp32 for fp32 and narrower gradients,
    float64 for float64 ones (fp32 would cost them 1e-7 relative error)."""
    return torch.promote_types(dtype, torch.float32)


@dataclasses.dataclass
class Factors:
    """One representation's factors over the tasks that read it: d side by side, [B, sum h_t],
    and the weights stacked, [sum h_t, D], both in `compute_dtype` of the gradients'; `widths`
    the h_t, `uniform` whether they are all equal (then every task's products run as one
    batched op)."""

    present: list[int]
    left: torch.Tensor
    right: torch.Tensor
    widths: list[int]
    uniform: bool


def stack_factors(deltas: list[torch.Tensor | None], weights_t: list[torch.Tensor | None],
                  scale: torch.Tensor | None = None) -> Factors | None:
    """`weights_t`: each task's W.T ([D, h_t]), as its linear node saved it. `scale` (a 0-d
    device tensor), if given, multiplies the left factor (in place: `cat` made it)."""
    present = [t for t, d in enumerate(deltas) if d is not None]
    if not present:
        return None
    # a linear node's output gradient is [rows, h] already: no reshape op in the usual case
    ds = [d if d.dim() == 2 else d.reshape(-1, d.shape[-1]) for d in (deltas[t] for t in present)]
    dtype = compute_dtype(ds[0].dtype)
    with torch.no_grad():  # the saved weights require grad: their transposes and copy need no graph
        left = torch.cat(ds, 1).to(dtype)
        if scale is not None:
            left.mul_(scale)
        # [sum h, D] rows: the batched Gram and the combination's matmul read it contiguously (the
        # side-by-side W.T, with no transposes, made both slower on CPUs)
        right = torch.cat([weights_t[t].t() for t in present], 0).to(dtype)
    widths = [d.shape[1] for d in ds]
    return Factors(present, left, right, widths, all(w == widths[0] for w in widths))


def task_norm_sums(f: Factors | None, n_tasks: int, per_sample: bool, device, samples: int = 1,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[T] for the representation gradients d_t @ W_t (0 where a task does not read it): the sum of
    squares, or (per_sample) the sum over the `samples` samples of each sample's norm (a sample's
    rows are consecutive), the local parts of the norms (see `Balancer._global_norms`). From h x h
    Gram matrices: ||d W||^2 = <d^T d, W W^T>, a row's (d_r (W W^T)) . d_r."""
    if f is None:  # `dtype`: that of the other representations' sums, stacked with these
        return torch.zeros(n_tasks, dtype=dtype, device=device)
    if f.uniform and not per_sample:  # every task in one batched op (one kernel on a Triton backend)
        norms = factor_square_sums(f.left, f.right, len(f.widths))
    elif f.uniform:
        n, width = len(f.widths), f.widths[0]
        ds = f.left.view(f.left.shape[0], n, width).transpose(0, 1)  # [T', B, h]
        ws = f.right.view(n, width, -1)  # [T', h, D]
        gram_w = torch.bmm(ws, ws.transpose(1, 2))
        norms = (torch.bmm(ds, gram_w) * ds).sum(2).view(n, samples, -1).sum(2).clamp_min(0).sqrt().sum(1)
    else:
        norms = []
        for d, w in zip(f.left.split(f.widths, 1), f.right.split(f.widths, 0)):
            gram_w = w @ w.T
            if per_sample:
                norms.append(((d @ gram_w) * d).sum(1).view(samples, -1).sum(1).clamp_min(0).sqrt().sum())
            else:
                norms.append(torch.dot((d.T @ d).reshape(-1), gram_w.reshape(-1)).clamp_min(0))
        norms = torch.stack(norms)
    if len(f.present) == n_tasks:
        return norms
    zero, found = norms.new_zeros(()), dict(zip(f.present, norms.unbind()))
    return torch.stack([found.get(t, zero) for t in range(n_tasks)])


def combine(f: Factors | None, coeff: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sum_t coeff[t] * d_t @ W_t as one matmul (coeff: [T] on the device), in `compute_dtype`, shaped like `like`;
    the coefficients scale the weights' rows (h x D per task), the smaller side."""
    if f is None:
        return torch.zeros_like(like, dtype=compute_dtype(like.dtype))
    c = (coeff if len(f.present) == coeff.numel() else torch.stack([coeff[t] for t in f.present])).to(f.right.dtype)
    if f.uniform:
        right = (f.right.view(len(f.widths), f.widths[0], -1) * c.view(-1, 1, 1)).view(f.right.shape)
    else:
        right = f.right * torch.cat([c[i].expand(w) for i, w in enumerate(f.widths)]).unsqueeze(1)
    out = f.left @ right
    return out if like.dim() == 2 else out.view(like.shape)  # (a view is an op too)
