"""Process-group teardown that does not deadlock on torch < 2.8: call
`gpukernels_common.distributed.destroy_process_group()` where a script would call
`dist.destroy_process_group()`."""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist

# the gloo backends of groups destroyed one at a time: the caller still holds the `ProcessGroup`
# (a `close()` method's local, this function's argument) and frees it after the call, with the
# GIL held; a reference here keeps that from being the backend's last, which the next full
# teardown drops instead
_RETIRED: list = []


def destroy_process_group(group=None) -> None:
    """`torch.distributed.destroy_process_group(group)` (every group when None), with the gloo
    backends destroyed while the GIL is released.

    Before torch 2.8 (pytorch/pytorch#154976) the `ProcessGroup` binding frees its backends with
    the GIL held: ~ProcessGroupGloo joins gloo's worker threads, and a worker that is still
    releasing a finished collective whose tensor Python has already dropped (a temporary such as
    freescale `CommScheduler`'s chunk copies; the tensor's Python object is then owned by C++) waits for
    the GIL to free it. Both wait forever. It needs the worker to be descheduled between
    completing the collective and releasing it, so it shows on a loaded machine. Holding a
    reference to every gloo backend across the call leaves their last release to the backend's
    own binding, which drops the GIL first. Objects that keep a group alive past this call (e.g. a
    freescale `BatchBalancer`'s background group) free it later with the GIL held: drop them first.
    A single `group`'s backend is kept until the next call without one (the caller frees the
    group itself, later). Newer torch shuts the backends down in `destroy_process_group` itself;
    this changes nothing there.
    """
    # no ProcessGroup reference may stay in this frame: it would free its backend after `backends`
    backends = [_cpu_backend(pg) for pg in (list(dist.distributed_c10d._world.pg_map) if group is None else [group])]
    gc.collect()  # unreachable objects (cycles) that hold a group: freed now, their backends kept
    dist.destroy_process_group(group)
    if group is not None:
        _RETIRED.extend(b for b in backends if b is not None)
        return
    _RETIRED.clear()  # as `backends`: their groups are gone (the callers of a one-group call have returned)
    del backends  # the last references: each backend's binding releases the GIL, then joins its threads


def _cpu_backend(pg):
    try:
        return pg._get_backend(torch.device("cpu"))
    except RuntimeError:  # no CPU backend (NCCL only): nothing of gloo's to free
        return None
