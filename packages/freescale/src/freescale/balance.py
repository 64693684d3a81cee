"""Load-balanced batches across data-parallel ranks.

Each step: all-gather the per-sample lengths, partition the GLOBAL batch by cost (the same
deterministic result on every rank, computable in a background thread while the previous
step runs), then move samples between ranks with uneven `all_to_all_single` on the jagged
values and on any dense per-sample tensors. A plan made from the features themselves
(`plan(features)`) gathers every sample's per-key lengths too, so the exchange knows what it
receives and moves values and dense tensors in one all-to-all; the gather is one all-gather
once the per-rank sample count stops growing. The global batch is the same set of samples;
normalise the loss by the global sample count (`plan.global_batch`) and sum gradients over
ranks, and the gradients equal the unbalanced run's.

Where one sample alone costs more than a rank's fair share no placement helps: the plan reports
that floor, and `long_sequences="cap"` or `"split"` cuts such samples down first (see
`freescale.longseq` for what each keeps of the model's maths).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from gpukernels_common.distributed import destroy_process_group

from .comm import collective_device
from .cost import CostModel, check_lengths
from .jagged import KeyedJagged
from .longseq import DROP_WARNING, MODES, Windows, floor_of, long_sequence_windows
from .partition import METHODS, Partition, bubble_of, oversized, partition_or_keep


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
    # per-sample lengths under every key (global samples x keys, before capping/splitting), when
    # the plan was made from the features: the exchange then needs no lengths all-to-all
    key_lengths: torch.Tensor | None = None
    # the dtypes and trailing shapes every rank's values and dense tensors take (agreed from the
    # gather: ranks without samples adopt them); None when the plan was made from cost lengths
    schema: Schema | None = None

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

    def received_key_lengths(self) -> torch.Tensor | None:
        """Per-key lengths (samples x keys) of the samples this rank holds after `exchange`, in
        order; None when the plan was made from cost lengths alone."""
        if self.key_lengths is None:
            return None
        return self._key_lengths_of(self.partition.assignments[self.rank])

    def sent_key_lengths(self) -> torch.Tensor | None:
        """Per-key lengths (samples x keys) of the samples this rank sends in `exchange`, in send
        order; None when the plan was made from cost lengths alone."""
        if self.key_lengths is None:
            return None
        order, _ = self.send_order()
        return self._key_lengths_of(order + sum(self.local_sizes[: self.rank]))

    def _key_lengths_of(self, ids: torch.Tensor) -> torch.Tensor:
        if self.windows is None:
            return self.key_lengths[ids]
        return self.windows.lengths[ids].unsqueeze(1).expand(-1, self.key_lengths.shape[1]).contiguous()

    def recv_counts(self) -> list[int]:
        ids = self.partition.assignments[self.rank]
        bounds = torch.tensor([0] + list(torch.cumsum(torch.tensor(self.local_sizes), 0)))
        return [int(((ids >= bounds[s]) & (ids < bounds[s + 1])).sum()) for s in range(self.world_size)]

    def positions_dropped(self) -> tuple[int, float]:
        """Positions the plan's cap drops (0 unless long_sequences="cap" cut something), and
        their share of the batch's positions."""
        if self.windows is None or self.long_sequences != "cap":
            return 0, 0.0
        total = int(self.lengths.sum())
        dropped = total - self.windows.positions()
        return dropped, dropped / total if total else 0.0

    def report(self) -> dict:
        """Imbalance before/after, and the floor: `floor_cost` (the costliest sample before
        cutting), `fair_share`, `floor_bound` (the costliest exceeds the fair share) and
        `bubble_floor` (the least bubble any placement of whole samples reaches);
        `positions_dropped` / `positions_dropped_frac`: what a cap cut off (0 otherwise)."""
        dropped, dropped_frac = self.positions_dropped()
        before = self.cost_model(self.lengths)
        after = self.cost_model(self.windows.lengths) if self.windows is not None else before
        return {"bubble_before": bubble_of(self.before_loads), "bubble_after": self.partition.bubble(),
                "max_load_before": float(self.before_loads.max()), "max_load_after": float(self.partition.loads.max()),
                "counts_after": self.partition.counts(), "oversized_samples": self.oversized.tolist(),
                **floor_of(before, self.world_size), "long_sequences": self.long_sequences,
                "max_sample_cost_after": float(after.max()) if after.numel() else 0.0,
                "cost_change_pct": 100.0 * (float(after.sum()) / float(before.sum()) - 1.0) if float(before.sum()) > 0 else 0.0,
                "positions_dropped": dropped, "positions_dropped_frac": dropped_frac}


