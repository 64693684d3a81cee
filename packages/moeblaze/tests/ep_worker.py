"""Run by test_parallel.py: 2 gloo ranks, 4 experts (2 per rank), every case in CASES in one
process group; rank 0 saves each rank's outputs, gradients and traffic counts. With a third
argument "ddp": the DDP case instead (`run_ddp`)."""

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpukernels_common.distributed import destroy_process_group
from moeblaze import MoE, expert_parallel_experts

WORLD, N_EXPERTS = 2, 4
LOCAL = N_EXPERTS // WORLD

# name: tokens per rank, d, d_ff, top_k, routing, checkpoint
CASES = {
    "top1_odd_d": dict(tokens=(9, 6), d=7, f=10, k=1, routing="random", checkpoint="preact"),
    "top2_hot_expert": dict(tokens=(13, 13), d=8, f=12, k=2, routing="hot", checkpoint="recompute"),
    "top_k_equals_experts": dict(tokens=(7, 5), d=5, f=9, k=N_EXPERTS, routing="random", checkpoint="preact"),
    # every choice is an expert of rank 0: de-duplication is maximal and rank 1 receives nothing
    "all_on_rank0": dict(tokens=(6, 8), d=6, f=8, k=2, routing="rank0", checkpoint="preact"),
    "rank1_without_tokens": dict(tokens=(8, 0), d=5, f=6, k=2, routing="random", checkpoint="preact"),
    # tokens that pick one expert twice: token 0 has 3 choices on rank 0, which holds 2 experts
    "with_duplicate_ids": dict(tokens=(5, 4), d=6, f=8, k=3, routing="duplicates", checkpoint="preact"),
}
# the MoE module with expert_group and a capacity: each rank drops over its own tokens
LAYER_CASE = dict(tokens=(10, 7), d=6, f=10, k=2, capacity_factor=0.6, activation="silu", n_shared_experts=1)


def case_inputs(name):
    """The global batch (rank r's tokens are the r-th chunk), with full expert weights."""
    case = CASES[name]
    g = torch.Generator().manual_seed(sorted(CASES).index(name))
    t, d, f, k = sum(case["tokens"]), case["d"], case["f"], case["k"]
    x = torch.randn(t, d, generator=g)
    choose_from = LOCAL if case["routing"] == "rank0" else N_EXPERTS
    ids = torch.stack([torch.randperm(choose_from, generator=g)[:k] for _ in range(t)]).int()
    if case["routing"] == "hot":
        ids[: case["tokens"][0], 0] = 0
    if case["routing"] == "duplicates":
        ids[::2, 1] = ids[::2, 0]
        ids[0] = torch.tensor([0, 0, 1])
        ids[t - 1] = torch.tensor([3, 2, 3])
    w = torch.rand(t, k, generator=g)
    if case["routing"] == "random" and k > 1:  # a few slots dropped by a capacity: id E, weight 0
        ids[1, 0] = ids[t - 1, k - 1] = N_EXPERTS
        w[1, 0] = w[t - 1, k - 1] = 0
    wg, wu = (torch.randn(N_EXPERTS, d, f, generator=g) / d**0.5 for _ in range(2))
    wd = torch.randn(N_EXPERTS, f, d, generator=g) / f**0.5
    grad_out = torch.randn(t, d, generator=g)
    return x, ids, w, (wg, wu, wd), grad_out


def layer_inputs():
    """A single-process MoE (all experts) and the global batch and output gradient."""
    c = LAYER_CASE
    torch.manual_seed(11)
    layer = MoE(c["d"], c["f"], N_EXPERTS, c["k"], activation=c["activation"], capacity_factor=c["capacity_factor"],
                n_shared_experts=c["n_shared_experts"])
    x = torch.randn(sum(c["tokens"]), c["d"])
    grad_out = torch.randn(sum(c["tokens"]), c["d"])
    return layer, x, grad_out


def rank_slice(tokens, rank):
    return slice(sum(tokens[:rank]), sum(tokens[: rank + 1]))


def expert_slice(rank):
    return slice(rank * LOCAL, (rank + 1) * LOCAL)


