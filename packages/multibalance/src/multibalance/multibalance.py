"""MultiBalance: per-task gradient magnitudes balanced on the shared representation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from gpukernels_common.checks import check_numbers, check_sizes

from . import factored
from .balance_step import balance_step
from .base import Balancer, _PendingNorms


class MultiBalance(Balancer):
    """Rescale each task's representation gradient toward a target magnitude.

    Per representation j and task t: n_tj = ||g_tj|| (see `norm`), m_tj <- beta*m_tj + (1-beta)*n_tj
    (initialised to the first n_tj), target M_j = max/mean over tasks or one task's m,
    s_tj = relax*M_j/m_tj + (1-relax), and G_j = sum_t w_t*s_tj*g_tj.

    - `norm="batch"`: Frobenius norm of the whole [B, ...] gradient (default).
      `norm="sample"`: mean over samples of each sample's gradient norm.
      Under torch.distributed both are reduced over ranks (sum of squares / sum and count),
      so every rank uses the norms of the global batch and DDP matches one process.
    - `warmup_steps`: plain weighted sum (s = 1) for the first `backward` calls (micro-batches
      under gradient accumulation) while the averages settle.
    - `norm_lag=1`: a step's norms enter the averages one step later, so its scales come from the
      averages through the previous step (the first step uses its own norms). Under
      torch.distributed the norms' sum over ranks then runs during the bottom's backward and the
      next step's forward instead of holding the step: one synchronization point per step, as
      with equal weights. One process and DDP still agree. `norm_lag=0` (default): the step's
      own norms, waited for between the heads' backward and the bottom's.

    Heads that read the representation through a Linear layer of their own (the usual case)
    never form a [B, D] gradient per task, in one process or under DistributedDataParallel: the
    norms and the combination come from the factors dL/dh and the layer's weight
    (`multibalance.factored`; `last_path` says which path the last step took). Other heads take
    the general path.
    """

    def __init__(self, task_names: Sequence[str], *, relax: float = 0.7, beta: float = 0.9, target: str = "max",
                 norm: str = "batch", weights: Mapping[str, float] | None = None, warmup_steps: int = 0,
                 eps: float = 1e-12, norm_lag: int = 0, process_group=None):
        super().__init__(task_names, weights=weights, process_group=process_group)
        # real numbers first: a string failed the range test with a bare TypeError
        check_numbers(0.0, relax=relax, beta=beta)
        if not 0.0 <= relax <= 1.0:
            raise ValueError(f"relax must be in [0, 1], got {relax}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if target not in ("max", "mean") and target not in self.task_names:
            raise ValueError(f"target must be 'max', 'mean' or a task name {self.task_names}, got {target!r}")
        if norm not in ("batch", "sample"):
            raise ValueError(f"norm must be 'batch' or 'sample', got {norm!r}")
        if norm_lag not in (0, 1) or isinstance(norm_lag, bool):
            raise ValueError(f"norm_lag must be 0 or 1, got {norm_lag!r}")
        warmup_steps, = check_sizes(0, warmup_steps=warmup_steps)  # numpy ints too, as Python ints
        # eps bounds the averages below: at 0 a task that does not read a representation (norm 0) got
        # the scale inf there, and inf * 0 made the whole bottom's gradient NaN
        check_numbers(0.0, above=True, eps=eps)
        self.relax, self.beta, self.target, self.norm, self.warmup_steps, self.eps = relax, beta, target, norm, warmup_steps, eps
        self.norm_lag = norm_lag
        self._lagged: _PendingNorms | None = None  # norm_lag=1: the last step's norms, not yet averaged in
        self._ema_started = False  # norm_lag=1: the averages are known to hold a finite step's norms
        self.register_buffer("ema", torch.zeros(0))  # [n_reps, n_tasks], sized on first use
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("scales", torch.ones(0))
        self.register_buffer("lagged_norms", torch.zeros(0))  # `_lagged`, written when a state_dict is taken

    def _norms(self, grads: list[list[torch.Tensor]]) -> _PendingNorms:
        """[n_reps, n_tasks] gradient norms, being reduced over data-parallel ranks; no host sync."""
        n_reps = len(grads[0])
        # float64 if any representation is float64, as the factored path's stacked sums: the first
        # one's dtype alone took a float64 representation's norms to fp32
        dtypes = {factored.compute_dtype(g.dtype) for g in grads[0]}  # fp32 or float64 each
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
        flat = [g if g.dtype == dtype else g.to(dtype) for gt in grads for g in gt]  # task-major
        if self.norm == "batch":
            if flat[0].device.type == "cpu":  # BLAS dot: a quarter of vector_norm's time on a cached tensor
                sums = torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)) for g in flat])
            else:
                sums = torch.stack(torch._foreach_norm(flat)).pow(2)  # one launch for every (task, rep)
            return self._reduce_norms(sums.view(self.num_tasks, n_reps).T)
        else:
            # the sample dimension spelled out: reshape(B, -1) refuses an empty batch ([0, ...])
            per = [g.reshape(g.shape[0], math.prod(g.shape[1:])).norm(dim=1) if g.dim() > 0 else g.abs().reshape(1)
                   for g in flat]
        sums = torch.stack([p.sum() for p in per])
        rows = torch.tensor([float(p.numel()) for p in per], dtype=sums.dtype, device=sums.device)
        return self._reduce_norms(sums.view(self.num_tasks, n_reps).T, rows.view(self.num_tasks, n_reps).T)

    uses_norms_only = True
    _sized_on_first_use = ("ema", "scales", "lagged_norms")

    @property
    def per_sample_norms(self) -> bool:
        return self.norm == "sample"

    def combine(self, grads, losses):
        return self.weighted_sums(grads, self._coefficients_from(self._norms(grads)))

    def _coefficients_from(self, norms: _PendingNorms) -> torch.Tensor:
        if not self.norm_lag or self.ema.shape != norms.shape or not self._averages_started():
            # exact, or the first step (or every step so far overflowed: the averages are NaN): its own norms
            if self._lagged is not None:  # (nn.Module's __setattr__ costs microseconds: not every step)
                self._lagged = None
            return self._balance(norms)
        previous, self._lagged = self._lagged, norms
        # the previous step's norms, summed over ranks during its bottom backward: no wait
        return self._balance(previous)

    def _averages_started(self) -> bool:
        """Whether the moving averages hold a finite step's norms (they are NaN until then: see
        `running_average`). Read from the device until it is true once (from then on they stay
        finite), so a steady run reads it once, on its second step."""
        if not self._ema_started:
            self._ema_started = bool(torch.isfinite(self.ema).all())
        return self._ema_started

    def coefficients(self, norms: torch.Tensor) -> torch.Tensor:
        return self._balance(_PendingNorms.ready(norms))

    def _step_coefficients(self) -> torch.Tensor:
        """This step's coefficients from the averages as they are (no new norms)."""
        return self._balance(None)

    def _balance(self, norms: _PendingNorms | None) -> torch.Tensor:
        """Average `norms` in (if any), count the step, and return the [n_reps, T] coefficients
        (the static weights included); the scales are kept for `backward`'s TaskScales. One
        kernel on a Triton backend (`balance_step`)."""
        values, kind = (None, "none") if norms is None else norms.statistics()
        target = self.target if self.target in ("max", "mean") else self.task_names.index(self.target)
        weights = None
        if not self._unit_weights():
            weights = self.static_weights_on((self.ema if values is None else values).device)
        ema, scales, coeff = balance_step(values, kind, self.ema, self.step, beta=self.beta, relax=self.relax,
                                          eps=self.eps, target=target, warmup_steps=self.warmup_steps, weights=weights)
        # new tensors each step, set without nn.Module's checks: `backward`'s TaskScales keep theirs
        self._buffers["ema"], self._buffers["scales"] = ema, scales
        return coeff

    def _step_scales(self) -> torch.Tensor | None:
        return self.scales[0] if self.scales.numel() else None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pending = self._lagged.result() if self._lagged is not None else self.ema.new_zeros(0)
        self._buffers["lagged_norms"] = pending
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "lagged_norms", torch.zeros(0))  # checkpoints from before norm_lag
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ema_started = False
        self._lagged = _PendingNorms.ready(self.lagged_norms) if self.lagged_norms.numel() else None