class BatchBalancer:
    """Balance each step's global batch over the ranks of `process_group` by sequence cost."""

    def __init__(self, process_group=None, cost_model: CostModel | None = None, method: str = "kk_equal",
                 refine: bool = True, background: bool = True, long_sequences: str = "report",
                 split_context: int | None = None, min_gain: float = 0.0,
                 timeout: datetime.timedelta | float | None = None):
        """`timeout`: of the background thread's own gloo group (a timedelta or seconds); by
        default that of `process_group` (the default group: what `init_process_group` was
        given), so a hung rank fails the background gather as it would a foreground one.
        `min_gain`: keep every sample where it is (no sample all-to-all at all) when balancing
        would cut the slowest rank's cost by less than this fraction, e.g. 0.05 on ranks whose
        loads are already about equal; 0 (default) moves whenever the partition is no worse than
        the batch as it stands.
        `long_sequences`: what to do with a sample that alone costs more than a rank's fair
        share: "report" it (the plan's report names it and its floor; warned once), "cap" it
        to its most recent positions, or "split" it into pieces for other ranks with
        `split_context` positions of context each (default: half a piece). Capping and
        splitting cost by the number of positions and need every key of the features to hold
        one entry per position (e.g. items and their targets); see `freescale.longseq`."""
        if method not in METHODS:  # here, not at the first plan
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if long_sequences not in MODES:
            raise ValueError(f"long_sequences must be one of {MODES}, got {long_sequences!r}")
        if split_context is not None and (not isinstance(split_context, int) or split_context < 0):
            raise ValueError(f"split_context must be a non-negative int or None, got {split_context!r}")
        if not isinstance(min_gain, (int, float)) or not 0.0 <= min_gain < 1.0:
            raise ValueError(f"min_gain must be a fraction in [0, 1), got {min_gain!r}")
        self.group, self.min_gain = process_group, float(min_gain)
        self.cost_model = cost_model or CostModel(a=1.0, b=1.0)
        self.method, self.refine = method, refine
        self.long_sequences, self.split_context = long_sequences, split_context
        self._warned = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="freescale-partition") if background else None
        # plan_async gathers the lengths in the background thread too, on a gloo group of its own:
        # collectives from two threads on one group could reach the ranks in different orders.
        # new_group is collective: every process constructs the balancer, as with any group.
        self._gather_group = None
        self._gather_bounds: dict[int, tuple[int, int]] = {}  # per group: the largest rows and schema seen (elements)
        if background and dist.is_initialized() and self.world_size > 1:
            self._gather_group = background_group(process_group, timeout)
        self._closed = False

    def close(self) -> None:
        """Wait for the plans and exchanges still running in the background thread (every rank
        thus finishes the collectives it issued; their futures keep their results and errors),
        then stop the thread and destroy the background gloo group. Idempotent; `plan_async` /
        `balance_async` raise afterwards, while `plan`, `exchange` and `balance`, which run on the
        caller's group, still work. Also `with BatchBalancer(...) as balancer:`. Call it before
        `destroy_process_group()`: a live background group was freed later, with the GIL held
        (see `gpukernels_common.distributed.destroy_process_group`)."""
        if self._closed:
            return
        self._closed = True
        group, self._gather_group = self._gather_group, None
        self._gather_bounds.pop(id(group), None)
        release_background(self._pool, [group])

    def __enter__(self) -> BatchBalancer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self, method: str) -> None:
        if self._closed:
            raise RuntimeError(f"BatchBalancer.{method}: the balancer is closed (close() was called); plan(), "
                               "exchange() and balance() still run in the foreground")

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    def _gather_rows(self, rows: torch.Tensor, group=None, schema: list[int] | None = None,
                     refused: _Refused | None = None, method: str = "BatchBalancer.plan"):
        """All-gather every rank's (samples x columns) integer rows and its schema (a short list
        of ints, see `Schema`): (rows per rank, schema per rank). One all-gather of a header
        (samples, columns, schema length, this rank's refusal code, the balancer's fingerprint),
        the schema and the rows, padded to the largest rows and schema seen so far; a second
        one, padded to the new largest, only when some rank has more (every rank sees that in
        the first). Where a rank `refused` its input (its rows then empty), where the ranks'
        columns (kinds of input) or balancers differ: the same error on every rank, `method`
        first, after the first all-gather (rather than one rank raising before it, the others
        waiting in it until the group's timeout)."""
        schema = schema or []
        if self.world_size == 1:
            if refused is not None:
                raise refused.error(f"{method}: {refused.alone}") from None
            return [rows], [schema]
        group = group or self.group
        key = id(group)  # plan() and plan_async() gather on different groups, maybe at once
        device = collective_device(group)  # the host, or the GPU for an NCCL group (the callers' rows are on the host)
        head = torch.tensor([rows.shape[0], rows.shape[1], len(schema), refused.code if refused is not None else 0,
                             self._fingerprint()], dtype=torch.long)
        while True:
            # bounds in elements: every rank's message has the same size whatever its columns
            bound, schema_bound = self._gather_bounds.get(key, (0, 0))
            message = torch.zeros(_HEAD + schema_bound + bound, dtype=torch.long, device=device)
            message[:_HEAD] = head
            if rows.numel() <= bound and len(schema) <= schema_bound:
                message[_HEAD : _HEAD + len(schema)] = torch.tensor(schema, dtype=message.dtype)
                message[_HEAD + schema_bound : _HEAD + schema_bound + rows.numel()] = rows.reshape(-1)
            out = [torch.empty_like(message) for _ in range(self.world_size)]
            dist.all_gather(out, message, group=group)
            out = list(torch.stack(out).cpu()) if device.type != "cpu" else out  # one copy back for the plan
            heads = [o[:_HEAD].tolist() for o in out]
            self._check_heads(heads, refused, method)
            sizes, schema_sizes = [h[0] * h[1] for h in heads], [h[2] for h in heads]
            if max(sizes) <= bound and max(schema_sizes) <= schema_bound:
                start = _HEAD + schema_bound
                return ([o[start : start + h[0] * h[1]].view(h[0], h[1]) for o, h in zip(out, heads)],
                        [o[_HEAD : _HEAD + h[2]].tolist() for o, h in zip(out, heads)])
            self._gather_bounds[key] = (max(bound, *sizes), max(schema_bound, *schema_sizes))

    def _check_heads(self, heads: list[list[int]], refused: _Refused | None, method: str) -> None:
        """Raise, the same error on every rank, where the gathered headers show a rank that refused
        its input (that rank adds its own reason), ranks with different kinds of input (cost
        lengths, or features with another number of keys) or balancers configured differently."""
        bad = [(r, h[3]) for r, h in enumerate(heads) if h[3]]
        if bad:
            text = "; ".join(f"rank {r}: {_REFUSALS[code][1]}" + (f" ({refused})" if r == self.rank else "")
                             for r, code in bad)
            # a TrainPipeline batch that is not a batch: the others' balance_async is the pipeline's
            method = "TrainPipeline.run" if bad[0][1] == _BATCH_REFUSED else method
            raise _REFUSALS[bad[0][1]][0](f"{method}: {text}")
        if len({h[4] for h in heads}) > 1:
            # the plan must be the same on every rank: other partitions move samples no rank expects
            differ = [r for r, h in enumerate(heads) if h[4] != heads[0][4]]
            raise ValueError(f"{method}: the ranks' balancers are configured differently: rank(s) {differ} differ from "
                             f"rank 0 in the cost model, method, refine, long_sequences, split_context or min_gain (this "
                             f"rank: {self._config()}); every rank must plan alike")
        if len({h[1] for h in heads}) > 1:
            kinds = "; ".join(f"rank {r}: " + ("cost lengths" if h[1] == 1 else f"features with {h[1] - 1} key(s)")
                              for r, h in enumerate(heads))
            raise ValueError(f"{method}: the ranks passed different kinds of input ({kinds}); every rank must pass "
                             "features with the same keys, or every rank cost lengths")

    def _config(self) -> str:
        """What every rank's balancer must agree on to make the same plan."""
        model = self.cost_model
        model = f"CostModel(a={model.a!r}, b={model.b!r})" if isinstance(model, CostModel) else type(model).__name__
        return (f"{model}, method={self.method!r}, refine={self.refine!r}, long_sequences={self.long_sequences!r}, "
                f"split_context={self.split_context!r}, min_gain={self.min_gain!r}")

    def _fingerprint(self) -> int:
        return zlib.crc32(self._config().encode())

    def lengths_of(self, features: KeyedJagged) -> torch.Tensor:
        """What the plan costs per sample: its number of positions when every key holds one entry
        per position (aligned keys, e.g. items and their targets; required for capping and
        splitting), else its total length over keys. This rank's view; a plan made from the
        features decides aligned or not from every rank's gathered per-key lengths, so all
        ranks cost samples alike."""
        per_key = features.lengths_per_key()
        if self.long_sequences == "report" and not (per_key == per_key[:1]).all():
            return features.sample_lengths()
        return features.aligned_lengths()

    def _plan_rows(self, lengths_or_features: torch.Tensor | KeyedJagged) -> torch.Tensor:
        """What the gather carries per sample: the cost length, then (features given) its length
        under every key (the plan then decides the cost length from those, on every rank alike).
        A `_Refused` where the cost lengths are not what a plan takes."""
        if isinstance(lengths_or_features, KeyedJagged):
            per_key = lengths_or_features.lengths_per_key().cpu()
            return torch.cat([per_key.sum(0).unsqueeze(1), per_key.T], 1)
        try:
            lengths = torch.as_tensor(lengths_or_features)
        except (TypeError, ValueError, RuntimeError):
            got = f"got {type(lengths_or_features).__name__}"
            raise _Refused(5, got, f"{_REFUSALS[5][1]}, {got}") from None
        try:
            return check_lengths(lengths.cpu()).unsqueeze(1)
        except ValueError as err:
            raise _Refused(1, str(err)) from None

    def _plan_input(self, lengths_or_features, dense, need_features: bool):
        """(rows, schema, refusal) of this rank's plan input: a refused input gathers empty rows
        and its refusal code, so that every rank raises after the gather (see `_gather_rows`)."""
        refused = _batch_refusal(lengths_or_features, dense, need_features)
        if refused is None:
            try:
                return self._plan_rows(lengths_or_features), _schema_of(lengths_or_features, dense), None
            except _Refused as err:
                refused = err
        return torch.zeros(0, 1, dtype=torch.long), None, refused

    def _cost_lengths(self, key_lengths: torch.Tensor) -> torch.Tensor:
        """Cost length per global sample from every rank's per-key lengths (samples x keys): the
        number of positions when every sample's keys are aligned, else the total length; the
        same on every rank."""
        aligned = bool((key_lengths == key_lengths[:, :1]).all())
        if aligned:
            return key_lengths[:, 0].clone()
        if self.long_sequences != "report":
            raise ValueError(f"long_sequences={self.long_sequences!r} needs keys of the same length in every sample "
                             "(per-position sequences), on every rank")
        return key_lengths.sum(1)

    def _make_plan(self, gathered) -> BalancePlan:
        per_rank_rows, schemas = gathered
        source_sizes = [r.shape[0] for r in per_rank_rows]
        key_lengths = torch.cat(per_rank_rows)[:, 1:] if per_rank_rows[0].shape[1] > 1 else None
        schema = Schema.agree(schemas, source_sizes) if any(schemas) else None
        if key_lengths is not None:
            lengths = self._cost_lengths(key_lengths)
            per_rank = list(lengths.split(source_sizes))
        else:
            per_rank = [r[:, 0] for r in per_rank_rows]
            lengths = torch.cat(per_rank)
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
        part = partition_or_keep(costs, before, source_sizes, self.method, self.refine, self.min_gain)
        if part.method == "kept":
            # not worth moving: every rank keeps its samples whole (the same decision on every rank);
            # cut samples too, whose pieces may cost more than the whole (split's recomputed context)
            windows, local_sizes = None, source_sizes
        plan = BalancePlan(self.rank, self.world_size, local_sizes, part, before, big, lengths, source_sizes,
                           self.cost_model, windows, self.long_sequences, key_lengths, schema)
        dropped = plan.positions_dropped()
        if dropped[1] > DROP_WARNING:  # once per plan: every step's batch is capped anew
            warnings.warn(f"long_sequences='cap' dropped {dropped[0]} of {int(lengths.sum())} positions "
                          f"({100 * dropped[1]:.1f}%) of this batch to balance it (plan.report()['positions_dropped']); "
                          "long_sequences='split' keeps every position", stacklevel=2)
        return plan

    def plan(self, lengths_or_features: torch.Tensor | KeyedJagged, dense: dict[str, torch.Tensor] | None = None) -> BalancePlan:
        """All-gather this rank's per-sample lengths and partition the global batch. Given the
        features (rather than their cost lengths, `lengths_of(features)`), the plan also knows
        every sample's per-key lengths and the exchange saves its lengths all-to-all, and the
        ranks agree on the values' dtype (and, `dense` given, the dense tensors' dtypes and
        trailing shapes) in the same gather: a rank without samples adopts them, ranks with
        samples that disagree get a ValueError, every one of them. Input one rank refuses (cost
        lengths that are not 1-D non-negative integers, dense not a dict of tensors), ranks with
        different kinds of input (lengths, features with another number of keys) or balancers
        configured otherwise: the same error on every rank, naming the rank, from the gather."""
        rows, schema, refused = self._plan_input(lengths_or_features, dense, need_features=False)
        return self._make_plan(self._gather_rows(rows, None, schema, refused, "BatchBalancer.plan"))

    def plan_async(self, lengths_or_features: torch.Tensor | KeyedJagged,
                   dense: dict[str, torch.Tensor] | None = None) -> Future:
        """Like plan(), off the caller's thread: the all-gather of the lengths (on the balancer's
        own gloo group) and the partitioning run in the background thread, so no rank waits for
        the others here; the wait moves to the future's result, after the step's compute."""
        self._check_open("plan_async")
        rows, schema, refused = self._plan_input(lengths_or_features, dense, need_features=False)
        method = "BatchBalancer.plan_async"
        if self._pool is None:
            return _done(self._make_plan(self._gather_rows(rows, None, schema, refused, method)))
        if self._gather_group is None and self.world_size > 1:  # made before init_process_group: gather here
            return self._pool.submit(self._make_plan, self._gather_rows(rows, None, schema, refused, method))
        return self._pool.submit(lambda: self._make_plan(self._gather_rows(rows, self._gather_group, schema, refused, method)))

    def _refuse_async(self, refused: _Refused, method: str) -> Future:
        """Join the plan's gather that the other ranks' `balance_async` / `plan_async` make (on the
        group those would use) with `refused`'s code, so that every rank's future raises (e.g. a
        TrainPipeline batch that is not a batch: its rank has no features to plan from)."""
        self._check_open("balance_async")
        rows = torch.zeros(0, 1, dtype=torch.long)
        if self._pool is None or self._gather_group is None:
            return _done(self._gather_rows(rows, None, None, refused, method))
        return self._pool.submit(self._gather_rows, rows, self._gather_group, None, refused, method)

    def balance_async(self, features: KeyedJagged, dense: dict[str, torch.Tensor] | None = None) -> Future:
        """plan + exchange off the caller's thread: a future of (features, dense, plan). The
        lengths all-gather, the partition and the sample all-to-all all run in the background
        thread on the balancer's own gloo group, so they overlap the caller's step (CPU tensors;
        anything else, or no background thread, balances here and returns a done future)."""
        self._check_open("balance_async")
        method = "BatchBalancer.balance_async"
        if self._pool is None or self._gather_group is None or not self._on_host(features, dense):
            return _done(self._balance(features, dense, method))
        dense = {} if dense is None else dense  # (the plan agrees on the dense tensors: see `balance`)
        rows, schema, refused = self._plan_input(features, dense, need_features=True)

        def plan_and_exchange():
            plan = self._make_plan(self._gather_rows(rows, self._gather_group, schema, refused, method))
            return (*self.exchange(plan, features, dense, group=self._gather_group), plan)

        return self._pool.submit(plan_and_exchange)

    def _on_host(self, features, dense) -> bool:
        """Whether balance_async balances in the background (host tensors) or here. Input it
        refuses takes the path the others' good input most likely takes, that of its tensors, if
        any, else of the group's device: its refusal rides on the gather of that path. A guess (a
        rank cannot see the others' input): where it is wrong, e.g. host features on the other
        ranks of an NCCL group while this rank's refused input holds no tensor (or one on another
        device), the ranks wait in different collectives until the group's timeout, as before."""
        tensors = [features.values if isinstance(features, KeyedJagged) else features]
        tensors += list(dense.values()) if isinstance(dense, dict) else [dense]
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        if tensors:
            return all(t.device.type == "cpu" for t in tensors)
        return not dist.is_initialized() or collective_device(self.group).type == "cpu"

    def exchange(self, plan: BalancePlan, features: KeyedJagged, dense: dict[str, torch.Tensor] | None = None, group=None):
        """Move samples to their assigned ranks. Returns (KeyedJagged, dense dict) for this rank.
        `group`: the process group of the all-to-all (default the balancer's). Every rank's
        values and dense tensors travel in the dtypes and trailing shapes the ranks agreed on
        (in the plan's gather, or, for a plan made without them, in one small all-gather here):
        a rank without samples casts its empty tensors to them; ranks with samples must match.
        Input that does not fit the plan on any rank is a ValueError on every rank, naming it
        (features that are not a KeyedJagged or dense tensors not a dict of tensors: a
        TypeError). Raised on this rank alone, as no rank can join the all-to-all without it: a
        `plan` that is not a BalancePlan of this group."""
        if not isinstance(plan, BalancePlan):
            hint = ": plan_async() returns a Future, pass its .result()" if isinstance(plan, Future) else ""
            raise TypeError(f"BatchBalancer.exchange: plan must be a BalancePlan, got {type(plan).__name__}{hint}")
        if (plan.rank, plan.world_size) != (self.rank, self.world_size):
            raise ValueError(f"BatchBalancer.exchange: the plan was made for rank {plan.rank} of {plan.world_size}, this "
                             f"balancer is rank {self.rank} of {self.world_size} (a plan of another group)")
        group = group or self.group
        expected, first = plan.source_sizes[plan.rank], sum(plan.source_sizes[: plan.rank])
        moves = plan.world_size > 1 and plan.partition.method != "kept"
        refused = _batch_refusal(features, dense, need_features=True)
        # the dense keys that name another rank's dense problem: the caller's, also when its input
        # is refused (a dict holding something else), so every rank names it alike where it can
        dense_keys = list(dense) if isinstance(dense, dict) else []
        if refused is not None:
            if not moves:  # no collective follows
                raise TypeError(f"BatchBalancer.exchange: {refused.alone}")
            # this rank has no input to exchange, but joins the collective the others are on their
            # way into with the flag (and placeholders of the planned sizes, below)
            problem, detail, dense = [_TYPE_PROBLEM, 0, 0, 0], f" ({refused.alone})", {}
        else:
            dense = {} if dense is None else dense
            problem, detail = _input_problem(plan, features, dense, first, expected), ""
        schema = plan.schema
        if moves and (schema is None or schema.dense is None):
            # the plan did not see the dense tensors (or the features): the ranks agree on them here,
            # and in the same gather on whether every rank's input fits the plan (a check that fails
            # on one rank only must fail on all, before the all-to-all the others would wait in)
            flags, schemas = self._gather_rows(torch.tensor([problem or [0, 0, 0, 0]], dtype=torch.long), group,
                                               _schema_of(features, dense) if refused is None else [],
                                               method="BatchBalancer.exchange")
            bad = [(r, f[0].tolist()) for r, f in enumerate(flags) if int(f[0, 0])]
            if bad:
                raise _flagged_error(bad, dense_keys, plan.rank, detail)
            schema = Schema.agree(schemas, plan.source_sizes)
        elif problem is not None and not moves:  # no collective follows
            raise ValueError("BatchBalancer.exchange: " + _problem_text(plan.rank, problem, dense_keys))
        if schema is not None and problem is None:
            try:
                features, dense = schema.conform(features, dense)
            except ValueError as err:
                if not moves:
                    raise
                problem, detail = [_CONFORM_PROBLEM, 0, 0, 0], f" ({err})"
        if problem is not None:
            # the plan saw every rank's features and dense tensors, so the other ranks are already on
            # their way into the all-to-all: this rank joins it with the sizes the plan expects and a
            # flag, and every rank raises after it (rather than the others waiting out the timeout)
            device = features.values.device if refused is None else collective_device(group)
            _, send_counts = plan.send_order()
            sent_lengths = plan.sent_key_lengths().to(device)
            _, _, headers = self._move_rows(plan, sent_lengths, plan.received_key_lengths(), send_counts,
                                            _placeholders(schema, sent_lengths, send_counts), problem, group)
            _raise_flagged(headers, dense_keys, plan.rank, detail)
        if plan.windows is not None:  # cap/split this rank's samples first; dense rows follow their source
            mine = plan.windows.select((plan.windows.source >= first) & (plan.windows.source < first + expected))
            features = features.windows(mine.source - first, mine.start, mine.stop)
            dense = {k: v[mine.source - first] for k, v in dense.items()}
        if plan.partition.method == "kept":  # min_gain: nothing moves, no collective
            return features, dense
        order, send_counts = plan.send_order()
        if not moves:  # one rank: a local permutation
            return features.permute(order), {k: v[order] for k, v in dense.items()}
        # sample-major, so that each destination's samples are one contiguous slice
        values, lengths = features.sample_major(order)
        parts = [values.unsqueeze(1)] + [v[order].reshape(order.numel(), math.prod(v.shape[1:])) for v in dense.values()]
        recv_lengths, received, headers = self._move_rows(plan, lengths, plan.received_key_lengths(), send_counts, parts,
                                                          None, group)
        _raise_flagged(headers, list(dense), plan.rank, "")
        moved = {k: got.view((got.shape[0],) + tuple(v.shape[1:])) for (k, v), got in zip(dense.items(), received[1:])}
        return KeyedJagged.from_sample_major(features.keys, received[0].reshape(-1), recv_lengths), moved

    def _move_rows(self, plan: BalancePlan, lengths: torch.Tensor, recv_lengths: torch.Tensor | None,
                   send_counts: list[int], parts: list[torch.Tensor], problem: list[int] | None, group):
        """The exchange's all-to-all: `parts` (values as one column, then each dense tensor as
        rows) in send order, `send_counts` samples per destination, with `lengths` (samples x
        keys) of what is sent, and a header row per destination carrying this rank's input
        problem (zeros: none). Returns (received lengths, received parts, headers: one row per
        source rank)."""
        recv_counts = plan.recv_counts()
        if recv_lengths is None:  # the receivers learn the lengths first: the value counts follow from them
            recv_lengths = lengths.new_empty(sum(recv_counts), lengths.shape[1])
            dist.all_to_all_single(recv_lengths, lengths, recv_counts, send_counts, group=group)
        recv_lengths = recv_lengths.to(lengths.device)
        world = plan.world_size
        header = torch.tensor([problem or [0, 0, 0, 0]], dtype=torch.long, device=lengths.device).expand(world, 4)
        received = _all_to_all_rows(parts + [header], [_run_sums(lengths, send_counts)] + [send_counts] * (len(parts) - 1)
                                    + [[1] * world], [_run_sums(recv_lengths, recv_counts)]
                                    + [recv_counts] * (len(parts) - 1) + [[1] * world], group)
        return recv_lengths, received[:-1], received[-1]

    def balance(self, features: KeyedJagged, dense: dict[str, torch.Tensor] | None = None):
        """plan + exchange in one call. Returns (features, dense, plan)."""
        return self._balance(features, dense, "BatchBalancer.balance")

    def _balance(self, features, dense, method: str):
        dense = {} if dense is None else dense  # the plan's gather agrees on the dense tensors too: no second gather in exchange
        rows, schema, refused = self._plan_input(features, dense, need_features=True)
        plan = self._make_plan(self._gather_rows(rows, None, schema, refused, method))
        feats, dense = self.exchange(plan, features, dense)
        return feats, dense, plan


