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
    would be read as logits near 0, a wrong log-loss and NE with the right AUC."""

    def __init__(self):
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self.loss_sum = 0.0
        self.count = 0
        self.positives = 0.0

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

    def compute(self) -> dict[str, float]:
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

    def compute(self) -> dict[str, dict[str, float]]:
        return {n: m.compute() for n, m in self.tasks.items()}
