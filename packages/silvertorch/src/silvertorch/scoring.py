"""OverArch (multi-task scorer over user x candidate) and Value Model (task scores -> one value).

OverArch is DLRM's top MLP applied to each of the K retrieved candidates: input
[u, v, u*v] (and optional dense features), hidden ReLU layers, one logit per task. The Value
Model merges the task probabilities into one ranking value: a weighted sum with fixed weights,
per-request weights, or a small learned MLP. Both are plain modules so they train with the
towers and are published into the RetrievalModel unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from gpukernels_common import tracing
from gpukernels_common.checks import check_sizes

# the largest float32: the weighted sum's scores are float32
FLOAT32_MAX = torch.finfo(torch.float32).max


class OverArch(nn.Module):
    def __init__(self, dim: int, num_tasks: int, hidden: tuple[int, ...] | list[int] = (64,), dense_dim: int = 0):
        super().__init__()
        dim, num_tasks = check_sizes(dim=dim, num_tasks=num_tasks)
        (dense_dim,) = check_sizes(0, dense_dim=dense_dim)
        if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__iter__"):
            raise ValueError(f"hidden must be a list of layer widths, got {hidden!r}")
        hidden = list(check_sizes(**{f"hidden[{i}]": h for i, h in enumerate(hidden)}))
        self.dim, self.num_tasks, self.hidden, self.dense_dim = dim, num_tasks, hidden, dense_dim
        layers: list[nn.Module] = []
        width = 3 * dim + dense_dim
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_tasks))
        self.mlp = nn.Sequential(*layers)

    def config(self) -> dict:
        return {"dim": self.dim, "num_tasks": self.num_tasks, "hidden": self.hidden, "dense_dim": self.dense_dim}

    def forward(self, user: torch.Tensor, items: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        """user [..., D] (broadcast over candidates) or [..., K, D], items [..., K, D] -> logits
        [..., K, T]: the MLP over [user, item, user * item, dense]."""
        if self.dense_dim and (dense is None or dense.shape[-1] != self.dense_dim):
            raise ValueError(f"OverArch was built with dense_dim={self.dense_dim}; pass dense [..., K, {self.dense_dim}]")
        if not self.dense_dim and dense is not None:  # it would be ignored
            raise ValueError("OverArch was built with dense_dim=0; leave dense out")
        if items.dim() < 2 or items.shape[-1] != self.dim:
            raise ValueError(f"items must be [..., K, {self.dim}] for this OverArch (dim={self.dim}), got {tuple(items.shape)}")
        if user.dim() not in (items.dim() - 1, items.dim()) or user.shape[-1] != self.dim:
            raise ValueError(f"user must be [..., {self.dim}] or [..., K, {self.dim}] for this OverArch (dim={self.dim}), "
                             f"got {tuple(user.shape)}")
        if user.dim() == items.dim() - 1:  # one user per row of candidates: see _per_user
            rows = _cpu_chunk_rows(items.shape[:-2], items.shape[-2] * max(self.hidden, default=self.num_tasks), items.device)
            if not rows:
                return self._per_user(user, items, dense)
            # eager on the CPU: a few users at a time (see CPU_CHUNK_BYTES)
            batch = items.shape[:-2]
            user = user.expand(*batch, user.shape[-1]).flatten(0, -2)
            items = items.flatten(0, -3)
            dense = dense.expand(*batch, *dense.shape[-2:]).flatten(0, -3) if self.dense_dim else None
            parts = [self._per_user(user[i:i + rows], items[i:i + rows], None if dense is None else dense[i:i + rows])
                     for i in range(0, user.shape[0], rows)]
            return torch.cat(parts).view(*batch, -1, self.num_tasks)
        user = user.expand_as(items)
        parts = [user, items, user * items] + ([dense] if self.dense_dim else [])
        return self.mlp(torch.cat([p.to(self.mlp[0].weight.dtype) for p in parts], -1)).float()

    def _per_user(self, user, items, dense):
        """The MLP for one user per row of candidates, without the [..., K, 3D] input: the first
        layer's user part once per user; its item and user*item parts as one product of the items
        with W_item + diag(user) W_user*item, a [D, h] matrix per user. ReLUs in place (each reads
        a fresh layer output that no backward needs)."""
        first, d = self.mlp[0], self.dim
        u, w = user.to(first.weight.dtype), first.weight
        mixed = w[:, d:2 * d].T + u.unsqueeze(-1) * w[:, 2 * d:3 * d].T  # [..., D, h]
        hidden = items.to(w.dtype) @ mixed
        hidden += nn.functional.linear(u, w[:, :d], first.bias).unsqueeze(-2)  # in place: no second [..., K, h]
        if self.dense_dim:
            hidden += nn.functional.linear(dense.to(w.dtype), w[:, 3 * d:])
        for layer in self.mlp[1:]:
            hidden = hidden.relu_() if isinstance(layer, nn.ReLU) else layer(hidden)
        return hidden.float()


# eager on the CPU, OverArch scores this many bytes of hidden activations at a time: a few users'
# candidates stay in cache and their temporaries in the allocator's reused memory, where the whole
# batch's [Q, K, h] would be fresh pages each call (128 users x 1,000 candidates: 76 -> 26 ms)
CPU_CHUNK_BYTES = 8 << 20


def _cpu_chunk_rows(batch_shape, hidden_per_row: int, device) -> int:
    """Users per chunk for eager CPU calls whose batch is larger than one chunk; 0: no chunking
    (GPUs, compiled or exported graphs, small batches)."""
    if device.type != "cpu" or tracing() or not batch_shape:
        return 0
    rows = max(1, CPU_CHUNK_BYTES // (4 * max(hidden_per_row, 1)))
    return rows if batch_shape.numel() > rows else 0


class ValueModel(nn.Module):
    """value = sum_t w_t * sigmoid(logit_t); `learned=True` replaces the sum by a tiny MLP.

    Weights are one number per task in the OverArch's task order (`weights=[1.0, 0.5]`), or, with
    `task_names=`, a mapping that names every task (`weights={"watch": 1.0, "like": 0.5}`); an
    unknown or missing name is a ValueError. Per-request weights take either form too."""

    def __init__(self, num_tasks: int | None = None, weights=None, learned: bool = False, hidden: int = 16,
                 task_names=None):
        super().__init__()
        names = None if task_names is None else _checked_task_names(task_names)
        if num_tasks is None and names is None:
            raise ValueError("ValueModel needs num_tasks (or task_names, one per task)")
        num_tasks = len(names) if num_tasks is None else num_tasks
        num_tasks, hidden = check_sizes(num_tasks=num_tasks, hidden=hidden)
        if not isinstance(learned, bool):  # "no" (e.g. from a hand-edited config) built the MLP, silently
            raise ValueError(f"learned must be True or False, got {learned!r}")
        if names is not None and len(names) != num_tasks:
            raise ValueError(f"task_names must name the {num_tasks} tasks (num_tasks={num_tasks}), got {len(names)}: {names}")
        self.num_tasks, self.learned, self.hidden_size, self.task_names = num_tasks, learned, hidden, names
        if learned and weights is not None:  # the MLP replaces the weighted sum: the weights would be ignored
            raise ValueError("weights: a learned Value Model (an MLP over the task probabilities) has no weighted sum; "
                             "leave weights out, or pass learned=False")
        w = torch.ones(num_tasks) if weights is None else check_value_weights(self._by_position(weights, "weights"), num_tasks, "weights")
        self.register_buffer("weights", w)
        self.mlp = nn.Sequential(nn.Linear(num_tasks, hidden), nn.ReLU(), nn.Linear(hidden, 1)) if learned else None

    def config(self) -> dict:
        config = {"num_tasks": self.num_tasks, "learned": self.learned, "hidden": self.hidden_size}
        if self.task_names is not None:  # absent otherwise: artifacts without names read as before
            config["task_names"] = list(self.task_names)
        return config

    def _by_position(self, weights, name: str):
        """A {task name: weight} mapping as one weight per task in task order (a list of mappings, one
        per query, as rows); anything else as given."""
        if isinstance(weights, (list, tuple)) and weights and all(isinstance(w, Mapping) for w in weights):
            return [self._by_position(w, name) for w in weights]
        if not isinstance(weights, Mapping):
            return weights
        if self.task_names is None:
            raise ValueError(f"{name}: weights by task name need the Value Model's task_names (ValueModel(..., "
                             f"task_names=[...])); without them pass one weight per task, in task order")
        unknown = [k for k in weights if k not in self.task_names]
        missing = [n for n in self.task_names if n not in weights]
        if unknown or missing:
            raise ValueError(f"{name} must name every task exactly: "
                             + "; ".join(([f"unknown {unknown}"] if unknown else []) + ([f"missing {missing}"] if missing else []))
                             + f" (tasks: {self.task_names})")
        return [weights[n] for n in self.task_names]

    def forward(self, logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """logits [Q, K, T]; weights [Q, T] per request (overrides the fixed ones) -> value [Q, K]."""
        return self.value_of(torch.sigmoid(logits.float()), weights)

    def value_of(self, probs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` from the task probabilities, sigmoid(logits) in float32 [Q, K, T] (a caller
        that returns them too computes them once)."""
        if weights is not None:
            weights = self.check_request_weights(weights, probs.shape[0], values=not tracing()).to(probs.device)
        if self.mlp is not None:
            return self.mlp(probs.to(self.mlp[0].weight.dtype)).squeeze(-1).float()
        # in the probabilities' float32: a Value Model moved to another dtype (.double(), bf16) keeps working
        w = (self.weights if weights is None else weights).to(probs.dtype)
        if w.dim() == 1:
            return probs @ w
        return (probs * w.unsqueeze(-2)).sum(-1)

    def check_request_weights(self, weights, num_queries: int | None = None, values: bool = True) -> torch.Tensor:
        """Per-request `value_weights` as float32 [T] (or [num_queries, T]; a {task name: weight}
        mapping with `task_names`), or a ValueError naming them: refused for a learned Value Model,
        checked as `check_value_weights` checks them
        (`values=False` checks the shape only: a traced graph cannot read the values)."""
        if self.mlp is not None:  # the MLP has no weights to override: ignoring them would be a silent wrong answer
            raise ValueError("value_weights: this Value Model is learned (an MLP over the task probabilities); "
                             "per-request weights apply to the weighted sum only")
        return check_value_weights(self._by_position(weights, "value_weights"), self.num_tasks, "value_weights", num_queries,
                                   values=values)


