import math

import pytest
import torch

from gpukernels_common.testing import CanaryBuffer
from silvertorch import BloomIndex, parse_filters

N_FEATURES, N_VALUES = 3, 4


def _items(n, max_terms=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_terms + 1, (n,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    total = int(lengths.sum())
    return torch.randint(1, N_FEATURES + 1, (total,), generator=g), offsets, torch.randint(0, N_VALUES, (total,), generator=g)


def _exact(expr_fn, fids, offsets, vals):
    n = offsets.numel() - 1
    out = []
    for i in range(n):
        s, e = int(offsets[i]), int(offsets[i + 1])
        terms = set(zip(fids[s:e].tolist(), vals[s:e].tolist()))
        out.append(expr_fn(terms))
    return torch.tensor(out)


def _unpack(words, n):
    return ((words.unsqueeze(-1) >> torch.arange(64)) & 1).reshape(words.shape[0], -1)[:, :n].bool()


FIDS, OFFSETS, VALS = _items(2500, seed=1)
INDEX = BloomIndex.build(FIDS, OFFSETS, VALS, k=2, b_multiplier=1.5)  # small filters: many false positives

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # the GPU machine has torch, triton and numpy only: its `-m gpu` run must still collect this module
    def test_no_true_match_is_ever_lost():
        pytest.fail("needs hypothesis: pip install -e 'packages/silvertorch[test]'")  # not a skip: `-m gpu` deselects it
else:
    # expression trees: (text, python predicate)
    def _leaf():
        return st.tuples(st.integers(1, N_FEATURES), st.integers(0, N_VALUES - 1)).map(
            lambda t: (f"{t[0]}:{t[1]}", lambda terms, t=t: t in terms))

    def _extend(children):
        return st.one_of(
            st.tuples(children, children).map(lambda p: (f"({p[0][0]} AND {p[1][0]})", lambda s, p=p: p[0][1](s) and p[1][1](s))),
            st.tuples(children, children).map(lambda p: (f"({p[0][0]} | {p[1][0]})", lambda s, p=p: p[0][1](s) or p[1][1](s))),
            children.map(lambda c: (f"NOT {c[0]}", lambda s, c=c: not c[1](s))),
        )

    EXPRESSIONS = st.recursive(_leaf(), _extend, max_leaves=6)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(exprs=st.lists(EXPRESSIONS, min_size=1, max_size=3))
    def test_no_true_match_is_ever_lost(exprs):
        plans = parse_filters([e[0] for e in exprs])
        got = _unpack(INDEX.search(plans), INDEX.num_items)
        for q, (_, fn) in enumerate(exprs):
            truth = _exact(fn, FIDS, OFFSETS, VALS)
            assert not (truth & ~got[q]).any(), f"{exprs[q][0]}: lost {int((truth & ~got[q]).sum())} true matches"
            exact = INDEX.verify(parse_filters([exprs[q][0]]), torch.arange(INDEX.num_items).unsqueeze(0))[0]
            assert torch.equal(exact, truth)


@pytest.mark.parametrize("k", [1, 3, 10])  # 10: every one of the kernel's draw slots
def test_build_kernel_matches_reference(monkeypatch, k):
    fids, offsets, vals = _items(5000, seed=7)  # 3 bundles, the last one partial
    monkeypatch.setenv("GKC_BACKEND", "reference")  # (the default on the CPU is the interpreter)
    ref = BloomIndex.build(fids, offsets, vals, k=k, b_multiplier=2.5)
    monkeypatch.setenv("GKC_BACKEND", "interpret")
    tri = BloomIndex.build(fids, offsets, vals, k=k, b_multiplier=2.5)
    assert torch.equal(tri.bits, ref.bits) and torch.equal(tri.widths, ref.widths)
    plans = parse_filters(["1:2 AND NOT 2:3", "3:1 OR 1:0", "2:-1"])
    kernel_words = tri.search(plans)
    monkeypatch.setenv("GKC_BACKEND", "reference")
    assert torch.equal(ref.search(plans), kernel_words)  # the search kernel places each term's rows as the reference
    cut = int(offsets[10])
    monkeypatch.setenv("GKC_BACKEND", "interpret")
    tri.append(fids[:cut], offsets[:11], vals[:cut])
    monkeypatch.setenv("GKC_BACKEND", "reference")
    ref.append(fids[:cut], offsets[:11], vals[:cut])
    assert torch.equal(tri.bits, ref.bits)


def test_kernel_matches_reference_and_ranges_match_full(monkeypatch):
    plans = parse_filters(["1:2 AND NOT 2:3", "1:{1,2} OR 3:0", "", "!(1:0 | 2:1) & 3:{0,1,2}"])
    monkeypatch.setenv("GKC_BACKEND", "reference")  # (the default on the CPU is the interpreter)
    ref = INDEX.search(plans)
    monkeypatch.setenv("GKC_BACKEND", "interpret")
    canary = CanaryBuffer(ref.shape, dtype=torch.int64)  # poisoned output inside canary padding
    tri = INDEX.search(plans, out=canary.tensor)
    canary.check("search")
    assert tri is canary.tensor and torch.equal(ref, tri)
    starts = torch.tensor([[5, 100], [0, 2047], [77, 1], [2400, 3]])
    lengths = torch.tensor([[70, 10], [64, 100], [33, 0], [100, 5]])
    canary = CanaryBuffer((4, 2, 4), dtype=torch.int32)
    ranges_tri = INDEX.search_ranges(plans, starts, lengths, 100, out=canary.tensor)
    canary.check("search_ranges")
    with pytest.raises(ValueError, match="out must be"):
        INDEX.search_ranges(plans, starts, lengths, 100, out=torch.empty(4, 2, 3, dtype=torch.int32))
    monkeypatch.setenv("GKC_BACKEND", "reference")
    ranges_ref = INDEX.search_ranges(plans, starts, lengths, 100)
    assert torch.equal(ranges_tri, ranges_ref)
    full = _unpack(ref, INDEX.num_items)
    for q in range(4):
        for r in range(2):
            s, n = int(starts[q, r]), int(lengths[q, r])
            bits = ((ranges_ref[q, r].long().unsqueeze(-1) >> torch.arange(32)) & 1).reshape(-1).bool()
            assert torch.equal(bits[:n], full[q, s : s + n]) and not bits[n:].any()


def test_false_positive_rate_within_theory():
    k, m, terms = 3, 4.0, 6
    n = 8192
    g = torch.Generator().manual_seed(3)
    fids = torch.ones(n * terms, dtype=torch.long)
    vals = torch.randint(0, 10**9, (n * terms,), generator=g)
    offsets = torch.arange(0, n * terms + 1, terms)
    idx = BloomIndex.build(fids, offsets, vals, k=k, b_multiplier=m)
    probes = [f"1:{-(i + 1)}" for i in range(8)]  # values no item has
    hits = _unpack(idx.search(parse_filters(probes)), n).float().mean().item()
    theory = (1 - math.exp(-1 / m)) ** k
    sigma = math.sqrt(theory * (1 - theory) / (n * len(probes)))
    assert hits <= theory + 4 * sigma + 0.002, (hits, theory)
    assert hits > 0.2 * theory  # the filter is not trivially exact either


def test_false_positive_rate_at_k5_within_theory():
    """At k=5 the rate sits at the formula (1 - e^(-1/m))^k too: double-hashed rows gave 4.4x it
    here (21x at m=10), probe terms sharing all k rows with a stored term far more often than
    independent rows do."""
    k, m, terms, n = 5, 5.0, 6, 8192
    g = torch.Generator().manual_seed(5)
    vals = torch.randint(0, 10**9, (n * terms,), generator=g)
    idx = BloomIndex.build(torch.ones(n * terms, dtype=torch.long), torch.arange(0, n * terms + 1, terms), vals,
                           k=k, b_multiplier=m)
    probes = [f"1:{-(i + 1)}" for i in range(256)]  # values no item has: ~410 false positives expected
    hits = _unpack(idx.search(parse_filters(probes)), n).float().mean().item()
    theory = (1 - math.exp(-1 / m)) ** k
    assert 0.6 * theory < hits < 1.4 * theory, (hits, theory)


def test_append_delete_save_load(tmp_path):
    fids, offsets, vals = _items(3000, seed=5)
    full = BloomIndex.build(fids, offsets, vals, k=3, b_multiplier=5)
    part = BloomIndex.build(fids[: int(offsets[2100])], offsets[:2101], vals[: int(offsets[2100])], k=3, b_multiplier=5)
    new = part.append(fids[int(offsets[2100]) :], offsets[2100:] - offsets[2100], vals[int(offsets[2100]) :])
    assert new.tolist() == list(range(2100, 3000))
    plans = parse_filters(["1:2 OR 2:3", "NOT 3:1"])
    assert torch.equal(part.search(plans), full.search(plans))
    full.delete(torch.tensor([0, 63, 2999]))
    res = _unpack(full.search(parse_filters([""])), 3000)[0]
    assert not res[[0, 63, 2999]].any() and res.sum() == 2997
    assert not full.verify(parse_filters([""]), torch.tensor([[63, 64]]))[0, 0]
    path = full.save(tmp_path / "bloom.safetensors")
    back = BloomIndex.load(path)
    assert torch.equal(back.search(plans), full.search(plans)) and back.k == 3
    full.k = 2  # a header whose k is not the build's: the index would test other rows
    with pytest.raises(ValueError, match="does not match its items: the bundle widths do not follow from k=2"):
        BloomIndex.load(full.save(tmp_path / "k.safetensors"))
    full.k, full.bits = 3, full.bits.roll(1, 0)  # bits of the right shape from another build
    with pytest.raises(ValueError, match="sampled terms are missing from the Bloom bits"):
        BloomIndex.load(full.save(tmp_path / "bits.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable"):
        BloomIndex.load(tmp_path / "bad.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:  # a version 1 file: its rows were double-hashed
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(tmp_path / "v1.safetensors"),
                  metadata=dict(f.metadata(), format_version="1"))
    with pytest.raises(ValueError, match="format version 1 is not supported .*double hashing: build the index again"):
        BloomIndex.load(tmp_path / "v1.safetensors")


def test_bytes_per_item_and_bad_inputs():
    fids, offsets, vals = _items(4096, max_terms=10, seed=2)
    idx = BloomIndex.build(fids, offsets, vals, k=3, b_multiplier=5)
    assert 10 * 3 * 5 / 8 <= idx.bytes_per_item() <= 1.2 * 10 * 3 * 5 / 8
    with pytest.raises(ValueError, match="offsets end"):
        BloomIndex.build(fids, offsets[:-1], vals)
    with pytest.raises(ValueError, match="b_multiplier"):
        BloomIndex.build(fids, offsets, vals, b_multiplier=1.0)
    with pytest.raises(ValueError, match="k must be"):
        BloomIndex.build(fids, offsets, vals, k=0)
    with pytest.raises(ValueError, match="an item with 1 terms needs 1073741824 Bloom rows .* fewer than 1073741824"):
        BloomIndex.build(torch.tensor([1]), torch.tensor([0, 1]), torch.tensor([5]), k=1, b_multiplier=2.0**30)
    plans = parse_filters(["1:1"])
    with pytest.raises(ValueError, match="inside the index"):
        idx.search_ranges(plans, torch.tensor([[4090]]), torch.tensor([[10]]), 16)
    with pytest.raises(ValueError, match="max_length"):
        idx.search_ranges(plans, torch.tensor([[0]]), torch.tensor([[40]]), 16)
    with pytest.raises(ValueError, match="num_queries"):
        idx.search_ranges(plans, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), 16)
    with pytest.raises(TypeError, match="parse_filters"):
        idx.search(["1:1"])
    with pytest.raises(ValueError, match="positions"):
        idx.verify(plans, torch.tensor([[5000]]))


def test_an_append_refused_for_its_bundle_width_leaves_the_index_as_it_was():
    """An append whose items need a bundle of 2^30 rows or more is refused (the kernels reduce 32-bit
    row hashes modulo the width), but the refusal came from the rebuild, after the attributes were
    appended: the index counted the refused items, without their Bloom bits or live bits, and could
    no longer be saved and loaded."""
    none = torch.zeros(0, dtype=torch.int64)
    index = BloomIndex.build(none, torch.tensor([0, 0, 0]), none, k=1, b_multiplier=2.0**29)  # items of no terms: 2 rows
    plans = parse_filters(["", "1:5"])
    assert index.search(plans).tolist() == [[0b11], [0]]
    with pytest.raises(ValueError, match="an item with 2 terms needs 1073741824 Bloom rows"):
        index.append(torch.tensor([1, 2]), torch.tensor([0, 0, 2]), torch.tensor([5, 6]))
    assert index.num_items == 2 and index.offsets.tolist() == [0, 0, 0] and index.feature_ids.numel() == 0
    assert index.deleted.numel() == 1 and index.search(plans).tolist() == [[0b11], [0]]
    assert index.append(none, torch.tensor([0, 0]), none).tolist() == [2]  # and it still takes items
    assert index.search(plans).tolist() == [[0b111], [0]] and index.widths.tolist() == [2]


def test_bloom_filter_range_masks_check_their_ranges():
    """`BloomFilter.range_masks` is the public range-filter method: ranges outside the index are a
    ValueError, as `search_ranges` says, not words of bits past its end. (The IVF search, whose
    ranges are its own clusters, takes the unchecked variant.)"""
    f = INDEX.filter(parse_filters(["NOT 1:1"]))
    n = INDEX.num_items
    for starts, lengths, match in (([[n - 10]], [[20]], "inside the index"), ([[-5]], [[10]], "inside the index"),
                                   ([[0]], [[40]], "max_length")):
        with pytest.raises(ValueError, match=match):
            f.range_masks(torch.tensor(starts), torch.tensor(lengths), 32)
    starts, lengths = torch.tensor([[0, 100]]), torch.tensor([[32, 7]])
    assert torch.equal(f.range_masks(starts, lengths, 32), f._range_masks_unchecked(starts, lengths, 32))


def test_reference_build_in_chunks_equals_one_pass(monkeypatch):
    import silvertorch.bloom.index as bloom_index

    fids, offsets, vals = _items(3000, seed=11)
    monkeypatch.setenv("GKC_BACKEND", "reference")
    whole = BloomIndex.build(fids, offsets, vals, k=3, b_multiplier=2.5)
    monkeypatch.setattr(bloom_index, "BUILD_CHUNK", 777)  # pairs per step: many chunks, one straddling each bundle edge
    chunked = BloomIndex.build(fids, offsets, vals, k=3, b_multiplier=2.5)
    assert torch.equal(whole.bits, chunked.bits) and whole.bits.any()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bloom_kernels_on_device_match_cpu_reference(monkeypatch, device):
    """Build (and append), full search and range search on `device` with the kernels the backend
    picks for it (compiled Triton on CUDA, the interpreter on the CPU) against the CPU reference,
    canary-padded outputs."""
    fids, offsets, vals = _items(5000, seed=7)  # 3 bundles, the last one partial
    plans = parse_filters(["1:2 AND NOT 2:3", "1:{1,2} OR 3:0", "", "!(1:0 | 2:1) & 3:{0,1,2}"])
    starts = torch.tensor([[5, 100], [0, 2047], [77, 1], [4900, 3]])
    lengths = torch.tensor([[70, 10], [64, 100], [33, 0], [100, 5]])
    cut = int(offsets[10])
    monkeypatch.setenv("GKC_BACKEND", "reference")
    ref = BloomIndex.build(fids, offsets, vals, k=3, b_multiplier=2.5)
    ref.append(fids[:cut], offsets[:11], vals[:cut])
    want_full, want_ranges = ref.search(plans), ref.search_ranges(plans, starts, lengths, 100)
    monkeypatch.setenv("GKC_BACKEND", "auto")
    index = BloomIndex.build(fids, offsets, vals, k=3, b_multiplier=2.5, device=device)
    index.append(fids[:cut].to(device), offsets[:11].to(device), vals[:cut].to(device))
    assert torch.equal(index.bits.cpu(), ref.bits) and torch.equal(index.widths.cpu(), ref.widths)
    canary = CanaryBuffer(want_full.shape, dtype=torch.int64, device=device)
    index.search(plans, out=canary.tensor)
    canary.check("search")
    assert torch.equal(canary.tensor.cpu(), want_full)
    canary = CanaryBuffer(want_ranges.shape, dtype=torch.int32, device=device)
    index.search_ranges(plans, starts.to(device), lengths.to(device), 100, out=canary.tensor)
    canary.check("search_ranges")
    assert torch.equal(canary.tensor.cpu(), want_ranges)


def test_kernels_read_plans_with_any_strides_row_major(monkeypatch):
    """Hand-made plans (FilterPlans of column-major views) and a non-contiguous `out`: the kernels
    index them row-major, so the launchers copy the inputs and refuse such an `out`."""
    from silvertorch.bloom.parser import FilterPlans

    plans = parse_filters(["1:2 AND NOT 2:3", "1:{1,2} OR 3:0", "!(1:0 | 2:1) & 3:{0,1,2}"])
    strided = FilterPlans(*(t.T.contiguous().T for t in (plans.ops, plans.args, plans.hashes)), plans.expressions)
    assert not strided.hashes.is_contiguous()
    starts, lengths = torch.tensor([[5, 100], [0, 2047], [77, 1]]), torch.tensor([[70, 10], [64, 100], [33, 0]])
    monkeypatch.setenv("GKC_BACKEND", "reference")
    want, want_ranges = INDEX.search(plans), INDEX.search_ranges(plans, starts, lengths, 100)
    monkeypatch.setenv("GKC_BACKEND", "interpret")
    assert torch.equal(INDEX.search(strided), want)
    assert torch.equal(INDEX.search_ranges(strided, starts, lengths, 100), want_ranges)
    with pytest.raises(ValueError, match="out must be a contiguous .*not contiguous"):
        INDEX.search(plans, out=torch.empty(want.shape[1], 3, dtype=torch.int64).T)


def test_module_loads_without_hypothesis():
    """The GPU machine has torch, triton and numpy only: with hypothesis missing this module (and
    its gpu test) still loads; the property test stands in, failing if run (`-m gpu` deselects it)."""
    import subprocess
    import sys

    code = ("import runpy, sys; sys.modules['hypothesis'] = None; "  # None in sys.modules: `import hypothesis` raises ImportError
            f"names = runpy.run_path({__file__!r}); "
            "print(not hasattr(names['test_no_true_match_is_ever_lost'], 'hypothesis'), "
            "'test_bloom_kernels_on_device_match_cpu_reference' in names)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"]


@pytest.mark.parametrize("positions", [[1.5], [True, False], torch.tensor([2.0])])
def test_positions_must_be_integers(positions):
    """delete([1.5]) tombstoned item 1 and a bool mask items 0 and 1; verify and ranges read floats
    truncated alike."""
    index = BloomIndex.build(torch.ones(10, dtype=torch.int64), torch.arange(11), torch.arange(10))
    plans = parse_filters(["1:3"])
    with pytest.raises(ValueError, match="positions must be integer item positions"):
        index.delete(positions)
    assert index.search(plans)[0, 0] == 1 << 3  # nothing was deleted
    with pytest.raises(ValueError, match="positions must be integer item positions"):
        index.verify(plans, torch.tensor([[3.9]]))
    with pytest.raises(ValueError, match="starts must be integer item positions"):
        index.search_ranges(plans, torch.tensor([[0.5]]), torch.tensor([[4]]), max_length=32)


def test_deleting_no_positions_deletes_nothing():
    # [] reads as float32: the position check refused it, where it deleted nothing before
    index = BloomIndex.build(torch.ones(10, dtype=torch.int64), torch.arange(11), torch.arange(10))
    index.delete([])
    plans = parse_filters(["1:3"])
    assert index.search(plans)[0, 0] == 1 << 3
    assert index.verify(plans, [[]]).shape == (1, 0)


def _right_deep(depth):
    """(text, predicate) of an expression whose evaluation needs `depth` stack slots: every binary
    operator keeps its left operand on the stack while its right one is evaluated."""
    text, fn = "NOT 3:3", lambda s: (3, 3) not in s  # a NOT with every slot full, on a term used nowhere else
    for i in range(depth - 1):
        term = (1 + i % N_FEATURES, i % N_VALUES)
        if i % 2:
            text, fn = f"{term[0]}:{term[1]} OR ({text})", lambda s, t=term, f=fn: t in s or f(s)
        else:
            text, fn = f"NOT {term[0]}:{term[1]} AND ({text})", lambda s, t=term, f=fn: t not in s and f(s)
    return text, fn


def test_the_deepest_accepted_filter_runs_exactly_in_the_kernel(monkeypatch):
    from silvertorch.bloom.hashing import term_hash
    from silvertorch.bloom.parser import MAX_DEPTH
    from silvertorch.bloom.probed import run_plans

    with pytest.raises(ValueError, match="nests too deeply"):
        parse_filters([_right_deep(MAX_DEPTH + 1)[0]])
    text, fn = _right_deep(MAX_DEPTH)  # every one of the kernel's stack slots in use
    plans = parse_filters([text, "1:0"])
    ref = INDEX.search(plans)
    monkeypatch.setenv("GKC_BACKEND", "interpret")
    assert torch.equal(INDEX.search(plans), ref)
    truth = _exact(fn, FIDS, OFFSETS, VALS)
    assert 0 < int(truth.sum()) < INDEX.num_items  # a test that can tell a wrong slot from a right one
    assert not (truth & ~_unpack(ref, INDEX.num_items)[0]).any()
    assert torch.equal(INDEX.verify(parse_filters([text]), torch.arange(INDEX.num_items).unsqueeze(0))[0], truth)
    # the retrieval model's tensor-op evaluator, on each term's exact per-item truth
    item_of = torch.repeat_interleave(torch.arange(INDEX.num_items), OFFSETS.diff())
    item_hashes = term_hash(FIDS, VALS)
    has = torch.zeros(1, plans.hashes.shape[1], INDEX.num_items, dtype=torch.bool)
    for slot, h in enumerate(plans.hashes[0].tolist()):
        has[0, slot, item_of[item_hashes == h]] = True
    assert torch.equal(run_plans(plans.ops[:1], plans.args[:1], has, has)[0], truth)


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_search_of_no_queries_is_empty_on_every_backend(monkeypatch, backend):
    """A batch of zero filters: the kernel path returned [0, num_words], the PyTorch path (the CPU's
    default) failed in torch.stack ("stack expects a non-empty TensorList")."""
    monkeypatch.setenv("GKC_BACKEND", backend)
    got = INDEX.search(parse_filters([]))
    assert got.shape == (0, INDEX.num_words) and got.dtype == torch.int64
    out = torch.empty(0, INDEX.num_words, dtype=torch.int64)
    assert INDEX.search(parse_filters([]), out=out) is out


@pytest.mark.parametrize("which", ["offsets", "feature_ids", "values"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64, torch.bool])
def test_attributes_must_be_integer_tensors(which, dtype):
    """Float offsets [0, 1.5, 3] were truncated to [0, 1, 3] (the pairs moved to other items),
    complex values lost their imaginary part and bool ids read as 0s and 1s, silently: refused
    by build and append alike."""
    given = {"feature_ids": torch.tensor([1, 1, 2]), "offsets": torch.tensor([0, 1, 3]), "values": torch.tensor([1, 0, 1])}
    bad = dict(given, **{which: given[which].to(dtype)})
    if which == "offsets" and dtype.is_floating_point:
        bad["offsets"] = torch.tensor([0.0, 1.5, 3.0], dtype=dtype)
    match = f"must be (an )?integer tensors?, got {which} of {dtype}"
    with pytest.raises(ValueError, match=match):
        BloomIndex.build(**bad)
    index = BloomIndex.build(**given)
    with pytest.raises(ValueError, match=match):
        index.append(**bad)
    assert index.num_items == 2


def test_load_refuses_a_corrupt_file_that_would_answer_wrongly(tmp_path):
    """A saved file whose tombstones were cut short loaded and broadcast its first word's deletions
    over every word (items 3 and 5 dropped in every 64); attributes that `build` refuses (pairs
    past the end, offsets not from 0) loaded as a wrong side table; a header without k failed
    with a KeyError."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    index = BloomIndex.build(*_items(300, seed=4))
    index.delete([3, 5])
    path = index.save(tmp_path / "ok.safetensors")
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    config = json.loads(meta["config"])
    pairs = int(tensors["offsets"][-1])
    for name, changed, new_meta, match in (
        ("deleted", {"deleted": tensors["deleted"][:1]}, meta, r"deleted is \(1,\), expected \(5,\)"),
        ("pairs", {"values": tensors["values"][: pairs - 2], "feature_ids": tensors["feature_ids"][: pairs - 2]}, meta,
         "offsets end at"),
        ("offsets", {"offsets": tensors["offsets"] + 1}, meta, "starting at 0"),
        ("dtype", {"bits": tensors["bits"].double()}, meta, "bits must be int64"),
        ("no_k", {}, dict(meta, config=json.dumps({key: v for key, v in config.items() if key != "k"})), "config"),
        ("list", {}, dict(meta, config="[1]"), "config"),
        ("nan", {}, dict(meta, config=json.dumps(dict(config, b_multiplier=float("nan")))), "config"),
        # widths past the kernels' bound: the ValueError named neither the file nor the check
        ("wide", {}, dict(meta, config=json.dumps(dict(config, b_multiplier=2.0**40))),
         r"wide.safetensors: the Bloom index does not match its items: an item with \d+ terms needs \d+ Bloom rows"),
    ):
        save_file({**tensors, **changed}, str(tmp_path / f"{name}.safetensors"), metadata=new_meta)
        with pytest.raises(ValueError, match=match):
            BloomIndex.load(tmp_path / f"{name}.safetensors")
    back = BloomIndex.load(path)
    plans = parse_filters(["", "NOT 1:1"])
    assert torch.equal(back.search(plans), index.search(plans))


@pytest.mark.parametrize("k", [0, 12])
def test_load_refuses_a_k_that_build_refuses(tmp_path, monkeypatch, k):
    """A file whose k is outside build's [1, 10], its bits and widths laid out for that k (so the
    load-time check of the bits passes) loaded: with k=12 the kernels, which hold 10 draws of
    Floyd's sampling, read other rows than the reference (a term's rows repeated); with k=0 (items
    of no terms: no bits to check) a search of a term failed in the reference with a RuntimeError and
    passed every item in the kernels. Refused as build refuses it."""
    monkeypatch.setenv("GKC_BACKEND", "reference")
    n = 300
    terms = n if k else 0  # a term each: narrow bundles, where Floyd's replacements are frequent
    index = BloomIndex(k=k, b_multiplier=1.01, feature_ids=torch.ones(terms, dtype=torch.int64),
                       offsets=torch.arange(n + 1) if k else torch.zeros(n + 1, dtype=torch.int64),
                       values=torch.arange(terms), bits=torch.zeros(0, 32, dtype=torch.int64),
                       row_offsets=torch.zeros(1, dtype=torch.int64), widths=torch.zeros(0, dtype=torch.int64),
                       deleted=torch.zeros(5, dtype=torch.int64))
    index._build_bundles(0)
    with pytest.raises(ValueError, match=rf"k.safetensors: the header's config is not a BloomIndex's .*k must be an integer in \[1, 10\], got {k}"):
        BloomIndex.load(index.save(tmp_path / "k.safetensors"))


def test_uint64_attributes_past_int64_are_refused():
    """A uint64 value of 2**63 or more was wrapped to a negative int64 by the cast: the item
    matched `1:-9223372036854775803`, a value it does not have, and no filter can write its own
    (the parser, like `FilterSchema.encode_items`, takes int64 numbers only)."""
    offsets = torch.tensor([0, 1, 2])
    for fids, vals in ((torch.tensor([1, 1]), torch.tensor([5, 2**63 + 5], dtype=torch.uint64)),
                       (torch.tensor([1, 2**63], dtype=torch.uint64), torch.tensor([5, 6]))):
        with pytest.raises(ValueError, match="outside the int64 range"):
            BloomIndex.build(fids, offsets, vals)
        with pytest.raises(ValueError, match="outside the int64 range"):
            BloomIndex.build(torch.tensor([1]), torch.tensor([0, 1]), torch.tensor([7])).append(fids, offsets, vals)
    index = BloomIndex.build(torch.tensor([1, 1]), offsets, torch.tensor([5, 2**63 - 1], dtype=torch.uint64))  # in range: kept
    assert index.search(parse_filters([f"1:{2**63 - 1}"]))[0, 0] == 0b10


@pytest.mark.parametrize("k, b_multiplier", [(2.5, 5.0), (True, 5.0), (3, float("nan")), (3, float("inf"))])
def test_build_refuses_a_k_or_b_multiplier_it_cannot_use(k, b_multiplier):
    """k=2.5 built with k=2 (True with 1), silently; a NaN or infinite b_multiplier passed the
    `<= 1` check and failed in the widths' integer conversion, or, with no items yet, built an
    index that a later append failed on."""
    fids, offsets, vals = torch.tensor([1]), torch.tensor([0, 1]), torch.tensor([5])
    for args in ((fids, offsets, vals), (torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                                         torch.zeros(0, dtype=torch.int64))):
        with pytest.raises(ValueError, match="k must be an integer in|b_multiplier must be a finite number"):
            BloomIndex.build(*args, k=k, b_multiplier=b_multiplier)


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_an_index_of_no_items_answers_empty_ranges_and_padding(monkeypatch, backend):
    """An index built with no items yet (to be appended to): `search` returned [Q, 0], but a range
    search of its only valid range (start 0, length 0) and `verify` of padding failed with an
    IndexError, reading the empty bundle tables."""
    monkeypatch.setenv("GKC_BACKEND", backend)
    none = torch.zeros(0, dtype=torch.int64)
    index = BloomIndex.build(none, torch.zeros(1, dtype=torch.int64), none)
    plans = parse_filters(["1:5", "NOT 1:5"])
    zeros = torch.zeros(2, 1, dtype=torch.int64)
    assert torch.equal(index.search_ranges(plans, zeros, zeros, 32), torch.zeros(2, 1, 1, dtype=torch.int32))
    out = torch.full((2, 1, 1), 7, dtype=torch.int32)
    assert index.search_ranges(plans, zeros, zeros, 32, out=out) is out and not out.any()
    assert torch.equal(index.filter(plans)._range_masks_unchecked(zeros, zeros, 32), torch.zeros(2, 1, 1, dtype=torch.int32))
    assert torch.equal(index.verify(plans, torch.tensor([[-1, -1], [-1, -1]])), torch.zeros(2, 2, dtype=torch.bool))
    index.append(torch.tensor([1]), torch.tensor([0, 1]), torch.tensor([5]))
    assert index.verify(plans, torch.tensor([[0, -1], [0, -1]])).tolist() == [[True, False], [False, False]]
