"""Classic multi-task balancers behind the same interface as MultiBalance.

Representation-level by default (gradients w.r.t. the attached representation); PCGrad,
MGDA and MetaBalance become parameter-level (the expensive classic form) when given
`shared_parameters=`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from gpukernels_common.checks import check_numbers

from .base import Balancer
from .combine import weighted_loss
from .naive import running_average


def _flat(grads_t: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1).double() for g in grads_t])


def _ones(n: int) -> torch.Tensor:
    """The scale of a balancer that does not rescale the tasks (on the host: reading it waits for nothing)."""
    return torch.ones(n)


def _finite(new: torch.Tensor, old: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """`new` if every gradient norm is finite, else `old`: a step whose gradients overflowed (a
    GradScaler skips it) leaves a running statistic as it was."""
    return torch.where(torch.isfinite(norms).all(), new, old)


def _global_losses(bal: Balancer, losses) -> torch.Tensor:
    """[T] float64 loss values on the (first) loss's device, where the balancer's state and the
    gradients are (and NCCL all-reduces); under torch.distributed their mean over the ranks (the
    loss of the global batch for per-rank mean losses, the objective DDP's averaged gradients
    descend), the same on every rank."""
    device = losses[0].device
    vals = torch.stack([x.detach().to(device, torch.float64) for x in losses])
    world = bal._world_size()
    return vals if world == 1 else bal._global_sum(vals) / world


def _global_norms(bal: Balancer, grads) -> torch.Tensor:
    """[T] float64 norms of the task gradients; under torch.distributed of the global batch's (the
    gradients of the mean of the ranks' losses: sqrt(sum of the ranks' squares) / ranks), the
    same on every rank."""
    sq = torch.stack([_flat(g).pow(2).sum() for g in grads])
    world = bal._world_size()
    return sq.sqrt() if world == 1 else bal._global_sum(sq).sqrt() / world


def _unflat(vec: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        out.append(vec[i : i + t.numel()].view_as(t).to(t.dtype))
        i += t.numel()
    return out


class EqualWeights(Balancer):
    """Sum of (statically weighted) losses: the baseline every method is compared with."""

    needs_task_grads = False

    def combine(self, grads, losses):  # used only if called directly
        return self.weighted_sums(grads, self.static_weights)

    def _step_scales(self):
        return _ones(self.num_tasks)


class UncertaintyWeighting(Balancer):
    """Kendall et al. 2018: L = sum_t exp(-s_t) * L_t + s_t with learnable s_t = log sigma_t^2.

    Add `balancer.parameters()` to the optimizer.
    """

    needs_task_grads = False

    def __init__(self, task_names: Sequence[str], **kw):
        super().__init__(task_names, **kw)
        self.log_vars = nn.Parameter(torch.zeros(len(self.task_names)))

    def total_loss(self, losses):
        s = self.log_vars
        weights = self.static_weight_list()
        if self._world_size() == 1:
            return sum(w * (torch.exp(-s[t]) * loss + s[t]) for t, (w, loss) in enumerate(zip(weights, losses)))
        # under torch.distributed: the model's gradient from this rank's losses (DDP averages it),
        # s's from the losses' mean over the ranks, so that every rank keeps the same s
        mean = _global_losses(self, losses).tolist()  # one device read for all tasks
        return sum(w * (torch.exp(-s[t].detach()) * loss + s[t] + torch.exp(-s[t]) * mean[t]
                        - torch.exp(-s[t].detach()) * mean[t])
                   for t, (w, loss) in enumerate(zip(weights, losses)))

    def combine(self, grads, losses):
        return self.weighted_sums(grads, torch.exp(-self.log_vars.detach()))

    def _step_scales(self):
        return torch.exp(-self.log_vars.detach())


class GradNorm(Balancer):
    """Chen et al. 2018, on the representation gradient.

    The heads get grad L_t, not w_t grad L_t (as LibMTL's representation-gradient variant; the
    paper trains every parameter on sum_t w_t L_t).

    G_t = w_t*||g_t||; target_t = mean(G) * r_t^alpha with r_t = (L_t/L_t(0)) / mean(L/L(0)).
    The combined gradient uses the current weights (what `backward` returns); then
    w_t <- w_t - lr*sign(G_t - target_t)*||g_t|| (the gradient of sum_t |G_t - target_t| with the
    target held constant), clamped positive and renormalised to sum to the number of tasks. A step
    with a non-finite gradient norm (an overflowing GradScaler step) leaves the weights as they were.
    """

    _sized_on_first_use = ("initial_losses",)

    def __init__(self, task_names: Sequence[str], *, alpha: float = 1.5, lr: float = 0.025, **kw):
        super().__init__(task_names, **kw)
        check_numbers(0.0, alpha=alpha, lr=lr)  # a NaN or negative rate would spread into the weights silently
        self.alpha, self.lr = alpha, lr
        self.register_buffer("task_weights", torch.ones(len(self.task_names), dtype=torch.float64))
        self.register_buffer("initial_losses", torch.zeros(0, dtype=torch.float64))
        self._applied: torch.Tensor | None = None  # the weights the last step used

    def combine(self, grads, losses):
        norms = _global_norms(self, grads)  # before the sum overwrites task 0
        # the state follows the gradients' device (a balancer made on the CPU for a model on a GPU)
        w = self._applied = self.task_weights.to(norms.device, copy=True)
        out = self.weighted_sums(grads, w * self.static_weights_on(w.device).to(w.dtype))
        lvals = _global_losses(self, losses).to(norms.device)
        if self.initial_losses.numel() == 0:
            self.initial_losses = lvals.clone()
        g_w = w * norms
        ratio = lvals / self.initial_losses.to(lvals.device).clamp_min(1e-12)
        target = g_w.mean() * (ratio / ratio.mean()) ** self.alpha
        if not bool(torch.isfinite(norms).all()):  # an overflowing step: keep the weights
            return out
        new = (w - self.lr * torch.sign(g_w - target) * norms).clamp_min(1e-6)
        self.task_weights = new * self.num_tasks / new.sum()
        return out

    def _step_scales(self):
        return self._applied


class PCGrad(Balancer):
    """Yu et al. 2020: project each task gradient off the others it conflicts with, in random order.

    No per-task scalar: `backward` returns 1.0 per task.
    """

    def __init__(self, task_names: Sequence[str], *, seed: int = 0, **kw):
        super().__init__(task_names, **kw)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):  # 1.5 failed in manual_seed, unnamed
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.generator = torch.Generator().manual_seed(int(seed))

    def combine(self, grads, losses):
        # each projected g_i stays a combination of the task gradients, coef[i] @ flat, so every dot
        # product comes from their Gram matrix (summed over ranks under torch.distributed: the
        # projections of the global batch's gradients, up to a common factor)
        flat = torch.stack([_flat(g) * w for g, w in zip(grads, self.static_weight_list())])
        # T x T on the host: the projections below read it entry by entry
        gram = self._global_sum(flat @ flat.T).cpu()
        coef = torch.eye(self.num_tasks, dtype=flat.dtype)
        for i in range(self.num_tasks):
            for j in torch.randperm(self.num_tasks, generator=self.generator).tolist():
                if j == i:
                    continue
                dot = coef[i] @ gram[:, j]
                if dot < 0:
                    coef[i, j] -= dot / gram[j, j].clamp_min(1e-30)
        return _unflat(coef.sum(0).to(flat.device) @ flat, grads[0])

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "generator_state": self.generator.get_state()}

    def set_extra_state(self, state) -> None:
        if isinstance(state, Mapping) and state.get("generator_state") is not None:
            self.generator.set_state(state["generator_state"].cpu())

    def _step_scales(self):
        return _ones(self.num_tasks)


def _affine_min(gram: torch.Tensor, support: list[int]) -> torch.Tensor:
    """Weights (summing to 1) of the min-norm point of the affine hull of the points `support`:
    the bordered system [K_SS 1; 1^T 0] [w; c] = [0; 1], least squares where K_SS is singular."""
    k = len(support)
    system = gram.new_zeros(k + 1, k + 1)
    system[:k, :k] = gram[support][:, support]
    system[:k, k] = system[k, :k] = 1.0
    rhs = gram.new_zeros(k + 1, 1)
    rhs[k] = 1.0
    return torch.linalg.lstsq(system, rhs, driver="gelsd").solution[:k, 0]


def min_norm_weights(gram: torch.Tensor, tol: float = 1e-12) -> torch.Tensor:
    """argmin_{a in simplex} a^T K a (the MGDA sub-problem, Sener & Koltun 2018).

    Two tasks: closed form. More: Wolfe's min-norm-point algorithm (1976) on the Gram matrix, an
    active-set method that ends at the exact minimiser in finitely many steps whatever the
    conditioning (projected gradient stalls when the tasks' gradient norms differ by 100x).
    """
    gram = gram.detach().double().cpu()  # T x T: the active-set steps run on the host
    t = gram.shape[0]
    if t == 1:
        return torch.ones(1, dtype=gram.dtype)
    if not bool(torch.isfinite(gram).all()):  # an overflowing step (a GradScaler skips it): any weights do
        return torch.full((t,), 1.0 / t, dtype=gram.dtype)
    if t == 2:
        g11, g12, g22 = gram[0, 0], gram[0, 1], gram[1, 1]
        denom = g11 - 2 * g12 + g22
        a = torch.tensor(0.5, dtype=gram.dtype) if denom <= 0 else ((g22 - g12) / denom).clamp(0, 1)
        return torch.stack([a, 1 - a])
    scale = float(gram.diagonal().max())
    if scale <= 0.0:  # every gradient is zero: any weights do
        return torch.full((t,), 1.0 / t, dtype=gram.dtype)
    gram = gram / scale  # the weights do not depend on the scale; tolerances are relative to it
    start = int(gram.diagonal().argmin())
    support, a = [start], torch.zeros(t, dtype=gram.dtype)
    a[start] = 1.0
    for _ in range(50 * t):  # major cycles: each adds a point; finite in exact arithmetic
        grad = gram @ a  # <p_j, x> for every point j; x = sum_i a_i p_i
        j = int(grad.argmin())
        if float(grad[j]) >= float(a @ grad) - tol or j in support:  # x is the min-norm point
            break
        support.append(j)
        while True:  # minor cycles: move toward the affine minimiser, dropping points that reach 0
            w = _affine_min(gram, support)
            if bool((w > tol).all()):
                a = torch.zeros_like(a)
                a[support] = w
                break
            current = a[support]
            shrink = (w <= tol) & (current - w > 0)
            theta = float((current[shrink] / (current[shrink] - w[shrink])).min().clamp(0.0, 1.0))
            mixed = current + theta * (w - current)
            keep = [i for i, v in zip(support, mixed.tolist()) if v > tol]
            a = torch.zeros_like(a)
            a[keep] = mixed[[support.index(i) for i in keep]]
            support = keep
            if len(support) == 1:
                a[support] = 1.0
                break
    a = a.clamp_min(0.0)
    return a / a.sum()


class MGDA(Balancer):
    """Multiple-gradient descent: the min-norm convex combination of the task gradients.

    On the representation this is MGDA-UB (Sener & Koltun 2018); with `shared_parameters=`
    it is the original parameter-level MGDA. The combined gradient is sum_t a_t*g_t (a on the simplex).
    """

    _sized_on_first_use = ("alphas",)

    def __init__(self, task_names: Sequence[str], **kw):
        super().__init__(task_names, **kw)
        self.register_buffer("alphas", torch.zeros(0, dtype=torch.float64))

    def combine(self, grads, losses):
        # the statically weighted task gradients w_t g_t; tasks of weight 0 stay out (a_t = 0).
        # Their Gram matrix is summed over ranks under torch.distributed (the weights a do not
        # depend on its scale)
        device = grads[0][0].device
        w = self.static_weights_on(device).double()
        flat = torch.stack([_flat(g) for g in grads]) * w.unsqueeze(1)
        gram = self._global_sum(flat @ flat.T)
        active = [t for t, x in enumerate(self.static_weight_list()) if x != 0.0]
        alphas = torch.zeros(self.num_tasks, dtype=torch.float64)
        if active:
            index = torch.tensor(active)
            alphas[index] = min_norm_weights(gram[index.to(device)][:, index.to(device)])
        self.alphas = alphas
        return _unflat((alphas.to(device).unsqueeze(1) * flat).sum(0), grads[0])

    def _step_scales(self):
        return self.alphas if self.alphas.numel() else None


class DBMTL(Balancer):
    """DB-MTL (Lin et al. 2023), on the representation: log-transformed losses, then each task's
    gradient scaled to the largest moving-average gradient norm.

    Every parameter trains on log(L_t - min_loss_t + eps) (as the official LibMTL DB_MTL does), so
    the heads get grad L_t / (L_t - min_loss_t + eps), and so does the representation: g_t / L_t
    for short. With m_t the EMA of ||g_t/L_t||, the shared bottom gets
    sum_t (max_k m_k / m_t) * g_t/L_t. (The original keeps an EMA of parameter gradients; on a
    representation whose batch changes every step we average its norm instead.) `min_losses`
    (task -> lower bound, default 0) must lie below the losses: `backward` refuses a loss <= its
    bound (the log is undefined there). `backward` returns the factor on each task's gradient,
    (max_k m_k / m_t) / L_t; a non-finite norm (an overflowing GradScaler step) is not averaged in.
    """

    _sized_on_first_use = ("ema",)

    def __init__(self, task_names: Sequence[str], *, beta: float = 0.9, eps: float = 1e-8,
                 min_losses: Mapping[str, float] | None = None, **kw):
        super().__init__(task_names, **kw)
        check_numbers(0.0, eps=eps)
        if not 0.0 <= beta < 1.0:  # as MultiBalance's: at beta >= 1 the average never follows the norms
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.beta, self.eps = beta, eps
        self._set_min_losses(min_losses)
        self.register_buffer("ema", torch.zeros(0, dtype=torch.float64))
        self._applied: torch.Tensor | None = None
        self._log_denominators: torch.Tensor | None = None  # this step's L_t - min_loss_t + eps

    def _differentiated_losses(self, losses):
        # log(L - m + eps) through its gradient, grad L / (L - m + eps), with the loss values of
        # the global batch under torch.distributed (see _global_losses): DDP's average of the ranks'
        # head gradients is then one process's
        lvals = _global_losses(self, losses)
        lvals = lvals - self.min_loss_values.to(lvals.device) + self.eps
        self._log_denominators = lvals
        return [loss / v.to(loss.dtype) for loss, v in zip(losses, lvals.unbind())]  # v: a constant of the backward

    def combine(self, grads, losses):
        # the grads are already those of the log losses (see _differentiated_losses)
        norms = _global_norms(self, grads)
        self.ema = running_average(self.ema, norms, self.beta)
        scale = self.ema.max() / self.ema.clamp_min(1e-30)
        self._applied = scale / self._log_denominators.to(scale.device)
        return self.weighted_sums(grads, scale * self.static_weights_on(scale.device).double())

    def _step_scales(self):
        return self._applied


class FAMO(Balancer):
    """FAMO (Liu et al. 2023): fast adaptive multitask optimisation, O(1) in the number of tasks.

    Backward uses weights c_t = (z_t/L_t) / sum_k (z_k/L_k) with z = softmax(xi) on the losses
    (no per-task gradients). After the optimizer step call `update(new_losses)` with the losses
    on the same batch: delta_t = log L_t(before) - log L_t(after), and the logits xi take one step
    of Adam (the update of `torch.optim.Adam(lr=lr, weight_decay=gamma)`, as the official code
    Cranial-XIX/FAMO does; its moments are buffers, in the state_dict) on the gradient
    J_softmax(xi)^T delta. Defaults as the official code: lr 0.025, gamma 0.01. Under
    torch.distributed the loss values are averaged over the ranks, so every rank keeps the same
    logits. `backward` returns the c_t it used.

    L_t stands for L_t - min_loss_t throughout (`min_losses`, task -> lower bound, default 0, as the
    official code's): `backward` and `update` refuse a loss <= its bound. The official code's
    clipping of the shared gradients to norm 1.0 is left to the caller.
    """

    needs_task_grads = False
    _sized_on_first_use = ("prev_losses",)
    #: Adam's defaults (torch.optim.Adam)
    adam_betas, adam_eps = (0.9, 0.999), 1e-8

    def __init__(self, task_names: Sequence[str], *, lr: float = 0.025, gamma: float = 0.01, eps: float = 1e-8,
                 min_losses: Mapping[str, float] | None = None, **kw):
        super().__init__(task_names, **kw)
        check_numbers(0.0, lr=lr, gamma=gamma, eps=eps)  # NaN logits otherwise, from the first update()
        self.lr, self.gamma, self.eps = lr, gamma, eps
        self._set_min_losses(min_losses)
        n = len(self.task_names)
        self.register_buffer("logits", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("prev_losses", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.float64))
        self.register_buffer("adam_exp_avg", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("adam_exp_avg_sq", torch.zeros(n, dtype=torch.float64))
        self._applied: torch.Tensor | None = None

    def weights(self, loss_values: torch.Tensor) -> torch.Tensor:
        z = torch.softmax(self.logits, 0)
        c = z / (loss_values - self.min_loss_values.to(loss_values.device) + self.eps)
        return c / c.sum()

    def total_loss(self, losses):
        vals = _global_losses(self, losses).to(self.logits.device)
        self.prev_losses = vals
        self._applied = self.weights(vals)
        # one device read for all tasks (a read per task would wait for a GPU once per task); the
        # weights stay Python floats, constants of the backward as before
        c = (self._applied * self.static_weights.to(self._applied.device, torch.float64)).tolist()
        return weighted_loss(losses, c)

    def combine(self, grads, losses):
        c = self._applied = self.weights(_global_losses(self, losses).to(self.logits.device))
        return self.weighted_sums(grads, c)

    def _step_scales(self):
        return self._applied

    def update(self, new_losses) -> None:
        if self.prev_losses.numel() == 0:
            raise RuntimeError("FAMO.update() needs a backward() first")
        new = _global_losses(self, self._ordered_losses(new_losses)).to(self.logits.device)
        floors = self.min_loss_values.to(new.device)
        delta = (self.prev_losses - floors + self.eps).log() - (new - floors + self.eps).log()
        z = torch.softmax(self.logits, 0)
        grad = z * (delta - (z * delta).sum())  # J^T delta for J = diag(z) - z z^T
        # torch.optim.Adam's step (weight decay as an L2 term on the gradient)
        beta1, beta2 = self.adam_betas
        grad = grad + self.gamma * self.logits
        self.adam_step.add_(1)
        self.adam_exp_avg.lerp_(grad, 1 - beta1)
        self.adam_exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = float(self.adam_step)
        denom = (self.adam_exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(self.adam_eps)
        self.logits.addcdiv_(self.adam_exp_avg, denom, value=-self.lr / (1 - beta1**step))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the Adam update: fresh moments
        state_dict.setdefault(prefix + "adam_step", torch.zeros((), dtype=torch.float64))
        for name in ("adam_exp_avg", "adam_exp_avg_sq"):
            state_dict.setdefault(prefix + name, torch.zeros(self.num_tasks, dtype=torch.float64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MetaBalance(Balancer):
    """MetaBalance (He et al. 2022) on shared parameters: per parameter tensor, every task's
    gradient is moved toward the target task's moving-average magnitude.

    m_tp <- beta*m_tp + (1-beta)*||g_tp|| (from zero); g_tp <- relax*(m_0p/m_tp)*g_tp + (1-relax)*g_tp.
    Needs `shared_parameters=`; task `target` (default the first) is left unchanged. `backward`
    returns the scales of the first shared parameter tensor (as MultiBalance those of its first
    representation); a non-finite norm (an overflowing GradScaler step) is not averaged in.
    """

    def __init__(self, task_names: Sequence[str], *, shared_parameters, relax: float = 0.7, beta: float = 0.9,
                 target: str | None = None, weights: Mapping[str, float] | None = None, process_group=None):
        super().__init__(task_names, weights=weights, shared_parameters=shared_parameters, process_group=process_group)
        if not self.shared_parameters:
            raise ValueError("MetaBalance needs shared_parameters (a non-empty list of the shared bottom's parameters)")
        if not 0.0 <= relax < 1.0 or not 0.0 <= beta < 1.0:
            raise ValueError(f"relax and beta must be in [0, 1), got relax={relax}, beta={beta}")
        target = target or self.task_names[0]
        if target not in self.task_names:
            raise ValueError(f"target {target!r} is not one of {self.task_names}")
        self.relax, self.beta, self.target_index = relax, beta, self.task_names.index(target)
        self.register_buffer("ema", torch.zeros(len(self.shared_parameters), len(self.task_names), dtype=torch.float64))
        self._applied: torch.Tensor | None = None

    def combine(self, grads, losses):
        norms = torch.stack([torch.stack([grads[t][p].double().norm() for t in range(self.num_tasks)])
                             for p in range(len(self.shared_parameters))])  # [P, T]
        ema = self.ema.to(norms.device)  # the state follows the gradients' device, as the other balancers'
        self.ema = _finite(self.beta * ema + (1 - self.beta) * norms, ema, norms)
        m = self.ema.clamp_min(1e-30)
        scales = self.relax * m[:, self.target_index: self.target_index + 1] / m + (1 - self.relax)
        self._applied = scales[0]
        return self.weighted_sums(grads, scales * self.static_weights_on(scales.device).to(scales.dtype))

    def _step_scales(self):
        return self._applied
