"""Shared parts of the multibalance benchmarks: the model (embeddings + MLP shared bottom, one MLP
head per task), the paired overhead statistic and the allocator conditions."""

from __future__ import annotations

import ctypes
import ctypes.util
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


# The CPU allocator conditions the overhead benchmarks time under. PyTorch's CPU tensors come
# straight from malloc. glibc's malloc hands large blocks back to the kernel when they are freed
# (it trims the heap top and unmaps big blocks), so a step that frees and reallocates them takes
# fresh pages and their page faults: from about 30 to over 1,000 a step on this model, depending
# on the order in which earlier steps freed their tensors. Alternating providers in one process
# changes that order, so the fault count, and the step time with it, differs between providers
# for reasons that have nothing to do with them. "steady" keeps the freed
# memory in the process (the effect of the caching allocator PyTorch's CPU tuning guide
# recommends, and of what PyTorch's CUDA allocator does on GPUs); the figures are given under both.
MALLOC_CONDITIONS = ("glibc default", "steady")


def set_malloc(condition: str) -> None:
    """Put this process's allocator in `condition` (one of MALLOC_CONDITIONS). "steady" cannot be
    undone: it sets glibc's trim threshold to its maximum and its mmap threshold to 32 MiB (the
    largest it takes on 64-bit systems), which also stops glibc from adjusting both itself."""
    if condition not in MALLOC_CONDITIONS:
        raise ValueError(f"condition must be one of {MALLOC_CONDITIONS}, got {condition!r}")
    if condition == "glibc default":
        return
    path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(path) if path else None
    if libc is None or not hasattr(libc, "mallopt"):
        raise RuntimeError("the 'steady' allocator condition needs glibc's mallopt")
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    if not (libc.mallopt(m_trim_threshold, 2**31 - 1) and libc.mallopt(m_mmap_threshold, 32 << 20)):
        raise RuntimeError("mallopt refused the 'steady' allocator settings")
