"""OverArch (multi-task scorer over user x candidate) and Value Model (task scores -> one value).

OverArch is DLRM's top MLP applied to each of the K retrieved candidates: input
[u, v, u*v] (and optional dense features), hidden ReLU layers, one logit per task. The Value
Model merges the task probabilities into one ranking value: a weighted sum with fixed weights,
per-request weights, or a small learned MLP. Both are plain modules so they train with the
towers and are published into the RetrievalModel unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class OverArch(nn.Module):
    def __init__(self, dim: int, num_tasks: int, hidden: tuple[int, ...] | list[int] = (64,), dense_dim: int = 0):
        super().__init__()
        if dim < 1 or num_tasks < 1 or dense_dim < 0:
            raise ValueError(f"OverArch needs dim >= 1, num_tasks >= 1, dense_dim >= 0; got {dim}, {num_tasks}, {dense_dim}")
        self.dim, self.num_tasks, self.hidden, self.dense_dim = dim, num_tasks, list(hidden), dense_dim
        layers: list[nn.Module] = []
        width = 3 * dim + dense_dim
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_tasks))
        self.mlp = nn.Sequential(*layers)

    def config(self) -> dict:
        return {"dim": self.dim, "num_tasks": self.num_tasks, "hidden": self.hidden, "dense_dim": self.dense_dim}

    def forward(self, user: torch.Tensor, items: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        """user [..., D] (broadcast over candidates) or [..., K, D], items [..., K, D] -> logits
        [..., K, T]: the MLP over [user, item, user * item, dense]."""
        if self.dense_dim and (dense is None or dense.shape[-1] != self.dense_dim):
            raise ValueError(f"OverArch was built with dense_dim={self.dense_dim}; pass dense [..., K, {self.dense_dim}]")
        first, d = self.mlp[0], self.dim
        dtype = first.weight.dtype
        if user.dim() == items.dim() - 1:
            # one user per row of candidates: the first layer without the [..., K, 3D] input. Its
            # user part once per user; its item and user*item parts as one product of the items
            # with W_item + diag(user) W_user*item, a [D, h] matrix per user
            u, w = user.to(dtype), first.weight
            mixed = w[:, d:2 * d].T + u.unsqueeze(-1) * w[:, 2 * d:3 * d].T  # [..., D, h]
            hidden = items.to(dtype) @ mixed
            hidden += nn.functional.linear(u, w[:, :d], first.bias).unsqueeze(-2)  # in place: no second [..., K, h]
            if self.dense_dim:
                hidden += nn.functional.linear(dense.to(dtype), w[:, 3 * d:])
            return self.mlp[1:](hidden).float()
        user = user.expand_as(items)
        parts = [user, items, user * items] + ([dense] if self.dense_dim else [])
        return self.mlp(torch.cat([p.to(dtype) for p in parts], -1)).float()


class ValueModel(nn.Module):
    """value = sum_t w_t * sigmoid(logit_t); `learned=True` replaces the sum by a tiny MLP."""

    def __init__(self, num_tasks: int, weights=None, learned: bool = False, hidden: int = 16):
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        w = torch.ones(num_tasks) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != (num_tasks,) or not torch.isfinite(w).all():
            raise ValueError(f"weights must be {num_tasks} finite numbers, got {tuple(w.shape)}")
        self.num_tasks, self.learned, self.hidden_size = num_tasks, learned, hidden
        self.register_buffer("weights", w)
        self.mlp = nn.Sequential(nn.Linear(num_tasks, hidden), nn.ReLU(), nn.Linear(hidden, 1)) if learned else None

    def config(self) -> dict:
        return {"num_tasks": self.num_tasks, "learned": self.learned, "hidden": self.hidden_size}

    def forward(self, logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """logits [Q, K, T]; weights [Q, T] per request (overrides the fixed ones) -> value [Q, K]."""
        probs = torch.sigmoid(logits.float())
        if self.mlp is not None:
            return self.mlp(probs.to(self.mlp[0].weight.dtype)).squeeze(-1).float()
        w = self.weights if weights is None else weights.float()
        if w.dim() == 1:
            return probs @ w
        return (probs * w.unsqueeze(-2)).sum(-1)
