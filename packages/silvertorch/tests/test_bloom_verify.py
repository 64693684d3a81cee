"""The ops that test filters exactly on the items' stored attributes: the exact verification
(`silvertorch::verify_plans`) and the exact words of probed items (`silvertorch::exact_words`),
each kernel against its reference and each reference against the items' attribute sets."""

import pytest
import torch

from gpukernels_common import Backend
from silvertorch import parse_filters
from silvertorch.bloom.exact_words import exact_words
from silvertorch.bloom.hashing import term_hash
from silvertorch.bloom.parser import EXACT_TERM
from silvertorch.bloom.verify import verify_plans

FILTERS = ["", "1:0", "NOT 2:1", "1:{0,2} AND NOT (3:5 OR 2:0)", "NOT NOT 3:4 | 1:1 & !2:2",
           "(1:0 OR 1:1) AND (2:0 OR 2:1) AND (3:4 OR NOT 3:5)", "4:9"]


def _items(n, width, seed, past=(1, 0)):
    """n items of 0..width (feature, value) attributes over features 1-3 (feature 4 on none):
    (attribute sets, attr_terms [n, width], attr_counts [n]). Past each count the row holds the
    term `past`, one the filters ask for: read, it would pass items (or set bits) wrongly."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, width + 1, (n,), generator=g)
    fids = torch.randint(1, 4, (n, width), generator=g)
    vals = torch.randint(0, 6, (n, width), generator=g)
    terms = term_hash(fids, vals)
    terms[torch.arange(width) >= counts.unsqueeze(1)] = term_hash(torch.tensor(past[0]), torch.tensor(past[1]))
    sets = [{(int(f), int(v)) for f, v in zip(fids[i, :c], vals[i, :c])} for i, c in enumerate(counts.tolist())]
    return sets, terms, counts


def _truth(text, attrs):
    """The filter on one item's attribute set, by Python's own boolean evaluation."""
    if not text:
        return True
    expr = text.replace("&", " and ").replace("|", " or ").replace("!", " not ")
    expr = expr.replace("AND", " and ").replace("OR", " or ").replace("NOT", " not ")
    import re

    expr = re.sub(r"(\d+):\{([\d,]+)\}", lambda m: "(" + " or ".join(f"{m[1]}:{v}" for v in m[2].split(",")) + ")", expr)
    expr = re.sub(r"(\d+):(\d+)", lambda m: str((int(m[1]), int(m[2])) in attrs), expr)
    return eval(expr)  # noqa: S307 - our own test strings, only True/False/and/or/not/parentheses


def _args(filters, positions, terms, counts):
    plans = parse_filters(filters)
    return terms, counts, positions, plans.ops, plans.args, plans.hashes


@pytest.mark.parametrize("n, width, m", [(50, 3, 1), (97, 5, 37), (300, 1, 130)])
def test_reference_is_the_filter_on_the_stored_attributes(n, width, m):
    sets, terms, counts = _items(n, width, seed=n)
    positions = torch.randint(0, n, (len(FILTERS), m), generator=torch.Generator().manual_seed(1))
    got = verify_plans.run(Backend.REFERENCE, *_args(FILTERS, positions, terms, counts))
    want = torch.tensor([[_truth(f, sets[i]) for i in row] for f, row in zip(FILTERS, positions.tolist())])
    assert got.dtype == torch.bool and torch.equal(got, want)
    assert want.any() and not want.all()


@pytest.mark.parametrize("n, width, m", [(50, 3, 1), (97, 5, 37), (300, 1, 130), (40, 0, 9)])
def test_kernel_matches_reference(n, width, m):
    sets, terms, counts = _items(n, width, seed=n + 1)
    positions = torch.randint(0, n, (len(FILTERS), m), generator=torch.Generator().manual_seed(2))
    args = _args(FILTERS, positions, terms, counts)
    assert torch.equal(verify_plans.run(Backend.INTERPRET, *args), verify_plans.run(Backend.REFERENCE, *args))


def test_kernel_writes_inside_its_output_only():
    """The launch on a canary-padded buffer (the interpreter does not catch stores out of bounds)."""
    import triton

    from silvertorch.bloom.kernels import verify_kernel

    _, terms, counts = _items(60, 4, seed=3)
    q, m, bm = len(FILTERS), 70, 64
    positions = torch.randint(0, 60, (q, m), generator=torch.Generator().manual_seed(4))
    _, _, _, ops, args, hashes = _args(FILTERS, positions, terms, counts)
    buffer = torch.full((q * m + 64,), 7, dtype=torch.int8)
    verify_kernel[(q, triton.cdiv(m, bm))](buffer, positions, terms, counts, ops, args, hashes, m, ops.shape[1],
                                           hashes.shape[1], terms.shape[1], BM=bm, BA=4)
    assert (buffer[q * m:] == 7).all()
    want = verify_plans.run(Backend.REFERENCE, terms, counts, positions, ops, args, hashes)
    assert torch.equal(buffer[: q * m].view(q, m), want.to(torch.int8))


def test_no_candidates_and_no_queries():
    _, terms, counts = _items(10, 2, seed=5)
    for backend in (Backend.REFERENCE, Backend.INTERPRET):
        assert verify_plans.run(backend, *_args(FILTERS, torch.zeros(len(FILTERS), 0, dtype=torch.int64), terms, counts)).shape == (len(FILTERS), 0)
        assert verify_plans.run(backend, *_args([], torch.zeros(0, 5, dtype=torch.int64), terms, counts)).shape == (0, 5)


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_verify_op_passes_opcheck(monkeypatch, backend):
    monkeypatch.setenv("GKC_BACKEND", backend)
    _, terms, counts = _items(30, 3, seed=6)
    positions = torch.randint(0, 30, (len(FILTERS), 11), generator=torch.Generator().manual_seed(7))
    torch.library.opcheck(verify_plans.op, _args(FILTERS, positions, terms, counts))


# -- exact words of probed items ------------------------------------------------------------
EXACT_FILTERS = ["", "1:0", "NOT 2:1", "1:{0,2} AND NOT (3:5 OR 2:0)", "NOT 3:4 AND NOT 1:1 AND NOT 2:2", "4:9 OR NOT 4:9"]


def _exact_args(n, width, m, slots, seed):
    sets, terms, counts = _items(n, width, seed, past=(2, 1))  # 2:1: a term under NOT
    plans = parse_filters(EXACT_FILTERS)
    words = torch.randint(0, (n + 63) // 64, (len(EXACT_FILTERS), m), generator=torch.Generator().manual_seed(seed + 1))
    hashes = torch.nn.functional.pad(plans.hashes, (0, max(0, slots - plans.hashes.shape[1])))[:, :slots].contiguous()
    return sets, plans, (terms, counts, words, hashes, plans.ops, plans.args, n - 1)


@pytest.mark.parametrize("n, width, m, slots", [(70, 3, 1, 1), (200, 2, 5, 4), (130, 0, 3, 2), (64, 4, 2, 3)])
def test_exact_words_reference_holds_the_bits_of_the_slots_in_use(n, width, m, slots):
    sets, plans, args = _exact_args(n, width, m, slots, seed=n)
    got = exact_words.run(Backend.REFERENCE, *args)
    assert got.shape == (len(EXACT_FILTERS), slots, m)
    words, hashes = args[2], args[3]
    terms = hashes.tolist()
    for q in range(len(EXACT_FILTERS)):
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
def test_exact_words_kernel_matches_reference(n, width, m, slots):
    _, _, args = _exact_args(n, width, m, slots, seed=n + 7)
    want = exact_words.run(Backend.REFERENCE, *args)
    assert torch.equal(exact_words.run(Backend.INTERPRET, *args), want)


def test_exact_words_kernel_writes_inside_its_output_only():
    import triton

    from silvertorch.bloom.kernels import exact_words_kernel

    _, _, (terms, counts, words, hashes, ops, args, last) = _exact_args(300, 3, 70, 3, seed=9)
    q, e, m = words.shape[0], hashes.shape[1], words.shape[1]
    buffer = torch.full((q * e * m + 64,), 77, dtype=torch.int64)
    exact_words_kernel[(q, triton.cdiv(m, 64))](buffer, words, terms, counts, hashes, ops, args, m, ops.shape[1], e, e,
                                              terms.shape[1], last, BW=64)
    assert (buffer[q * e * m:] == 77).all()
    assert torch.equal(buffer[: q * e * m].view(q, e, m), exact_words.run(Backend.REFERENCE, terms, counts, words, hashes, ops, args, last))


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_exact_words_op_passes_opcheck(monkeypatch, backend):
    monkeypatch.setenv("GKC_BACKEND", backend)
    _, _, args = _exact_args(90, 2, 4, 2, seed=11)
    torch.library.opcheck(exact_words.op, args)
