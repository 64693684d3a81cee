"""The plain PyTorch reference: a per-expert loop with ordinary autograd (what tests compare against)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

ACTIVATIONS = ("swiglu", "silu", "gelu")


def activate(a: torch.Tensor, b: torch.Tensor | None, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        return F.silu(a) * b
    if activation == "silu":
        return F.silu(a)
    if activation == "gelu":
        return F.gelu(a)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_expert_ids(expert_ids: torch.Tensor, n_experts: int) -> None:
    """int32/int64 ids in [0, n_experts], n_experts marking a slot dropped by a capacity. Reads the
    ids' range back to the host (one reduction, one synchronisation)."""
    if expert_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_ids must be an int32 or int64 tensor, got {expert_ids.dtype}")
    if expert_ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(expert_ids))
        if lo < 0 or hi > n_experts:
            raise ValueError(f"expert_ids must be in [0, {n_experts}] ({n_experts}: a slot dropped by the capacity), "
                             f"got values in [{lo}, {hi}]")


def moe_reference(x, expert_ids, weights, w_gate, w_up, w_down, activation: str = "swiglu") -> torch.Tensor:
    """sum_j weights[t, j] * FFN_{expert_ids[t, j]}(x[t]) by looping over experts; expert_ids
    (int32/int64) in [0, E], E marking a slot dropped by a capacity (skipped)."""
    # checked as moe_experts checks them: an id no expert matches (negative, above E, fractional)
    # would be skipped silently, and an unknown activation is only reached when some expert has tokens
    check_activation(activation)
    n_experts = w_gate.shape[0]
    check_expert_ids(expert_ids, n_experts)
    out = torch.zeros_like(x)
    for e in range(n_experts):
        tok, j = (expert_ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        h = activate(xe @ w_gate[e], xe @ w_up[e] if w_up is not None else None, activation)
        out = out.index_add(0, tok, (h @ w_down[e]) * weights[tok, j].unsqueeze(1))
    return out
