"""Per-call tables that the probed filter op keeps on the device (`filtering.device_constant`)
must not grow with the batch sizes a long-running process sees (a server's dynamic batching)."""

import pytest
import torch

from gpukernels_common import Backend, env
from silvertorch import filtering
from silvertorch.bloom.probed import probed_filter_words

interpreted = pytest.mark.skipif(not env.triton_interpret(), reason="the Triton path runs on the CPU only with TRITON_INTERPRET=1")


@interpreted
@pytest.mark.xfail(strict=True, reason="found by review: bloom/probed.py keeps one `probed_exact_rows{q},{e},{t}` "
                   "table per batch size q (fix pending in that file: index the exact rows as q * E + min(slot, E - 1) "
                   "in the kernel, or keep one table per (E, T) and offset it by q)")
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
