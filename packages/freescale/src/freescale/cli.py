"""`freescale` command line: simulate bubbles at scale, or train the reference model.

    freescale simulate --world 256 --lengths zipf --method kk_equal
    torchrun --nproc_per_node 2 -m freescale.train --steps 20      (or: freescale train ...)
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .cost import CostModel
from .data import movielens_sequences, zipf_lengths
from .partition import METHODS
from .simulate import simulate


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        # forwarded whole, before argparse: a REMAINDER positional would not take leading options
        from .train import main as train_main

        train_main(argv[1:], prog="freescale train")
        return 0
    parser = argparse.ArgumentParser(prog="freescale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="bubble ratio of naive vs balanced data parallelism")
    sim.add_argument("--world", type=_positive_int, default=64)
    sim.add_argument("--per-rank", type=_positive_int, default=32, help="samples per rank per step")
    sim.add_argument("--steps", type=_positive_int, default=10)
    sim.add_argument("--lengths", choices=["zipf", "movielens"], default="zipf")
    sim.add_argument("--method", choices=METHODS, default="kk_equal")
    sub.add_parser("train", help="run freescale.train with the options that follow (use torchrun for several ranks)",
                   add_help=False)  # listed for --help; handled above
    args = parser.parse_args(argv)
    n = args.world * args.per_rank
    if args.lengths == "zipf":
        pool = zipf_lengths(n * args.steps, seed=0)
    else:
        lengths = movielens_sequences().lengths
        # seeded as the zipf pool is: the same command prints the same figures
        draw = torch.randint(0, lengths.numel(), (n * args.steps,), generator=torch.Generator().manual_seed(0))
        pool = lengths[draw]
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
