"""Sequences that alone exceed a rank's fair share: their floor, capping and splitting.

No placement brings a rank's load below its costliest sample, so when one sample costs more
than a rank's fair share (global cost / W) that sample sets the step's floor. Two ways out,
both computed from the all-gathered lengths (the same result on every rank, no extra
communication):

- **cap** keeps only the most recent positions of each long sequence: one cap for the whole
  batch, the largest whose cost fits the fair share of the capped batch. Lossy: the oldest
  positions and the targets they carry are dropped (`BalancePlan.report()["positions_dropped"]`,
  and a warning when more than `DROP_WARNING` of them go). A batch with no more non-empty samples
  than ranks is left whole: every sample then has a rank to itself, so capping could only make
  the long ones shorter, never let another sample use an idle rank (the fair share of such a
  batch is below every sample but the shortest, and the cap used to collapse to that: one
  200-long history on 3 ranks was cut to 1 position).
- **split** is for models trained on every position (HSTU-style next-item training: position t
  predicts item t+1). The positions of a long sequence are cut into consecutive pieces, each
  a sample of its own that the partitioner may send to another rank; every piece but the
  first also carries the `context` positions before it, as context only (no loss). Each
  position carries its loss in exactly one piece, so the global count of loss positions is
  unchanged: normalise the per-position loss sum by `BalancePlan.global_positions`, sum the
  gradients over ranks, and
    * a model whose output at position t depends on positions t-context .. t only gets
      exactly the unsplit run's loss and gradients;
    * a causal-attention model (`HSTURecommender`) gets the unsplit states on the first
      piece of each sequence (its whole prefix is in the window), given `trailing` (positions
      after the window) so recency positions match; positions of later pieces attend to their
      piece's window only (at least `context` positions back): a chunked sliding-window
      approximation of full attention, whose loss differs from the unsplit run's.
  Every piece costs at most the fair share of the split batch. Splitting drops the attention
  across pieces (a quadratic cost shrinks) and recomputes context (a linear cost grows): see
  `BalancePlan.report()["cost_change_pct"]`.
"""

from __future__ import annotations

import dataclasses

import torch

from .cost import CostModel, check_lengths
from .partition import check_world_size

MODES = ("report", "cap", "split")
DROP_WARNING = 0.10  # the share of positions a cap may drop before the plan warns


@dataclasses.dataclass
class Windows:
    """One row per sample after capping or splitting: positions [start, stop) of the original
    sample `source`; the first `context` of them carry no loss; `trailing` positions of the
    source follow the window (0 for the newest piece)."""

    source: torch.Tensor
    start: torch.Tensor
    stop: torch.Tensor
    context: torch.Tensor
    trailing: torch.Tensor

    @classmethod
    def whole(cls, lengths: torch.Tensor) -> Windows:
        """Every sample whole: no capping, no splitting."""
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        zeros = torch.zeros_like(lengths)
        return cls(torch.arange(lengths.numel()), zeros, lengths.clone(), zeros, zeros.clone())

    @property
    def lengths(self) -> torch.Tensor:
        return self.stop - self.start

    def positions(self) -> int:
        """Positions that carry a loss."""
        return int((self.lengths - self.context).sum())

    def select(self, rows: torch.Tensor) -> Windows:
        return Windows(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))

    def loss_mask(self) -> torch.Tensor:
        """Bool over the windows' positions laid end to end (a key's values in a KeyedJagged of
        these windows): False for context-only positions."""
        within = torch.arange(int(self.lengths.sum())) - torch.repeat_interleave(self.lengths.cumsum(0) - self.lengths, self.lengths)
        return within >= torch.repeat_interleave(self.context, self.lengths)


def floor_of(costs: torch.Tensor, world_size: int) -> dict:
    """The costliest sample against a rank's fair share, and the smallest bubble any placement
    of these (unsplit) samples can reach: 1 - total / (W * max(costliest, fair share))."""
    costs = torch.as_tensor(costs, dtype=torch.float64)
    fair = float(costs.sum()) / world_size
    floor = float(costs.max()) if costs.numel() else 0.0
    bound = max(floor, fair)
    return {"floor_cost": floor, "fair_share": fair, "floor_bound": floor > fair,
            "bubble_floor": 1.0 - fair / bound if bound > 0 else 0.0}


