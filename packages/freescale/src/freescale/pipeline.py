"""A three-stage training pipeline: copy batch i+1, balance + distribute it, while batch i trains.

Stage 1 copies the next batch to the device (non-blocking); stage 2 all-gathers its per-key
lengths, partitions the global batch and (CPU tensors) moves its samples with one all-to-all,
all in the balancer's background thread on its own gloo group, then sends the batch's embedding
ids to the ranks that own their rows (the "input distribution" of the `ShardedEmbeddings` given
as `embeddings`), in the pipeline's background thread on a gloo group of its own; stage 3 runs
forward/backward on the current batch meanwhile, and its lookups only fetch the rows. On a GPU
the sample exchange and the id distribution (NCCL, on the callers' groups) run just before
batch i+1's step instead. Every synchronising point goes through the BubbleMeter when one is
given.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from .balance import _BATCH_REFUSED, BatchBalancer, _done, _Refused, background_group, release_background
from .bubbles import BubbleMeter
from .embeddings import POOLINGS, ShardedEmbeddings
from .jagged import KeyedJagged

Batch = tuple[KeyedJagged, dict[str, torch.Tensor]]
# the end of `run`'s batches: a None batch is refused like any other non-batch (taken as the end,
# it stopped this rank's training silently while the others waited for it in their collectives)
_END = object()


def _to(batch: Batch, device) -> Batch:
    feats, dense = batch
    return (KeyedJagged(feats.keys, feats.values.to(device, non_blocking=True), feats.lengths.to(device)),
            {k: v.to(device, non_blocking=True) for k, v in dense.items()})


class TrainPipeline:
    def __init__(self, step_fn: Callable[..., object], balancer: BatchBalancer | None = None,
                 device: torch.device | str = "cpu", meter: BubbleMeter | None = None,
                 embeddings: ShardedEmbeddings | Sequence[ShardedEmbeddings] = (), pooling: str | Sequence[str] = "sum",
                 process_group=None, timeout: datetime.timedelta | float | None = None):
        """`step_fn(features, dense, global_batch)` runs forward/backward/optimizer on one balanced
        batch; `global_batch` is the number of samples in the global batch (over all ranks), the
        normaliser of a per-sample loss whose gradients are summed over ranks. With a balancer it
        is `plan.global_batch`; without one, the local counts summed over `process_group`'s ranks
        (default: the world) by an all-reduce issued when the batch is staged (on a gloo group of
        the pipeline's own) and awaited before its step. `embeddings`: the sharded tables the
        step looks `features` up in, with `pooling` (one for all, or one per module): their ids
        are distributed ahead, while the previous step runs, and the step's
        `module(features, pooling)` finds them there. Every process constructs the pipeline (it
        makes a process group per module, and one for the count without a balancer).
        `timeout`: of those groups (a timedelta or seconds; default: that of the group each
        serves, i.e. what `init_process_group` was given); how long the other ranks wait in the
        pipeline's collectives for a rank that stopped (see `run`).
        `meter`: a `BubbleMeter` the pipeline opens one step in per batch (waiting for the batch's
        exchange and input distribution, staging the next, step_fn) and times its own waits in;
        step_fn times its parts with `meter.compute()` / `meter.sync()`, not `meter.step()`.
        The batch's `BalancePlan`: a step_fn with a parameter named `plan` gets it as
        `step_fn(features, dense, global_batch, plan=plan)` (None without a balancer), and
        `pipeline.last_plan` is it while step_fn runs. With `long_sequences="cap"` or `"split"`
        the step needs it: `plan.received()` gives the windows of the samples in `features`
        (`loss_mask()`, `trailing`) and `plan.global_positions` the per-position normaliser."""
        if not callable(step_fn):
            raise TypeError(f"step_fn must be callable (features, dense, global_batch), got {type(step_fn).__name__}")
        if balancer is not None and not isinstance(balancer, BatchBalancer):
            raise TypeError(f"balancer must be a BatchBalancer or None, got {type(balancer).__name__}")
        if meter is not None and not isinstance(meter, BubbleMeter):
            raise TypeError(f"meter must be a BubbleMeter or None, got {type(meter).__name__}")
        self.step_fn, self.balancer, self.device, self.meter = step_fn, balancer, torch.device(device), meter
        self._pass_plan = _takes_plan(step_fn)
        self.last_plan = None  # the plan of the batch being trained (None without a balancer)
        self.embeddings = [embeddings] if isinstance(embeddings, ShardedEmbeddings) else list(embeddings)
        if not all(isinstance(m, ShardedEmbeddings) for m in self.embeddings):
            raise TypeError(f"embeddings must be a ShardedEmbeddings or a sequence of them, got "
                            f"{[type(m).__name__ for m in self.embeddings]}")
        poolings = [pooling] * len(self.embeddings) if isinstance(pooling, str) else list(pooling)
        if len(poolings) != len(self.embeddings) or any(p not in POOLINGS for p in poolings):
            raise ValueError(f"pooling must be one of {POOLINGS} or one per module of embeddings "
                             f"({len(self.embeddings)}), got {pooling!r}")
        self.poolings = poolings
        self._warned = False
        # the id all-to-alls run in a thread of their own beside the step's collectives: each on
        # a gloo group of its own (collectives from two threads on one group could cross)
        background = self.device.type == "cpu" and bool(self.embeddings)
        self._groups = [background_group(m.group, timeout) if background and m.world > 1 else None for m in self.embeddings]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="freescale-input-dist") if background else None
        # without a balancer the global sample count comes from an all-reduce of the local ones
        self._count_group = None
        if balancer is None and dist.is_initialized() and dist.get_world_size(process_group) > 1:
            self._count_group = background_group(process_group, timeout)
        self._pending = None  # the next batch's staged work while a step runs (left behind if run() raises)
        self._closed = False

    def close(self) -> None:
        """Release what the pipeline holds: wait for the background work of a batch that `run()`
        staged but never trained (it raised during the step before), stop the pipeline's thread
        and destroy its gloo groups. Idempotent; `run()` raises afterwards. Where that staged
        work failed, close() raises a RuntimeError from its error (inside a `with` block that is
        already raising, a warning instead: the first error stays the one raised). The balancer
        is yours: close it too (both work as context managers:
        `with BatchBalancer(...) as balancer, TrainPipeline(step, balancer) as pipeline:`)."""
        if self._closed:
            return
        self._closed = True
        try:
            error = self._drain()
        finally:
            groups = [*self._groups, self._count_group]
            self._groups, self._count_group = [None] * len(self._groups), None
            release_background(self._pool, groups)
        if error is not None:
            raise RuntimeError(f"TrainPipeline.close: the background work of the batch staged before run() stopped "
                               f"failed: {type(error).__name__}: {error}") from error

    def __enter__(self) -> TrainPipeline:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except RuntimeError as err:  # the step's error is the one to see; this one is not lost either
            warnings.warn(str(err), stacklevel=2)

    def _drain(self) -> BaseException | None:
        """Wait for the pending staged batch's background work (its collectives were issued on
        every rank: they finish); its error, if any."""
        staged, self._pending = self._pending, None
        if staged is None:
            return None
        _, balanced, _, ids = staged
        try:
            if ids is not None:
                ids.result()
            result = balanced.result()
            if isinstance(result, tuple) and isinstance(result[-1], tuple):  # no balancer: the count's all-reduce
                work = result[-1][1]
                if work is not None:
                    work.wait()
        except Exception as error:  # noqa: BLE001 (handed to the caller by close())
            return error
        return None

    def _sync(self, fn, name: str):
        return self.meter.sync(fn, name=name) if self.meter is not None else fn()

    def _distribute(self, feats: KeyedJagged, groups) -> list:
        return [m.distribute(feats, pooling, group) for m, pooling, group in zip(self.embeddings, self.poolings, groups)]

    def _distribute_when_balanced(self, balanced):
        feats, dense, plan = balanced.result()
        if isinstance(plan, tuple):  # no balancer: a rank whose batch was refused distributes nothing
            _checked_count(*plan)
        return (feats, dense, plan), self._distribute(feats, self._groups)

    def _stage(self, batch: Batch):
        """Stages 1-2 for `batch`. A batch that is not a batch is refused through the collective
        the others' staging makes (the balancer's gather, the count's all-reduce): every rank
        raises when that batch is due, after the same steps (the rank that raised alone, one
        step early, left the others waiting in step_fn's collectives)."""
        if (not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[0], KeyedJagged)
                or not isinstance(batch[1], dict) or not all(isinstance(v, torch.Tensor) for v in batch[1].values())):
            got = f"got {_describe(batch)}"
            refused = _Refused(_BATCH_REFUSED, got, f"each batch must be a (KeyedJagged, dict of dense tensors) pair, {got}")
            if self.balancer is not None:
                balanced = self.balancer._refuse_async(refused, "TrainPipeline.run")
                exchanged = self.device.type == "cpu"
            else:
                balanced, exchanged = _done((None, {}, self._count_async(0, refused))), True
            ids = self._pool.submit(self._distribute_when_balanced, balanced) if self._pool is not None and exchanged else None
            return (None, {}), balanced, exchanged, ids
        batch = _to(batch, self.device)
        if self.balancer is None:
            balanced, exchanged = _done((*batch, self._count_async(batch[0].batch_size))), True
        elif self.device.type == "cpu":  # plan and exchange in the background, beside batch i's step
            balanced, exchanged = self.balancer.balance_async(*batch), True
        else:  # the plan gathers the per-key lengths too, so the exchange needs no lengths all-to-all
            balanced, exchanged = self.balancer.plan_async(*batch), False
        ids = None
        if self._pool is not None and exchanged:  # the ids of the balanced batch, once it is here
            ids = self._pool.submit(self._distribute_when_balanced, balanced)
        return batch, balanced, exchanged, ids

    def _count_async(self, local: int, refused: _Refused | None = None):
        """The global sample count without a balancer: (count tensor, pending all-reduce or None,
        `refused`). The count carries a flag per rank, set where that rank's batch was refused."""
        world = dist.get_world_size(self._count_group) if self._count_group is not None else 1
        count = torch.zeros(1 + world, dtype=torch.long)
        count[0] = local
        count[1 + (dist.get_rank(self._count_group) if self._count_group is not None else 0)] = refused is not None
        if self._count_group is None:
            return count, None, refused
        return count, dist.all_reduce(count, group=self._count_group, async_op=True), refused

    def _finish(self, staged):
        (feats, dense), balanced, exchanged, ids = staged
        if ids is not None:
            (feats, dense, plan), distributed = self._sync(ids.result, "balance_and_input_dist")
        elif exchanged:
            feats, dense, plan = self._sync(balanced.result, "balance_exchange")
            distributed = None
        else:
            plan = balanced.result()
            feats, dense = self._sync(lambda: self.balancer.exchange(plan, feats, dense), "balance_exchange")
            distributed = None
        count = None
        if isinstance(plan, tuple):  # no balancer: the global count's all-reduce
            # (issued a step ago: normally done; no barrier, timed as comm). Checked before the ids
            # are distributed: a rank's refused batch (no features) fails every rank here, by name
            timed = self.meter is not None and plan[1] is not None
            with self.meter.comm("global_batch_count") if timed else contextlib.nullcontext():
                count = _checked_count(*plan)
        if distributed is None and self.embeddings:  # no background thread: distribute here
            distributed = self._sync(lambda: self._distribute(feats, [m.group for m in self.embeddings]), "input_dist")
        for module, d in zip(self.embeddings, distributed or ()):
            module.prefetch(d)
        if count is not None:
            return (feats, dense, count), None
        return (feats, dense, plan.global_batch), plan

    def run(self, batches: Iterator[Batch]) -> list:
        """Train over all batches; returns what step_fn returned for each.

        When step_fn raises on one rank only, run() raises it there; the other ranks go on until
        they reach a collective that rank does not join. Inside step_fn (DDP's all-reduce, the
        embeddings' lookups, the gradient all-reduce) they wait for that group's timeout (the
        `init_process_group` one); in the pipeline's and the balancer's own collectives they fail
        as soon as the failed rank closes them (their `with` blocks) or its process ends, else
        after `timeout=`. The pipeline cannot do better: the others are blocked in step_fn's
        collectives, on groups it does not own, and an error flag exchanged between steps would
        add a blocking collective to every step. To stop every rank promptly, let the error end
        the process (torchrun then stops the others), or give a `BubbleMeter(timeout=...)` and
        time step_fn's collectives with `meter.sync(...)`: its barriers fail on every rank within
        that timeout. A batch that is not a (KeyedJagged, dict of tensors) pair on one rank is
        refused through its staging's collective: every rank raises when it is due."""
        if self._closed:
            raise RuntimeError("TrainPipeline.run: the pipeline is closed (close() was called)")
        error = self._drain()  # a batch a failed run() left staged: its collectives are done on every rank
        if error is not None:
            raise RuntimeError(f"TrainPipeline.run: the background work of the batch staged before the previous "
                               f"run() stopped failed: {type(error).__name__}: {error}") from error
        outputs = []
        it = iter(batches)
        first = next(it, _END)
        if first is _END:
            return outputs
        staged = self._stage(first)
        while staged is not None:
            # with a meter, one metered step per batch: waiting for it (its exchange and input
            # distribution), staging the next, and step_fn; every second of the run is in a step
            with self.meter.step() if self.meter is not None else contextlib.nullcontext():
                self._pending = None  # _finish takes it: its errors are raised from here
                current, plan = self._finish(staged)
                if self.meter is not None:
                    self.meter.add_samples(current[0].batch_size)
                nxt = next(it, _END)
                staged = None if nxt is _END else self._stage(nxt)  # stages 1-2 for batch i+1 (in the background)
                self._pending = staged  # close() waits for it (and reports its error) if step_fn raises
                outputs.append(self._step(current, plan))  # stage 3 for batch i
        return outputs

    def _step(self, batch, plan):
        self.last_plan = plan  # set here, not when the next batch is staged: step_fn sees its own batch's
        output = self.step_fn(*batch, plan=plan) if self._pass_plan else self.step_fn(*batch)
        unused = [m for m in self.embeddings if m._prefetched is not None]
        if unused and not self._warned:
            self._warned = True
            warnings.warn(f"{len(unused)} of the pipeline's embedding modules were not called on the step's features "
                          f"with the pipeline's pooling {self.poolings}: their ids were distributed ahead for nothing "
                          f"(call module(features, pooling) on the features step_fn receives)", stacklevel=3)
        for m in unused:
            m._prefetched = None
        return output


