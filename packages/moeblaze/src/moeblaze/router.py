"""Token-choice router: top-k over softmax (or sigmoid) logits, load-balancing and z-losses."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass
class Routing:
    expert_ids: torch.Tensor  # [T, k] int32
    weights: torch.Tensor  # [T, k] combine weights (differentiable)
    aux_loss: torch.Tensor  # load-balancing loss (Switch/GShard form), scalar
    z_loss: torch.Tensor  # router z-loss (ST-MoE), scalar


def route(logits: torch.Tensor, top_k: int, score: str = "softmax", renormalize: bool = True) -> Routing:
    """Top-k routing of [T, E] logits."""
    if logits.dim() != 2:
        raise ValueError(f"router logits must be [tokens, experts], got shape {tuple(logits.shape)}")
    n_experts = logits.shape[1]
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
    if not torch.isfinite(logits).all():
        raise ValueError("router logits contain NaN or inf")
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
    logits32 = logits.float()
    probs = logits32.softmax(-1) if score == "softmax" else logits32.sigmoid()
    weights, expert_ids = probs.topk(top_k, dim=-1)
    if renormalize and top_k > 1:
        weights = weights / weights.sum(-1, keepdim=True)
    # aux loss: E * sum_e (fraction of routed slots to e) * (mean router prob of e)
    frac = torch.zeros(n_experts, device=logits.device).index_add_(0, expert_ids.reshape(-1),
                                                                   torch.ones(expert_ids.numel(), device=logits.device))
    frac = frac / expert_ids.numel()
    mean_prob = (probs / probs.sum(-1, keepdim=True)).mean(0)
    aux = n_experts * (frac * mean_prob).sum()
    z = torch.logsumexp(logits32, -1).pow(2).mean()
    return Routing(expert_ids.to(torch.int32), weights.to(logits.dtype), aux, z)


class Router(nn.Module):
    def __init__(self, d_model: int, n_experts: int, top_k: int, score: str = "softmax", renormalize: bool = True):
        super().__init__()
        self.proj = nn.Linear(d_model, n_experts, bias=False)
        self.top_k, self.score, self.renormalize = top_k, score, renormalize

    def forward(self, x: torch.Tensor) -> Routing:
        return route(self.proj(x), self.top_k, self.score, self.renormalize)
