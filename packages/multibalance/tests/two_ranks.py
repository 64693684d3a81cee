"""What the 2-rank gloo worker scripts (ddp_baselines_worker, metrics_ddp_worker,
ddp_unread_worker) share: joining the group and handing rank 0's test every rank's results."""

import datetime
import os

import torch
import torch.distributed as dist


def init_gloo(rank: int, world: int, port: int, seconds: float = 60) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=seconds))


def save_gathered(result, out: str) -> None:
    """Every rank's `result` (any picklable object), saved by rank 0 to `out` in rank order."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        torch.save(gathered, out)
    dist.barrier()  # leave together: gloo dislikes a peer vanishing mid-teardown