def _checked_count(count: torch.Tensor, work, refused: _Refused | None) -> int:
    """The global sample count, once its all-reduce (`work`) is done; the same TypeError on every
    rank where a rank's batch was refused (flagged in the count), that rank adding its reason."""
    if work is not None:
        work.wait()
    bad = count[1:].nonzero()[:, 0].tolist()
    if bad and work is None:  # one rank
        raise TypeError(f"TrainPipeline.run: {refused.alone}")
    if bad:
        own = f" ({refused})" if refused is not None else ""
        raise TypeError(f"TrainPipeline.run: rank(s) {bad}: each batch must be a (KeyedJagged, dict of dense tensors) "
                        f"pair{own}")
    return int(count[0])


def _describe(batch) -> str:
    if isinstance(batch, (tuple, list)):
        parts = [type(b).__name__ for b in batch]
        if len(batch) == 2 and isinstance(batch[1], dict):
            wrong = {k: type(v).__name__ for k, v in batch[1].items() if not isinstance(v, torch.Tensor)}
            parts[1] += f" with values that are not tensors {wrong}" if wrong else ""
        return f"a {type(batch).__name__} of ({', '.join(parts)})"
    return f"a {type(batch).__name__}"


def _takes_plan(step_fn) -> bool:
    """Whether step_fn has a parameter named `plan` it can take by keyword (older step_fns,
    with three parameters, are called as before)."""
    try:
        params = inspect.signature(step_fn).parameters
    except (TypeError, ValueError):  # a callable without a signature: the three arguments only
        return False
    p = params.get("plan")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