class _Refused(Exception):
    """This rank's input refused before a collective: `code` (see `_REFUSALS`) travels in the
    collective; the message is what this rank got (added to the expectation `code` names), and
    `alone` the whole error where no other rank is involved."""

    def __init__(self, code: int, reason: str, alone: str | None = None):
        super().__init__(reason)
        self.code, self.alone = code, alone or reason

    @property
    def error(self) -> type[Exception]:
        return _REFUSALS[self.code][0]


# what a rank's own check can refuse before the plan's gather, as codes it carries (0: nothing):
# the class every rank raises, and what was expected
_REFUSALS = {1: (ValueError, "cost lengths must be 1-D non-negative integer counts, one per sample (or pass the "
                             "features, a KeyedJagged)"),
             2: (TypeError, "features must be a KeyedJagged"),
             3: (TypeError, "dense must be a dict of tensors, one row per sample"),
             4: (TypeError, "each batch must be a (KeyedJagged, dict of dense tensors) pair"),
             5: (TypeError, "lengths_or_features must be a KeyedJagged or cost lengths (1-D integer counts, one per "
                            "sample)")}
_BATCH_REFUSED = 4
_HEAD = 5  # the gather's header: samples, columns, schema length, refusal code, the balancer's fingerprint


def _batch_refusal(features, dense, need_features: bool) -> _Refused | None:
    """Where `features` is not a KeyedJagged (`need_features`) or `dense` not None nor a dict of
    tensors with a row dimension: why (they failed later with an AttributeError, or a plan of
    cost lengths was exchanged as if they were features)."""
    if need_features and not isinstance(features, KeyedJagged):
        got = f"got {type(features).__name__}"
        return _Refused(2, got, f"features must be a KeyedJagged, {got}")
    if dense is None:
        return None
    if not isinstance(dense, dict):
        got = f"got {type(dense).__name__}"
        return _Refused(3, got, f"dense must be a dict of tensors (one row per sample), {got}")
    bad = {k: type(v).__name__ if not isinstance(v, torch.Tensor) else "a 0-d tensor" for k, v in dense.items()
           if not isinstance(v, torch.Tensor) or v.dim() == 0}
    if bad:
        return _Refused(3, f"got {bad}", f"dense must hold tensors of one row per sample, got {bad}")
    return None


