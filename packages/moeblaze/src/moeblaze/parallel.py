"""Expert parallelism: experts sharded over the ranks of a process group, tokens exchanged by all-to-all.

Rank r owns experts [r*E_local, (r+1)*E_local). Rows of x are de-duplicated per destination:
a token whose k choices include several experts of one rank sends that rank its row once, with
the list of that rank's (local expert, routing weight) choices (at most min(k, E_local) of them:
a token that picks one expert twice sends it once, with the two weights summed).
The owner runs each of those experts on the row through `moe_experts`, sums the weighted outputs
itself and sends one row back per (token, rank), where it is added to the token's output.
Slots dropped by a capacity (id E) never travel and contribute zero.

Counts are exchanged first so every buffer has its exact size. The rows, with their routing
weights in x's dtype, go out and come back through a differentiable all-to-all
(`_exchange_rows`), so gradients for x, the routing weights and the local expert weights flow back
across ranks; a rank that receives nothing keeps its buffers and expert weights in the graph,
so every rank's backward runs the same collectives. gloo on CPUs, NCCL on GPUs.

Capacity is per rank: each rank's router caps every expert at its share of that rank's own
tokens (as GShard and Megatron drop per local batch), so an expert keeps at most
world * capacity slots per step, and a rank's drops never depend on the other ranks' tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gpukernels_common.checks import check_sizes

from .experts import _autocast, check_expert_inputs, moe_experts


class _RowExchange(torch.autograd.Function):
    """All-to-all of rows: send[r] rows to rank r, recv[r] rows from it; the backward sends the
    gradients the reverse way. Built on the public collective: torch.distributed.nn's differentiable
    all_to_all_single is deprecated (a FutureWarning in recent torch)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = rows.new_empty(sum(recv), *rows.shape[1:])
        dist.all_to_all_single(out, rows.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return back, None, None, None


def _exchange_rows(rows: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    return _RowExchange.apply(rows, send, recv, group)


def local_expert_count(n_experts: int, group=None) -> int:
    """Experts each rank of `group` holds: n_experts / group size (which must divide it)."""
    world = dist.get_world_size(group)
    if n_experts % world:
        raise ValueError(f"n_experts={n_experts} must be divisible by the expert-parallel group size {world}")
    return n_experts // world


def _plan_rows(expert_ids: torch.Tensor, n_experts: int, world: int):
    """One row per (token, destination rank) that the token has a kept choice on.

    Returns (row_token [R], row_dest [R], row_local_ids [R, width], row_slot [R, width]) with rows
    ordered by destination then token; width = min(k, E_local). Each row's choices are packed to
    the front in choice order; unused places hold local id E_local and slot T*k (a zero weight).
    A token that picks one expert several times travels with its first such choice only (slot of
    the first occurrence): the caller sends that slot the sum of the repeats' weights
    (`_merged_weights`), so a row never carries more than E_local distinct experts.
    """
    t, k = expert_ids.shape
    local = n_experts // world
    width = min(k, local)
    ids = expert_ids.long()
    kept = (ids < n_experts) & _first_occurrence(ids)
    dest = torch.where(kept, torch.div(ids, local, rounding_mode="floor"), world)  # dropped: a rank past the last
    # a choice's place among the same token's choices on the same rank: the earlier ones with its rank
    place = torch.tril(dest.unsqueeze(2) == dest.unsqueeze(1), diagonal=-1).sum(2)
    key = dest * t + torch.arange(t, device=ids.device).unsqueeze(1)  # (rank, token), ordered by rank then token
    row_keys = key[kept & (place == 0)].sort().values  # one per (token, rank): its first choice there
    row_dest = torch.div(row_keys, max(t, 1), rounding_mode="floor")
    row_token = row_keys - row_dest * t
    rows = torch.searchsorted(row_keys, key[kept])
    row_local_ids = torch.full((row_token.numel(), width), local, dtype=torch.int32, device=ids.device)
    row_slot = torch.full((row_token.numel(), width), t * k, dtype=torch.long, device=ids.device)
    row_local_ids[rows, place[kept]] = (ids - dest * local)[kept].to(torch.int32)
    row_slot[rows, place[kept]] = torch.arange(t * k, device=ids.device).view(t, k)[kept]
    return row_token, row_dest, row_local_ids, row_slot


def _first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """[T, k] bool: the choice is the first of its token's choices of that expert id."""
    return ~torch.tril(ids.unsqueeze(2) == ids.unsqueeze(1), diagonal=-1).any(2)


def _merged_weights(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each choice's weight summed with the token's other choices of the same expert (which
    `_plan_rows` leaves behind): w1 * f(x) + w2 * f(x) = (w1 + w2) * f(x), and autograd gives
    each repeat the same routing-weight gradient as moe_experts does. Without repeats, unchanged."""
    same = ids.unsqueeze(2) == ids.unsqueeze(1)  # [T, k, k]
    return torch.where(same, weights.unsqueeze(1), torch.zeros_like(weights).unsqueeze(1)).sum(2)


def _run_local_experts(rows, local_ids, weights, w_gate, w_up, w_down, local, activation, checkpoint):
    """Each received row through its own list of local experts, weighted outputs summed per row.

    Rows are grouped by how many choices they carry, so `moe_experts` never sees padding slots
    (their pre-activations would still be allocated and saved)."""
    choices = (local_ids < local).sum(1)
    counts = torch.bincount(choices, minlength=local_ids.shape[1] + 1).tolist()
    out = None
    for c, n in enumerate(counts):
        if n == 0:
            continue
        if n == rows.shape[0]:  # one group: no regrouping copy
            return moe_experts(rows, local_ids[:, :c].contiguous(), weights[:, :c], w_gate, w_up, w_down, activation,
                               checkpoint)
        sel = (choices == c).nonzero().squeeze(1)
        y = moe_experts(rows[sel], local_ids[sel, :c].contiguous(), weights[sel, :c], w_gate, w_up, w_down, activation,
                        checkpoint)
        out = (rows.new_zeros(rows.shape) if out is None else out).index_copy(0, sel, y)
    return out


def expert_parallel_experts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor,
                            w_up: torch.Tensor | None, w_down: torch.Tensor, n_experts: int, group=None,
                            activation: str = "swiglu", checkpoint: str = "preact",
                            traffic: dict | None = None) -> torch.Tensor:
    """Routed experts with this rank holding w_gate/w_up/w_down for its E_local = n_experts / world experts.

    x [T, d], expert_ids and weights [T, k] for this rank's own tokens (id n_experts: a slot
    dropped by the capacity, e.g. by this rank's `Router`). Returns [T, d], the same as
    `moe_experts` over all experts would. With `traffic` (a dict), it is filled with this
    rank's sends: "slots" (kept (token, choice) slots: the rows a per-slot exchange would send),
    "rows" (rows actually sent, one per (token, destination rank)) and "remote_slots" /
    "remote_rows" (the same, without those this rank keeps). Each row travels out and back.
    """
    # an integer (as dispatch checks it): 4.0 failed in a bincount of float ranks, "4" with a bare TypeError
    n_experts, = check_sizes(n_experts=n_experts)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local = local_expert_count(n_experts, group)
    x, w_gate, w_up, w_down = _autocast(x, w_gate, w_up, w_down)  # as moe_experts does: rows travel in that dtype
    # every rank fails here, before the first collective, rather than leave its peers waiting
    check_expert_inputs(x, expert_ids, weights, w_gate, w_up, w_down, activation, checkpoint, n_experts, world)
    d = x.shape[1]
    row_token, row_dest, row_local_ids, row_slot = _plan_rows(expert_ids, n_experts, world)
    send_counts = torch.bincount(row_dest, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)  # exact buffer sizes first
    send, recv = send_counts.tolist(), recv_counts.tolist()
    n_recv = sum(recv)
    if traffic is not None:
        kept_ids = expert_ids[expert_ids < n_experts].long()
        slots = torch.bincount(torch.div(kept_ids, local, rounding_mode="floor"), minlength=world).tolist()
        traffic.update(slots=sum(slots), rows=sum(send), remote_slots=sum(slots) - slots[rank],
                       remote_rows=sum(send) - send[rank])
    recv_local_ids = row_local_ids.new_empty(n_recv, row_local_ids.shape[1])
    dist.all_to_all_single(recv_local_ids, row_local_ids, recv, send, group=group)
    # rows and their routing weights travel in one differentiable all-to-all (in x's dtype), so
    # every rank's backward runs the same collectives in the same order; slot T*k of the padded
    # weights is the zero that an unused choice place points at; a token's repeated choices of one
    # expert travel once, with their summed weight
    if expert_ids.shape[1] > 1:
        weights = _merged_weights(expert_ids, weights)
    padded_weights = torch.cat([weights.reshape(-1), weights.new_zeros(1)]).to(x.dtype)
    outgoing = torch.cat([x[row_token], padded_weights[row_slot]], 1)
    incoming = _exchange_rows(outgoing, send, recv, group)
    if n_recv:
        out_rows = _run_local_experts(incoming[:, :d], recv_local_ids, incoming[:, d:], w_gate, w_up, w_down, local,
                                      activation, checkpoint)
    else:  # keep the received buffer and the weights in the graph: every rank's backward runs the same collectives
        unused = w_gate.sum() + w_down.sum() + (w_up.sum() if w_up is not None else 0)
        out_rows = incoming[:, :d] + unused * 0
    back = _exchange_rows(out_rows, recv, send, group)
    return torch.zeros_like(x).index_add(0, row_token, back)
