"""torchrun-ready training of the HSTU reference model on MovieLens-100k histories.

    torchrun --nproc_per_node 2 -m freescale.train --steps 20 --checkpoint ckpt.pt
    torchrun --nproc_per_node 2 -m freescale.train --steps 40 --checkpoint ckpt.pt --resume
    torchrun --nproc_per_node 2 -m freescale.train --all-positions --max-len 400 --long-sequences split

Each rank takes a contiguous slice of every global batch (the naive split), the BatchBalancer
rebalances it by sequence cost (`--method contiguous`: no balancer, each rank trains its slice
as it is), the loss is normalised by the global batch, gradients are summed over ranks, and a
checkpoint (state dicts only, loaded with weights_only=True) is written at the end; `--resume`
continues from it (an error when it does not exist, or when it was written with other
`RESUME_ARGS`: they shape the model or the data stream; the number of ranks may differ).

The loss is the next item after each history (`--all-positions`: after every position, HSTU
style, normalised by the global count of loss positions). `--long-sequences cap|split` handles
histories that alone exceed a rank's fair share (see `freescale.longseq`); `split` needs
`--all-positions`, since every piece of a history carries the loss of its own positions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import warnings

import torch
import torch.distributed as dist

from gpukernels_common.distributed import destroy_process_group

from .balance import BatchBalancer
from .bubbles import BubbleMeter
from .cli import _positive_int
from .cost import CostModel
from .data import movielens_sequences
from .jagged import KeyedJagged
from .longseq import MODES, Windows
from .model import HSTURecommender
from .partition import METHODS

# the options a checkpoint records and a resume must repeat: they shape the model or the data
# stream (or, --long-sequences, which positions are trained); --method and the world size do
# not change what is trained, --steps is how far to go
RESUME_ARGS = ("seed", "batch_size", "max_len", "all_positions", "long_sequences")


def _check_resume(p: argparse.ArgumentParser, args, state: dict) -> None:
    """Refuse (exit 2) a resume whose RESUME_ARGS differ from those the checkpoint was written
    with; a checkpoint of an older release, without them, is trusted with a warning."""
    saved = state.get("args")
    if saved is None:
        warnings.warn(f"--resume: {args.checkpoint} records no training options (an older checkpoint): assuming "
                      f"the same {', '.join('--' + a.replace('_', '-') for a in RESUME_ARGS)}", stacklevel=2)
        return
    differ = [a for a in RESUME_ARGS if a in saved and saved[a] != getattr(args, a)]
    if differ:
        p.error(f"--resume: {args.checkpoint} was written with other options: " + ", ".join(
            f"--{a.replace('_', '-')} {saved[a]!r} (now {getattr(args, a)!r})" for a in differ)
            + "; resume with the checkpoint's values or start a new checkpoint")


def global_batches(seq, batch_size: int, steps: int, seed: int, max_len: int, all_positions: bool = False):
    """Per step: the global batch's histories (and, with `all_positions`, the item after each
    position as the aligned key "next") and the item after each history."""
    g = torch.Generator().manual_seed(seed)
    offsets = seq.offsets
    for _ in range(steps):
        users = torch.randint(0, seq.lengths.numel(), (batch_size,), generator=g)
        hist, nxt, targets = [], [], []
        for u in users.tolist():
            items = seq.items[offsets[u] : offsets[u + 1]]
            cut = int(torch.randint(1, items.numel(), (1,), generator=g))
            first = max(0, cut - max_len)
            hist.append(items[first:cut])
            nxt.append(items[first + 1 : cut + 1])
            targets.append(items[cut])
        keys = {"history": hist, "next": nxt} if all_positions else {"history": hist}
        yield KeyedJagged.from_dict(keys), {"target": torch.stack(targets)}


def _all_positions_loss(model, local: KeyedJagged, windows: Windows) -> torch.Tensor:
    """Sum of the next-item losses at every position that carries one (context positions of a
    split piece do not); positions count back from the whole history's newest item."""
    items, lengths = local["history"]
    targets, _ = local["next"]
    trailing = windows.trailing if bool(windows.trailing.any()) else None
    states, mask = model.sequence_states(items, lengths, trailing=trailing)
    losses = torch.nn.functional.cross_entropy(states[mask] @ model.item.weight.T, targets, reduction="none")
    return losses[windows.loss_mask()].sum()


