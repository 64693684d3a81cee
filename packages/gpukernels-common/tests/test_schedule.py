import pytest
import torch

from gpukernels_common import grouped_blocks


def _reference_blocks(starts, counts, block):
    """Every (group, first row) a per-group loop would launch, in group order."""
    out = []
    for g, (s, c) in enumerate(zip(starts.tolist(), counts.tolist())):
        out += [(g, s + r) for r in range(0, c, block)]
    return out


@pytest.mark.parametrize("block", [1, 3, 16])
@pytest.mark.parametrize("counts", [[0], [5], [0, 7, 0, 0, 13, 1], [16, 16, 0, 33], [2] * 9])
def test_blocks_cover_every_group_row_once(counts, block):
    counts = torch.tensor(counts)
    starts = torch.cumsum(counts, 0) - counts
    total = int(counts.sum()) + 3  # an upper bound may exceed the rows that exist
    group, first, n_blocks = grouped_blocks(starts, counts, total, block)
    assert n_blocks == -(-total // block) + len(counts) == group.numel() == first.numel()
    live = group >= 0
    assert list(zip(group[live].tolist(), first[live].tolist())) == _reference_blocks(starts, counts, block)
    assert (first[~live] == 0).all() and bool(live[: int(live.sum())].all())  # surplus blocks trail


def test_groups_need_not_be_contiguous():
    starts, counts = torch.tensor([40, 0, 10]), torch.tensor([3, 5, 0])
    group, first, _ = grouped_blocks(starts, counts, 8, 2)
    live = group >= 0
    assert list(zip(group[live].tolist(), first[live].tolist())) == [(0, 40), (0, 42), (1, 0), (1, 2), (1, 4)]


@pytest.mark.parametrize("starts, counts, block, match", [
    (torch.zeros(2), torch.zeros(3), 4, "equal non-empty"),
    (torch.zeros(0), torch.zeros(0), 4, "equal non-empty"),
    (torch.zeros(2), torch.ones(2), 0, "block must be"),
])
def test_bad_arguments(starts, counts, block, match):
    with pytest.raises(ValueError, match=match):
        grouped_blocks(starts, counts, 4, block)
