"""Shared model for the multibalance benchmarks: embeddings + MLP shared bottom, one MLP head per task."""

from __future__ import annotations

import torch
from torch import nn


class SharedBottomModel(nn.Module):
    def __init__(self, cardinality: dict, dense_dim: int, tasks: list[str], emb_dim: int = 32, hidden: int = 512, rep: int = 256):
        super().__init__()
        self.embeddings = nn.ModuleDict({k: nn.Embedding(v, emb_dim) for k, v in cardinality.items()})
        self.bottom = nn.Sequential(nn.Linear(emb_dim * len(cardinality) + dense_dim, hidden), nn.ReLU(),
                                    nn.Linear(hidden, rep), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Sequential(nn.Linear(rep, 32), nn.ReLU(), nn.Linear(32, 1)) for t in tasks})

    def shared(self, sparse: dict, dense: torch.Tensor) -> torch.Tensor:
        parts = [self.embeddings[k](sparse[k]) for k in self.embeddings] + [dense]
        return self.bottom(torch.cat(parts, dim=1))

    def shared_parameters(self):
        return list(self.embeddings.parameters()) + list(self.bottom.parameters())
