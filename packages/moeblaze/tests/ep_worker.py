"""Run by test_parallel.py: 2 gloo ranks, 4 experts (2 per rank); rank 0 saves outputs and grads."""

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeblaze import expert_parallel_experts


def inputs(seed=0, t=13, d=8, f=12, e=4, k=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * t, d, generator=g)  # rows [rank*t, (rank+1)*t) belong to each rank
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(2 * t)]).int()
    ids[:t, 0] = 0  # a hot expert on rank 0's side
    w = torch.rand(2 * t, k, generator=g)
    wg, wu = (torch.randn(e, d, f, generator=g) / d**0.5 for _ in range(2))
    wd = torch.randn(e, f, d, generator=g) / f**0.5
    return x, ids, w, wg, wu, wd


def run(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    x, ids, w, wg, wu, wd = inputs()
    t = x.shape[0] // world
    sl = slice(rank * t, (rank + 1) * t)
    xs = x[sl].clone().requires_grad_()
    ws = w[sl].clone().requires_grad_()
    local = 4 // world
    params = [p[rank * local : (rank + 1) * local].clone().requires_grad_() for p in (wg, wu, wd)]
    y = expert_parallel_experts(xs, ids[sl], ws, *params, n_experts=4)
    g = torch.Generator().manual_seed(5)
    grad_out = torch.randn(x.shape[0], x.shape[1], generator=g)[sl]
    y.backward(grad_out)
    gathered = [None] * world
    dist.all_gather_object(gathered, {"y": y.detach(), "dx": xs.grad, "dw": ws.grad, "dparams": [p.grad for p in params]})
    if rank == 0:
        torch.save(gathered, out)
    dist.barrier()  # leave together: gloo dislikes a peer vanishing mid-teardown
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2, join=True)
