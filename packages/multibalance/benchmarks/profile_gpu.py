"""Where a training step's time goes, equal weights against MultiBalance: torch.profiler over a
few steps of bench_overhead.py's host-bound model (batch 2,048) at 2 and 8 tasks. Prints, per
case, the wall time per step, the kernels by device time, the host ops by CPU time and the
launches and synchronisations per step. A diagnostic for the GPU overhead (+17 to +48% on an
H200, far more than the balancer's own ops account for), not a benchmark: it records nothing.
Without CUDA it profiles the host side on the CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import multibalance as mb
from gpukernels_common.bench import print_profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SharedBottomModel  # noqa: E402

CARDINALITY = {"user": 20000, "item": 50000, "a": 1000, "b": 1000}  # as bench_overhead.py
BATCH = 2048


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for n_tasks in (2, 8):
        tasks = [f"t{i}" for i in range(n_tasks)]
        torch.manual_seed(0)
        model = SharedBottomModel(CARDINALITY, 32, tasks).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        sparse = {k: torch.randint(0, v, (BATCH,), device=device) for k, v in CARDINALITY.items()}
        dense = torch.randn(BATCH, 32, device=device)
        labels = {t: (torch.rand(BATCH, 1, device=device) < 0.3).float() for t in tasks}
        for name, balancer in (("equal weights", mb.EqualWeights(tasks)), ("multibalance", mb.MultiBalance(tasks))):
            def step(balancer=balancer):
                opt.zero_grad(set_to_none=True)
                rep = balancer.attach(model.shared(sparse, dense))
                losses = {t: torch.nn.functional.binary_cross_entropy_with_logits(model.heads[t](rep), labels[t]) for t in tasks}
                balancer.backward(losses)
                opt.step()

            print_profile(f"{name}, {n_tasks} tasks, batch {BATCH} ({device})", step, calls=10)


if __name__ == "__main__":
    sys.exit(main())
