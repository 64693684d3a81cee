"""`freescale` command line: simulate bubbles at scale, or train the reference model.

    freescale simulate --world 256 --lengths zipf --method kk_equal
    torchrun --nproc_per_node 2 -m freescale.train --steps 20      (or: freescale train ...)
"""

from __future__ import annotations

import argparse
import json
import sys

from .cost import CostModel
from .data import movielens_sequences, zipf_lengths
from .partition import METHODS
from .simulate import simulate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="freescale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="bubble ratio of naive vs balanced data parallelism")
    sim.add_argument("--world", type=int, default=64)
    sim.add_argument("--per-rank", type=int, default=32, help="samples per rank per step")
    sim.add_argument("--steps", type=int, default=10)
    sim.add_argument("--lengths", choices=["zipf", "movielens"], default="zipf")
    sim.add_argument("--method", choices=METHODS, default="kk_equal")
    train = sub.add_parser("train", help="run freescale.train (use torchrun for several ranks)")
    train.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "train":
        from .train import main as train_main

        train_main(args.rest)
        return 0
    n = args.world * args.per_rank
    if args.lengths == "zipf":
        pool = zipf_lengths(n * args.steps, seed=0)
    else:
        lengths = movielens_sequences().lengths
        pool = lengths[__import__("torch").randint(0, lengths.numel(), (n * args.steps,))]
    batches = list(pool.split(n))
    cost = CostModel(a=256.0, b=1.0)
    naive = simulate(batches, args.world, cost, method="contiguous")
    balanced = simulate(batches, args.world, cost, method=args.method)
    out = {"naive": naive.as_dict(), args.method: balanced.as_dict(),
           "bubble_reduction": 1 - balanced.bubble_ratio / naive.bubble_ratio if naive.bubble_ratio else 0.0}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