def run_case(name, rank):
    x, ids, w, params, grad_out = case_inputs(name)
    sl = rank_slice(CASES[name]["tokens"], rank)
    xs, ws = x[sl].clone().requires_grad_(), w[sl].clone().requires_grad_()
    local = [p[expert_slice(rank)].clone().requires_grad_() for p in params]
    traffic = {}
    y = expert_parallel_experts(xs, ids[sl], ws, *local, n_experts=N_EXPERTS, checkpoint=CASES[name]["checkpoint"],
                                traffic=traffic)
    y.backward(grad_out[sl])
    return {"y": y.detach(), "dx": xs.grad, "dw": ws.grad, "dparams": [p.grad for p in local], "traffic": traffic}


def run_layer(rank):
    full, x, grad_out = layer_inputs()
    c = LAYER_CASE
    layer = MoE(c["d"], c["f"], N_EXPERTS, c["k"], activation=c["activation"], capacity_factor=c["capacity_factor"],
                n_shared_experts=c["n_shared_experts"], expert_group=dist.group.WORLD)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            src = full.get_parameter(name)
            p.copy_(src[expert_slice(rank)] if name.startswith("w_") else src)
    sl = rank_slice(c["tokens"], rank)
    xs = x[sl].clone().requires_grad_()
    y = layer(xs)
    (y * grad_out[sl]).sum().backward()
    return {"y": y.detach(), "dx": xs.grad, "grads": {n: p.grad for n, p in layer.named_parameters()},
            "dropped": int(layer.last_dropped), "aux_loss": layer.aux_loss.detach(), "traffic": layer.last_traffic}


# MoE(expert_group=...) built with the same seed on every rank (data-parallel seeding)
INIT_CASE = dict(d=6, f=10, k=2, n_shared_experts=1, seed=5)


def run_init(rank):
    """This rank's parameters right after construction."""
    c = INIT_CASE
    torch.manual_seed(c["seed"])
    layer = MoE(c["d"], c["f"], N_EXPERTS, c["k"], n_shared_experts=c["n_shared_experts"], expert_group=dist.group.WORLD)
    return {name: p.detach() for name, p in layer.named_parameters()}


# a model with an expert-parallel MoE, wrapped in DistributedDataParallel after `prepare_ddp`
DDP_CASE = dict(tokens=8, d=6, f=10, k=2, n_shared_experts=1, seed=7)


class DDPNet(torch.nn.Module):
    """A replicated input layer, then the MoE (`expert_group` None: the single-process model)."""

    def __init__(self, expert_group=None):
        super().__init__()
        c = DDP_CASE
        torch.manual_seed(c["seed"])  # seeded alike on every rank, as data parallelism seeds
        self.inp = torch.nn.Linear(c["d"], c["d"])
        self.moe = MoE(c["d"], c["f"], N_EXPERTS, c["k"], n_shared_experts=c["n_shared_experts"], expert_group=expert_group)

    def forward(self, x):
        return self.moe(self.inp(x))


def ddp_inputs():
    """The global batch (rank r's tokens are the r-th of WORLD equal chunks)."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(WORLD * DDP_CASE["tokens"], DDP_CASE["d"], generator=g)


def ddp_step(model, net, x):
    """One step's loss (a mean over this rank's tokens) and the inner module's gradients."""
    loss = model(x).square().mean()
    loss.backward()
    return {name: p.grad for name, p in net.named_parameters()}


def run_ddp(rank):
    from moeblaze import prepare_ddp

    net = DDPNet(dist.group.WORLD)
    ignored = prepare_ddp(net)
    model = torch.nn.parallel.DistributedDataParallel(net)
    x = ddp_inputs().chunk(WORLD)[rank]
    params = {name: p.detach().clone() for name, p in net.named_parameters()}
    return {"ignored": ignored, "params": params, "grads": ddp_step(model, net, x)}


def run(rank, world, port, out, mode="ep"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    if mode == "ddp":
        results = run_ddp(rank)
    else:
        results = {name: run_case(name, rank) for name in CASES}
        results["layer"] = run_layer(rank)
        results["init"] = run_init(rank)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out)
    dist.barrier()  # leave together: gloo dislikes a peer vanishing mid-teardown
    destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(WORLD, int(sys.argv[1]), sys.argv[2], *sys.argv[3:4]), nprocs=WORLD, join=True)
