"""How `ShardedEmbeddings` moves embedding rows (and their gradients) between ranks.

- `"collective"` (default): `all_to_all_single`, NCCL kernels on GPUs (they occupy SMs while
  they overlap the dense compute), gloo on CPUs.
- `"copy_engine"`, the "SM-free" transport: every rank stages the rows it sends in a buffer its
  peers can read, and every rank pulls its own rows out of each peer's buffer with plain copies.
  On GPUs the buffer is PyTorch symmetric memory (`torch.distributed._symmetric_memory`) and the
  pulls are `copy_` calls on a side stream, which CUDA runs on the copy engines (peer-to-peer
  DMA, no SM), between two symmetric-memory barriers (so no rank reads a buffer before it is
  staged, and none restages before every peer has read). On CPUs the same protocol runs with
  gloo standing in for the peer reads (each staged buffer is all-gathered): a test of the
  protocol, not a fast path. Where a rank's rows start in a peer's buffer comes from one small
  all-gather of every rank's send counts.

Verified where: the CPU protocol by the 2-3 rank gloo tests (equal to the collective transport,
forward and backward). The CUDA path needs GPUs that are peers of each other (NVLink or PCIe
P2P) and torch >= 2.6; it has not run on any GPU yet (the lent machines have one GPU).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

TRANSPORTS = ("collective", "copy_engine")


class CollectiveTransport:
    """Uneven `all_to_all_single` along dim 0."""

    name = "collective"

    def exchange(self, tensor: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        output = tensor.new_empty(sum(output_splits), *tensor.shape[1:])
        dist.all_to_all_single(output, tensor.contiguous(), output_splits, input_splits, group=group)
        return output


class CopyEngineTransport:
    """Pull-based all-to-all: stage, barrier, copy each peer's rows for this rank, barrier."""

    name = "copy_engine"

    def __init__(self):
        self._symmetric: dict[tuple, tuple[int, torch.Tensor, object]] = {}  # (group, device) -> (bytes, buffer, handle)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def exchange(self, tensor: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        tensor = tensor.contiguous()
        sent = torch.tensor(input_splits, dtype=torch.long, device=tensor.device)
        table = [torch.empty_like(sent) for _ in range(world)]
        dist.all_gather(table, sent, group=group)  # the metadata: rows every rank sends to every rank
        splits = torch.stack(table).cpu()
        if splits[:, rank].tolist() != list(output_splits):
            raise ValueError(f"output_splits {list(output_splits)} differ from what the ranks send this rank "
                             f"({splits[:, rank].tolist()})")
        starts = (splits.cumsum(1) - splits).tolist()  # where rank r's rows for rank j begin in r's buffer
        capacity = int(splits.sum(1).max())  # rows; the same on every rank
        row = math.prod(tensor.shape[1:])
        output = tensor.new_empty(sum(output_splits), *tensor.shape[1:])
        pulls = [(r, starts[r][rank], int(splits[r, rank])) for r in range(world)]
        if capacity == 0:  # nobody sends anything (every rank sees it)
            return output
        if tensor.is_cuda:
            self._pull_cuda(tensor, output, pulls, capacity * row, row, group)
        else:
            self._pull_gloo(tensor, output, pulls, capacity, group)
        return output

    @staticmethod
    def _pull_gloo(tensor, output, pulls, capacity, group):
        staged = tensor.new_zeros(capacity, *tensor.shape[1:])
        staged[: tensor.shape[0]] = tensor
        buffers = [torch.empty_like(staged) for _ in pulls]
        dist.all_gather(buffers, staged, group=group)  # stands in for reading the peers' buffers
        offset = 0
        for r, start, count in pulls:
            output[offset : offset + count] = buffers[r][start : start + count]
            offset += count

    def _pull_cuda(self, tensor, output, pulls, capacity_elements, row, group):
        buffer, handle = self._buffer(capacity_elements * tensor.element_size(), tensor.device, group)
        local = buffer[: tensor.numel() * tensor.element_size()].view(tensor.dtype)
        local.copy_(tensor.reshape(-1))
        handle.barrier(channel=0)  # every rank has staged its rows
        current = torch.cuda.current_stream(tensor.device)
        side = self._streams.setdefault(tensor.device, torch.cuda.Stream(tensor.device))
        side.wait_stream(current)
        flat = output.view(-1)
        with torch.cuda.stream(side):
            offset = 0
            for r, start, count in pulls:
                if count:
                    source = handle.get_buffer(r, (count * row,), tensor.dtype, start * row)
                    flat[offset * row : (offset + count) * row].copy_(source, non_blocking=True)
                offset += count
        output.record_stream(side)
        current.wait_stream(side)
        handle.barrier(channel=1)  # every rank has read this rank's buffer: it may be restaged

    def _buffer(self, nbytes: int, device: torch.device, group):
        """A symmetric-memory byte buffer of at least `nbytes` for `group` on `device`, grown by
        doubling (every rank computes the same size from the gathered counts, so every rank
        makes the same collective rendezvous)."""
        key = (id(group), device)
        held = self._symmetric.get(key)
        if held is not None and held[0] >= nbytes:
            return held[1], held[2]
        if torch.torch_version.TorchVersion(torch.__version__) < (2, 6):
            raise RuntimeError(f"transport='copy_engine' on GPUs needs torch >= 2.6 (symmetric memory), found {torch.__version__}")
        import torch.distributed._symmetric_memory as symm

        size = 1 << max(nbytes - 1, 1 << 16).bit_length()
        buffer = symm.empty(size, dtype=torch.uint8, device=device)
        process_group = group or dist.group.WORLD
        handle = symm.rendezvous(buffer, process_group)
        self._symmetric[key] = (size, buffer, handle)
        return buffer, handle


def make_transport(name: str):
    if name == "collective":
        return CollectiveTransport()
    if name == "copy_engine":
        return CopyEngineTransport()
    raise ValueError(f"transport must be one of {TRANSPORTS}, got {name!r}")