def longest_within(cost_model: CostModel, budget: float, upper: int) -> int:
    """The largest length in [0, upper] whose cost is at most `budget` (costs grow with length)."""
    lo, hi = 0, int(upper)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if float(cost_model(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def cap_lengths(lengths, cost_model: CostModel, world_size: int) -> torch.Tensor:
    """Cap sequence lengths (keeping the most recent positions) at the largest common cap whose
    cost fits the fair share of the capped batch, so that no sample alone exceeds it. The cap
    is at least 1. No more non-empty samples than ranks: every sample keeps its length (each
    can have a rank to itself; a cap would drop positions without filling any idle rank)."""
    # checked as `oversized` checks them: float lengths were truncated, and 0 (or a negative or
    # float number of) ranks gave a cap or none at all, silently
    lengths = check_lengths(lengths)
    world_size = check_world_size(world_size)
    if int((lengths > 0).sum()) <= world_size:
        return lengths.clone()

    def fits(cap: int) -> bool:
        return float(cost_model(cap)) * world_size <= float(cost_model(lengths.clamp_max(cap)).sum())

    # the slack (capped total - W * cost(cap)) is 0 at cap 0, grows while more than W samples are
    # longer than the cap and shrinks after: the caps that fit are [0, best], found by bisection
    lo, hi = 0, int(lengths.max())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lengths.clamp_max(max(lo, 1))


def cap_windows(lengths, cost_model: CostModel, world_size: int) -> Windows:
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    windows = Windows.whole(lengths)
    windows.start = lengths - cap_lengths(lengths, cost_model, world_size)
    return windows


def split_windows(lengths, cost_model: CostModel, world_size: int, context: int | None = None) -> Windows:
    """Split the samples that cost more than a rank's fair share into pieces that each cost at
    most the fair share of the split batch (see the module docs for the semantics). `context`:
    positions of context before every piece but the first; default half the longest window
    that fits, and at most that window minus one position."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    if context is not None and context < 0:
        raise ValueError(f"split context must be >= 0 positions, got {context}")
    # splitting removes attention across pieces (and adds context), so the fair share moves:
    # shrink the longest allowed window until every piece fits the fair share of its own batch
    budget = float(cost_model(lengths).sum()) / world_size
    window = int(lengths.max()) if lengths.numel() else 0
    while True:
        window = longest_within(cost_model, budget, window)
        if window < 1:  # not even one position fits: nothing to gain from splitting
            return Windows.whole(lengths)
        windows = _cut(lengths, window, window // 2 if context is None else min(context, window - 1))
        costs = cost_model(windows.lengths)
        budget = float(costs.sum()) / world_size
        if float(costs.max()) <= budget:
            return windows


def _cut(lengths: torch.Tensor, window: int, context: int) -> Windows:
    """Cut every sample longer than `window` into the fewest pieces of at most `window` positions
    (the first holds `window` new positions, the others window - context each), evened out."""
    rows: list[tuple[int, int, int, int, int]] = []  # source, start, stop, context, trailing
    for i, length in enumerate(lengths.tolist()):
        if length <= window:
            rows.append((i, 0, length, 0, 0))
            continue
        pieces = 1 + -(-(length - window) // (window - context))
        mass = length + (pieces - 1) * context
        sizes = [mass // pieces + (1 if j < mass % pieces else 0) for j in range(pieces)]
        first = 0
        for j, size in enumerate(sizes):
            c = context if j else 0
            stop = first + size - c
            rows.append((i, first - c, stop, c, length - stop))
            first = stop
    return Windows(*(torch.tensor(col, dtype=torch.long) for col in zip(*rows)))


def long_sequence_windows(mode: str, lengths, cost_model: CostModel, world_size: int,
                          context: int | None = None) -> Windows | None:
    """The windows `mode` asks for ('cap' or 'split'), or None for 'report' (samples stay whole)."""
    if mode not in MODES:
        raise ValueError(f"long_sequences must be one of {MODES}, got {mode!r}")
    if mode == "cap":
        return cap_windows(lengths, cost_model, world_size)
    if mode == "split":
        return split_windows(lengths, cost_model, world_size, context)
    return None
