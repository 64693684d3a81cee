"""Per-sample cost models: cost(L) = a*L + b*L^2 (HSTU-style attention is quadratic in length)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gpukernels_common.checks import check_sizes


class CostModel:
    """cost(L) = a*L + b*L^2 in arbitrary units (FLOPs from the model shape, or seconds when fitted)."""

    def __init__(self, a: float = 1.0, b: float = 0.0):
        for name, value in (("a", a), ("b", b)):
            try:
                finite = not isinstance(value, (bool, str)) and math.isfinite(float(value))
            except (TypeError, ValueError):
                finite = False
            if not finite:
                raise ValueError(f"cost coefficient {name} must be a finite real number, got {value!r}")
        a, b = float(a), float(b)
        if a < 0 or b < 0 or (a == 0 and b == 0):
            raise ValueError(f"cost coefficients must be non-negative and not both zero, got a={a}, b={b}")
        self.a, self.b = float(a), float(b)

    @classmethod
    def from_model_shape(cls, d_model: int, n_heads: int, n_layers: int, d_ff: int | None = None) -> CostModel:
        """Forward+backward FLOPs per token (linear part) and per token pair (attention part).

        Per layer and token: projections ~ 2*(4*d^2) (U, V, Q, K) + output 2*d^2, feed-forward
        2*2*d*d_ff; attention ~ 2*2*d per token pair (scores and weighted sum). x3 for backward.
        """
        check_sizes(d_model=d_model, n_heads=n_heads, n_layers=n_layers)
        d_ff = check_sizes(0, d_ff=d_ff)[0] if d_ff is not None else 4 * d_model  # 0: no feed-forward
        linear = n_layers * (10 * d_model * d_model + 4 * d_model * d_ff) * 3
        quadratic = n_layers * 4 * d_model * 3
        return cls(a=linear, b=quadratic)

    def __call__(self, lengths) -> torch.Tensor:
        lengths = torch.as_tensor(lengths, dtype=torch.float64)
        if lengths.numel() and not bool((lengths >= 0).all()):  # a*L + b*L^2 is positive again below -a/b
            raise ValueError(f"CostModel: lengths must be non-negative (and not NaN), got min {float(lengths.min())}")
        return self.a * lengths + self.b * lengths * lengths

    def fit(self, rank_lengths: Sequence[Sequence[int]], step_times: Sequence[float]) -> CostModel:
        """Least-squares fit of (a, b) >= 0 from measured per-rank step times:
        time_r = a*sum(L) + b*sum(L^2). Costs cannot be negative, so the fit is constrained: where
        the unconstrained optimum has a negative coefficient, the best fit with that one at zero."""
        if len(rank_lengths) != len(step_times) or len(step_times) < 2:
            raise ValueError("fit needs at least two (lengths, time) observations of equal count")
        # each length checked, not the per-rank sums: [-1, 5] summed to 4 and squared to 26, and a
        # fractional length was truncated in the squares only
        x = torch.tensor([_sums(r, ls) for r, ls in enumerate(rank_lengths)], dtype=torch.float64)
        y = torch.tensor(list(step_times), dtype=torch.float64).unsqueeze(1)
        if not torch.isfinite(y).all():  # lstsq would fail with an internal assert
            raise ValueError(f"fit: step_times must be finite, got {[float(t) for t in step_times]}")
        if not torch.isfinite(x).all():
            raise ValueError("fit: rank_lengths must hold finite, non-negative lengths")
        coef = _nonnegative_least_squares(x, y.squeeze(1))
        if float(coef.sum()) == 0:
            raise ValueError("fitted cost is zero everywhere: step times do not grow with length")
        self.a, self.b = float(coef[0]), float(coef[1])
        return self

    def __repr__(self) -> str:
        return f"CostModel(a={self.a:.4g}, b={self.b:.4g})"


def _sums(rank: int, lengths: Sequence[int]) -> list[float]:
    """[sum(L), sum(L^2)] of one rank's lengths for `CostModel.fit`; a ValueError naming
    `rank_lengths[rank]` for a length that is not a non-negative integer count."""
    counts = []
    for v in lengths:
        try:
            count = float(v)
        except (TypeError, ValueError):
            count = math.nan
        if not (math.isfinite(count) and count >= 0 and count == int(count)):
            raise ValueError(f"fit: rank_lengths[{rank}] must hold non-negative integer lengths, got {v!r}")
        counts.append(int(count))
    return [float(sum(counts)), float(sum(c * c for c in counts))]


def check_lengths(lengths, name: str = "lengths") -> torch.Tensor:
    """`lengths` (one per sample) as a 1-D int64 tensor of non-negative counts; a ValueError
    naming `name` and what it got otherwise."""
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one length per sample), got shape {tuple(lengths.shape)}")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        if lengths.numel() or lengths.dtype == torch.bool:  # torch.as_tensor([]) is float32: an empty batch
            raise ValueError(f"{name} must be integer counts of positions, got dtype {lengths.dtype}")
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"{name} must be non-negative, got {int(lengths.min())}")
    return lengths.to(torch.long)


def _nonnegative_least_squares(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """argmin ||x c - y|| over c >= 0 for two columns: the unconstrained optimum when it is
    non-negative, else (the problem is convex) the better of the two one-column fits, each
    clamped at zero. Clamping the unconstrained optimum instead leaves the other coefficient
    fitted for a term that was dropped."""
    coef = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    if (coef >= 0).all():
        return coef
    best, best_residual = torch.zeros(2, dtype=x.dtype), float(y.square().sum())
    for j in range(2):
        norm = float(x[:, j].square().sum())
        if norm == 0:
            continue
        c = torch.zeros(2, dtype=x.dtype)
        c[j] = max(float(x[:, j] @ y) / norm, 0.0)
        residual = float((x @ c - y).square().sum())
        if residual < best_residual:
            best, best_residual = c, residual
    return best