def make_balancer(method: str, long_sequences: str, distributed: bool) -> BatchBalancer | None:
    """The script's balancer: none in one process or with `contiguous` (each rank keeps its slice)."""
    if not distributed or method == "contiguous":
        return None
    return BatchBalancer(cost_model=CostModel.from_model_shape(32, 2, 2), method=method, long_sequences=long_sequences)


def main(argv=None, prog: str = "python -m freescale.train"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=_positive_int, default=20, help="steps in all (a resumed run continues up to it)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="global batch")
    p.add_argument("--method", choices=METHODS, default="kk_equal",
                   help="partitioner of the BatchBalancer; contiguous: no balancer (each rank keeps its slice)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint (which must exist)")
    p.add_argument("--loss-log", default=None, help="write per-step losses (JSON) here (rank 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=_positive_int, default=100, help="positions kept of each history (and the model's max_len)")
    p.add_argument("--all-positions", action="store_true", help="next-item loss after every position, not only the last")
    p.add_argument("--long-sequences", choices=MODES, default="report",
                   help="histories that alone exceed a rank's fair share: report them, cap them, or split them")
    args = p.parse_args(argv)
    if args.long_sequences == "split" and not args.all_positions:
        p.error("--long-sequences split needs --all-positions: each piece carries the loss of its own positions")
    if args.method == "contiguous" and args.long_sequences != "report":
        p.error(f"--long-sequences {args.long_sequences} needs the balancer: not with --method contiguous")
    if args.resume and not args.checkpoint:
        p.error("--resume needs --checkpoint (the file to resume from)")
    if args.resume and not os.path.exists(args.checkpoint):
        p.error(f"--resume: no checkpoint at {args.checkpoint}")
    state = None
    if args.resume:  # before any process group: every rank refuses alike, none waits for the others
        state = torch.load(args.checkpoint, weights_only=True)
        _check_resume(p, args, state)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(args.seed)
    seq = movielens_sequences()
    model = HSTURecommender(seq.n_items, d_model=32, n_layers=2, max_len=args.max_len)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:  # an older checkpoint (no options recorded) of another shape
            p.error(f"--resume: {args.checkpoint} does not fit this model (another --max-len?): {str(err)[:300]}")
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
    balancer = make_balancer(args.method, args.long_sequences, distributed)
    meter = BubbleMeter()
    losses = []
    batches = global_batches(seq, args.batch_size, args.steps, args.seed, args.max_len, args.all_positions)
    for step, (feats, dense) in enumerate(batches):
        if step < start:
            continue  # the same data stream as an uninterrupted run
        sizes = [args.batch_size // world + (1 if r < args.batch_size % world else 0) for r in range(world)]
        local = feats.split(sizes)[rank]
        lo = sum(sizes[:rank])
        target = dense["target"][lo : lo + local.batch_size]
        normaliser = args.batch_size  # a per-sample loss; per position below
        with meter.step(samples=local.batch_size):
            if args.all_positions:
                # the global count of loss positions: what the loss is normalised by on every rank
                normaliser = int(feats["history"][1].sum())
                windows = Windows.whole(local["history"][1])
                if balancer is not None:
                    local, _, plan = balancer.balance(local)
                    windows, normaliser = plan.received(), plan.global_positions
            elif balancer is not None:
                local, moved, _plan = balancer.balance(local, {"target": target})
                target = moved["target"]
            with meter.compute():
                opt.zero_grad()
                if args.all_positions:
                    loss_sum = _all_positions_loss(model, local, windows)
                else:
                    items, lengths = local["history"]
                    loss_sum = torch.nn.functional.cross_entropy(model(items, lengths), target, reduction="sum")
                (loss_sum / normaliser).backward()
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
        losses.append(float(total) / normaliser)
    summary = meter.summary()
    if rank == 0:
        print(json.dumps({"losses": losses, "bubble": summary}))
        if args.loss_log:
            with open(args.loss_log, "w") as f:
                json.dump({"losses": losses, "start": start, "bubble": summary}, f)
        if args.checkpoint:
            # the steps the model has taken: a resume past --steps trains none and must not go back
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": max(start, args.steps),
                        "args": {a: getattr(args, a) for a in RESUME_ARGS}}, args.checkpoint)
    if distributed:
        dist.barrier()
        if balancer is not None:
            balancer.close()  # its background group first (see destroy_process_group)
        destroy_process_group()


if __name__ == "__main__":
    main()
