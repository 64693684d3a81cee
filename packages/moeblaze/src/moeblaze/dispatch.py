"""Dispatch without routing buffers: four int32 index tensors, never a permuted copy of x.

For T tokens with k expert choices each, slot s = t*k + j. The dispatch holds
- `sorted_slots` [T*k]: slots grouped expert by expert (stable: ascending slot within an expert),
  so `sorted_slots // k` is the token each grouped row reads;
- `expert_offsets` [E+1]: exclusive prefix sum of rows per expert;
- `expert_ids` [T, k]: each token's experts (the router's choice, token order);
- `slot_position` [T*k]: where slot s sits in the grouped order (the combine's gather map).

The Triton build is atomic-free and deterministic: program e counts the slots routed to
experts < e (its offset) and then places its own slots with a block-local prefix sum.
"""

from __future__ import annotations

import dataclasses

import torch

from gpukernels_common import register_op
from gpukernels_common.checks import check_sizes


@dataclasses.dataclass
class Dispatch:
    sorted_slots: torch.Tensor
    expert_offsets: torch.Tensor
    expert_ids: torch.Tensor
    slot_position: torch.Tensor
    top_k: int

    @property
    def n_experts(self) -> int:
        return self.expert_offsets.numel() - 1

    @property
    def sorted_tokens(self) -> torch.Tensor:
        return torch.div(self.sorted_slots, self.top_k, rounding_mode="floor")

    def counts(self) -> torch.Tensor:
        return self.expert_offsets[1:] - self.expert_offsets[:-1]


def _dispatch_reference(expert_ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flat = expert_ids.reshape(-1).long()
    sorted_slots = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    offsets = torch.zeros(n_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    position = torch.empty_like(sorted_slots)
    position[sorted_slots] = torch.arange(flat.numel(), device=flat.device)
    return sorted_slots.to(torch.int32), offsets.to(torch.int32), position.to(torch.int32)


def _dispatch_triton(expert_ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .kernels import dispatch_kernel

    flat = expert_ids.reshape(-1).contiguous()
    n = flat.numel()
    sorted_slots = torch.empty(n, dtype=torch.int32, device=flat.device)
    position = torch.empty(n, dtype=torch.int32, device=flat.device)
    offsets = torch.empty(n_experts + 1, dtype=torch.int32, device=flat.device)
    dispatch_kernel[(n_experts,)](flat, n, sorted_slots, position, offsets, n_experts, BLOCK=1024)
    return sorted_slots, offsets, position


def _dispatch_fake(expert_ids: torch.Tensor, n_experts: int):
    n = expert_ids.numel()
    new = expert_ids.new_empty
    return new(n, dtype=torch.int32), new(n_experts + 1, dtype=torch.int32), new(n, dtype=torch.int32)


build_dispatch = register_op("moeblaze::build_dispatch", reference=_dispatch_reference, triton=_dispatch_triton,
                             fake=_dispatch_fake)


def dispatch(expert_ids: torch.Tensor, n_experts: int) -> Dispatch:
    """Build the dispatch indices for [T, k] expert choices in [0, n_experts). The range check
    costs one host synchronisation (moe_experts checks the range once and skips this one)."""
    check_sizes(n_experts=n_experts)  # eager only, as the range check: traced callers pass symbolic counts
    _check_dispatch_inputs(expert_ids, n_experts)
    if expert_ids.numel():
        lo, hi = torch.aminmax(expert_ids)
        lo, hi = int(lo), int(hi)
        # out-of-range ids would be counted by no expert: uninitialised rows from the kernel
        if lo < 0 or hi >= n_experts:
            raise ValueError(f"expert_ids must be in [0, n_experts={n_experts}), got values in [{lo}, {hi}]")
    return _dispatch_unchecked(expert_ids, n_experts)


def _check_dispatch_inputs(expert_ids: torch.Tensor, n_experts: int) -> None:
    if expert_ids.dim() != 2:
        raise ValueError(f"expert_ids must be [tokens, top_k], got shape {tuple(expert_ids.shape)}")
    if expert_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_ids must be int32 or int64, got {expert_ids.dtype}")
    if expert_ids.shape[0] == 0:
        raise ValueError("expert_ids is empty: no tokens to route")
    if expert_ids.numel() >= 2**31:
        raise ValueError("tokens * top_k must fit in int32")
    if n_experts < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")


def _dispatch_unchecked(expert_ids: torch.Tensor, n_experts: int) -> Dispatch:
    """`dispatch` without its range check (no host synchronisation): the caller has checked
    that every id is in [0, n_experts)."""
    _check_dispatch_inputs(expert_ids, n_experts)
    sorted_slots, offsets, position = build_dispatch(expert_ids.to(torch.int32), n_experts)
    return Dispatch(sorted_slots, offsets, expert_ids.to(torch.int32), position, expert_ids.shape[1])