def release_background(pool: ThreadPoolExecutor | None, groups) -> None:
    """What a `close()` frees: the background thread, once its queued work is done (every rank
    thus finishes the collectives it issued), then the gloo groups (None entries skipped)."""
    if pool is not None:
        pool.shutdown(wait=True)
    if dist.is_initialized():  # (gone already if every group was destroyed)
        for group in groups:
            if group is not None:
                destroy_process_group(group)


def background_group(process_group=None, timeout: datetime.timedelta | float | None = None):
    """A gloo group of the same ranks as `process_group` (default: the world), for collectives
    from a background thread; `timeout` defaults to that of `process_group` (collective: every
    member must call it)."""
    members = None if process_group is None else dist.get_process_group_ranks(process_group)
    if timeout is None:
        timeout = group_timeout(process_group)
    elif not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    return dist.new_group(ranks=members, backend="gloo", timeout=timeout)


def group_timeout(group=None) -> datetime.timedelta:
    """The timeout `group` (default: the default group) was created with; torch's default for its
    backend where the group does not say (no public accessor: read from its backend's options)."""
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    for device in ("cpu", "cuda"):
        try:
            timeout = pg._get_backend(torch.device(device)).options._timeout
        except (AttributeError, RuntimeError, ValueError):
            continue
        if isinstance(timeout, datetime.timedelta):
            return timeout
    return dist.distributed_c10d._get_default_timeout(dist.get_backend(pg))


