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
P2P) and a torch with symmetric memory: the public `empty` / `rendezvous(tensor, group)` (torch
2.11 checked), or torch 2.5's private `_SymmetricMemory.empty_strided_p2p` after
`enable_symm_mem_for_group` (both APIs read from the installed packages, not run); other
versions raise a RuntimeError naming the torch version. It has not run on any GPU yet (the lent
machines have one GPU).
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
    """Pull-based all-to-all: stage, barrier, copy each peer's rows for this rank, barrier.

    On GPUs one symmetric-memory buffer per (group, device) is staged anew by every exchange:
    safe because each exchange's last barrier (every peer has read the buffer) is queued on the
    caller's CUDA stream before the next exchange's staging copy. An exchange issued on another
    stream than the group's previous one first waits for that stream (recorded per buffer)."""

    name = "copy_engine"

    def __init__(self):
        # group name -> (group, device, bytes, buffer, handle, stream of the last exchange)
        self._symmetric: dict[tuple, list] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def exchange(self, tensor: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        tensor = tensor.contiguous()
        # the metadata, one all-gather: every rank's send and receive counts (and what it can
        # hand over), so every rank checks every rank's counts and all raise the same error
        row = math.prod(tensor.shape[1:])
        mine = [len(input_splits), len(output_splits), tensor.shape[0], row]
        mine += _padded(input_splits, world) + _padded(output_splits, world)
        sent = torch.tensor(mine, dtype=torch.long, device=tensor.device)
        table = [torch.empty_like(sent) for _ in range(world)]
        dist.all_gather(table, sent, group=group)
        gathered = torch.stack(table).cpu()
        _check_splits(gathered, world)
        splits = gathered[:, 4 : 4 + world]  # rows rank r sends to rank j
        starts = (splits.cumsum(1) - splits).tolist()  # where rank r's rows for rank j begin in r's buffer
        capacity = int(splits.sum(1).max())  # rows; the same on every rank
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
        current = torch.cuda.current_stream(tensor.device)
        buffer, handle = self._buffer(capacity_elements * tensor.element_size(), tensor.device, group, current)
        local = buffer[: tensor.numel() * tensor.element_size()].view(tensor.dtype)
        local.copy_(tensor.reshape(-1))
        handle.barrier(channel=0)  # every rank has staged its rows
        if tensor.device not in self._streams:  # one side stream per device (not one per call)
            self._streams[tensor.device] = torch.cuda.Stream(tensor.device)
        side = self._streams[tensor.device]
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

    def _buffer(self, nbytes: int, device: torch.device, group, stream):
        """A symmetric-memory byte buffer of at least `nbytes` for `group` on `device`, grown by
        doubling (every rank computes the same size from the gathered counts, so every rank
        makes the same collective rendezvous). Cached by the group's name, and only for that
        very group object (a name can come back after the world is destroyed and made anew);
        `stream`: the caller's, ordered after the stream of the group's previous exchange."""
        process_group = group or dist.group.WORLD
        name = getattr(process_group, "group_name", None) or f"id:{id(process_group)}"
        key = (name, device)
        held = self._symmetric.get(key)
        if held is not None and held[0] is process_group:
            if held[5] != stream:  # the last exchange's barrier was queued there: restage after it
                stream.wait_stream(held[5])
                held[5] = stream
            if held[2] >= nbytes:
                return held[3], held[4]
        size = 1 << max(nbytes - 1, 1 << 16).bit_length()
        buffer, handle = _symmetric_buffer(size, device, process_group, name)
        # the group object is held, so an `id:` key cannot be reused by another group meanwhile
        self._symmetric[key] = [process_group, device, size, buffer, handle, stream]
        return buffer, handle


def _padded(values, n: int) -> list[int]:
    values = [int(v) for v in values][:n]
    return values + [0] * (n - len(values))


def _check_splits(gathered: torch.Tensor, world: int) -> None:
    """Every rank's counts from the metadata gather (rows: len(input_splits), len(output_splits),
    rows of the tensor, elements per row, input_splits, output_splits): a ValueError, the same
    on every rank, where any rank's do not fit together."""
    problems = []
    rows = gathered[:, 4 : 4 + world]
    for r, info in enumerate(gathered.tolist()):
        n_in, n_out, n_rows = info[0], info[1], info[2]
        if n_in != world or n_out != world:
            problems.append(f"rank {r}: input_splits has {n_in} and output_splits {n_out} entries, expected {world} "
                            "(one per rank)")
            continue
        if sum(info[4 : 4 + world]) != n_rows:
            problems.append(f"rank {r}: input_splits sum to {sum(info[4 : 4 + world])}, its tensor has {n_rows} rows")
        receives, expected = info[4 + world : 4 + 2 * world], rows[:, r].tolist()
        if receives != expected:
            problems.append(f"rank {r}: output_splits {receives} differ from what the ranks send this rank ({expected})")
    if problems:
        raise ValueError("CopyEngineTransport: " + "; ".join(problems))
    if len({info[3] for info, n in zip(gathered.tolist(), gathered[:, 2].tolist()) if n}) > 1:
        raise ValueError("CopyEngineTransport: the ranks' rows differ in size (elements per row: "
                         f"{gathered[:, 3].tolist()}); every rank must send rows of the same shape[1:]")


def _symmetric_buffer(size: int, device: torch.device, group, name: str):
    """Allocate `size` bytes of symmetric memory on `device` and rendezvous them over `group`
    (collective), with the API this torch has: the public `empty` + `rendezvous(tensor, group)`
    (torch 2.11; `enable_symm_mem_for_group` first where it is still needed, i.e. not yet
    deprecated), or torch 2.5's `_SymmetricMemory.empty_strided_p2p` + `rendezvous(tensor)`."""
    try:
        import torch.distributed._symmetric_memory as symm
    except ImportError as err:
        raise RuntimeError(f"transport='copy_engine' on GPUs needs torch's symmetric memory "
                           f"(torch.distributed._symmetric_memory), not in torch {torch.__version__}") from err
    enable = getattr(symm, "enable_symm_mem_for_group", None)
    if enable is not None and getattr(enable, "__deprecated__", None) is None:
        # torch 2.5 (and the versions before its deprecation) needs the group's store registered
        # first; a no-op when it already is; every rank gets here for the same group
        enable(name)
    if hasattr(symm, "empty") and hasattr(symm, "rendezvous"):
        buffer = symm.empty(size, dtype=torch.uint8, device=device)
        return buffer, symm.rendezvous(buffer, group)
    raw = getattr(symm, "_SymmetricMemory", None)
    if raw is not None and hasattr(raw, "empty_strided_p2p"):
        buffer = raw.empty_strided_p2p((size,), (1,), torch.uint8, device, name)
        return buffer, raw.rendezvous(buffer)
    raise RuntimeError(f"transport='copy_engine' on GPUs: torch {torch.__version__} has neither "
                       "torch.distributed._symmetric_memory.empty/rendezvous (torch 2.11) nor "
                       "_SymmetricMemory.empty_strided_p2p (torch 2.5); use transport='collective'")


def make_transport(name: str):
    if name == "collective":
        return CollectiveTransport()
    if name == "copy_engine":
        return CopyEngineTransport()
    raise ValueError(f"transport must be one of {TRANSPORTS}, got {name!r}")
