"""2 gloo ranks: a step in which a representation is read by some task on rank 0 only (a head that
reads it only for some batches). Rank 0 writes each rank's running averages and bottom gradient."""

import sys
import warnings

import torch
import torch.multiprocessing as mp
from two_ranks import init_gloo, save_gathered  # (this directory: the script's)

from gpukernels_common.distributed import destroy_process_group
from multibalance import MultiBalance


def worker(rank, world, port, out):
    # short: a rank left waiting in the norms' all-reduce fails the test instead of hanging it
    init_gloo(rank, world, port, seconds=30)
    try:
        torch.manual_seed(0)
        bottom, heads = torch.nn.Linear(4, 6), torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in range(3))
        bal = MultiBalance(["a", "b"])
        for step in range(3):
            x = torch.randn(8, 4)
            z1, z2 = bal.attach(bottom(x), bottom(x).tanh())
            loss_b = heads[1](z1).pow(2).mean()
            if rank == 0 or step != 1:  # rank 1's batch of step 1 has none of the samples that head reads
                loss_b = loss_b + heads[2](z2).pow(2).mean()
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # nothing is stale here: no warning
                bal.backward({"a": heads[0](z1).pow(2).mean(), "b": loss_b})
        save_gathered((bal.ema.clone(), bottom.weight.grad.clone()), out)
    finally:
        destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2, join=True)