# dtype codes in the schema: every torch dtype, in one order (the same torch on every rank)
_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)


def _keys_crc(keys) -> int:
    return zlib.crc32("\0".join(keys).encode())


def _schema_of(lengths_or_features, dense: dict[str, torch.Tensor] | None) -> list[int] | None:
    """This rank's schema as ints for the gather: [values dtype, has values, dense given, crc of
    the dense keys, number of dense keys, crc of the feature keys, then per dense key: dtype,
    trailing dims, *trailing shape]."""
    if not isinstance(lengths_or_features, KeyedJagged):
        return None
    values = lengths_or_features.values
    out = [_DTYPES.index(values.dtype), int(values.numel() > 0), int(dense is not None)]
    dense = dense or {}
    out += [_keys_crc(dense), len(dense), _keys_crc(lengths_or_features.keys)]
    for v in dense.values():
        out += [_DTYPES.index(v.dtype), v.dim() - 1, *v.shape[1:]]
    return out


@dataclasses.dataclass(frozen=True)
class Schema:
    """What the ranks agreed their values and dense tensors are: the values' dtype (None: no rank
    has values) and per dense key (dtype, trailing shape) (None per key: no rank has rows; None
    for all: the plan did not see the dense tensors)."""

    values: torch.dtype | None
    dense: tuple | None
    dense_keys: int  # crc of the dense keys' names, in order
    feature_keys: int  # crc of the jagged features' keys, in order

    @staticmethod
    def _parse(ints: list[int]):
        values, has_values, dense_given, crc, n = _DTYPES[ints[0]], bool(ints[1]), bool(ints[2]), ints[3], ints[4]
        dense, i = [], 6
        for _ in range(n):
            nd = ints[i + 1]
            dense.append((_DTYPES[ints[i]], tuple(ints[i + 2 : i + 2 + nd])))
            i += 2 + nd
        return values, has_values, dense_given, crc, dense, ints[5]

    @classmethod
    def agree(cls, schemas: list[list[int]], samples: list[int]) -> Schema:
        """The agreed schema from every rank's (`samples`: per rank, > 0 where it has rows); a
        ValueError, identical on every rank, where ranks with values or rows disagree."""
        parsed = [cls._parse(s) for s in schemas]
        if len({p[5] for p in parsed}) != 1:
            # the exchange rebuilds what it receives in the receiver's key order: other orders would
            # silently swap keys' values between moved samples
            raise ValueError("BatchBalancer: the ranks' features have different keys or the same keys in another order; "
                             "every rank must pass the same keys in the same order (KeyedJagged.from_dict keeps the "
                             "dict's order)")
        if len({(p[2], p[3], len(p[4])) for p in parsed}) != 1:
            raise ValueError("BatchBalancer: the ranks pass different dense keys (names or count) or some pass no "
                             "dense tensors to the plan: every rank must pass the same dense keys, in the same order")
        with_values = {p[0] for p in parsed if p[1]}
        if len(with_values) > 1:
            per_rank = ", ".join(f"rank {r}: {p[0]}" for r, p in enumerate(parsed) if p[1])
            raise ValueError(f"BatchBalancer: the ranks' jagged values differ in dtype ({per_rank}); give every rank "
                             "the same values dtype (e.g. KeyedJagged.from_dict(..., dtype=...))")
        dense = None
        if parsed[0][2]:
            dense = []
            for k in range(len(parsed[0][4])):
                seen = {p[4][k] for p, n in zip(parsed, samples) if n}
                if len(seen) > 1:
                    per_rank = ", ".join(f"rank {r}: {p[4][k][0]} {list(p[4][k][1])}"
                                         for r, (p, n) in enumerate(zip(parsed, samples)) if n)
                    raise ValueError(f"BatchBalancer: dense tensor #{k} differs in dtype or trailing shape between "
                                     f"ranks ({per_rank}); every rank must pass the same dtype and shape[1:]")
                dense.append(seen.pop() if seen else None)
            dense = tuple(dense)
        return cls(with_values.pop() if with_values else None, dense, parsed[0][3], parsed[0][5])

    def conform(self, features: KeyedJagged, dense: dict[str, torch.Tensor]):
        """`features` and `dense` in the agreed dtypes and shapes: empty ones are cast/reshaped,
        others must already match (a ValueError where they do not: not what the plan saw)."""
        if _keys_crc(features.keys) != self.feature_keys:
            raise ValueError(f"features' keys {list(features.keys)} differ from those the plan was made with (names or order)")
        values = features.values
        if self.values is not None and values.dtype != self.values:
            if values.numel():
                raise ValueError(f"features' values are {values.dtype}, the plan agreed on {self.values}")
            features = KeyedJagged(features.keys, values.to(self.values), features.lengths)
        if self.dense is None:
            return features, dense
        if _keys_crc(dense) != self.dense_keys or len(dense) != len(self.dense):
            raise ValueError(f"dense keys {list(dense)} differ from those the plan was made with")
        out = {}
        for (k, v), agreed in zip(dense.items(), self.dense):
            if agreed is not None and (v.dtype, tuple(v.shape[1:])) != agreed:
                if v.shape[0]:
                    raise ValueError(f"dense[{k!r}] is {v.dtype} {list(v.shape[1:])} per row, the ranks agreed on "
                                     f"{agreed[0]} {list(agreed[1])}")
                v = v.new_empty((0, *agreed[1]), dtype=agreed[0])
            out[k] = v
        return features, out


