"""Shared parts of the multibalance benchmarks: the model (embeddings + MLP shared bottom, one MLP
head per task) and the paired overhead statistic."""

from __future__ import annotations

import math
import statistics

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


def paired_overhead(base_ms: list[float], ms: list[float]) -> dict:
    """Overhead of `ms` over `base_ms`, timed in alternating blocks (block i of each back to back):
    the median of the per-block ratios, in percent, with a distribution-free 95% confidence
    interval of that median (order statistics n/2 -+ 0.98 sqrt(n)). Pairing adjacent blocks
    cancels the slow drifts of a shared machine; the interval shows what noise is left. The
    baseline against itself (`ms is base_ms`): 0, no interval."""
    if ms is base_ms:
        return {"overhead_pct": 0, "ci95_pct": "-"}
    ratios = sorted(100 * (b / a - 1) for a, b in zip(base_ms, ms))
    n = len(ratios)
    half = 0.98 * math.sqrt(n)
    low, high = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return {"overhead_pct": round(statistics.median(ratios), 1), "ci95_pct": f"{ratios[low]:+.1f}..{ratios[high]:+.1f}"}
