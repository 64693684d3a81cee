"""Launch schedules for grouped (ragged) work that need no host synchronisation."""

from __future__ import annotations

import torch


def grouped_blocks(starts: torch.Tensor, counts: torch.Tensor, total: int, block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Cut every group's rows into blocks of at most `block` rows, on the device.

    Group g owns rows starts[g] .. starts[g] + counts[g] - 1 and the counts sum to at most
    `total`. Returns (group, first_row, n_blocks): block i covers rows first_row[i] ..
    min(first_row[i] + block, end of its group) - 1 of group[i]. The number of blocks
    n_blocks = ceil(total / block) + n_groups is an upper bound known on the host without
    reading the counts, so a kernel grid can be sized before they are known; surplus blocks
    get group -1 and first row 0 and must do nothing.
    """
    if starts.shape != counts.shape or counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"starts and counts must be equal non-empty 1-d tensors, got {tuple(starts.shape)} and {tuple(counts.shape)}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    n_groups = counts.numel()
    counts = counts.long()
    blocks = (counts + (block - 1)) // block
    ends = torch.cumsum(blocks, 0)  # block index one past each group's last block
    # a block's first row is its group's start + (its index - the group's first block) x block:
    # the group's part of that, taken once per group, then one lookup per block
    base = starts.long() - (ends - blocks) * block
    n_blocks = (total + block - 1) // block + n_groups
    index = torch.arange(n_blocks, device=counts.device)
    group = torch.searchsorted(ends, index, right=True)
    valid = group < n_groups
    first = base[group.clamp(max=n_groups - 1)] + index * block
    return torch.where(valid, group, -1), torch.where(valid, first, 0), n_blocks
