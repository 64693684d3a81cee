"""torchrun-ready training of the HSTU reference model on MovieLens-100k histories.

    torchrun --nproc_per_node 2 -m freescale.train --steps 20 --checkpoint ckpt.pt
    torchrun --nproc_per_node 2 -m freescale.train --steps 40 --checkpoint ckpt.pt --resume

Each rank takes a contiguous slice of every global batch (the naive split), the BatchBalancer
rebalances it by sequence cost (`--method contiguous` disables that), the loss is normalised
by the global batch, gradients are summed over ranks, and a checkpoint (state dicts only,
loaded with weights_only=True) is written at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist

from .balance import BatchBalancer
from .bubbles import BubbleMeter
from .cost import CostModel
from .data import movielens_sequences
from .jagged import KeyedJagged
from .model import HSTURecommender


def global_batches(seq, batch_size: int, steps: int, seed: int, max_len: int):
    g = torch.Generator().manual_seed(seed)
    offsets = seq.offsets
    for _ in range(steps):
        users = torch.randint(0, seq.lengths.numel(), (batch_size,), generator=g)
        hist, targets = [], []
        for u in users.tolist():
            items = seq.items[offsets[u] : offsets[u + 1]]
            cut = int(torch.randint(1, items.numel(), (1,), generator=g))
            hist.append(items[max(0, cut - max_len) : cut])
            targets.append(items[cut])
        yield KeyedJagged.from_dict({"history": hist}), {"target": torch.stack(targets)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--method", default="kk_equal")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--loss-log", default=None, help="write per-step losses (JSON) here (rank 0)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(args.seed)
    seq = movielens_sequences()
    model = HSTURecommender(seq.n_items, d_model=32, n_layers=2, max_len=100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = 0
    if args.resume and args.checkpoint and os.path.exists(args.checkpoint):
        state = torch.load(args.checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
    balancer = BatchBalancer(cost_model=CostModel.from_model_shape(32, 2, 2), method=args.method) if distributed else None
    meter = BubbleMeter()
    losses = []
    batches = global_batches(seq, args.batch_size, args.steps, args.seed, 100)
    for step, (feats, dense) in enumerate(batches):
        if step < start:
            continue  # the same data stream as an uninterrupted run
        local = feats.split([args.batch_size // world + (1 if r < args.batch_size % world else 0) for r in range(world)])[rank]
        lo = sum(args.batch_size // world + (1 if r < args.batch_size % world else 0) for r in range(rank))
        target = dense["target"][lo : lo + local.batch_size]
        with meter.step(samples=local.batch_size):
            if balancer is not None:
                local, moved, _plan = balancer.balance(local, {"target": target})
                target = moved["target"]
            with meter.compute():
                opt.zero_grad()
                items, lengths = local["history"]
                logits = model(items, lengths)
                loss_sum = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
                (loss_sum / args.batch_size).backward()
            if distributed:
                def allreduce():
                    for prm in model.parameters():
                        if prm.grad is not None:
                            dist.all_reduce(prm.grad)
                    total = loss_sum.detach().clone()
                    dist.all_reduce(total)
                    return total
                total = meter.sync(allreduce, name="grad_allreduce")
            else:
                total = loss_sum.detach()
            opt.step()
        losses.append(float(total) / args.batch_size)
    summary = meter.summary()
    if rank == 0:
        print(json.dumps({"losses": losses, "bubble": summary}))
        if args.loss_log:
            with open(args.loss_log, "w") as f:
                json.dump({"losses": losses, "start": start, "bubble": summary}, f)
        if args.checkpoint:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": args.steps}, args.checkpoint)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
