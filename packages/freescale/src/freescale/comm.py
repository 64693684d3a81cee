"""Prioritised, chunked asynchronous collectives that overlap with compute.

Collectives submitted to a `CommScheduler` are issued on a dedicated communication thread in
priority order (lower number = consumed sooner by the model), then submission order. Large
all-to-alls are cut into chunks of at most `chunk_bytes`, and chunks of every pending op are
ordered by priority, so an urgent op submitted together with a large background one is not
stuck behind all of it. By default ordering is decided per `flush()` round from (priority,
sequence), which is identical on every rank, so ranks always issue collectives in the same
order (a requirement of gloo and NCCL).

With `preempt=True` an urgent op flushed while an earlier round's chunks are still queued
jumps ahead of that round's chunks that have not started. Which rounds a rank has flushed
when its communication thread picks the next chunk depends on timing, so before each chunk
the ranks agree on the latest round flushed everywhere (one small MIN all-reduce on the
scheduler's group) and pick the most urgent chunk of the rounds up to it: the same choice on
every rank. That all-reduce is the price; give the scheduler a process group of its own when
other threads issue collectives at the same time. It also carries a fingerprint of each round's
ops (kind, shapes, dtype, chunk count, priority, in submission order): ranks whose submissions
differ (another priority, another flush() boundary) would otherwise send each other's
equal-sized payloads, silently, so a round is not started before every rank's fingerprint of it
is the same, and a mismatch is a RuntimeError on every rank. Without `preempt` the scheduler
issues no collective of its own to carry it (it would cost one per flush): identical submissions
are the caller's to keep.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import threading
import zlib
from concurrent.futures import Future

import torch
import torch.distributed as dist

from gpukernels_common.checks import check_sizes


def collective_device(group=None) -> torch.device:
    """Where a tensor made here for a collective on `group` (a count, a flag) must live: the host
    when the group has a CPU backend (gloo, also as in "cpu:gloo,cuda:nccl"), else this thread's
    current CUDA device (NCCL alone takes CUDA tensors only)."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


@dataclasses.dataclass
class _Chunk:
    priority: int
    seq: int
    index: int
    run: object
    round: int = 0
    spec: str = ""  # the op's kind, shapes, dtype and chunk count, for the round's fingerprint


_CHECKED_ROUNDS = 8  # rounds whose fingerprints one agreement carries (more wait for the next)
_ABSENT = 1 << 62  # a round this rank has not flushed yet: above every fingerprint, ignored by MIN


class _Deferred:
    """A part whose chunks are decided when it runs (see `CommScheduler.all_to_all`)."""