# what `_input_problem` finds, as ints a gather can carry: (code, sample, got, expected)
_PROBLEMS = {1: "the features have {got} samples, the plan expects {expected}",
             2: "dense[{name!r}] has {got} rows, expected {expected} (one per sample)",
             3: "the features' per-key lengths differ from those the plan was made from (local sample {sample})",
             4: "the features' positions per sample differ from the lengths the plan was made from (local sample "
                "{sample}: {got} positions, the plan's lengths say {expected}); the plan's cap/split windows would cut "
                "the wrong positions: plan from the features (plan(features)) or from balancer.lengths_of(features)",
             5: "the features' keys do not hold one entry per position (needed to cut samples for long_sequences="
                "'cap'/'split')",
             6: "the features or dense tensors differ from those the plan was made from in keys, dtype or shape[1:] "
                "(that rank's error says which)",
             7: "features must be a KeyedJagged and dense a dict of tensors with one row per sample",
             8: "the features have {got} keys, the plan was made from features with {expected}"}


_CONFORM_PROBLEM = 6  # Schema.conform refused this rank's input: its own error says how
_TYPE_PROBLEM = 7  # `_batch_refusal` refused this rank's input: raised as a TypeError


def _placeholders(schema: Schema, sent_lengths: torch.Tensor, sent: list[int]) -> list[torch.Tensor]:
    """Zero rows of the sizes, dtypes and widths the plan expects this rank to send (values, then
    each dense tensor; `sent_lengths`: samples x keys in send order, `sent`: samples per
    destination): what a rank whose input does not fit the plan sends, to keep the ranks in step
    through the all-to-all."""
    device = sent_lengths.device
    values_dtype = schema.values if schema.values is not None else torch.long  # None: no rank has values
    values = torch.zeros(int(sent_lengths.sum()), 1, dtype=values_dtype, device=device)
    dense = [torch.zeros(sum(sent), math.prod(agreed[1]), dtype=agreed[0], device=device) if agreed is not None
             else torch.zeros(0, 0, device=device) for agreed in schema.dense]  # None: no rank has samples
    return [values] + dense


