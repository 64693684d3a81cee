"""Streaming per-task metrics for binary tasks: normalized entropy (NE), AUC and log-loss.

NE = log-loss / entropy of the base rate (He et al., "Practical lessons from predicting
clicks on ads at Facebook"): 1.0 is no better than predicting the average; lower is better.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


class BinaryTaskMetrics:
    """Accumulate (logit, label) batches; `compute()` gives log-loss, NE and exact AUC (NE and AUC
    are NaN while the labels seen hold one class only). Scores must be logits: probabilities
    would be read as logits near 0, a wrong log-loss and NE with the right AUC.

    `reset()` starts over (e.g. per evaluation epoch); `merge(other)` adds another's samples;
    `compute(sync=True)` gives the metrics of every rank's samples together (see `compute`)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Forget every sample seen."""
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self.loss_sum = 0.0
        self.count = 0
        self.positives = 0.0

    def merge(self, other: BinaryTaskMetrics) -> None:
        """Add `other`'s samples to these (exact: AUC keeps every (logit, label) pair); `other` is
        left as it was."""
        if not isinstance(other, BinaryTaskMetrics):
            raise TypeError(f"merge: other must be a BinaryTaskMetrics, got {type(other).__name__}")
        self.loss_sum += other.loss_sum
        self.count += other.count
        self.positives += other.positives
        self._logits += other._logits
        self._labels += other._labels

    @staticmethod
    def _checked(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch flattened to float64 on the host, or ValueError (nothing is counted then)."""
        logits = torch.as_tensor(logits).detach().reshape(-1).double().cpu()
        labels = torch.as_tensor(labels).detach().reshape(-1).double().cpu()
        if logits.shape != labels.shape:
            raise ValueError(f"logits and labels must have the same number of elements, got {logits.numel()} and {labels.numel()}")
        if not torch.isfinite(logits).all():
            raise ValueError("logits contain NaN or inf")
        if ((labels != 0) & (labels != 1)).any():
            raise ValueError("labels must be 0 or 1")
        return logits, labels

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self._add(*self._checked(logits, labels))

    def _add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += float(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum"))
        self.count += labels.numel()
        self.positives += float(labels.sum())
        self._logits.append(logits)
        self._labels.append(labels)

    def _state(self) -> tuple:
        """What another rank needs to merge these samples (`_gather`)."""
        cat = (lambda xs: torch.cat(xs)) if self._logits else (lambda xs: torch.zeros(0, dtype=torch.float64))
        return self.loss_sum, self.count, self.positives, cat(self._logits), cat(self._labels)

    @classmethod
    def _from_state(cls, state: tuple) -> BinaryTaskMetrics:
        m = cls()
        m.loss_sum, m.count, m.positives, logits, labels = state
        m._logits, m._labels = [logits], [labels]
        return m

    def compute(self, *, sync: bool = False, process_group=None) -> dict[str, float]:
        """Log-loss, NE, AUC and the sample count. `sync=True`: of the samples of every rank of
        `process_group` (default: the world) together, the same numbers on every rank (as
        torchmetrics' sync on compute); a collective, so every rank must call it. Exact: every
        rank's (logit, label) pairs are gathered (an all-gather of objects, so NCCL groups work
        too, once each process has called `torch.cuda.set_device(local_rank)`: torch's
        `all_gather_object` sends through the current GPU). The local samples stay as they were."""
        if sync:
            return _gather({"": self}, process_group, "BinaryTaskMetrics")[""]._compute()
        return self._compute()

    def _compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no samples: call update() first")
        logloss = self.loss_sum / self.count
        p = self.positives / self.count
        base = -(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else float("nan")
        return {"logloss": logloss, "ne": logloss / base if base == base else float("nan"),
                "auc": auc(torch.cat(self._logits), torch.cat(self._labels)), "count": self.count}


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC with ties counted half (Mann-Whitney U); NaN when one class is absent.
    `scores` must be finite (+-inf allowed: they still rank) and `labels` 0 or 1, with as many
    elements as `scores`."""
    scores, labels = torch.as_tensor(scores).double().reshape(-1), torch.as_tensor(labels).double().reshape(-1)
    if scores.numel() != labels.numel():
        raise ValueError(f"scores and labels must have the same number of elements, got {scores.numel()} and {labels.numel()}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if ((labels != 0) & (labels != 1)).any():
        raise ValueError(f"labels must be 0 or 1, got values {sorted(set(labels.unique().tolist()) - {0.0, 1.0})}")
    n_pos = float(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    s = scores[order]
    ranks = torch.empty_like(s)
    # average ranks over ties
    uniq, inverse, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks = avg[inverse]
    pos_rank_sum = float(ranks[labels[order] == 1].sum())
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


class MultiTaskMetrics:
    """One `BinaryTaskMetrics` per task; `update` takes a mapping task -> tensor for each of logits
    and labels, with exactly the tasks' names as keys."""

    def __init__(self, task_names: Sequence[str]):
        if isinstance(task_names, str):
            raise ValueError(f"task_names must be a sequence of task names, got the string {task_names!r}")
        names = list(task_names)
        # as the balancers: a repeated name would share one task's counts, silently
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"task_names must be distinct non-empty strings, got {task_names!r}")
        self.tasks = {n: BinaryTaskMetrics() for n in names}

    def update(self, logits: Mapping, labels: Mapping) -> None:
        """All tasks are checked before any is counted: an error leaves every task as it was."""
        for what, given in (("logits", logits), ("labels", labels)):
            if not isinstance(given, Mapping):  # a list would be matched to nothing (its items read as task names)
                raise TypeError(f"{what} must be a mapping from task name to tensor (keys {list(self.tasks)}), "
                                f"got {type(given).__name__}")
            missing, unknown = set(self.tasks) - set(given), set(given) - set(self.tasks)
            if missing or unknown:
                raise ValueError(f"{what}: missing tasks {sorted(missing)}, unknown tasks {sorted(unknown)}; "
                                 f"expected {list(self.tasks)}")
        checked = {}
        for name in self.tasks:
            try:
                checked[name] = BinaryTaskMetrics._checked(logits[name], labels[name])
            except ValueError as error:
                raise ValueError(f"task {name!r}: {error}") from None
        for name, m in self.tasks.items():
            m._add(*checked[name])

    def reset(self) -> None:
        """Forget every task's samples (e.g. at the start of an evaluation epoch)."""
        for m in self.tasks.values():
            m.reset()

    def merge(self, other: MultiTaskMetrics) -> None:
        """Add `other`'s samples, task by task (the same task names, in any order)."""
        if not isinstance(other, MultiTaskMetrics):
            raise TypeError(f"merge: other must be a MultiTaskMetrics, got {type(other).__name__}")
        if set(other.tasks) != set(self.tasks):
            raise ValueError(f"merge: other has tasks {list(other.tasks)}, these metrics {list(self.tasks)}")
        for name, m in self.tasks.items():
            m.merge(other.tasks[name])

    def compute(self, *, sync: bool = False, process_group=None) -> dict[str, dict[str, float]]:
        """Per task, as `BinaryTaskMetrics.compute`; `sync=True`: over every rank of `process_group`
        (default: the world), all tasks in one collective that every rank must call (the ranks
        must hold the same task names)."""
        tasks = _gather(self.tasks, process_group, "MultiTaskMetrics") if sync else self.tasks
        return {n: m._compute() for n, m in tasks.items()}


def _gather(tasks: dict[str, BinaryTaskMetrics], process_group, who: str) -> dict[str, BinaryTaskMetrics]:
    """Every rank's samples merged, task by task, in rank order (the same floats on every rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{who}.compute(sync=True) needs torch.distributed initialised "
                           f"(init_process_group), or sync=False for this process's samples")
    states = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(states, {n: m._state() for n, m in tasks.items()}, group=process_group)
    # before merging: a task missing on a rank would count as empty there, silently
    odd = [rank for rank, state in enumerate(states) if set(state) != set(states[0])]
    if odd:  # the same message on every rank
        named = ", ".join(f"rank {r} {list(states[r])}" for r in [0, *odd])
        raise ValueError(f"{who}.compute(sync=True): the ranks hold different task names ({named}): every rank must "
                         f"create the metrics with the same task names")
    merged = {n: BinaryTaskMetrics() for n in tasks}
    for state in states:
        for n, m in merged.items():
            m.merge(BinaryTaskMetrics._from_state(state[n]))
    return merged
