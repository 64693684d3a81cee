"""The interface every balancer shares: attach the shared representation(s), then backward once.

    balancer = multibalance.MultiBalance(["like", "love"], relax=0.7, beta=0.9, target="max")
    rep = balancer.attach(shared(x))                 # heads read `rep`
    losses = {"like": bce(head_like(rep), y1), "love": bce(head_love(rep), y2)}
    balancer.backward(losses)                        # one backward through the shared bottom
    optimizer.step()

Representation-level balancers differentiate each task loss only down to the representation
(head-only backward passes, or for heads that open with a Linear layer only the factors of
those gradients, see `multibalance.factored`), combine the per-task representation gradients
and run ONE backward through the shared bottom. Under DistributedDataParallel every parameter
still gets its gradient once and is all-reduced once: DDP reduces a bucket when all of its
parameters have their gradients and finishes when the last bucket is reduced, whichever
backward call that happens in (the bottom's, the last one of the step).
Parameter-level balancers
(`shared_parameters=` given) take per-task gradients of the shared parameters instead: the
expensive classic path, kept for comparison.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import factored
from .combine import weighted_loss, weighted_sum
from .naive import _all_finite, norms_from


class TaskScales(Mapping):
    """One step's scale factor per task, as `Balancer.backward` returns it: a read-only mapping
    whose values stay on the device until first read (then one read for all tasks), so a
    training loop that does not log them never waits for the device."""

    __slots__ = ("_names", "_values", "_floats")

    def __init__(self, names: list[str], values: torch.Tensor | None):
        self._names, self._values, self._floats = names, values, None

    def _read(self) -> dict[str, float]:
        if self._floats is None:
            self._floats = {} if self._values is None else dict(zip(self._names, self._values.tolist()))
        return self._floats

    def __getitem__(self, name: str) -> float:
        return self._read()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())

    def __repr__(self) -> str:
        return f"TaskScales({self._read()!r})"


def _with_aux(roots: list, grads: list, aux: torch.Tensor | None) -> tuple[list, list]:
    """The backward's roots and their gradients, with the aux_loss (if any) joined as one more
    root: its gradient reaches the bottom in the same backward (one gradient per parameter)."""
    return (roots, grads) if aux is None else (roots + [aux], grads + [None])


class _PendingNorms:
    """Norm statistics being summed over data-parallel ranks (`work` in flight, or None in one
    process); `result()` waits for them (once) and returns the [n_reps, T] norms."""

    __slots__ = ("stats", "work", "per_sample", "norms")

    def __init__(self, stats: torch.Tensor | None, work, per_sample: bool, norms: torch.Tensor | None = None):
        self.stats, self.work, self.per_sample, self.norms = stats, work, per_sample, norms

    @classmethod
    def ready(cls, norms: torch.Tensor) -> _PendingNorms:
        return cls(None, None, False, norms)

    @property
    def shape(self) -> torch.Size:
        return self.norms.shape if self.norms is not None else self.stats.shape[-2:]

    def result(self) -> torch.Tensor:
        if self.norms is None:
            self.norms = norms_from(*self.statistics())
        return self.norms

    def statistics(self) -> tuple[torch.Tensor, str]:
        """The summed statistics once reduced and what they are (a `balance_step` kind): the
        norms, sums of squares, or per-sample norm sums stacked on their row counts."""
        if self.norms is not None:
            return self.norms, "norms"
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.stats, "per_sample" if self.per_sample else "squares"


class Balancer(nn.Module, abc.ABC):
    """Base class. Subclasses implement `combine(grads, losses)`.

    `grads[t][j]` is task t's gradient w.r.t. target j (a representation, or a shared
    parameter for parameter-level balancers); `combine` returns one gradient per target.
    """

    #: whether this balancer needs per-task gradients at all (equal weights / uncertainty don't)
    needs_task_grads = True
    #: whether `coefficients(norms)` alone decides the combination (then heads that open with a
    #: Linear layer take the factored path, see `multibalance.factored`)
    uses_norms_only = False
    #: whether `coefficients` expects the mean per-sample norm rather than the batch norm
    per_sample_norms = False
    #: per task, the lower bound L_t must stay above (balancers that take log(L_t - min_loss), as
    #: FAMO and DBMTL: their `min_losses=` option); None: any finite loss is accepted
    min_losses: list[float] | None = None
    #: buffers sized on first use ([..., T]): `load_state_dict` gives them the checkpoint's shape
    _sized_on_first_use: tuple[str, ...] = ()

    def __init__(self, task_names: Sequence[str], *, weights: Mapping[str, float] | None = None,
                 shared_parameters=None, process_group=None):
        super().__init__()
        if isinstance(task_names, str):  # list("like") would make four one-letter tasks
            raise ValueError(f"task_names must be a sequence of task names, got the string {task_names!r} "
                             f"(for one task: [{task_names!r}])")
        names = list(task_names)
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"task_names must be distinct non-empty strings, got {task_names!r}")
        self.task_names = names
        # not saved: a constructor option, as relax or target (a checkpoint's weights silently
        # replaced those given to the constructor of a resumed run)
        self.register_buffer("static_weights", torch.tensor(self._per_task_floats("weights", weights, 1.0)),
                             persistent=False)
        self.shared_parameters = list(shared_parameters) if shared_parameters is not None else None
        self.process_group = process_group
        self._reps: list[torch.Tensor] = []
        self._leaves: list[torch.Tensor] = []
        self._calls: list[int] = []  # representations per attach() call since the last backward (`_drop_unread`)
        # "factored" or "general": how the last backward took the task gradients; "" before the first
        # backward and for the balancers that take none (equal weights, uncertainty weighting)
        self.last_path = ""
        self._static: tuple | None = None  # (tensor, version, derived): see `_static_state`
        self._wiring_checked = False  # see `_check_reads_representation`
        self._constants: dict = {}  # see `_constant`

    def _apply(self, fn, recurse=True):
        """The buffers (running statistics, static weights) move with `.to()`/`.cuda()` but keep
        their dtype: a model that holds the balancer may be cast as a whole (`model.bfloat16()`),
        and cast averages failed against the steps' fp32/float64 norms."""
        before = {name: buf for name, buf in self._buffers.items() if buf is not None}
        out = super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers.get(name)
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return out

    def _per_task_floats(self, arg: str, values, default: float) -> list[float]:
        """A mapping from task name to a finite float (`weights=`, `min_losses=`), as one float per
        task in task order (`default` for the tasks it leaves out)."""
        if values is None:
            return [default] * self.num_tasks
        if not isinstance(values, Mapping):  # a list or tensor would be matched to tasks by position, silently
            raise ValueError(f"{arg} must be a mapping from task name to a float (e.g. {{{self.task_names[0]!r}: 1.0}}), "
                             f"got {type(values).__name__}")
        unknown = set(values) - set(self.task_names)
        if unknown:
            raise ValueError(f"{arg} names unknown tasks {sorted(unknown)}; tasks are {self.task_names}")
        try:
            floats = {n: float(v) for n, v in values.items()}
        except (TypeError, ValueError):
            floats = {}
        if len(floats) != len(values) or not all(math.isfinite(v) for v in floats.values()):
            raise ValueError(f"{arg} must be finite numbers, got {dict(values)}")
        return [floats.get(n, default) for n in self.task_names]

    def _set_min_losses(self, min_losses) -> None:
        """The `min_losses=` option of the balancers that take log(L - min_loss) (FAMO, DBMTL): the
        floats for the loss check, and as a float64 buffer that moves with the module (not saved:
        a constructor option), so a step subtracts them without building a tensor."""
        self.min_losses = self._per_task_floats("min_losses", min_losses, 0.0)
        self.register_buffer("min_loss_values", torch.tensor(self.min_losses, dtype=torch.float64), persistent=False)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def parameter_level(self) -> bool:
        return self.shared_parameters is not None

    # -- representation bookkeeping ------------------------------------------------------
    def attach(self, *reps: torch.Tensor):
        """Register the shared representation(s); returns what the task heads must read.

        Representation-level: detached leaves (so per-task gradients stop there).
        Parameter-level: the tensors unchanged.
        Calls before one `backward()` add up: a bottom run twice in a step (a pairwise or
        siamese model) attaches each output, and the next `backward()` balances them all. A step
        that attaches but will not reach `backward()` (a skipped step, e.g. a non-finite loss, or
        one that raised) should call `discard()`; otherwise the next `backward()` drops, with a
        warning, the attachments of the attach() calls before the first one a task's loss reads
        (EqualWeights, UncertaintyWeighting and
        the parameter-level forms never back-propagate the attachments: they drop them unused).
        Under torch.distributed every rank attaches the same number of representations in a step:
        MultiBalance sums the [n_reps, T] norms over ranks, and ranks of different counts wait in
        that all-reduce until the group's timeout (or gloo aborts a process on the size mismatch).
        """
        if not reps:
            raise ValueError("attach() needs at least one representation tensor")
        for i, r in enumerate(reps):
            if not isinstance(r, torch.Tensor) or not r.requires_grad:
                # under no_grad the bottom's output is the right tensor: say why it is refused
                why = ("; gradients are disabled here (torch.no_grad() or inference_mode(), as in evaluation): attach() "
                       "is for training steps, evaluation heads read the bottom's output directly"
                       if isinstance(r, torch.Tensor) and not torch.is_grad_enabled() else "")
                got = "a tensor with requires_grad=False" if isinstance(r, torch.Tensor) else type(r).__name__
                raise ValueError(f"representation {i} must be a tensor that requires grad (the shared bottom's "
                                 f"output), got {got}{why}")
        if self.parameter_level or not self.needs_task_grads:
            leaves = list(reps)
        else:
            leaves = [r.detach().requires_grad_(True) for r in reps]
        self._reps += reps
        self._leaves += leaves
        self._calls.append(len(leaves))
        return leaves[0] if len(reps) == 1 else tuple(leaves)

    def discard(self) -> None:
        """Drop the representations attached since the last `backward()`, without a backward: for a
        step that attached but is skipped (a non-finite loss) or raised. The running statistics
        are kept. Also frees the step's graph, which the attachments keep alive."""
        self._reps, self._leaves, self._calls = [], [], []

    def _drop_unread(self, losses: list[torch.Tensor]) -> None:
        """Drop, with a warning, the attachments left by an earlier step that never reached
        `backward()`: the attach() calls before the first call one of whose representations a
        task's loss reads (attach() cannot tell them from a second attach of the same step; the
        losses can, and an earlier step's calls all come before this step's). Back-propagating
        them mixed that step's graph into this one, and the extra representation restarted
        MultiBalance's averages, silently. A representation of this step that no loss reads (a
        head that reads it only for some batches) is kept, with a zero gradient, as before: dropped,
        it changed the number of representations from step to step (restarting the averages) and,
        under torch.distributed, on some ranks only (their norms' all-reduce then hung)."""
        read = factored.leaves_read(losses, self._leaves)
        if all(read) or not any(read):  # none read: the losses' own check names the task
            return
        first, start = read.index(True), 0
        for size in self._calls:  # the start of the attach() call holding the first read representation
            if start + size > first:
                break
            start += size
        if start == 0:
            return
        stale = list(range(start))
        warnings.warn(f"{type(self).__name__}.backward: attached representation(s) {stale} (of {len(read)}) are read "
                      f"by no task's loss and were dropped, not back-propagated: left by a step that attached but "
                      f"never reached backward() (it raised or was skipped)? Call balancer.discard() in such a step.",
                      RuntimeWarning, stacklevel=3)
        self._reps, self._leaves, self._calls = self._reps[start:], self._leaves[start:], []

    def _ordered_losses(self, losses) -> list[torch.Tensor]:
        if isinstance(losses, Mapping):
            unknown = set(losses) - set(self.task_names)
            missing = set(self.task_names) - set(losses)
            if unknown or missing:
                raise ValueError(f"losses: unknown tasks {sorted(unknown)}, missing tasks {sorted(missing)}; "
                                 f"expected {self.task_names}")
            out = [losses[n] for n in self.task_names]
        else:
            out = list(losses)
            if len(out) != self.num_tasks:
                raise ValueError(f"losses: expected {self.num_tasks} losses ({self.task_names}), got {len(out)}")
        for name, loss in zip(self.task_names, out):
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"loss {name!r} must be a scalar tensor (0-d, e.g. a mean over the batch), got {got}")
        # finite, and above the lower bounds of balancers that take log(L - min_loss): one device
        # read for all tasks (a read per loss would wait for a GPU once per task)
        floors = self.min_losses

        def valid(values: torch.Tensor, floor) -> torch.Tensor:
            ok = torch.isfinite(values)
            return ok if floor is None else ok & (values > torch.as_tensor(floor, dtype=values.dtype, device=values.device))

        if len({loss.device for loss in out}) == 1:
            with torch.no_grad():  # one stack and one cast for all tasks, not a detach and a cast per loss
                values = torch.stack(out).double()  # (stack promotes mixed dtypes to one that holds each exactly)
            if floors is None:
                good = bool(_all_finite(values))
            else:
                good = bool(valid(values, floors).all())
        else:
            good = all(bool(valid(loss.detach().double(), None if floors is None else floors[t])) for t, loss in enumerate(out))
        if not good:
            for t, (name, loss) in enumerate(zip(self.task_names, out)):
                value = loss.item()
                if not math.isfinite(value):
                    raise ValueError(f"loss {name!r} is not finite ({value})")
                if floors is not None and not value > floors[t]:
                    raise ValueError(
                        f"loss {name!r} is {value}, not above its lower bound min_losses[{name!r}] = {floors[t]}: "
                        f"{type(self).__name__} works on log(L - min_loss), defined only for L > min_loss; pass "
                        f"min_losses={{{name!r}: m}} with m a bound the loss stays above (e.g. its known minimum "
                        f"minus a small margin)")
        return out

    def _task_grads(self, losses: list[torch.Tensor]) -> tuple[list[list[torch.Tensor]], list[bool]]:
        """Per-task gradients w.r.t. the targets (the leaves, or the shared parameters: zeros for
        frozen ones), without touching any `.grad`, and per target whether any task reached it. A
        task of static weight 0 counts as zero, as in `_head_backward_per_task` (the same
        statistics in one process and under DDP)."""
        targets = self.shared_parameters if self.parameter_level else self._leaves  # leaves always require grad
        live = [j for j, t in enumerate(targets) if t.requires_grad]  # autograd.grad refuses frozen tensors
        if self.parameter_level and not live:
            raise ValueError("shared_parameters: every shared parameter is frozen (requires_grad=False); "
                             "nothing is left to balance")
        grads, reached = [], [False] * len(targets)
        for name, loss, w in zip(self.task_names, losses, self.static_weight_list()):
            got = torch.autograd.grad(loss, [targets[j] for j in live], retain_graph=True, allow_unused=True)
            if all(x is None for x in got):
                self._missing_dependency(name)
            g = [None] * len(targets)
            for j, x in zip(live, got):
                g[j] = x
                reached[j] = reached[j] or x is not None
            grads.append([torch.zeros_like(t) if x is None or w == 0.0 else x for x, t in zip(g, targets)])
        return grads, reached

    def _head_backward_per_task(self, losses: list[torch.Tensor]) -> tuple[list[list[torch.Tensor]], list[bool]]:
        """Each task's head backward runs once: it accumulates the head's parameter gradients
        (weighted by the static weight) and leaves the task's representation gradient on the leaves.
        A task of static weight 0 trains nothing (its head gets zero gradients, as with equal
        weights) and its representation gradient counts as zero."""
        leaf_ids = {id(leaf) for leaf in self._leaves}
        for name, loss in zip(self.task_names, losses):  # before any backward: an error leaves no gradient behind
            if not factored.reaches(loss, leaf_ids):
                self._missing_dependency(name)
        grads = []
        for t, (loss, w) in enumerate(zip(losses, self.static_weight_list())):
            for leaf in self._leaves:
                leaf.grad = None
            retain = t < len(losses) - 1
            if w == 0.0:
                loss.backward(torch.zeros_like(loss), retain_graph=retain)
                grads.append([torch.zeros_like(leaf) for leaf in self._leaves])
                continue
            loss.backward(None if w == 1.0 else torch.full((), w, dtype=loss.dtype, device=loss.device), retain_graph=retain)
            if w == 1.0:
                grads.append([torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for leaf in self._leaves])
            else:
                grads.append([torch.zeros_like(leaf) if leaf.grad is None else leaf.grad / w for leaf in self._leaves])
        for leaf in self._leaves:
            leaf.grad = None
        return grads, [True] * len(self._leaves)

    def _static_state(self) -> dict:
        """What the steps derive from `static_weights`: their floats and their copies on the steps'
        devices, made once (reading or copying a device tensor waits for the device), remade when
        `load_state_dict` or `.to()` changes the weights."""
        w = self.static_weights
        if self._static is None or self._static[0] is not w or self._static[1] != w._version:
            floats = w.tolist()
            self._static = (w, w._version, {"floats": floats, "unit": all(x == 1.0 for x in floats)})
        return self._static[2]

    def static_weight_list(self) -> list[float]:
        """The static weights as floats."""
        return self._static_state()["floats"]

    def _unit_weights(self) -> bool:
        """Whether every static weight is 1 (the usual case, where the steps skip their small ops)."""
        return self._static_state()["unit"]

    def _constant(self, value, like: torch.Tensor) -> torch.Tensor:
        """`value` (a float, or nested tuples of them) as a tensor of `like`'s dtype and device,
        made once: made every step it would be an op, and on a GPU a copy from the host. Not to be
        modified in place."""
        key = (value, like.dtype, like.device)
        constant = self._constants.get(key)
        if constant is None:
            if len(self._constants) >= 64:  # e.g. per-sample row counts of ever new batch sizes: bounded
                self._constants.clear()
            constant = self._constants[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
        return constant

    def static_weights_on(self, device) -> torch.Tensor:
        """The static weights on `device`."""
        state, device = self._static_state(), torch.device(device)
        if device not in state:
            state[device] = self.static_weights.to(device)
        return state[device]

    def _missing_dependency(self, name: str):
        what = "the shared parameters" if self.parameter_level else "the attached representation"
        raise ValueError(f"loss {name!r} does not depend on {what}; did the head read the tensor attach() returned?")

    @staticmethod
    def _data_parallel() -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _world_size(self) -> int:
        """The number of data-parallel ranks in the balancer's process group (1 without torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.process_group)
        return 1

    def _global_sum(self, stats: torch.Tensor) -> torch.Tensor:
        """`stats` summed over the process group's ranks (a copy; `stats` itself in one process).
        For the baselines' small statistics (loss values, gradient norms, Gram matrices), so that
        every rank takes the decision one process would take on the global batch."""
        if self._world_size() > 1:
            stats = stats.clone()
            dist.all_reduce(stats, group=self.process_group)
        return stats

    def _check_distributed(self) -> None:
        """Parameter-level balancers overwrite each shared parameter's gradient with a combination
        of this rank's per-task parameter gradients: under DDP the ranks would silently diverge."""
        if self.parameter_level and self._world_size() > 1:
            raise RuntimeError(
                f"{type(self).__name__} with shared_parameters= (the parameter-level form) does not support "
                f"torch.distributed with world size {self._world_size()}: it combines every task's full gradient "
                f"of the shared parameters on each rank, so the ranks would diverge. Under DDP use MultiBalance, "
                f"EqualWeights, UncertaintyWeighting, GradNorm, PCGrad, MGDA, DBMTL or FAMO on the attached "
                f"representation (without shared_parameters=).")

    def _check_reads_representation(self, losses: list[torch.Tensor], reps: list[torch.Tensor]) -> None:
        """For the balancers that do not detach the representation: every loss depends on what
        `attach` returned, checked before the first backward (a model's wiring does not change
        between steps, and the walk would cost these baselines, equal weights among them, time
        that the overhead benchmarks would then credit to MultiBalance)."""
        if self._wiring_checked:
            return
        for name, loss in zip(self.task_names, losses):
            if not factored.depends_on(loss, reps):
                self._missing_dependency(name)
        self._wiring_checked = True

    # -- the step ----------------------------------------------------------------------
    def backward(self, losses, *, scaler=None, aux_loss: torch.Tensor | None = None) -> TaskScales:
        """Balance and run the backward. Returns this step's per-task scale factors (for logging;
        read from the device only when looked at).

        Representation level: the heads' backward (their parameter gradients plus each task's
        representation gradient, or its factors), then one backward through the shared bottom.
        Under torch.distributed (world > 1) the norms are summed over ranks between the two;
        the general path then takes the task gradients with `autograd.grad` and runs the heads'
        and the bottom's backward in one call, so that a layer two heads share still gets its
        gradient once.

        With a `torch.amp.GradScaler`, pass the unscaled losses and the scaler, then call
        `scaler.step(optimizer)` and `scaler.update()` as usual: gradients are taken of the
        scaled losses (`scaler.scale`), norms are divided by the scale before they enter any
        running statistic, and a step whose gradients overflow (which the scaler skips) leaves
        the running statistics as they were.

        `aux_loss`: a 0-d loss of the shared bottom alone (a regulariser such as an MoE layer's
        load-balancing loss), added to the objective unbalanced: its gradient joins the bottom's
        one backward (one gradient per parameter, as DDP needs). Adding it to a task's loss instead
        is refused (the head's backward would run into the bottom).
        """
        if not self._reps:
            raise RuntimeError("call attach() on the shared representation before backward()")
        try:  # this step's attachments end here, also when a check below refuses the losses
            losses = self._ordered_losses(losses)
            if len(self._leaves) > 1 and self.needs_task_grads and not self.parameter_level:
                # only where the representations are back-propagated (the others' stale
                # attachments are dropped below unused); one representation cannot be stale
                self._drop_unread(losses)
            reps = self._reps
            if aux_loss is not None and not (isinstance(aux_loss, torch.Tensor) and aux_loss.dim() == 0
                                             and aux_loss.requires_grad):
                got = (f"shape {tuple(aux_loss.shape)}, requires_grad={aux_loss.requires_grad}"
                       if isinstance(aux_loss, torch.Tensor) else type(aux_loss).__name__)
                raise ValueError(f"aux_loss must be a scalar tensor (0-d) that requires grad, got {got}")
            self._check_distributed()
            scale = None
            if scaler is not None and scaler.is_enabled():
                # through `scaler.scale`, which creates the scale on first use (`scaler.step` needs
                # it); the scale stays on the device (`get_scale()` would wait for it)
                scale = scaler.scale(torch.ones((), device=reps[0].device))
            differentiated = self._differentiated_losses(losses)
            scaled = differentiated if scale is None else [scaler.scale(loss) for loss in differentiated]
            aux = aux_loss if scale is None or aux_loss is None else scaler.scale(aux_loss)
            self._balanced_backward(reps, scaled, losses, scale, aux)
        finally:
            self._reps, self._leaves, self._calls = [], [], []
        return TaskScales(self.task_names, self._step_scales())

    def _differentiated_losses(self, losses: list[torch.Tensor]) -> list[torch.Tensor]:
        """The losses whose gradients the heads and the task gradients are taken of (DBMTL: of
        their logs); the losses themselves by default."""
        return losses

    def _balanced_backward(self, reps, scaled, losses, scale, aux=None):
        """`aux`: the (scaled) aux_loss or None, joined to the bottom's one backward."""
        if not self.needs_task_grads:
            self._check_reads_representation(losses, reps)
            total = self.total_loss(losses)
            total = total if scale is None else total * scale.to(total.device)
            torch.autograd.backward(*_with_aux([total], [None], aux))
            return
        if not self.parameter_level and self.uses_norms_only and 0.0 not in self.static_weight_list():
            # the factored path never forms the leaves' gradients: hooks a user put on them
            # (clipping, gradient reversal) run only on the general path
            hooked = any(leaf._backward_hooks for leaf in self._leaves)
            found = None if hooked else factored.find_linear_consumers(scaled, self._leaves)
            if found is not None:
                self.last_path = "factored"
                consumers, params = found
                started = []  # by the last head pre-hook: the norms' sum over ranks overlaps the rest of the heads

                def start_norms(deltas):
                    started.append(self._factored_norms(deltas, consumers, scale))

                factored.head_backward(scaled, self.static_weight_list(), consumers, params, when_complete=start_norms)
                if not started:
                    raise RuntimeError("a head's first linear layer did not run in the heads' backward: its factors are missing")
                combined = self._factored_finish(*started.pop())
                self._bottom_backward(reps, combined, scaled, aux)
                return
        fused = not self.parameter_level and not self._data_parallel()
        self.last_path = "general"
        grads, reached = self._head_backward_per_task(scaled) if fused else self._task_grads(scaled)
        if scale is not None:
            grads = [[g / scale for g in gt] for gt in grads]
        combined = self.combine(grads, losses)
        if scale is not None:
            combined = [g * scale for g in combined]
        if fused:
            self._bottom_backward(reps, combined, scaled, aux)
            return
        head_total = weighted_loss(scaled, self.static_weight_list())
        if self.parameter_level:
            # heads (and a throwaway shared gradient) from one backward; then replace the shared grads
            if aux is not None:  # kept in `before`: the shared gradients below are replaced
                aux.backward(retain_graph=True)
            before = [None if p.grad is None else p.grad.clone() for p in self.shared_parameters]
            head_total.backward()
            for p, b, g, used in zip(self.shared_parameters, before, combined, reached):
                # a parameter no task reached (unused or frozen) keeps its gradient: None, which
                # optimizers skip (a zero would still move it under weight decay)
                p.grad = (g.to(p.dtype) if b is None else b + g.to(p.dtype)) if used else b
        else:
            rep_grads = [g.to(r.dtype) for g, r in zip(combined, reps)]
            torch.autograd.backward(*_with_aux([head_total] + reps, [None] + rep_grads, aux))

    def _bottom_backward(self, reps, combined, losses, aux=None):
        """The one backward through the shared bottom, of the combined representation gradients
        (and of `aux`, the aux_loss, if any)."""
        try:
            torch.autograd.backward(*_with_aux(reps, [g.to(r.dtype) for g, r in zip(combined, reps)], aux))
        except RuntimeError as error:
            # the heads' backward went into the bottom (and freed its graph) through a tensor
            # other than the attached representations: name the task (on this error path only)
            name = self._task_reading_bottom(reps, losses) if "second time" in str(error) else None
            if name is None:
                raise
            raise ValueError(f"loss {name!r} reads a tensor of the shared bottom other than what attach() returned: "
                             f"heads may read only what attach() returned (attach every shared tensor a head reads, "
                             f"e.g. `rep, wide = balancer.attach(z, wide)`); a loss of the bottom alone (a regulariser such "
                             f"as an MoE layer's aux_loss) goes to `balancer.backward(losses, aux_loss=aux)`, not into "
                             f"a task's loss") from error

    def _task_reading_bottom(self, reps, losses) -> str | None:
        """The first task whose loss graph meets the graph of the representations below them."""
        def walk(roots, stop=None) -> dict:
            # id -> node: holding the nodes keeps their ids unique (a freed node wrapper's id is reused)
            seen, stack = {}, [r for r in roots if r is not None]
            while stack:
                node = stack.pop()
                if id(node) in seen:
                    continue
                seen[id(node)] = node
                if stop is not None and id(node) in stop:
                    return seen
                stack.extend(child for child, _ in node.next_functions if child is not None)
            return seen

        bottom = walk([r.grad_fn for r in reps])
        for name, loss in zip(self.task_names, losses):
            if walk([loss.grad_fn], bottom).keys() & bottom.keys():
                return name
        return None

    def _factored_norms(self, deltas, consumers, scale):
        """The factors stacked per representation and their task norms, already on their way
        over the ranks under torch.distributed (the backward goes on meanwhile)."""
        weights = self.static_weight_list()
        n_tasks, device = len(weights), self._leaves[0].device
        # the factors carry the scaler's scale: divided out of the small left factor before any
        # square (the squares of a scale of 2^64 or more overflow fp32), put back in the combination
        unscale = None if scale is None else scale.to(device).reciprocal()
        per_rep = [factored.stack_factors([deltas[t][j] for t in range(n_tasks)],
                                          [None if row[j] is None else row[j].weight_t for row in consumers], unscale)
                   for j in range(len(self._leaves))]
        sums = [factored.task_norm_sums(f, n_tasks, self.per_sample_norms, device, leaf.shape[0],
                                        factored.compute_dtype(leaf.dtype))
                for f, leaf in zip(per_rep, self._leaves)]
        sums = sums[0].unsqueeze(0) if len(sums) == 1 else torch.stack(sums)
        # the factors carry the static weight: the norms are of the plain loss. Device tensors
        # only (no host-to-device copy: no sync on a GPU); nothing to undo in the usual case
        # (unit weights, no scaler), where every small op is skipped.
        unit = self._unit_weights()
        unweight = None if unit else self.static_weights_on(device).reciprocal()
        own = None if unit else unweight.abs()
        if self.per_sample_norms:
            rows = self._constant(tuple((float(leaf.shape[0]),) * n_tasks for leaf in self._leaves), sums)
            norms = self._reduce_norms(sums if unit else sums * own, rows)
        else:
            norms = self._reduce_norms(sums if unit else sums * (own * own))
        undo = unweight  # what turns the coefficients into multipliers of the factors as they are
        if scale is not None:
            undo = scale.to(device) if undo is None else undo * scale.to(device)
        return per_rep, norms, undo

    def _factored_finish(self, per_rep, norms: _PendingNorms, undo) -> list[torch.Tensor]:
        """`undo`: [T] (the inverse static weights, times the scale) or None, what the coefficients
        are multiplied by to act on the factors as they are."""
        coeff = self._coefficients_from(norms)  # [n_reps, T], the static weights included
        return [factored.combine(f, coeff[j] if undo is None else coeff[j] * undo, leaf)
                for j, (f, leaf) in enumerate(zip(per_rep, self._leaves))]

    def _reduce_norms(self, sums: torch.Tensor, rows: torch.Tensor | None = None) -> _PendingNorms:
        """Norms of the global batch from this rank's parts: sums of squares (batch norms), or
        (`per_sample_norms`) sums of per-sample norms over `rows` samples each. Under
        torch.distributed the parts are summed over ranks first (started here, awaited by
        `result()`), so DDP matches one process."""
        stats = torch.stack([sums, rows]) if self.per_sample_norms else sums
        work = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            stats = stats.clone()  # the reduction writes in place; `sums` may be a caller's tensor
            work = dist.all_reduce(stats, group=self.process_group, async_op=True)
        return _PendingNorms(stats, work, self.per_sample_norms)

    def _coefficients_from(self, norms: _PendingNorms) -> torch.Tensor:
        """`coefficients` of the norms once summed over ranks (a subclass may use them later)."""
        return self.coefficients(norms.result())

    def coefficients(self, norms: torch.Tensor) -> torch.Tensor:
        """[n_reps, T] combination weights (static weights included) from the [n_reps, T] norms of
        the per-task gradients. Called only when `uses_norms_only` is set, which a subclass sets
        together with this method (as MultiBalance does)."""
        raise NotImplementedError(f"{type(self).__name__} sets uses_norms_only but does not define coefficients()")

    def total_loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        return weighted_loss(losses, self.static_weight_list())

    @abc.abstractmethod
    def combine(self, grads: list[list[torch.Tensor]], losses: list[torch.Tensor]) -> list[torch.Tensor]:
        """One combined gradient per target from the per-task gradients (which it may overwrite:
        they are the balancer's own)."""

    def _step_scales(self) -> torch.Tensor | None:
        """The last step's [T] scale per task on the device (for MultiBalance, of the first
        representation), in a tensor later steps replace rather than modify; None if none."""
        return None

    def last_scales(self) -> dict[str, float]:
        """The last step's scale per task, as floats (reading them waits for the device)."""
        return dict(TaskScales(self.task_names, self._step_scales()))

    @staticmethod
    def weighted_sums(grads: list[list[torch.Tensor]], coeff: torch.Tensor) -> list[torch.Tensor]:
        """For every target j, sum_t coeff[t] * grads[t][j] (coeff [T], or [n_targets, T] for one
        row per target), written into task 0's buffers, which `combine` may overwrite."""
        n_targets = len(grads[0])
        coeff = coeff.to(grads[0][0].device)
        rows = coeff.expand(n_targets, -1) if coeff.dim() == 1 else coeff
        return [weighted_sum([gt[j] for gt in grads], rows[j]) for j in range(n_targets)]

    def get_extra_state(self) -> dict:
        """Saved in the state_dict (`_extra_state`): the task names, so that `load_state_dict`
        matches the statistics to tasks by name."""
        return {"task_names": list(self.task_names)}

    def set_extra_state(self, state) -> None:
        """The names are checked (and the statistics reordered) in `_load_from_state_dict`."""

    def _match_task_names(self, state_dict, prefix: str) -> None:
        """Refuse a checkpoint of another task set (ValueError naming both); for the same tasks in
        another order, reorder its per-task statistics (floating tensors whose last dimension is the
        task) to this balancer's order. A checkpoint without names (before they were saved) is
        matched by position."""
        key = prefix + "_extra_state"
        extra = state_dict.setdefault(key, None)  # None: a checkpoint from before the names
        saved = extra.get("task_names") if isinstance(extra, Mapping) else None
        if saved is None or list(saved) == self.task_names:
            return
        saved = list(saved)
        if sorted(saved) != sorted(self.task_names):
            where = f"{prefix[:-1]}: " if prefix else ""
            raise ValueError(f"{where}the checkpoint is of a balancer of tasks {saved}; this one's tasks are "
                             f"{self.task_names}: load it into a balancer of the same tasks")
        order = torch.tensor([saved.index(name) for name in self.task_names])
        for k, v in list(state_dict.items()):
            local = k[len(prefix):]
            if (k.startswith(prefix) and "." not in local and isinstance(v, torch.Tensor) and v.is_floating_point()
                    and v.dim() and v.shape[-1] == len(order)):
                state_dict[k] = v.index_select(-1, order.to(v.device))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._match_task_names(state_dict, prefix)
        n_saved = None  # the checkpoint's number of tasks, from its static weights or a running statistic
        saved = state_dict.pop(prefix + "static_weights", None)  # in checkpoints from before it was an option only
        if saved is not None:
            n_saved = saved.shape[-1] if saved.dim() else None
        for name in self._sized_on_first_use:
            saved = state_dict.get(prefix + name)
            if n_saved is None and saved is not None and saved.numel():
                n_saved = saved.shape[-1]
        if n_saved is not None and n_saved != self.num_tasks:
            where = f"{prefix[:-1]}: " if prefix else ""
            error_msgs.append(f"{where}the checkpoint is of a balancer with {n_saved} tasks; this one has "
                              f"{self.num_tasks} ({self.task_names})")
            return
        # running statistics are sized on first use: adopt the checkpoint's shapes, on this module's
        # device, and its floating dtype (set by the steps' norms: a float64 model's averages cast
        # to the fp32 placeholder's dtype lost their precision, and the resumed run drifted)
        for name in self._sized_on_first_use:
            buf, saved = self._buffers.get(name), state_dict.get(prefix + name)
            if buf is not None and saved is not None and (saved.shape != buf.shape or (
                    saved.dtype != buf.dtype and saved.is_floating_point() and buf.is_floating_point())):
                dtype = saved.dtype if saved.is_floating_point() and buf.is_floating_point() else buf.dtype
                self._buffers[name] = buf.new_empty(saved.shape, dtype=dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