def _raise_flagged(headers: torch.Tensor, dense_keys: list[str], rank: int, detail: str) -> None:
    """Raise on every rank, after the all-to-all, where a rank flagged its input as not fitting the
    plan; `detail`: this rank's own reason, when it is one of them."""
    bad = [(r, h.tolist()) for r, h in enumerate(headers.cpu()) if int(h[0])]
    if bad:
        raise _flagged_error(bad, dense_keys, rank, detail)


def _flagged_error(bad: list[tuple[int, list[int]]], dense_keys: list[str], rank: int, detail: str) -> Exception:
    """The error every rank raises for the flagged (rank, problem) pairs: a TypeError where the
    lowest flagged rank's input was of the wrong kind, else a ValueError."""
    error = TypeError if bad[0][1][0] == _TYPE_PROBLEM else ValueError
    return error("BatchBalancer.exchange: " + "; ".join(
        _problem_text(r, f, dense_keys) + (detail if r == rank else "") for r, f in bad))


def _problem_text(rank: int, problem: list[int], dense_keys: list[str]) -> str:
    """The same text on every rank (the ranks' dense keys agree, or the schema check fails next)."""
    code, sample, got, expected = problem
    name = dense_keys[sample] if code == 2 and sample < len(dense_keys) else f"#{sample}"
    return f"rank {rank}: " + _PROBLEMS[code].format(sample=sample, got=got, expected=expected, name=name)


