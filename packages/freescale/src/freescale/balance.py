"""Load-balanced batches across data-parallel ranks.

Each step: all-gather the per-sample lengths, partition the GLOBAL batch by cost (the same
deterministic result on every rank, computable in a background thread while the previous
step runs), then move samples between ranks with uneven `all_to_all_single` on the jagged
values and on any dense per-sample tensors. The global batch is the same set of samples;
normalise the loss by the global sample count (`plan.global_batch`) and sum gradients over
ranks, and the gradients equal the unbalanced run's.

Where one sample alone costs more than a rank's fair share no placement helps: the plan reports
that floor, and `long_sequences="cap"` or `"split"` cuts such samples down first (see
`freescale.longseq` for what each keeps of the model's maths).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from .cost import CostModel
from .jagged import KeyedJagged
from .longseq import MODES, Windows, floor_of, long_sequence_windows
from .partition import Partition, bubble_of, oversized, partition


@dataclasses.dataclass
class BalancePlan:
    rank: int
    world_size: int
    local_sizes: list[int]  # samples per rank before balancing (after capping/splitting)
    partition: Partition  # global sample ids per rank after balancing (rank-major global ids)
    before_loads: torch.Tensor  # per-rank cost of the unbalanced, uncut batch
    oversized: torch.Tensor  # global ids whose cost alone exceeds a fair share (before cutting)
    lengths: torch.Tensor  # the global lengths the plan was made from
    source_sizes: list[int]  # samples per rank as handed to `exchange` (before capping/splitting)
    cost_model: CostModel
    windows: Windows | None = None  # what capping/splitting made of each sample (None: whole)
    long_sequences: str = "report"

    @property
    def global_batch(self) -> int:
        """Samples in the global batch (before splitting): the normaliser of a per-sample loss."""
        return self.lengths.numel()

    @property
    def global_positions(self) -> int:
        """Positions that carry a loss in the global batch (after capping; unchanged by
        splitting): the normaliser of a per-position loss."""
        return self._all_windows().positions()

    def received(self) -> Windows:
        """Windows of the samples this rank holds after `exchange`, in order: `context` (leading
        positions without loss, see `loss_mask()`) and `trailing` (for `sequence_states`)."""
        return self._all_windows().select(self.partition.assignments[self.rank])

    def _all_windows(self) -> Windows:
        return self.windows if self.windows is not None else Windows.whole(self.lengths)

    def send_order(self) -> tuple[torch.Tensor, list[int]]:
        """Local sample indices in send order (grouped by destination) and counts per destination."""
        start = sum(self.local_sizes[: self.rank])
        stop = start + self.local_sizes[self.rank]
        order, counts = [], []
        for ids in self.partition.assignments:
            mine = ids[(ids >= start) & (ids < stop)] - start
            order.append(mine)
            counts.append(mine.numel())
        return torch.cat(order), counts

    def recv_counts(self) -> list[int]:
        ids = self.partition.assignments[self.rank]
        bounds = torch.tensor([0] + list(torch.cumsum(torch.tensor(self.local_sizes), 0)))
        return [int(((ids >= bounds[s]) & (ids < bounds[s + 1])).sum()) for s in range(self.world_size)]

    def report(self) -> dict:
        """Imbalance before/after, and the floor: `floor_cost` (the costliest sample before
        cutting), `fair_share`, `floor_bound` (the costliest exceeds the fair share) and
        `bubble_floor` (the least bubble any placement of whole samples reaches)."""
        before = self.cost_model(self.lengths)
        after = self.cost_model(self.windows.lengths) if self.windows is not None else before
        return {"bubble_before": bubble_of(self.before_loads), "bubble_after": self.partition.bubble(),
                "max_load_before": float(self.before_loads.max()), "max_load_after": float(self.partition.loads.max()),
                "counts_after": self.partition.counts(), "oversized_samples": self.oversized.tolist(),
                **floor_of(before, self.world_size), "long_sequences": self.long_sequences,
                "max_sample_cost_after": float(after.max()),
                "cost_change_pct": 100.0 * (float(after.sum()) / float(before.sum()) - 1.0) if float(before.sum()) > 0 else 0.0}


class BatchBalancer:
    """Balance each step's global batch over the ranks of `process_group` by sequence cost."""

    def __init__(self, process_group=None, cost_model: CostModel | None = None, method: str = "kk_equal",
                 refine: bool = True, background: bool = True, long_sequences: str = "report",
                 split_context: int | None = None):
        """`long_sequences`: what to do with a sample that alone costs more than a rank's fair
        share: "report" it (the plan's report names it and its floor; warned once), "cap" it
        to its most recent positions, or "split" it into pieces for other ranks with
        `split_context` positions of context each (default: half a piece). Capping and
        splitting cost by the number of positions and need every key of the features to hold
        one entry per position (e.g. items and their targets); see `freescale.longseq`."""
        if long_sequences not in MODES:
            raise ValueError(f"long_sequences must be one of {MODES}, got {long_sequences!r}")
        if split_context is not None and (not isinstance(split_context, int) or split_context < 0):
            raise ValueError(f"split_context must be a non-negative int or None, got {split_context!r}")
        self.group = process_group
        self.cost_model = cost_model or CostModel(a=1.0, b=1.0)
        self.method, self.refine = method, refine
        self.long_sequences, self.split_context = long_sequences, split_context
        self._warned = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="freescale-partition") if background else None
        # plan_async gathers the lengths in the background thread too, on a gloo group of its own:
        # collectives from two threads on one group could reach the ranks in different orders.
        # new_group is collective: every process constructs the balancer, as with any group.
        self._gather_group = None
        if background and dist.is_initialized() and self.world_size > 1:
            members = None if process_group is None else dist.get_process_group_ranks(process_group)
            self._gather_group = dist.new_group(ranks=members, backend="gloo")

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    def _gather_lengths(self, lengths: torch.Tensor, group=None) -> list[torch.Tensor]:
        if self.world_size == 1:
            return [lengths]
        group = group or self.group
        size = torch.tensor([lengths.numel()], dtype=torch.long)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=group)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.long)
        padded[: lengths.numel()] = lengths
        out = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded, group=group)
        return [o[: int(s.item())] for o, s in zip(out, sizes)]

    def lengths_of(self, features: KeyedJagged) -> torch.Tensor:
        """What the plan costs per sample: its number of positions when every key holds one entry
        per position (aligned keys, e.g. items and their targets; required for capping and
        splitting), else its total length over keys."""
        per_key = features.lengths_per_key()
        if self.long_sequences == "report" and not (per_key == per_key[:1]).all():
            return features.sample_lengths()
        return features.aligned_lengths()

    def _make_plan(self, per_rank: list[torch.Tensor]) -> BalancePlan:
        lengths = torch.cat(per_rank)
        source_sizes = [t.numel() for t in per_rank]
        costs = self.cost_model(lengths)
        before = torch.stack([self.cost_model(t).sum() for t in per_rank])
        big = oversized(costs, self.world_size)
        windows = long_sequence_windows(self.long_sequences, lengths, self.cost_model, self.world_size, self.split_context)
        if windows is None:
            local_sizes = source_sizes
            if big.numel() and not self._warned:
                self._warned = True
                warnings.warn(f"{big.numel()} sample(s) alone cost more than a rank's fair share: no placement removes "
                              f"that bubble (plan.report()['bubble_floor']); BatchBalancer(long_sequences='cap' or "
                              f"'split') cuts them", stacklevel=2)
        else:
            source_rank = torch.repeat_interleave(torch.arange(self.world_size), torch.tensor(source_sizes))
            local_sizes = torch.bincount(source_rank[windows.source], minlength=self.world_size).tolist()
            costs = self.cost_model(windows.lengths)
        part = partition(costs, self.world_size, method=self.method, refine=self.refine)
        return BalancePlan(self.rank, self.world_size, local_sizes, part, before, big, lengths, source_sizes,
                           self.cost_model, windows, self.long_sequences)

    def plan(self, lengths: torch.Tensor) -> BalancePlan:
        """All-gather this rank's per-sample lengths and partition the global batch."""
        return self._make_plan(self._gather_lengths(torch.as_tensor(lengths, dtype=torch.long)))

    def plan_async(self, lengths: torch.Tensor) -> Future:
        """Like plan(), off the caller's thread: the all-gather of the lengths (on the balancer's
        own gloo group) and the partitioning run in the background thread, so no rank waits for
        the others here; the wait moves to the future's result, after the step's compute."""
        lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
        if self._pool is None:
            fut: Future = Future()
            fut.set_result(self.plan(lengths))
            return fut
        if self._gather_group is None and self.world_size > 1:  # made before init_process_group: gather here
            return self._pool.submit(self._make_plan, self._gather_lengths(lengths))
        return self._pool.submit(lambda: self._make_plan(self._gather_lengths(lengths, self._gather_group)))

    def exchange(self, plan: BalancePlan, features: KeyedJagged, dense: dict[str, torch.Tensor] | None = None):
        """Move samples to their assigned ranks. Returns (KeyedJagged, dense dict) for this rank."""
        dense = dense or {}
        expected = plan.source_sizes[plan.rank]
        if features.batch_size != expected:
            raise ValueError(f"features has {features.batch_size} samples, the plan expects {expected}")
        for k, v in dense.items():
            if v.shape[0] != features.batch_size:
                raise ValueError(f"dense[{k!r}] has {v.shape[0]} rows, expected {features.batch_size}")
        if plan.windows is not None:  # cap/split this rank's samples first; dense rows follow their source
            first = sum(plan.source_sizes[: plan.rank])
            mine = plan.windows.select((plan.windows.source >= first) & (plan.windows.source < first + expected))
            features = features.windows(mine.source - first, mine.start, mine.stop)
            dense = {k: v[mine.source - first] for k, v in dense.items()}
        order, send_counts = plan.send_order()
        recv_counts = plan.recv_counts()
        ordered = features.permute(order)
        if plan.world_size == 1:
            return ordered, {k: v[order] for k, v in dense.items()}
        n_keys = len(features.keys)
        # per-sample lengths for every key, sample-major so they split by sample counts
        lengths_sm = ordered.lengths_per_key().T.contiguous()
        recv_lengths = lengths_sm.new_empty(sum(recv_counts), n_keys)
        dist.all_to_all_single(recv_lengths, lengths_sm, recv_counts, send_counts, group=self.group)
        # values: sample-major so each destination's slice is contiguous
        per_sample_values = _sample_major_values(ordered)
        send_value_counts = [int(s.sum()) for s in torch.split(lengths_sm.sum(1), send_counts)]
        recv_value_counts = [int(s.sum()) for s in torch.split(recv_lengths.sum(1), recv_counts)]
        recv_values = per_sample_values.new_empty(sum(recv_value_counts))
        dist.all_to_all_single(recv_values, per_sample_values, recv_value_counts, send_value_counts, group=self.group)
        moved = {}
        by_dtype: dict[torch.dtype, list[str]] = {}
        for k, v in dense.items():
            by_dtype.setdefault(v.dtype, []).append(k)
        for names in by_dtype.values():  # one all-to-all per dtype: each sample's rows side by side
            widths = [math.prod(dense[k].shape[1:]) for k in names]
            rows = torch.cat([dense[k][order].reshape(-1, w) for k, w in zip(names, widths)], 1)
            buf = rows.new_empty(sum(recv_counts), rows.shape[1])
            dist.all_to_all_single(buf, rows, recv_counts, send_counts, group=self.group)
            for k, part in zip(names, buf.split(widths, 1)):
                moved[k] = part.contiguous().view((-1,) + tuple(dense[k].shape[1:]))
        return _from_sample_major(features.keys, recv_values, recv_lengths), {k: moved[k] for k in dense}

    def balance(self, features: KeyedJagged, dense: dict[str, torch.Tensor] | None = None):
        """plan + exchange in one call. Returns (features, dense, plan)."""
        plan = self.plan(self.lengths_of(features))
        feats, dense = self.exchange(plan, features, dense)
        return feats, dense, plan


def _sample_major_values(kj: KeyedJagged) -> torch.Tensor:
    """Values reordered sample-major (sample 0's keys, then sample 1's, ...)."""
    b, k = kj.batch_size, len(kj.keys)
    chunks = list(torch.split(kj.values, kj.lengths.tolist()))
    return torch.cat([chunks[key * b + i] for i in range(b) for key in range(k)]) if chunks else kj.values


def _from_sample_major(keys, values: torch.Tensor, lengths_sm: torch.Tensor) -> KeyedJagged:
    b, k = lengths_sm.shape
    chunks = list(torch.split(values, lengths_sm.reshape(-1).tolist()))
    key_major = [chunks[i * k + key] for key in range(k) for i in range(b)]
    vals = torch.cat(key_major) if key_major else values
    return KeyedJagged(keys, vals, lengths_sm.T.reshape(-1).contiguous())
