"""The exact-verification op (`silvertorch::verify_plans`): its kernel against its reference, and the
reference against a plain Python evaluation of the filters on the items' attribute sets."""

import pytest
import torch

from gpukernels_common import Backend
from silvertorch import parse_filters
from silvertorch.bloom.hashing import term_hash
from silvertorch.bloom.verify import verify_plans

FILTERS = ["", "1:0", "NOT 2:1", "1:{0,2} AND NOT (3:5 OR 2:0)", "NOT NOT 3:4 | 1:1 & !2:2",
           "(1:0 OR 1:1) AND (2:0 OR 2:1) AND (3:4 OR NOT 3:5)", "4:9"]


def _items(n, width, seed):
    """n items of 0..width (feature, value) attributes over features 1-3 (feature 4 on none):
    (attribute sets, attr_terms [n, width] with garbage past each count, attr_counts [n])."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, width + 1, (n,), generator=g)
    fids = torch.randint(1, 4, (n, width), generator=g)
    vals = torch.randint(0, 6, (n, width), generator=g)
    terms = term_hash(fids, vals)
    # past each count a term the filters ask for (1:0, 2:1, 3:4, ...): read, it would pass items wrongly
    terms[torch.arange(width) >= counts.unsqueeze(1)] = term_hash(torch.tensor(1), torch.tensor(0))
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

