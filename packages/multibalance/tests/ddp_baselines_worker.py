"""Run by test_ddp_baselines.py as a script: 2 gloo ranks train every baseline under DDP for three
steps; rank 0 saves both ranks' gradients and balancer states (or the error each raised)."""

import os
import sys

import torch
import torch.multiprocessing as mp
from two_ranks import init_gloo, save_gathered  # (this directory: the script's)

import multibalance
from gpukernels_common.distributed import destroy_process_group

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_worker import Net, data  # noqa: E402

NAMES = ["EqualWeights", "UncertaintyWeighting", "GradNorm", "PCGrad", "MGDA", "DBMTL", "FAMO",
         "MetaBalance(params)", "PCGrad(params)", "MGDA(params)"]


def make(name, net):
    shared = list(net.bottom.parameters())
    return {"EqualWeights": lambda: multibalance.EqualWeights(["a", "b"]),
            "UncertaintyWeighting": lambda: multibalance.UncertaintyWeighting(["a", "b"]),
            "GradNorm": lambda: multibalance.GradNorm(["a", "b"], lr=0.1),
            "PCGrad": lambda: multibalance.PCGrad(["a", "b"]),
            "MGDA": lambda: multibalance.MGDA(["a", "b"], weights={"a": 3.0}),
            "DBMTL": lambda: multibalance.DBMTL(["a", "b"]),
            "FAMO": lambda: multibalance.FAMO(["a", "b"], lr=0.2),
            "MetaBalance(params)": lambda: multibalance.MetaBalance(["a", "b"], shared_parameters=shared),
            "PCGrad(params)": lambda: multibalance.PCGrad(["a", "b"], shared_parameters=shared),
            "MGDA(params)": lambda: multibalance.MGDA(["a", "b"], shared_parameters=shared)}[name]()


def train(name, wrapper, net, x, ya, yb, steps=3):
    """The last step's gradients and the balancer's state (its floating buffers and parameters)
    after `steps` steps of SGD on the model and the balancer's parameters."""
    bal = make(name, net)
    opt = torch.optim.SGD([*net.parameters(), *bal.parameters()], lr=0.1)
    for step in range(steps):
        opt.zero_grad()
        rep = bal.attach(wrapper(x))
        ya_s, yb_s = ya * (1 + step), yb  # the tasks' losses move apart: the balancers have something to do
        bal.backward({"a": ((net.head_a(rep) - ya_s) ** 2).mean(), "b": ((net.head_b(rep) - yb_s) ** 2).mean()})
        grads = {k: p.grad.clone() for k, p in net.named_parameters()}
        opt.step()
        if isinstance(bal, multibalance.FAMO):
            with torch.no_grad():
                rep = net(x)
                bal.update({"a": ((net.head_a(rep) - ya_s) ** 2).mean(), "b": ((net.head_b(rep) - yb_s) ** 2).mean()})
    state = {k: v.detach().clone() for k, v in [*bal.state_dict().items(), *bal.named_parameters()]
             if isinstance(v, torch.Tensor) and v.is_floating_point()}
    return grads, state


def worker(rank, world, port, out):
    init_gloo(rank, world, port)
    try:
        results = {}
        for name in NAMES:
            net = Net()
            ddp = torch.nn.parallel.DistributedDataParallel(net)
            x, ya, yb = (t.chunk(world)[rank] for t in data())
            try:
                results[name] = train(name, ddp, net, x, ya, yb)
            except (ValueError, RuntimeError) as error:
                results[name] = f"{type(error).__name__}: {error}"
        save_gathered(results, out)
    finally:
        destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2, join=True)
