"""Run by test_metrics.py as a script: 2 gloo ranks, each with its own part of the samples, compute
the metrics with sync=True; rank 0 saves every rank's results (or the error each raised)."""

import sys

import torch
import torch.multiprocessing as mp
from two_ranks import init_gloo, save_gathered  # (this directory: the script's)

from gpukernels_common.distributed import destroy_process_group
from multibalance import BinaryTaskMetrics, MultiTaskMetrics


def data():
    """Both tasks' (logits, labels); rank r gets rows r::2 of task a and, of task b, all rows on
    rank 0 and none on rank 1 (a rank without samples)."""
    g = torch.Generator().manual_seed(0)
    logits = {t: torch.randn(21, generator=g).round(decimals=1) for t in "ab"}  # ties across ranks
    labels = {t: (torch.rand(21, generator=g) < 0.4).double() for t in "ab"}
    return logits, labels


def worker(rank, world, port, out):
    init_gloo(rank, world, port)
    try:
        logits, labels = data()
        multi, single = MultiTaskMetrics(["a", "b"]), BinaryTaskMetrics()
        part = slice(rank, None, world)
        multi.update({"a": logits["a"][part], "b": logits["b"] if rank == 0 else logits["b"][:0]},
                     {"a": labels["a"][part], "b": labels["b"] if rank == 0 else labels["b"][:0]})
        if rank == 0:
            single.update(logits["b"], labels["b"])
        results = {"multi": multi.compute(sync=True), "single": single.compute(sync=True),
                   "local_count": multi.tasks["a"].count}
        try:
            MultiTaskMetrics(["a", "b"] if rank == 0 else ["a", "c"]).compute(sync=True)
            results["mismatch"] = "no error"
        except ValueError as error:
            results["mismatch"] = str(error)
        save_gathered(results, out)
    finally:
        destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2, join=True)
