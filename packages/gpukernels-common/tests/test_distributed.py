import datetime

import pytest
import torch
import torch.distributed as dist

from gpukernels_common import distributed
from gpukernels_common.distributed import destroy_process_group


@pytest.mark.parametrize("which", ["every group", "one group"])
def test_destroy_process_group_tears_down_like_torch(tmp_path, which):
    """A one-rank gloo world: the named group (or every group) is gone afterwards, as with
    torch's own call; the world stays usable after one subgroup goes."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        sub = dist.new_group([0], backend="gloo")
        t = torch.ones(3)
        dist.all_reduce(t, group=sub)
        if which == "one group":
            destroy_process_group(sub)
            assert dist.is_initialized() and sub not in dist.distributed_c10d._world.pg_map
            dist.all_reduce(t)  # the default group still works
            assert torch.equal(t, torch.ones(3))
        destroy_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_one_groups_backend_outlives_the_callers_reference(tmp_path):
    """Destroying one group: the caller frees its `ProcessGroup` after the call (with the GIL held,
    which before torch 2.8 could deadlock in the gloo backend's destructor), so the backend must
    still be referenced elsewhere until the next full teardown, which drops it."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        sub = dist.new_group([0], backend="gloo")
        backend = sub._get_backend(torch.device("cpu"))
        destroy_process_group(sub)
        del sub  # as a close() method's local goes when it returns
        assert any(kept is backend for kept in distributed._RETIRED)
        destroy_process_group()
        assert not any(kept is backend for kept in distributed._RETIRED)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
