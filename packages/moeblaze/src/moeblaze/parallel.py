"""Expert parallelism: experts sharded over the ranks of a process group, tokens exchanged by all-to-all.

Rank r owns experts [r*E_local, (r+1)*E_local). Each (token, choice) slot travels to the rank
owning its expert with its routing weight; the owner runs its local experts (k = 1 per
received slot, through `moe_experts`), and the weighted outputs travel back and are summed
per token. Counts are exchanged first so every buffer has its exact size. The all-to-alls are
torch.distributed.nn's differentiable ones, so gradients for x, the routing weights and the
local expert weights flow back across ranks. gloo on CPUs, NCCL on GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from .experts import moe_experts


def expert_parallel_experts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor,
                            w_up: torch.Tensor | None, w_down: torch.Tensor, n_experts: int, group=None,
                            activation: str = "swiglu", checkpoint: str = "preact") -> torch.Tensor:
    """Routed experts with this rank holding w_gate/w_up/w_down for its E_local = n_experts / world experts."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if n_experts % world:
        raise ValueError(f"n_experts={n_experts} must be divisible by the group size {world}")
    local = n_experts // world
    if w_gate.shape[0] != local:
        raise ValueError(f"this rank must hold {local} experts (n_experts / world), got {w_gate.shape[0]}")
    t, k = expert_ids.shape
    flat = expert_ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n_experts):
        raise ValueError(f"expert_ids must be in [0, {n_experts})")
    dest = flat // local
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)  # exact buffer sizes first
    send, recv = send_counts.tolist(), recv_counts.tolist()
    n_recv = sum(recv)
    tokens = torch.div(order, k, rounding_mode="floor")
    recv_ids = flat.new_empty(n_recv)
    dist.all_to_all_single(recv_ids, flat[order].contiguous(), recv, send, group=group)
    rows = dist_fn.all_to_all_single(x.new_empty(n_recv, x.shape[1]), x[tokens].contiguous(), recv, send, group=group)
    w_in = dist_fn.all_to_all_single(weights.new_empty(n_recv, 1), weights.reshape(-1)[order].unsqueeze(1).contiguous(),
                                     recv, send, group=group)
    if n_recv:
        local_ids = (recv_ids - rank * local).to(torch.int32).unsqueeze(1)
        out_rows = moe_experts(rows, local_ids, w_in, w_gate, w_up, w_down, activation=activation, checkpoint=checkpoint)
    else:  # keep the weights in the graph so every rank's backward runs the same collectives
        out_rows = rows.new_zeros(0, x.shape[1]) + (w_gate.sum() + w_down.sum() + (w_up.sum() if w_up is not None else 0)) * 0
    back = dist_fn.all_to_all_single(x.new_empty(t * k, x.shape[1]), out_rows.contiguous(), send, recv, group=group)
    return torch.zeros_like(x).index_add(0, tokens, back)