class CommScheduler:
    def __init__(self, process_group=None, chunk_bytes: int = 1 << 20, preempt: bool = False):
        # checked here: a 0 or float size failed only in the first op (a ZeroDivisionError, a
        # TypeError from range()), and a negative one cut all-reduces into one element per chunk
        (chunk_bytes,) = check_sizes(chunk_bytes=chunk_bytes)
        self.group = process_group
        self.chunk_bytes = chunk_bytes
        self.preempt = preempt
        self._seq = itertools.count()
        self._pending: list[_Chunk] = []  # submitted, not flushed
        self._ready: list[_Chunk] = []  # flushed, not started
        self._rounds = 0  # flush() rounds handed to the communication thread
        self._checked = 0  # rounds whose fingerprints every rank has agreed on (preempt)
        self._fingerprints: list[int] = []  # of the flushed rounds after the checked ones
        self._closed = False
        self._failed: Exception | None = None  # why the communication thread stopped (see `_loop`)
        self._cv = threading.Condition()
        # decided on the caller's thread: the communication thread's current CUDA device is device 0
        self._agreement_device = collective_device(process_group) if dist.is_initialized() else torch.device("cpu")
        self.completed: list[str] = []  # op names in completion order (for tests and traces)
        self._thread = threading.Thread(target=self._loop, name="freescale-comm", daemon=True)
        self._thread.start()

    def _agreed_round(self, flushed: int) -> int:
        """The latest round every rank has flushed and submitted alike (see the module docs)."""
        if not self.preempt or not dist.is_initialized() or dist.get_world_size(self.group) == 1:
            return flushed
        with self._cv:
            prints = self._fingerprints[: min(flushed - self._checked, _CHECKED_ROUNDS)]
        absent = [_ABSENT] * (_CHECKED_ROUNDS - len(prints))
        # one MIN all-reduce: the least round flushed, and per unchecked round the least
        # fingerprint and the least negated one (minus the greatest)
        agreed = torch.tensor([flushed, *prints, *absent, *(-p for p in prints), *absent], dtype=torch.long,
                              device=self._agreement_device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.group)
        agreed = agreed.tolist()
        limit = min(agreed[0], self._checked + _CHECKED_ROUNDS)  # every rank sent these rounds' prints
        for i in range(limit - self._checked):
            if agreed[1 + i] != -agreed[1 + _CHECKED_ROUNDS + i]:
                raise RuntimeError(f"CommScheduler: the ranks' submissions differ in flush() round {self._checked + i + 1} "
                                   "(preempt=True checks each round's ops: kind, shapes, dtype, chunk count, priority, "
                                   "order); every rank must queue the same ops with the same priorities and call flush() "
                                   "at the same points")
        with self._cv:
            del self._fingerprints[: limit - self._checked]
        self._checked = limit
        return limit

    def _next(self) -> _Chunk | None:
        with self._cv:
            self._cv.wait_for(lambda: self._ready or self._closed)
            if not self._ready:
                return None
            flushed = self._rounds
        limit = self._agreed_round(flushed)
        # per round in flush order, or (preempt) the most urgent of every round flushed everywhere
        key = (lambda c: (c.priority, c.seq, c.index)) if self.preempt else (lambda c: (c.round, c.priority, c.seq, c.index))
        with self._cv:
            chunk = min((c for c in self._ready if c.round <= limit), key=key)
            self._ready.remove(chunk)
        return chunk

    def _loop(self):
        while True:
            try:
                chunk = self._next()
            except Exception as err:  # the agreement failed (e.g. a rank died): fail what is queued
                with self._cv:
                    self._failed = err  # and what comes later: no thread is left to run it
                    for c in self._ready:
                        if not c.run.future.done():
                            c.run.future.set_exception(err)
                    self._ready.clear()
                return
            if chunk is None:
                return
            try:
                chunk.run()
            except Exception as err:  # surface errors through the op's future, keep serving others
                if not chunk.run.future.done():
                    chunk.run.future.set_exception(err)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"CommScheduler: cannot {what}: the scheduler is closed (close() was called); "
                               "create a new CommScheduler for further collectives")
        if self._failed is not None:
            raise RuntimeError(f"CommScheduler: cannot {what}: its communication thread stopped on an error "
                               f"({self._failed}); create a new CommScheduler") from self._failed

    def _queue_chunks(self, parts: list, send, result, priority: int, name: str, spec: str = "") -> Future:
        """Queue `send(part)` for every part as chunks of one op; the future resolves to `result`
        once the last chunk is done. A part may be a `_Deferred`, whose run returns more parts
        (the chunks it expands into, queued right behind it with the same priority and round).
        `spec`: what must match on every rank besides the priority (kind, shapes, dtype)."""
        self._check_open(f"queue op {name!r}")
        # checked here: the communication thread compares priorities when it picks a chunk, and a
        # TypeError there stopped it, failing every op queued beside this one
        if isinstance(priority, bool) or not isinstance(priority, numbers.Real) or math.isnan(priority):
            raise ValueError(f"op {name!r}: priority must be a number (lower is more urgent), got {priority!r}")
        future: Future = Future()
        seq = next(self._seq)
        remaining = [len(parts)]
        lock = threading.Lock()

        def finish_one():
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                self.completed.append(name)
                future.set_result(result)

        def make_run(part):
            def run():
                more = send(part)
                if more:  # expanded: parts 1.. become chunks of this op (the same on every rank)
                    with lock:
                        remaining[0] += len(more)
                    with self._cv:
                        for i, extra in enumerate(more, start=1):
                            extra_run = make_run(extra)
                            extra_run.chunk = _Chunk(priority, seq, i, extra_run, run.chunk.round)
                            self._ready.append(extra_run.chunk)
                finish_one()
            run.future = future
            return run

        for i, part in enumerate(parts):
            run = make_run(part)
            run.chunk = _Chunk(priority, seq, i, run, spec=f"{spec} x{len(parts)}")
            self._pending.append(run.chunk)
        return future

    def _local(self) -> bool:
        """No process group at all: a world of one, where every collective is a local no-op."""
        return self.group is None and not dist.is_initialized()

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, output_splits=None, input_splits=None,
                   priority: int = 0, name: str = "all_to_all") -> Future:
        """Queue an all_to_all_single; chunked along dim 1 when it is larger than chunk_bytes.

        Every rank must issue the same number of chunks. Without splits every rank's input has
        the same shape, so the count follows from it. With uneven splits the sizes differ per
        rank: the first chunk agrees on the count (one one-element MAX all-reduce on the
        scheduler's group, on the communication thread) and sends the first column block."""
        if not self._local():
            uneven = output_splits is not None or input_splits is not None
            # with splits only the rows may differ between ranks
            spec = (f"all_to_all {tuple(input.shape[1:])}->{tuple(output.shape[1:])} split" if uneven
                    else f"all_to_all {tuple(input.shape)}->{tuple(output.shape)}") + f" {input.dtype}"
            return self._queue_chunks([_Deferred()] if self._uneven_chunking(input, output_splits, input_splits)
                                      else self._column_blocks(input, output, self._local_chunks(input, output)),
                                      lambda part: self._send_all_to_all(output, input, output_splits, input_splits, part),
                                      output, priority, name, spec)

        def copy(_):  # a world of one: the only peer is this rank
            if output.shape != input.shape:
                raise ValueError(f"all_to_all {name!r}: without a process group (a world of one) output must have "
                                 f"input's shape {tuple(input.shape)}, got {tuple(output.shape)}")
            output.copy_(input)

        return self._queue_chunks([None], copy, output, priority, name)

    def _local_chunks(self, input: torch.Tensor, output: torch.Tensor) -> int:
        """Chunks of at most chunk_bytes for this rank's larger side, at least one, at most one
        per column (none for no columns: the whole op is sent as one)."""
        if input.dim() != 2 or input.shape[1] == 0:
            return 1
        total = max(input.numel(), output.numel()) * input.element_size()
        return max(1, min(-(-total // self.chunk_bytes), input.shape[1]))

    @staticmethod
    def _uneven_chunking(input: torch.Tensor, output_splits, input_splits) -> bool:
        # the row counts, hence the chunk counts, can differ between ranks
        return input.dim() == 2 and input.shape[1] > 1 and (output_splits is not None or input_splits is not None)

    @staticmethod
    def _column_blocks(input: torch.Tensor, output: torch.Tensor, n_chunks: int) -> list:
        if n_chunks == 1:
            return [None]  # the whole op at once
        return [(int(c[0]), int(c[-1]) + 1) for c in torch.arange(input.shape[1]).tensor_split(n_chunks)]

    def _send_all_to_all(self, output, input, output_splits, input_splits, part):
        if isinstance(part, _Deferred):
            n_chunks = self._local_chunks(input, output)
            if dist.get_world_size(self.group) > 1:
                agreed = torch.tensor([n_chunks], dtype=torch.long, device=self._agreement_device)
                dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.group)
                n_chunks = int(agreed)
            blocks = self._column_blocks(input, output, n_chunks)
            self._send_all_to_all(output, input, output_splits, input_splits, blocks[0])
            return blocks[1:]
        if part is None:
            # the backends need contiguous tensors (gloo writes a strided output as if it were not):
            # views such as column slices go through contiguous copies, as the chunked sends do
            out = output if output.is_contiguous() else torch.empty_like(output, memory_format=torch.contiguous_format)
            dist.all_to_all_single(out, input.contiguous(), output_splits, input_splits, group=self.group)
            if out is not output:
                output.copy_(out)
            return None
        lo, hi = part
        out = output.new_empty(output.shape[0], hi - lo)
        dist.all_to_all_single(out, input[:, lo:hi].contiguous(), output_splits, input_splits, group=self.group)
        output[:, lo:hi] = out
        return None

    def all_reduce(self, tensor: torch.Tensor, priority: int = 0, name: str = "all_reduce") -> Future:
        """Queue a sum all-reduce of `tensor` in place; flat chunks of at most chunk_bytes, so an
        urgent op is not stuck behind a large one. The future's result is `tensor`."""
        if not tensor.is_contiguous():
            raise ValueError(f"all_reduce: tensor {name!r} must be contiguous (it is reduced in place)")
        if self._local():  # a world of one: the sum is the tensor itself
            return self._queue_chunks([0], lambda lo: None, tensor, priority, name)
        flat = tensor.view(-1)
        per_chunk = max(1, self.chunk_bytes // max(1, tensor.element_size()))
        starts = list(range(0, max(1, flat.numel()), per_chunk))
        return self._queue_chunks(starts, lambda lo: dist.all_reduce(flat[lo : lo + per_chunk], group=self.group),
                                  tensor, priority, name, f"all_reduce {flat.numel()} {tensor.dtype}")

    def flush(self) -> None:
        """Hand every pending chunk to the communication thread as one round, most urgent first."""
        with self._cv:
            if self._failed is not None:  # the thread stopped (see `_loop`): these would never resolve
                for chunk in self._pending:
                    if not chunk.run.future.done():
                        chunk.run.future.set_exception(RuntimeError("CommScheduler: its communication thread "
                                                                    f"stopped before this op was flushed ({self._failed})"))
                self._pending = []
            self._check_open("flush()")
            if not self._pending:
                return  # an empty round would leave nothing to agree on
            self._rounds += 1
            if self.preempt:  # checked by the round agreement, which only preempt has
                ops = [f"{c.spec} p{float(c.priority)!r}" for c in self._pending if c.index == 0]  # submission order
                self._fingerprints.append(zlib.crc32("|".join(ops).encode()))
            for chunk in self._pending:
                chunk.round = self._rounds
            self._ready.extend(self._pending)
            self._cv.notify()
        self._pending = []

    def close(self) -> None:
        """Finish the flushed work, then stop the communication thread. Ops submitted but never
        flushed fail (their futures raise); submitting or flushing afterwards raises."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        for chunk in self._pending:  # never handed to the thread: they would never resolve
            if not chunk.run.future.done():
                chunk.run.future.set_exception(RuntimeError("CommScheduler closed before this op was flushed"))
        self._pending = []
        self._thread.join(timeout=30)