def _input_problem(plan: BalancePlan, features: KeyedJagged, dense: dict, first: int, expected: int) -> list[int] | None:
    """The first way this rank's `features`/`dense` do not fit `plan`, as [code, sample, got,
    expected] (see `_PROBLEMS`), or None."""
    if features.batch_size != expected:
        return [1, 0, features.batch_size, expected]
    for i, v in enumerate(dense.values()):
        if v.shape[0] != features.batch_size:
            return [2, i, v.shape[0], features.batch_size]
    if plan.key_lengths is not None and plan.key_lengths.shape[1] != len(features.keys):  # (compared below)
        return [8, 0, len(features.keys), plan.key_lengths.shape[1]]
    if plan.key_lengths is not None:
        differ = (plan.key_lengths[first : first + expected] != features.lengths_per_key().T.cpu()).any(1)
        if bool(differ.any()):
            return [3, int(differ.nonzero()[0, 0]), 0, 0]
    elif plan.windows is not None:
        # a plan from cost lengths cuts by those lengths: they must be the features' own positions
        per_key = features.lengths_per_key().cpu()
        if not bool((per_key == per_key[:1]).all()):
            return [5, 0, 0, 0]
        planned = plan.lengths[first : first + expected]
        differ = (per_key[0] if per_key.numel() else planned) != planned
        if bool(differ.any()):
            i = int(differ.nonzero()[0, 0])
            return [4, i, int(per_key[0, i]), int(planned[i])]
    return None


def _done(value) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


def _run_sums(lengths: torch.Tensor, counts: list[int]) -> list[int]:
    """Total of `lengths` (samples x keys) over each run of `counts` consecutive samples."""
    ends = torch.cumsum(torch.cat([lengths.new_zeros(1), lengths.sum(1)]), 0)
    bounds = torch.cumsum(torch.tensor([0] + counts), 0).to(ends.device)
    return (ends[bounds[1:]] - ends[bounds[:-1]]).tolist()


def _all_to_all_rows(parts: list[torch.Tensor], send_rows: list[list[int]], recv_rows: list[list[int]], group):
    """One `all_to_all_single` for tensors of any dtypes: part i (2-D) sends its next
    send_rows[i][d] rows to rank d and receives recv_rows[i][s] rows from rank s. Every part
    travels as its raw bytes (exact), each rank's slices of all parts side by side; returns the
    received parts, rank 0's rows first."""
    world = len(send_rows[0])
    as_bytes = [p.contiguous().view(torch.uint8) for p in parts]  # (rows, row bytes)
    row_bytes = [b.shape[1] for b in as_bytes]
    pieces = [b.split(rows) for b, rows in zip(as_bytes, send_rows)]
    send = torch.cat([pieces[i][d].reshape(-1) for d in range(world) for i in range(len(parts))])
    send_sizes = [sum(rows[d] * w for rows, w in zip(send_rows, row_bytes)) for d in range(world)]
    recv_sizes = [sum(rows[s] * w for rows, w in zip(recv_rows, row_bytes)) for s in range(world)]
    recv = send.new_empty(sum(recv_sizes))
    dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=group)
    from_rank = [chunk.split([rows[s] * w for rows, w in zip(recv_rows, row_bytes)])
                 for s, chunk in enumerate(recv.split(recv_sizes))]
    out = []
    for i, p in enumerate(parts):
        if row_bytes[i] == 0:  # a zero-width part: nothing travelled (and no byte view of it exists)
            out.append(p.new_empty(sum(recv_rows[i]), 0))
            continue
        # the concatenation copies to a fresh buffer, aligned for the view back to the part's dtype
        got = torch.cat([from_rank[s][i] for s in range(world)])
        out.append(got.view(sum(recv_rows[i]), row_bytes[i]).view(p.dtype))
    return out
