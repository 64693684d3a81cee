"""Run by test_ddp.py as a script: 2 gloo ranks train with MultiBalance under DDP; rank 0 saves grads."""

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpukernels_common.distributed import destroy_process_group
from multibalance import MultiBalance


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.bottom = torch.nn.Linear(4, 6)
        self.head_a = torch.nn.Linear(6, 1)
        self.head_b = torch.nn.Linear(6, 1)

    def forward(self, x):
        return torch.tanh(self.bottom(x))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g), 5 * torch.randn(8, 1, generator=g)


def train(wrapper, net, norm, path, x, ya, yb, norm_lag=0, steps=3):
    """Gradients after `steps` balanced steps; `path`: "factored" (the heads open with a Linear
    layer), "general" (forced: every task's representation gradient formed), "tanh heads"
    (heads that open with a tanh: the general path) or "sum-pooled heads" (a [B, S, D]
    representation summed over S: autograd.grad returns an expanded task gradient). Three
    steps: with norm_lag=1 the third is the first to average in the norms of a step before.
    A path ending in " + aux_loss" also passes a regulariser of the bottom's output as
    `backward(..., aux_loss=)` (as an MoE layer's load-balancing loss)."""
    path, with_aux = path.removesuffix(" + aux_loss"), path.endswith(" + aux_loss")
    bal = MultiBalance(["a", "b"], relax=0.8, norm=norm, norm_lag=norm_lag)
    bal.uses_norms_only = path != "general"
    first = {"tanh heads": torch.tanh, "sum-pooled heads": lambda r: r.sum(1)}.get(path, lambda r: r)
    if path == "sum-pooled heads":  # [B, 3, 4]: each sample's row three times, scaled
        x = x.unsqueeze(1) * torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1)
    for _ in range(steps):
        net.zero_grad()
        z = wrapper(x)
        rep = bal.attach(z)
        bal.backward({"a": ((net.head_a(first(rep)) - ya) ** 2).mean(), "b": ((net.head_b(first(rep)) - yb) ** 2).mean()},
                     aux_loss=0.1 * z.square().mean() if with_aux else None)
    assert bal.last_path == ("factored" if path == "factored" else "general"), (bal.last_path, path)
    return {k: p.grad.clone() for k, p in net.named_parameters()}


DDP_OPTIONS = {
    "default": {},
    # every parameter its own bucket, reduced as soon as its gradient is in (the heads' before the
    # bottom's backward starts), into gradients that are views of the buckets
    "small buckets": {"bucket_cap_mb": 1e-5, "gradient_as_bucket_view": True},
    "static graph": {"static_graph": True},
}


def worker(rank, world, port, norm, path, out, ddp_options="default", norm_lag=0):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        net = Net()
        ddp = torch.nn.parallel.DistributedDataParallel(net, **DDP_OPTIONS[ddp_options])
        x, ya, yb = (t.chunk(world)[rank] for t in data())
        grads = train(ddp, net, norm, path, x, ya, yb, norm_lag)
        if rank == 0:
            torch.save(grads, out)
        dist.barrier()  # leave together: gloo dislikes a peer vanishing mid-teardown
    finally:
        destroy_process_group()


if __name__ == "__main__":
    port, norm, path, out, ddp_options, norm_lag = int(sys.argv[1]), *sys.argv[2:6], int(sys.argv[6])
    mp.spawn(worker, args=(2, port, norm, path, out, ddp_options, norm_lag), nprocs=2, join=True)
