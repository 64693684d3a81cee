"""The exact-words op (`silvertorch::exact_words`): its kernel against its reference, and the
reference against the items' attribute sets, for the slots an EXACT_TERM step reads."""

import pytest
import torch

from gpukernels_common import Backend
from silvertorch import parse_filters
from silvertorch.bloom.exact_words import exact_words
from silvertorch.bloom.hashing import term_hash
from silvertorch.bloom.parser import EXACT_TERM

FILTERS = ["", "1:0", "NOT 2:1", "1:{0,2} AND NOT (3:5 OR 2:0)", "NOT 3:4 AND NOT 1:1 AND NOT 2:2", "4:9 OR NOT 4:9"]


def _items(n, width, seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, width + 1, (n,), generator=g)
    fids = torch.randint(1, 4, (n, width), generator=g)
    vals = torch.randint(0, 6, (n, width), generator=g)
    terms = term_hash(fids, vals)
    # past each count a term a filter has under NOT (2:1): read, it would set bits wrongly
    terms[torch.arange(width) >= counts.unsqueeze(1)] = term_hash(torch.tensor(2), torch.tensor(1))
    sets = [{(int(f), int(v)) for f, v in zip(fids[i, :c], vals[i, :c])} for i, c in enumerate(counts.tolist())]
    return sets, terms, counts


def _args(n, width, m, slots, seed):
    sets, terms, counts = _items(n, width, seed)
    plans = parse_filters(FILTERS)
    words = torch.randint(0, (n + 63) // 64, (len(FILTERS), m), generator=torch.Generator().manual_seed(seed + 1))
    hashes = torch.nn.functional.pad(plans.hashes, (0, max(0, slots - plans.hashes.shape[1])))[:, :slots].contiguous()
    return sets, plans, (terms, counts, words, hashes, plans.ops, plans.args, n - 1)


@pytest.mark.parametrize("n, width, m, slots", [(70, 3, 1, 1), (200, 2, 5, 4), (130, 0, 3, 2), (64, 4, 2, 3)])
def test_reference_holds_the_exact_bits_of_the_slots_in_use(n, width, m, slots):
    sets, plans, args = _args(n, width, m, slots, seed=n)
    got = exact_words.run(Backend.REFERENCE, *args)
    assert got.shape == (len(FILTERS), slots, m)
    words, hashes = args[2], args[3]
    terms = [[plans_term for plans_term in row] for row in hashes.tolist()]
    for q in range(len(FILTERS)):
        used = {int(a) for o, a in zip(plans.ops[q], plans.args[q]) if o == EXACT_TERM}
        for e in range(slots):
            for j, w in enumerate(words[q].tolist()):
                if e not in used:
                    assert got[q, e, j] == 0
                    continue
                want = 0
                for b in range(64):
                    item = min(64 * w + b, n - 1)
                    if any(int(term_hash(torch.tensor([f]), torch.tensor([v]))) == terms[q][e] for f, v in sets[item]):
                        want |= 1 << b
                assert int(got[q, e, j]) & (2**64 - 1) == want, (q, e, j)


@pytest.mark.parametrize("n, width, m, slots", [(70, 3, 1, 1), (200, 2, 5, 4), (130, 0, 3, 2), (700, 5, 70, 3)])
def test_kernel_matches_reference(n, width, m, slots):
    _, _, args = _args(n, width, m, slots, seed=n + 7)
    want = exact_words.run(Backend.REFERENCE, *args)
    assert torch.equal(exact_words.run(Backend.INTERPRET, *args), want)


def test_kernel_writes_inside_its_output_only():
    import triton

    from silvertorch.bloom.kernels import exact_words_kernel

    _, _, (terms, counts, words, hashes, ops, args, last) = _args(300, 3, 70, 3, seed=9)
    q, e, m = words.shape[0], hashes.shape[1], words.shape[1]
    buffer = torch.full((q * e * m + 64,), 77, dtype=torch.int64)
    exact_words_kernel[(q, triton.cdiv(m, 64))](buffer, words, terms, counts, hashes, ops, args, m, ops.shape[1], e, e,
                                              terms.shape[1], last, BW=64)
    assert (buffer[q * e * m:] == 77).all()
    assert torch.equal(buffer[: q * e * m].view(q, e, m), exact_words.run(Backend.REFERENCE, terms, counts, words, hashes, ops, args, last))


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_exact_words_op_passes_opcheck(monkeypatch, backend):
    monkeypatch.setenv("GKC_BACKEND", backend)
    _, _, args = _args(90, 2, 4, 2, seed=11)
    torch.library.opcheck(exact_words.op, args)
