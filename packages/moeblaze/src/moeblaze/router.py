"""Token-choice router: top-k over softmax (or sigmoid) logits, load-balancing and z-losses."""

from __future__ import annotations

import dataclasses
import math
import numbers
from fractions import Fraction

import torch
from torch import nn
from torch.nn import functional as F

from gpukernels_common import tracing
from gpukernels_common.checks import check_sizes

SCORES = ("softmax", "sigmoid")


@dataclasses.dataclass
class Routing:
    expert_ids: torch.Tensor  # [T, k] int32
    weights: torch.Tensor  # [T, k] combine weights (differentiable)
    aux_loss: torch.Tensor  # load-balancing loss (Switch/GShard form), scalar
    z_loss: torch.Tensor  # router z-loss (ST-MoE), scalar
    dropped: torch.Tensor  # [T, k] bool: slots over their expert's capacity (id E, weight 0)


def expert_capacity(tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """Slots each expert keeps: ceil(capacity_factor * tokens * top_k / n_experts), computed
    exactly for the factor as written (1.1 is 11/10: 1.1 * 100 * 2 / 4 gives 55, where the
    float product 110.00000000000001 would round up to 56). `capacity_factor` may also be that
    exact form already, a Fraction (as `Router` keeps it)."""
    factor = capacity_factor if isinstance(capacity_factor, Fraction) else exact_factor(capacity_factor)
    num, den = factor.numerator * top_k, factor.denominator * n_experts
    return max(1, -((-num * tokens) // den))  # integer ceil (tokens may be a symbolic size when traced)


def exact_factor(capacity_factor: float) -> Fraction:
    return Fraction(repr(float(capacity_factor)))  # the float's shortest decimal form


def check_top_k(top_k, n_experts: int) -> None:
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must be an integer in [1, n_experts={n_experts}], got {top_k!r}")


def check_score(score) -> None:
    if score not in SCORES:
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")


def check_capacity_factor(capacity_factor) -> None:
    # finite: expert_capacity takes the factor's exact decimal form, which inf and NaN have not
    if capacity_factor is None:
        return
    if (not isinstance(capacity_factor, numbers.Real) or isinstance(capacity_factor, bool)
            or not math.isfinite(capacity_factor) or not capacity_factor > 0):
        raise ValueError(f"capacity_factor must be a finite number > 0 (or None: dropless), got {capacity_factor!r}")


def check_capacity(capacity) -> None:
    # an integer: a float (1.5) or True would silently act as the next integer up
    if capacity is None:
        return
    if not isinstance(capacity, (numbers.Integral, torch.SymInt)) or isinstance(capacity, bool) or capacity < 1:
        raise ValueError(f"capacity must be an integer >= 1 slot per expert (or None: dropless), got {capacity!r}")


def check_renormalize(renormalize) -> None:
    # a bool: "no" (or a tensor) read as true, silently
    if not isinstance(renormalize, bool):
        raise ValueError(f"renormalize must be True or False, got {renormalize!r}")


def route(logits: torch.Tensor, top_k: int, score: str = "softmax", renormalize: bool = True,
          capacity: int | None = None) -> Routing:
    """Top-k routing of [T, E] logits. With `capacity`, each expert keeps its first `capacity`
    slots in token order (earlier tokens first, as in Switch/GShard); the others are dropped:
    expert id E and weight 0, so they are neither computed nor combined (the token keeps its
    other experts' outputs and, in a residual block, its input). Weights are renormalized before
    dropping; the auxiliary loss sees the router's choice before dropping.

    `renormalize` rescales the top-k weights to sum to 1 for top_k > 1 only: at top_k = 1 the
    weight stays the expert's probability (Switch Transformer), so the router keeps a gradient
    from the task loss (a renormalised top-1 weight would be the constant 1).

    With `score="sigmoid"` experts are chosen by their logits and renormalised in log space
    (a softmax of the log-sigmoids, the same weights): sigmoids of logits below about -104
    underflow to 0 in fp32, and a token whose logits are all that low still gets its top-k
    logits' experts with weights summing to 1, where sigmoid(l) / sum(sigmoid) would be 0/0 = NaN.
    Without renormalisation such weights are their sigmoids, 0 (the token's routed output is 0)."""
    if logits.dim() != 2:
        raise ValueError(f"router logits must be [tokens, experts], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():  # integer logits would give integer (all-zero) weights
        raise ValueError(f"router logits must be a floating-point tensor, got {logits.dtype}")
    n_experts = logits.shape[1]
    check_top_k(top_k, n_experts)
    check_capacity(capacity)
    check_renormalize(renormalize)
    # an eager-only check (a host synchronisation): skipped while torch.compile / torch.export
    # trace and on meta tensors (shape inference), which have no values to check
    if not (tracing() or logits.is_meta) and not torch.isfinite(logits).all():
        raise ValueError("router logits contain NaN or inf")
    check_score(score)
    logits32 = logits.float()
    # the choice is made on the logits: their order is the scores', without the ties of scores
    # that underflow to 0 or round to 1
    top_logits, expert_ids = logits32.topk(top_k, dim=-1)
    if score == "softmax":
        probs = logits32.softmax(-1)  # the top-k sum is at least the top-1 probability, >= 1/E
        weights = probs.gather(-1, expert_ids)
        if renormalize and top_k > 1:
            weights = weights / weights.sum(-1, keepdim=True)
    else:
        # sigmoid(l_i) / sum_j sigmoid(l_j) is softmax_i(logsigmoid(l)): no 0/0 when the sigmoids underflow
        probs = F.logsigmoid(logits32).softmax(-1)  # the normalised scores, for the aux loss
        weights = (F.logsigmoid(top_logits).softmax(-1) if renormalize and top_k > 1
                   else top_logits.sigmoid())
    # aux loss: E * sum_e (fraction of routed slots to e) * (mean router prob of e)
    # counted in fp32, not the default dtype: a bf16 (fp16) default stopped every count at 256 (2048)
    frac = logits32.new_zeros(n_experts).index_add_(0, expert_ids.reshape(-1), logits32.new_ones(expert_ids.numel()))
    frac = frac / expert_ids.numel()
    mean_prob = probs.mean(0)  # each token's scores sum to 1 (softmax, or normalised sigmoids)
    aux = n_experts * (frac * mean_prob).sum()
    z = torch.logsumexp(logits32, -1).pow(2).mean()
    if logits.shape[0] == 0:  # no tokens (e.g. an expert-parallel rank with an empty batch): losses 0, not 0/0
        aux = z = logits32.sum()  # 0, still in the graph: the router's weight gets a zero gradient
    dropped = torch.zeros_like(expert_ids, dtype=torch.bool)
    if capacity is not None:
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # slot order within each expert: token order
        counts = torch.zeros(n_experts, dtype=flat.dtype, device=flat.device).index_add_(
            0, flat, torch.ones_like(flat))  # bincount without its data-dependent output size
        first = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(flat)
        rank[order] = torch.arange(flat.numel(), device=flat.device) - first[flat[order]]
        dropped = (rank >= capacity).view_as(expert_ids)
        expert_ids = expert_ids.masked_fill(dropped, n_experts)
        weights = weights.masked_fill(dropped, 0.0)
    return Routing(expert_ids.to(torch.int32), weights.to(logits.dtype), aux, z, dropped)


def check_x_dtype(x: torch.Tensor, param_dtype: torch.dtype) -> None:
    """x floating point and in the parameters' dtype unless under autocast, else a ValueError naming x
    (the router's nn.Linear would fail with a bare matmul dtype error)."""
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dtype != param_dtype and not torch.is_autocast_enabled(x.device.type):  # autocast casts both, as nn.Linear's
        raise ValueError(f"x is {x.dtype} but the layer's parameters are {param_dtype}: cast one to the other "
                         f"(e.g. layer.to({x.dtype})) or run under torch.autocast")


class Router(nn.Module):
    """The routing part of `MoE` on its own: a bias-free linear projection to [T, n_experts]
    logits, then `route` (top-k, weights, load-balancing and z-losses). Its input x is
    `[tokens, d_model]`, 2-D (flatten any leading dimensions first, e.g.
    `x.reshape(-1, d_model)`, as `MoE` does), floating point and in the router's dtype unless
    under `torch.autocast`: anything else is a `ValueError` naming x. With `capacity_factor`,
    each expert keeps ceil(capacity_factor * tokens * top_k / n_experts) slots of a forward's
    tokens (see `route`'s `capacity`). Returns a `Routing`."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, score: str = "softmax", renormalize: bool = True,
                 capacity_factor: float | None = None):
        super().__init__()
        check_sizes(d_model=d_model, n_experts=n_experts)
        check_top_k(top_k, n_experts)
        check_score(score)
        check_renormalize(renormalize)
        self.proj = nn.Linear(d_model, n_experts, bias=False)
        self.n_experts, self.top_k, self.score, self.renormalize = n_experts, top_k, score, renormalize
        self.capacity_factor = capacity_factor

    @property
    def capacity_factor(self) -> float | None:
        return self._capacity_factor

    @capacity_factor.setter
    def capacity_factor(self, value: float | None) -> None:
        check_capacity_factor(value)
        self._capacity_factor = value
        # its exact decimal form, kept from here: torch.compile(dynamic=True) traces a float attribute as
        # a symbolic float, whose decimal form (repr) cannot be taken (fullgraph failed, else a graph break)
        self._capacity_fraction = None if value is None else exact_factor(value)

    def forward(self, x: torch.Tensor) -> Routing:
        d_model = self.proj.in_features
        if x.dim() != 2 or x.shape[1] != d_model:  # a 3-D x reached `route` as 3-D logits, unexplained
            raise ValueError(f"x must be [tokens, d_model={d_model}] (2-D: flatten leading dimensions first, "
                             f"e.g. x.reshape(-1, {d_model}), as MoE does), got shape {tuple(x.shape)}")
        check_x_dtype(x, self.proj.weight.dtype)
        capacity = None
        if self._capacity_fraction is not None:
            capacity = expert_capacity(x.shape[0], self.top_k, self.n_experts, self._capacity_fraction)
        return route(self.proj(x), self.top_k, self.score, self.renormalize, capacity)