def _checked_task_names(task_names) -> list[str]:
    if isinstance(task_names, str):  # list("like") would make four one-letter tasks
        raise ValueError(f"task_names must be a list of task names, got the string {task_names!r} (one task: [{task_names!r}])")
    try:
        names = list(task_names)
    except TypeError:
        raise ValueError(f"task_names must be a list of task names, got {task_names!r}") from None
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"task_names must be distinct non-empty strings, got {task_names!r}")
    return names


def check_value_weights(weights, num_tasks: int, name: str, num_queries: int | None = None, values: bool = True) -> torch.Tensor:
    """Weights of the weighted sum as float32 [num_tasks] (or [num_queries, num_tasks]), or a ValueError
    naming `name`: a score is at most the sum of the weights' absolute values (the task probabilities
    are in [0, 1]), so that sum must be finite in float32. A larger one overflows the scores to inf,
    which the model takes for a missing result (every id -1); a [Q, 1] would broadcast over the tasks."""
    try:
        w = torch.as_tensor(weights, dtype=torch.float32)
    except OverflowError:  # a Python int past float's range
        raise ValueError(f"{name}: a number is out of range") from None
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be numbers ({err})") from None
    shapes = [(num_tasks,)] + ([] if num_queries is None else [(num_queries, num_tasks)])
    if tuple(w.shape) not in shapes:
        raise ValueError(f"{name} must be {' or '.join(str(list(s)) for s in shapes)} (one weight per task), got {list(w.shape)}")
    if values and not torch.isfinite(w.abs().sum(-1)).all():
        raise ValueError(f"{name} must be finite numbers whose absolute values sum to at most {FLOAT32_MAX:.4g} "
                         f"(float32's largest; a score is at most that sum)")
    return w
