"""Per-rank step accounting: busy compute, straggler wait and exposed communication.

At every synchronising collective wrapped by `meter.sync(op)`, a cheap barrier is taken first
(measurement mode): the time spent in it is straggler wait (this rank arrived before the
slowest one); the collective's own time after it is exposed communication. Everything timed
with `meter.compute()` is busy compute. Per step, compute + wait + comm + untracked = step.

    bubble ratio       = sum(wait) / sum(step)     (over ranks and steps)
    bubble reduction   = 1 - bubble_balanced / bubble_baseline      (the paper's form)
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist


class BubbleMeter:
    def __init__(self, process_group=None, measure_wait: bool = True, timeout: float | None = None):
        """`timeout` (seconds): the barrier is awaited for at most that long on every rank, so a
        dead or hung rank makes every other rank fail within the timeout (a RuntimeError naming
        the timeout and the collective) instead of hanging."""
        self.group = process_group
        self.measure_wait = measure_wait
        self.timeout = timeout
        self.steps: list[dict] = []
        self.events: list[dict] = []
        self._current: dict | None = None
        self._t0 = time.perf_counter()

    def _rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_available() and dist.is_initialized() else 0

    def _event(self, name, start, end):
        self.events.append({"name": name, "ph": "X", "pid": self._rank(), "tid": 0,
                            "ts": (start - self._t0) * 1e6, "dur": (end - start) * 1e6})

    @contextlib.contextmanager
    def step(self, samples: int = 0):
        """Time one training step (steps do not nest: `TrainPipeline(meter=...)` opens one per batch
        itself, so its step_fn times the step's parts with `compute()` / `sync()` only)."""
        if self._current is not None:
            raise RuntimeError("BubbleMeter.step: a step is already open; steps do not nest (a TrainPipeline given "
                               "this meter opens one per batch: time its step_fn's parts with meter.compute() and "
                               "meter.sync(), not meter.step())")
        self._current = {"compute": 0.0, "wait": 0.0, "comm": 0.0, "samples": samples}
        start = time.perf_counter()
        try:
            yield self
        finally:
            end = time.perf_counter()
            self._current["step"] = end - start
            self._current["untracked"] = self._current["step"] - self._current["compute"] - self._current["wait"] - self._current["comm"]
            self.steps.append(self._current)
            self._event("step", start, end)
            self._current = None

    def add_samples(self, samples: int) -> None:
        """Count `samples` more in the open step (for a step whose batch is known only inside it)."""
        if self._current is None:
            raise RuntimeError("BubbleMeter.add_samples: no step is open")
        self._current["samples"] += samples

    def _account(self, part: str, name: str, start: float, end: float) -> None:
        if self._current is not None:
            self._current[part] += end - start
        self._event(name, start, end)

    @contextlib.contextmanager
    def _timed(self, part: str, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._account(part, name, start, time.perf_counter())

    @contextlib.contextmanager
    def compute(self, name: str = "compute"):
        """Context manager timing busy compute. On a GPU it waits for the kernels launched in it
        (they run after the launches return): else their time shows up as the next barrier's wait."""
        with self._timed("compute", name):
            yield
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()

    def sync(self, op=None, name: str = "collective"):
        """Run a synchronising collective `op()` (or just the barrier) and account its time."""
        t0 = time.perf_counter()
        if self.measure_wait and dist.is_available() and dist.is_initialized():
            if self.timeout is not None:
                # gloo's monitored_barrier enforces its timeout on rank 0 only: await an async
                # barrier with the timeout instead, which fails on every rank
                work = dist.barrier(group=self.group, async_op=True)
                try:
                    work.wait(timeout=datetime.timedelta(seconds=self.timeout))
                except RuntimeError as err:
                    raise RuntimeError(f"BubbleMeter: rank {self._rank()}: the barrier before {name!r} did not complete "
                                       f"within the timeout of {self.timeout} s: another rank is dead or hung "
                                       f"({str(err)[:200]})") from err
            else:
                dist.barrier(group=self.group)
        t1 = time.perf_counter()
        result = op() if op is not None else None
        self._account("wait", f"wait:{name}", t0, t1)
        self._account("comm", name, t1, time.perf_counter())
        return result

    def comm(self, name: str = "comm"):
        """Context manager timing exposed communication that is not a synchronisation point
        (e.g. waiting on async work)."""
        return self._timed("comm", name)

    def summary(self, skip: int = 0, gather: bool = True) -> dict:
        """Ratios over all steps (after `skip` warm-up steps), over all ranks when distributed."""
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:  # skip=-k kept the last k steps, silently
            raise ValueError(f"skip must be an integer >= 0 (warm-up steps left out), got {skip!r}")
        steps = self.steps[skip:]
        totals = {k: sum(s[k] for s in steps) for k in ("step", "compute", "wait", "comm", "untracked", "samples")}
        totals["n_steps"] = len(steps)
        if gather and dist.is_available() and dist.is_initialized():
            every = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(every, totals, group=self.group)
            per_rank_steps = [t["step"] for t in every]
            totals = {k: sum(t[k] for t in every) for k in totals}
            totals["n_steps"] = every[0]["n_steps"]
            world = len(every)
            wall = max(per_rank_steps)
        else:
            world, wall = 1, totals["step"]
        step = max(totals["step"], 1e-12)
        return {
            "bubble_ratio": totals["wait"] / step,
            "exposed_comm_ratio": totals["comm"] / step,
            "busy_ratio": totals["compute"] / step,
            "untracked_ratio": totals["untracked"] / step,
            "step_ms": 1e3 * wall / max(totals["n_steps"], 1),
            "samples_per_s": totals["samples"] / wall if wall > 0 else 0.0,
            "world_size": world,
        }

    def chrome_trace(self, path: str | os.PathLike) -> Path:
        """Write this rank's events as a Chrome trace (open in chrome://tracing or Perfetto)."""
        path = Path(path)
        path.write_text(json.dumps({"traceEvents": self.events}))
        return path


def bubble_reduction(baseline: float, balanced: float) -> float:
    return 1.0 - balanced / baseline if baseline > 0 else 0.0
