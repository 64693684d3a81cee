"""Per-call tables that the probed filter op keeps on the device (`filtering.device_constant`)
must not grow with the batch sizes a long-running process sees (a server's dynamic batching)."""

import torch

from gpukernels_common import Backend
from silvertorch import filtering
from silvertorch.bloom.probed import probed_filter_words


def test_exact_row_tables_do_not_grow_with_the_batch_size():
    m, t, e = 4, 6, 2
    bits = torch.zeros(1, 32, dtype=torch.int64)
    row_offsets, widths = torch.tensor([0, 1]), torch.tensor([1])

    def kept():
        return sum(1 for name, _ in filtering._CONSTANTS if name.startswith("probed_exact_rows"))

    before = kept()
    for q in range(1, 9):
        ops = torch.zeros(q, 3, dtype=torch.int64)  # NOPs: the plans' content does not matter here
        args = torch.zeros(q, 3, dtype=torch.int64)
        hashes = torch.zeros(q, t, dtype=torch.int64)
        words = torch.zeros(q, m, dtype=torch.int64)
        exact = torch.zeros(q, e, m, dtype=torch.int64)
        probed_filter_words.run(Backend.INTERPRET, bits, row_offsets, widths, words, ops, args, hashes, exact, 1)
    assert kept() - before <= 1, f"{kept() - before} tables kept for 8 batch sizes"


def test_a_shared_exact_row_table_serves_batches_of_any_size():
    """Batches of 70 and 3 negated filters (exact terms) read the right query's exact words
    through one table made for 128 queries and cut to theirs: the kernel equals the reference."""
    from silvertorch import parse_filters

    g = torch.Generator().manual_seed(5)
    m = 5
    bits = torch.randint(-(2**62), 2**62, (4, 32), generator=g)
    row_offsets, widths = torch.tensor([0, 4]), torch.tensor([4])
    for q in (70, 3):
        plans = parse_filters([f"NOT 1:{i} OR 2:{i % 3}" for i in range(q)])
        e = 1
        words = torch.randint(0, 32, (q, m), generator=g)
        exact = torch.randint(-(2**62), 2**62, (q, e, m), generator=g)
        args = (bits, row_offsets, widths, words, plans.ops, plans.args, plans.hashes, exact, 2)
        got = probed_filter_words.run(Backend.INTERPRET, *args)
        assert torch.equal(got, probed_filter_words.run(Backend.REFERENCE, *args)), q
