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
other threads issue collectives at the same time.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from concurrent.futures import Future

import torch
import torch.distributed as dist


@dataclasses.dataclass
class _Chunk:
    priority: int
    seq: int
    index: int
    run: object
    round: int = 0


class CommScheduler:
    def __init__(self, process_group=None, chunk_bytes: int = 1 << 20, preempt: bool = False):
        self.group = process_group
        self.chunk_bytes = chunk_bytes
        self.preempt = preempt
        self._seq = itertools.count()
        self._pending: list[_Chunk] = []  # submitted, not flushed
        self._ready: list[_Chunk] = []  # flushed, not started
        self._rounds = 0  # flush() rounds handed to the communication thread
        self._closed = False
        self._cv = threading.Condition()
        self.completed: list[str] = []  # op names in completion order (for tests and traces)
        self._thread = threading.Thread(target=self._loop, name="freescale-comm", daemon=True)
        self._thread.start()

    def _agreed_round(self, flushed: int) -> int:
        """The latest round every rank has flushed (see the module docs)."""
        if not self.preempt or not dist.is_initialized() or dist.get_world_size(self.group) == 1:
            return flushed
        agreed = torch.tensor([flushed], dtype=torch.long)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.group)
        return int(agreed)

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

    def _queue_chunks(self, parts: list, send, result, priority: int, name: str) -> Future:
        """Queue `send(part)` for every part as chunks of one op; the future resolves to `result`
        once the last chunk is done."""
        future: Future = Future()
        seq = next(self._seq)
        remaining = [len(parts)]
        lock = threading.Lock()

        def make_run(part):
            def run():
                send(part)
                with lock:
                    remaining[0] -= 1
                    last = remaining[0] == 0
                if last:
                    self.completed.append(name)
                    future.set_result(result)
            run.future = future
            return run

        for i, part in enumerate(parts):
            self._pending.append(_Chunk(priority, seq, i, make_run(part)))
        return future

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, output_splits=None, input_splits=None,
                   priority: int = 0, name: str = "all_to_all") -> Future:
        """Queue an all_to_all_single; chunked along dim 1 when it is larger than chunk_bytes."""
        total = input.numel() * input.element_size()
        n_chunks = max(1, -(-total // self.chunk_bytes)) if input.dim() == 2 else 1
        n_chunks = min(n_chunks, input.shape[1]) if input.dim() == 2 else 1
        cols = torch.arange(input.shape[1]).tensor_split(n_chunks) if input.dim() == 2 else [None]

        def send(c):
            if c is None:
                dist.all_to_all_single(output, input, output_splits, input_splits, group=self.group)
            else:
                out = output.new_empty(output.shape[0], c.numel())
                dist.all_to_all_single(out, input[:, c].contiguous(), output_splits, input_splits, group=self.group)
                output[:, c] = out

        return self._queue_chunks(list(cols), send, output, priority, name)

    def all_reduce(self, tensor: torch.Tensor, priority: int = 0, name: str = "all_reduce") -> Future:
        """Queue a sum all-reduce of `tensor` in place; flat chunks of at most chunk_bytes, so an
        urgent op is not stuck behind a large one. The future's result is `tensor`."""
        if not tensor.is_contiguous():
            raise ValueError(f"all_reduce: tensor {name!r} must be contiguous (it is reduced in place)")
        flat = tensor.view(-1)
        per_chunk = max(1, self.chunk_bytes // max(1, tensor.element_size()))
        starts = list(range(0, max(1, flat.numel()), per_chunk))
        return self._queue_chunks(starts, lambda lo: dist.all_reduce(flat[lo : lo + per_chunk], group=self.group),
                                  tensor, priority, name)

    def flush(self) -> None:
        """Hand every pending chunk to the communication thread as one round, most urgent first."""
        if not self._pending:
            return  # an empty round would leave nothing to agree on
        with self._cv:
            self._rounds += 1
            for chunk in self._pending:
                chunk.round = self._rounds
            self._ready.extend(self._pending)
            self._cv.notify()
        self._pending = []

    def close(self) -> None:
        """Finish the flushed work, then stop the communication thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)
