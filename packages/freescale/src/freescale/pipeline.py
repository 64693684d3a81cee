"""A three-stage training pipeline: copy batch i+1, balance + distribute it, while batch i trains.

Stage 1 copies the next batch to the device (non-blocking); stage 2 all-gathers its per-key
lengths, partitions the global batch and (CPU tensors) moves its samples with one all-to-all,
all in the balancer's background thread on its own gloo group; stage 3 runs forward/backward on
the current batch meanwhile. On a GPU the sample exchange (NCCL, on the caller's group) runs
just before batch i+1's step instead. Every synchronising point goes through the BubbleMeter
when one is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .balance import BatchBalancer
from .bubbles import BubbleMeter
from .jagged import KeyedJagged

Batch = tuple[KeyedJagged, dict[str, torch.Tensor]]


def _to(batch: Batch, device) -> Batch:
    feats, dense = batch
    return (KeyedJagged(feats.keys, feats.values.to(device, non_blocking=True), feats.lengths.to(device)),
            {k: v.to(device, non_blocking=True) for k, v in dense.items()})


class TrainPipeline:
    def __init__(self, step_fn: Callable[[KeyedJagged, dict, int], object], balancer: BatchBalancer | None = None,
                 device: torch.device | str = "cpu", meter: BubbleMeter | None = None):
        """`step_fn(features, dense, global_batch)` runs forward/backward/optimizer on one balanced batch."""
        self.step_fn, self.balancer, self.device, self.meter = step_fn, balancer, torch.device(device), meter

    def _sync(self, fn, name: str):
        return self.meter.sync(fn, name=name) if self.meter is not None else fn()

    def _stage(self, batch: Batch):
        batch = _to(batch, self.device)
        if self.balancer is None:
            return batch, None, False
        if self.device.type == "cpu":  # plan and exchange in the background, beside batch i's step
            return batch, self.balancer.balance_async(*batch), True
        # the plan gathers the per-key lengths too, so the exchange needs no lengths all-to-all
        return batch, self.balancer.plan_async(batch[0]), False

    def _finish(self, staged):
        (feats, dense), fut, exchanged = staged
        if fut is None:
            return feats, dense, feats.batch_size
        if exchanged:
            feats, dense, plan = self._sync(fut.result, "balance_exchange")
        else:
            plan = fut.result()
            feats, dense = self._sync(lambda: self.balancer.exchange(plan, feats, dense), "balance_exchange")
        self.last_plan = plan
        return feats, dense, plan.global_batch

    def run(self, batches: Iterator[Batch]) -> list:
        """Train over all batches; returns what step_fn returned for each."""
        outputs = []
        it = iter(batches)
        first = next(it, None)
        if first is None:
            return outputs
        current = self._finish(self._stage(first))
        for nxt in it:
            staged = self._stage(nxt)  # stages 1-2 for batch i+1 (partition in the background)
            outputs.append(self.step_fn(*current))  # stage 3 for batch i
            current = self._finish(staged)
        outputs.append(self.step_fn(*current))
        return outputs
