"""A discrete-event simulator of data-parallel steps for 2 to thousands of ranks.

Each step: the global batch is partitioned (same cost model and partitioners as training);
each rank computes for load * seconds_per_cost, while its embedding communication
(bytes / link bandwidth) overlaps the compute. SM-based communication slows the compute it
overlaps by `overlap_slowdown` (measured 30-40% on H100s for NCCL kernels); SM-free
(copy-engine) transfers do not. Ranks then meet at the gradient all-reduce: the early ones
wait (the bubble). `long_sequences="cap"|"split"` cuts samples that alone exceed a rank's
fair share first, as `BatchBalancer` does (split pieces recompute their context); as there,
a plan no better than the batch as it stands (each rank holding its contiguous share, uncut)
keeps every sample whole and in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .cost import CostModel, check_lengths
from .longseq import long_sequence_windows
from .partition import check_world_size, partition, partition_or_keep


@dataclasses.dataclass
class SimResult:
    step_times: list[float]
    bubble_ratio: float
    exposed_comm_ratio: float
    busy_ratio: float
    samples_per_s: float
    per_step_bubble: list[float]

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["step_ms"] = 1e3 * sum(self.step_times) / len(self.step_times)
        del d["step_times"], d["per_step_bubble"]
        return d


def simulate(batches: Sequence[torch.Tensor], world_size: int, cost_model: CostModel, method: str = "contiguous",
             seconds_per_cost: float = 1e-9, embedding_bytes_per_token: float = 0.0, link_bandwidth: float = float("inf"),
             overlap_slowdown: float = 0.35, sm_free: bool = False, allreduce_seconds: float = 0.0,
             refine: bool = True, long_sequences: str = "report", split_context: int | None = None) -> SimResult:
    """Simulate one step per global batch of sequence lengths."""
    world_size = check_world_size(world_size)
    if isinstance(batches, torch.Tensor):  # a 2-D tensor: one global batch per row
        batches = list(batches) if batches.dim() == 2 else None
    if batches is None or len(batches) == 0:
        raise ValueError("batches must be a non-empty sequence of 1-D length tensors (or a 2-D tensor, one batch per row)")
    if not link_bandwidth > 0:
        raise ValueError(f"link_bandwidth must be > 0 (bytes per second), got {link_bandwidth!r}")
    if not 0 <= overlap_slowdown < float("inf"):
        raise ValueError(f"overlap_slowdown must be a finite fraction >= 0, got {overlap_slowdown!r}")
    if not 0 <= seconds_per_cost < float("inf"):
        raise ValueError(f"seconds_per_cost must be finite and >= 0, got {seconds_per_cost!r}")
    alpha = 0.0 if sm_free else overlap_slowdown
    steps, waits, comms, busies, per_step = [], 0.0, 0.0, 0.0, []
    total_samples = 0
    for batch, lengths in enumerate(batches):
        lengths = check_lengths(lengths, f"batches[{batch}]")  # negative lengths cost like positive ones
        total_samples += lengths.numel()
        windows = long_sequence_windows(long_sequences, lengths, cost_model, world_size, split_context)
        # the batch as it stands: each rank's naive contiguous share, uncut; a plan no better than
        # it keeps every sample whole and in place, as BatchBalancer does
        costs = cost_model(lengths)
        source = partition(costs, world_size, method="contiguous")
        part = partition_or_keep(costs if windows is None else cost_model(windows.lengths), source.loads,
                                 source.counts(), method=method, refine=refine)
        lengths = lengths if windows is None or part.method == "kept" else windows.lengths
        finish, comp_list, exposed_list = [], [], []
        for r, idx in enumerate(part.assignments):
            compute = float(part.loads[r]) * seconds_per_cost
            comm = float(lengths[idx].sum()) * embedding_bytes_per_token / link_bandwidth if link_bandwidth != float("inf") else 0.0
            overlapped = min(comm, compute)
            compute_eff = compute + alpha * overlapped
            exposed = max(0.0, comm - compute_eff)
            finish.append(compute_eff + exposed)
            comp_list.append(compute_eff)
            exposed_list.append(exposed + allreduce_seconds)
        sync = max(finish)
        step = sync + allreduce_seconds
        wait = [sync - f for f in finish]
        steps.append(step)
        waits += sum(wait)
        comms += sum(exposed_list)
        busies += sum(comp_list)
        per_step.append(sum(wait) / (world_size * step) if step > 0 else 0.0)
    denom = world_size * sum(steps)
    if denom == 0:  # nothing to compute (all-zero lengths, no overhead): zero cost, no bubble
        return SimResult(steps, 0.0, 0.0, 0.0, float("inf") if total_samples else 0.0, per_step)
    return SimResult(steps, waits / denom, comms / denom, busies / denom, total_samples / sum(steps), per_step)
