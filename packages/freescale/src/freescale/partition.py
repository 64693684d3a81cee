"""Partition a global batch's per-sample costs over data-parallel ranks.

Methods:
- `contiguous`: the naive split (sample i goes to rank i // (B/W)); the baseline.
- `lpt`: longest-processing-time greedy, counts free.  `lpt_equal`: LPT with equal counts.
- `kk`: Karmarkar-Karp multi-way largest differencing, counts free.
- `kk_equal`: equal-count KK (sorted items grouped W at a time, then differenced), as in
  verl's and NVIDIA recsys-examples' sequence balancing.
Every method can be followed by pairwise-swap refinement (`refine=True`, count-preserving).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import numbers

import torch

METHODS = ("contiguous", "lpt", "lpt_equal", "kk", "kk_equal")


@dataclasses.dataclass
class Partition:
    assignments: list[torch.Tensor]  # sample indices per rank, ascending
    loads: torch.Tensor  # total cost per rank
    method: str

    @property
    def world_size(self) -> int:
        return len(self.assignments)

    def bubble(self) -> float:
        """Idle fraction if every rank waits for the slowest: sum(max - load) / (W * max)."""
        return bubble_of(self.loads)

    def imbalance(self) -> float:
        """(max - min) / max of per-rank cost."""
        mx = float(self.loads.max())
        return (mx - float(self.loads.min())) / mx if mx > 0 else 0.0

    def counts(self) -> list[int]:
        return [a.numel() for a in self.assignments]


def bubble_of(loads: torch.Tensor) -> float:
    loads = loads.double()
    mx = float(loads.max())
    return float((mx - loads).sum() / (loads.numel() * mx)) if mx > 0 else 0.0


def _contiguous(costs, world):
    n = costs.numel()
    bounds = [round(r * n / world) for r in range(world + 1)]
    return [list(range(bounds[r], bounds[r + 1])) for r in range(world)]


def _lpt(costs, world, equal):
    n = len(costs)
    cap = [n // world + (1 if r < n % world else 0) for r in range(world)] if equal else [n] * world
    order = sorted(range(n), key=lambda i: (-costs[i], i))
    bins = [[] for _ in range(world)]
    heap = [(0.0, r) for r in range(world)]
    full = []
    for i in order:
        while True:
            load, r = heapq.heappop(heap)
            if len(bins[r]) < cap[r]:
                break
            full.append((load, r))
        bins[r].append(i)
        heapq.heappush(heap, (load + costs[i], r))
    return bins


def _kk(costs, world, equal):
    n = len(costs)
    counter = itertools.count()
    heap = []
    if equal:
        pad = (-n) % world
        items = sorted(range(n), key=lambda i: (-costs[i], i)) + [-1] * pad  # -1: zero-cost padding
        for g in range(0, len(items), world):
            group = items[g : g + world]
            subsets = [([i] if i >= 0 else [], costs[i] if i >= 0 else 0.0) for i in group]
            subsets.sort(key=lambda s: s[1])
            heapq.heappush(heap, (-(subsets[-1][1] - subsets[0][1]), next(counter), subsets))
    else:
        for i in range(n):
            subsets = [([], 0.0)] * (world - 1) + [([i], costs[i])]
            heapq.heappush(heap, (-costs[i], next(counter), subsets))
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        # largest of one with smallest of the other
        merged = [(a[k][0] + b[world - 1 - k][0], a[k][1] + b[world - 1 - k][1]) for k in range(world)]
        merged.sort(key=lambda s: s[1])
        heapq.heappush(heap, (-(merged[-1][1] - merged[0][1]), next(counter), merged))
    return [s[0] for s in heap[0][2]] if heap else [[] for _ in range(world)]


def _refine(bins, costs, max_rounds=200):
    """Pairwise swaps between the most and least loaded ranks while the max load drops."""
    loads = [sum(costs[i] for i in b) for b in bins]
    for _ in range(max_rounds):
        hi = max(range(len(bins)), key=lambda r: loads[r])
        lo = min(range(len(bins)), key=lambda r: loads[r])
        gap = loads[hi] - loads[lo]
        if gap <= 0:
            break
        best, best_delta = None, 0.0
        for i in bins[hi]:
            for j in bins[lo]:
                d = costs[i] - costs[j]
                if 0 < d < gap:
                    gain = min(d, gap - d)  # how much the pair's max drops
                    if gain > best_delta:
                        best, best_delta = (i, j, d), gain
        if best is None:
            break
        i, j, d = best
        bins[hi].remove(i)
        bins[lo].remove(j)
        bins[hi].append(j)
        bins[lo].append(i)
        loads[hi] -= d
        loads[lo] += d
    return bins


def partition(costs, world_size: int, method: str = "kk_equal", refine: bool = True) -> Partition:
    """Assign samples to `world_size` ranks minimising the most loaded rank's cost. Fewer
    samples than ranks (e.g. a final partial batch) leave some ranks with none."""
    costs = torch.as_tensor(costs, dtype=torch.float64)
    if costs.dim() != 1:
        raise ValueError(f"costs must be 1-D (one cost per sample), got shape {tuple(costs.shape)}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    world_size = check_world_size(world_size)
    if not torch.isfinite(costs).all() or (costs < 0).any():
        raise ValueError("costs must be finite and non-negative")
    values = costs.tolist()  # Python floats: the greedy and differencing loops index them one by one
    if method == "contiguous":
        bins = _contiguous(costs, world_size)
    elif method.startswith("lpt"):
        bins = _lpt(values, world_size, equal=method == "lpt_equal")
    else:
        bins = _kk(values, world_size, equal=method == "kk_equal")
    if refine and method != "contiguous":
        bins = _refine(bins, values)
    assignments = [torch.tensor(sorted(b), dtype=torch.long) for b in bins]
    loads = torch.stack([costs[a].sum() if a.numel() else costs.new_zeros(()) for a in assignments])
    return Partition(assignments, loads, method)


def partition_or_keep(costs, before: torch.Tensor, source_sizes: list[int], method: str = "kk_equal",
                      refine: bool = True, min_gain: float = 0.0) -> Partition:
    """`partition(costs)` over `len(source_sizes)` ranks, unless its most loaded rank costs more than
    `(1 - min_gain)` times the batch as it stands (`before`: each rank's cost of its own
    `source_sizes` samples, uncut): then the "kept" partition, every rank keeping its samples in
    order (the indices are then those of the uncut batch). `costs` may be those of capped or
    split samples, whose pieces can cost more than the whole (split's recomputed context).
    `BatchBalancer` and `simulate` decide by this one rule."""
    world = len(source_sizes)
    part = partition(costs, world, method=method, refine=refine)
    if float(part.loads.max()) <= (1.0 - min_gain) * float(before.max()):
        return part
    bounds = [0] + torch.cumsum(torch.tensor(source_sizes, dtype=torch.long), 0).tolist()
    return Partition([torch.arange(bounds[r], bounds[r + 1]) for r in range(world)], before.to(torch.float64), "kept")


def check_world_size(world_size) -> int:
    """`world_size` as an int >= 1; a ValueError otherwise (0 ranks made every sample oversized-free)."""
    if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    return int(world_size)


def oversized(costs, world_size: int) -> torch.Tensor:
    """Indices of samples whose cost alone exceeds a rank's fair share (sum / W): no placement
    can balance those; split or cap them (`BatchBalancer(long_sequences=...)`, `freescale.longseq`)."""
    world_size = check_world_size(world_size)
    costs = torch.as_tensor(costs, dtype=torch.float64)
    return (costs > costs.sum() / world_size).nonzero().reshape(-1)
