"""RetrievalModel end to end against a plain PyTorch pipeline (exact filters, fp32 brute force)."""

import copy
import inspect
import json

import pytest
import torch

from silvertorch import (
    BloomIndex,
    EmbeddingTower,
    FilterSyntaxError,
    OverArch,
    RetrievalModel,
    ValueModel,
    load_towers,
    parse_filters,
    save_towers,
)
from silvertorch.bloom.parser import EXACT_TERM
from silvertorch.bloom.probed import probed_filter_words
from silvertorch.ivf import probed as probed_module
from silvertorch.ivf.index import CLUSTER_MAJOR_MIN_QUERIES
from silvertorch.ivf.probed import _probed_dots as probed_dots
from silvertorch.ivf.probed import probed_scores, probed_scores_reference

N, D, USERS = 2500, 24, 40
SCHEMA = {"cat": 1, "year": 2}
# expression -> the same predicate in Python, over (category, year)
FILTERS = {
    "": lambda c, y: True,
    "cat:1": lambda c, y: c == 1,
    "cat:{1,3} AND NOT year:1995": lambda c, y: c in (1, 3) and y != 1995,
    "NOT (cat:0 | cat:2) & year:{1991,1992,1993}": lambda c, y: c not in (0, 2) and y in (1991, 1992, 1993),
    "year:1999 OR (cat:4 AND NOT cat:4)": lambda c, y: y == 1999,
    # as many terms under NOT as the test models' max_exact_terms, plain terms after them in the slots
    "cat:1 AND NOT year:{1990,1991,1992} AND NOT year:1999": lambda c, y: c == 1 and y not in (1990, 1991, 1992, 1999),
    "NOT cat:{0,2}": lambda c, y: c not in (0, 2),  # exact terms only: no Bloom term slot in use
}


def _catalog(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)
    cat = torch.randint(0, 5, (n,), generator=g)
    year = torch.randint(1990, 2000, (n,), generator=g)
    fids = torch.tensor([1, 2]).repeat(n)
    vals = torch.stack([cat, year], 1).reshape(-1)
    return emb, cat, year, (fids, torch.arange(0, 2 * n + 1, 2), vals)


def _modules(seed=0, tasks=2):
    torch.manual_seed(seed)
    tower = EmbeddingTower([USERS], D, normalize=True)
    return tower, OverArch(D, tasks, [16]), ValueModel(tasks, torch.linspace(1.0, 0.5, tasks))


EMB, CAT, YEAR, ATTRS = _catalog()
TOWER, OVERARCH, VALUE = _modules()
IDS = torch.arange(5000, 5000 + N)


def _model(**kw):
    # max_exact_terms=4 (default 8): FILTERS reach the bound, and a 5-term NOT list passes it
    options = dict(n_clusters=12, nprobe=12, k_candidates=300, num_results=10, fresh_capacity=32, max_ops=12, max_exact_terms=4)
    options.update(kw)
    return RetrievalModel.build(TOWER, OVERARCH, VALUE, EMB, IDS, ATTRS, SCHEMA, **options)


MODEL = _model()


def _plain_pipeline(users, expressions, k, n, emb=EMB, cat=CAT, year=YEAR, ids=IDS, alive=None):
    """The reference: exact filter, fp32 brute-force top-K, OverArch, Value Model, top-N."""
    with torch.no_grad():
        u = TOWER(users)
        out = []
        for qi, expr in enumerate(expressions):
            ok = torch.tensor([FILTERS[expr](int(c), int(y)) for c, y in zip(cat, year)])
            if alive is not None:
                ok &= alive
            s = (emb @ u[qi]).masked_fill(~ok, float("-inf"))
            cand = torch.topk(s, min(k, int(ok.sum()))).indices
            value = VALUE(OVERARCH(u[qi], emb[cand].bfloat16().float()))
            top = torch.topk(value, min(n, cand.numel())).indices
            out.append(ids[cand[top]].tolist())
    return out


@pytest.mark.parametrize("expr", list(FILTERS))
def test_top_n_matches_plain_pipeline(expr):
    users = torch.arange(0, USERS, 5).unsqueeze(1)
    r = MODEL.retrieve(users, [expr] * users.shape[0])
    truth = _plain_pipeline(users, [expr] * users.shape[0], 300, 10)
    hits = total = 0
    for qi, want in enumerate(truth):
        got = [i for i in r.ids[qi].tolist() if i >= 0]
        rows = [i - 5000 for i in got]
        assert all(FILTERS[expr](int(CAT[i]), int(YEAR[i])) for i in rows), "a returned item fails the filter"
        assert len(got) == len(want)  # every query has at least N passing items here
        hits += len(set(got) & set(want))
        total += len(want)
        s = r.scores[qi][: len(got)]
        assert (s[:-1] >= s[1:]).all()
    assert hits / total >= 0.9, hits / total


def _bloom_index_bits(model, exprs):
    """[Q, num_main] bool: what a BloomIndex over the model's main items answers for the filters."""
    fids = model.attr_feature_ids[: model.num_main]
    counts = model.attr_counts[: model.num_main]
    keep = torch.arange(fids.shape[1]) < counts.unsqueeze(1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    bloom = BloomIndex.build(fids[keep], offsets, model.attr_values[: model.num_main][keep], k=model.bloom_k,
                             b_multiplier=model.bloom_multiplier)
    words = bloom.search(parse_filters(exprs, SCHEMA))  # int64 words, bit i % 64 of word i // 64
    return ((words.unsqueeze(-1) >> torch.arange(64)) & 1).reshape(len(exprs), -1)[:, : model.num_main].bool()


def _filter_words_args(model, exprs, words):
    ops, args, hashes = model.prepare_filters(exprs)
    return (model.bloom_bits, model.bloom_row_offsets, model.bloom_widths, words, ops, args, hashes,
            model._exact_words(words, hashes[:, : model.max_exact_terms], ops, args), model.bloom_k)


@pytest.mark.parametrize("backend", ["REFERENCE", "INTERPRET"])
def test_graph_filter_equals_bloom_index(backend):
    """The model's filter op (the tensor-op stack machine, and the Bloom kernel) gives the
    BloomIndex's bits on every word of the main index (exact NOT included)."""
    from gpukernels_common import Backend

    exprs = list(FILTERS)
    words = torch.arange((MODEL.num_main + 63) // 64).expand(len(exprs), -1)
    packed = probed_filter_words.run(Backend[backend], *_filter_words_args(MODEL, exprs, words))
    got = ((packed.unsqueeze(-1) >> torch.arange(64)) & 1).reshape(len(exprs), -1)[:, : MODEL.num_main].bool()
    assert torch.equal(got, _bloom_index_bits(MODEL, exprs))


@pytest.mark.parametrize("words_per_query", [1, 23, 70])
def test_filter_words_kernel_matches_reference(words_per_query):
    """The filter op's kernel against its reference on random words in any order, repeated, across
    bundles (a weak Bloom index so that false positives occur), plans cut to the batch's extent."""
    from gpukernels_common import Backend

    model = _model(bloom_k=2, bloom_multiplier=1.5, max_exact_terms=4)
    exprs = list(FILTERS)[1:] + ["cat:{0,1,2} AND NOT (year:1990 | cat:2)"]
    g = torch.Generator().manual_seed(words_per_query)
    words = torch.randint(0, (model.num_main + 63) // 64, (len(exprs), words_per_query), generator=g)
    args = _filter_words_args(model, exprs, words)
    want = probed_filter_words.run(Backend.REFERENCE, *args)
    got = probed_filter_words.run(Backend.INTERPRET, *args)
    assert (want != 0).any() and (want != -1).any()
    assert torch.equal(got, want)


def test_probed_cluster_bits_equal_bloom_index():
    """Each probed item's bit, read from the words covering its cluster (clusters start anywhere in a
    word), is the BloomIndex's answer for that item, cleared for padding slots and deleted items."""
    model = _model(n_clusters=7, nprobe=7)
    model.delete_items(IDS[::97])
    exprs = list(FILTERS)
    clusters = torch.stack([torch.randperm(7, generator=torch.Generator().manual_seed(i))[:5] for i in range(len(exprs))])
    got = model._probed_passing(clusters, *model.prepare_filters(exprs))
    slots = model.cluster_positions[clusters]
    want = _bloom_index_bits(model, exprs).gather(1, slots.flatten(1)).view_as(slots)
    want &= model.cluster_valid[clusters] & model.alive[slots]
    assert want.any() and not want.all()
    assert torch.equal(got, want)
    # traced (a compiled or exported model): per-slot arithmetic instead of eager's word shifts
    traced = torch.compile(model._probed_passing, backend="aot_eager", fullgraph=True)
    assert torch.equal(traced(clusters, *model.prepare_filters(exprs)), want)


@pytest.mark.parametrize("queries", [1, 2, 9])
def test_cluster_major_scores_equal_per_query_integer_dots(queries):
    """The forward's int8 scores (the batch's probed clusters scored once for all queries; with 9
    queries their padded rows outnumber the items and every item is scored) are each query's exact
    integer dot products with its own clusters' slots, padding slots included."""
    model = _model(n_clusters=12, nprobe=3)
    union_rows = min(12, queries * 3) * model.cluster_positions.shape[1]
    assert (union_rows < model.num_main) == (queries < 9)  # both branches are covered
    g = torch.Generator().manual_seed(queries)
    q_codes = torch.randint(-127, 128, (queries, D), dtype=torch.int8, generator=g)
    clusters = torch.stack([torch.randperm(12, generator=g)[:3] for _ in range(queries)])
    clusters[-1, 0] = clusters[0, 0]  # queries sharing a cluster read the same scored rows
    want = (model.codes[model.cluster_positions[clusters]].long() * q_codes.long()[:, None, None, :]).sum(-1)
    got = probed_dots(model.codes, model.cluster_positions, clusters, q_codes)
    assert got.dtype == torch.float32 and torch.equal(got, want.float())
    if queries == 2:  # the union is built from tensor ops only
        compiled = torch.compile(probed_dots, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(model.codes, model.cluster_positions, clusters, q_codes), got)


@pytest.mark.parametrize("words_per_query", [2, 64])
def test_exact_words_eager_equals_traced(words_per_query):
    """The exact-term words of probed items: eager reads few words per query item by item (2 words)
    or, once the batch's words cover more items than its distinct terms x the index, packs each
    distinct term's words over the whole index (64); traced always item by item. Same words."""
    model = _model()
    exprs = ["NOT cat:2", "cat:1 AND NOT year:1999", "NOT cat:2", "NOT (cat:3 OR year:2001)"]
    ops, args, hashes = model.prepare_filters(exprs)
    g = torch.Generator().manual_seed(words_per_query)
    full_words = model.num_main // 64  # words past these describe items past the main index: masked by callers
    words = torch.randint(0, full_words, (len(exprs), words_per_query), generator=g)
    distinct = torch.unique(hashes[:, : model.max_exact_terms]).numel()
    assert (distinct * model.num_main <= words.numel() * 64) == (words_per_query == 64)  # both branches are covered
    eager = model._exact_words(words, hashes, ops, args)
    traced = torch.compile(model._exact_words, backend="aot_eager", fullgraph=True)(words, hashes, ops, args)
    assert eager.shape == (len(exprs), model.max_exact_terms, words_per_query) and (eager != 0).any()
    # the slots an EXACT_TERM step reads (the op leaves the others 0; the whole-index branch fills them)
    used = ((ops == EXACT_TERM).unsqueeze(-1) & (args.unsqueeze(-1) == torch.arange(model.max_exact_terms))).any(1)
    assert used.any() and not used.all()
    assert torch.equal(eager * used.unsqueeze(-1), traced * used.unsqueeze(-1))
    assert not traced[~used].any()


def _scoring_op_args(queries):
    """Arguments of the model's scoring op: random query codes and scales, 3 of 12 clusters per query
    (the first shared by the first and last query), random keep bits (padding slots off)."""
    model = _model(n_clusters=12, nprobe=3)
    g = torch.Generator().manual_seed(queries)
    q_codes = torch.randint(-127, 128, (queries, D), dtype=torch.int8, generator=g)
    q_scales = torch.rand(queries, generator=g) + 0.01
    clusters = torch.stack([torch.randperm(12, generator=g)[:3] for _ in range(queries)])
    clusters[-1, 0] = clusters[0, 0]
    keep = (torch.rand(queries, 3, model.cluster_positions.shape[1], generator=g) < 0.7) & model.cluster_valid[clusters]
    return model.codes, model.scales, model.cluster_positions, model.cluster_offsets, clusters, keep, q_codes, q_scales


@pytest.mark.parametrize("queries", [1, 5])
def test_probed_scores_reference_eager_equals_traced(monkeypatch, queries):
    """The reference's two branches: eager (inside the custom op) past UNION_MAX_BYTES (0 here), each
    probed cluster's rows scored against the queries probing it; traced (compiled here, exported in
    a package), the static-shape union. Same scores, -inf exactly where keep is off (padding slots
    included)."""
    monkeypatch.setattr(probed_module, "UNION_MAX_BYTES", 0)
    args = _scoring_op_args(queries)
    keep = args[5]
    eager = probed_scores_reference(*args)
    traced = torch.compile(probed_scores_reference, backend="aot_eager", fullgraph=True)(*args)
    assert torch.equal(torch.isinf(eager), ~keep.reshape(queries, -1)) and keep.any()
    assert torch.equal(eager, traced)


@pytest.mark.parametrize("queries", [3, CLUSTER_MAJOR_MIN_QUERIES + 1])  # query-major, cluster-major kernel
def test_probed_scores_kernel_matches_reference(monkeypatch, queries):
    """The model's scoring op on the Triton interpreter against its reference: random keep bits
    (padding slots included), clusters shared between queries; -inf exactly where keep is off."""
    from gpukernels_common import Backend

    args = _scoring_op_args(queries)
    keep = args[5]
    want = probed_scores.run(Backend.REFERENCE, *args)
    got = probed_scores.run(Backend.INTERPRET, *args)
    assert torch.equal(torch.isinf(got), ~keep.reshape(queries, -1))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_custom_ops_pass_opcheck(monkeypatch, backend):
    """torch.library.opcheck on the model's two ops: schema, fake kernel (shapes and strides of the
    real output), autograd registration, AOT dispatch. The filter op's reference returned a strided
    view where its fake promised a contiguous tensor: torch.compile(fullgraph=True) failed on CPU."""
    monkeypatch.setenv("GKC_BACKEND", backend)
    exprs = list(FILTERS)
    words = torch.arange((MODEL.num_main + 63) // 64).expand(len(exprs), -1)
    torch.library.opcheck(probed_filter_words.op, _filter_words_args(MODEL, exprs, words))
    torch.library.opcheck(probed_scores.op, _scoring_op_args(3))


def test_bloom_false_positives_removed_by_exact_verification():
    tight = _model(bloom_k=1, bloom_multiplier=1.05)  # a deliberately weak Bloom index
    loose = _model(bloom_k=1, bloom_multiplier=1.05, exact_verify=False)
    users = torch.arange(0, USERS, 3).unsqueeze(1)
    exprs = ["cat:1 AND year:1999"] * users.shape[0]
    bad_loose = sum(not FILTERS["year:1999 OR (cat:4 AND NOT cat:4)"](0, int(YEAR[i - 5000])) or int(CAT[i - 5000]) != 1
                    for i in loose.retrieve(users, exprs).ids.flatten().tolist() if i >= 0)
    got = [i for i in tight.retrieve(users, exprs).ids.flatten().tolist() if i >= 0]
    assert bad_loose > 0, "the weak Bloom index should let false positives through without verification"
    assert all(int(CAT[i - 5000]) == 1 and int(YEAR[i - 5000]) == 1999 for i in got)


@pytest.mark.parametrize("bloom_multiplier, k", [(2.0, 80), (1.05, 60)], ids=["one pool", "widened pools"])
def test_exact_verification_replaces_false_positives_with_the_next_true_matches(bloom_multiplier, k):
    """A weak Bloom index: 55 items really pass "cat:1 AND year:1999". At b_multiplier 2, 199 pass
    the Bloom words: the best 80 hold about 22 true ones, the verified pool (4 x 80) all 199. At
    1.05 hundreds more pass: the static 4 x K pool holds fewer than the 55 and queries came back
    short; eager retrieval verifies larger pools until K are in or every candidate is checked.
    Either way the exact filter's top-N, and `found` the exact count (K above the 55: no int8
    boundary among the candidates)."""
    model = _model(bloom_k=1, bloom_multiplier=bloom_multiplier, k_candidates=k)
    users = torch.arange(0, USERS, 3).unsqueeze(1)
    expr = "cat:1 AND year:1999"
    truth = [int(c) == 1 and int(y) == 1999 for c, y in zip(CAT, YEAR)]
    r = model.retrieve(users, [expr] * users.shape[0])
    FILTERS[expr] = lambda c, y: c == 1 and y == 1999
    try:
        want = _plain_pipeline(users, [expr] * users.shape[0], k, 10)
    finally:
        del FILTERS[expr]
    assert r.found.tolist() == [sum(truth)] * users.shape[0]
    assert [sorted(i for i in row if i >= 0) for row in r.ids.tolist()] == [sorted(w) for w in want]
    assert all(len(w) == 10 for w in want)


def test_per_request_value_weights_change_ranking():
    tower, overarch, _ = _modules(tasks=3)
    model = RetrievalModel.build(tower, overarch, ValueModel(3), EMB, IDS, ATTRS, SCHEMA, n_clusters=8, nprobe=8,
                                 k_candidates=100, num_results=5, fresh_capacity=0)
    users = torch.tensor([[3], [4]])
    a = model.retrieve(users, ["", ""], [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    b = model.retrieve(users, ["", ""], [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.equal(a.ids[0], b.ids[0])
    assert torch.allclose(a.scores[1], a.task_probs[1, :, 2]) and torch.allclose(b.scores[1], b.task_probs[1, :, 0])


@pytest.mark.parametrize("weights", [[3e38, 3e38], [-3e38, -3e38], [[1.0, 0.5], [3e38, -3e38]], [1e39, 0.0]])
def test_value_weights_that_would_overflow_the_scores_are_refused(weights):
    """Finite weights whose scores overflow float32 made every result id -1 (inf is taken for missing)."""
    with pytest.raises(ValueError, match="value_weights must be finite numbers whose absolute values sum to at most"):
        MODEL.retrieve(torch.tensor([[1], [2]]), None, weights)
    assert (MODEL.retrieve(torch.tensor([[1], [2]]), None, [1.7e38, 1.7e38]).ids >= 0).all()  # the bound itself is served


def test_fresh_items_appear_and_deleted_items_vanish():
    model = _model(k_candidates=10)  # every ANN candidate is returned, so the ANN stage decides
    users = torch.tensor([[7]])
    u = TOWER(users).detach()
    # a fresh item equal to the (unit) user vector wins the ANN stage; it must come back tagged fresh
    fresh_attrs = (torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([1, 1999]))
    model.add_items(u, torch.tensor([99999]), fresh_attrs)
    r = model.retrieve(users, ["cat:1"])
    assert 99999 in r.ids[0].tolist()
    assert bool(r.fresh[0][r.ids[0].tolist().index(99999)])
    assert 99999 not in model.retrieve(users, ["cat:2"]).ids[0].tolist()  # fresh items are filtered exactly
    before = model.retrieve(users, [""]).ids[0].tolist()
    gone = [i for i in before if i != 99999][:3] + [99999]
    assert model.delete_items(gone) == 4
    after = model.retrieve(users, [""]).ids[0].tolist()
    assert not set(gone) & set(after) and len([i for i in after if i >= 0]) == 10
    rebuilt = model.rebuild()
    assert rebuilt.fresh_used == 0 and rebuilt.num_main == N - 3
    assert not set(gone) & set(rebuilt.retrieve(users, [""]).ids[0].tolist())
    with pytest.raises(ValueError, match="already live"):
        model.add_items(u, torch.tensor([5001]))
    with pytest.raises(ValueError, match="fresh index holds 32"):
        model.add_items(torch.zeros(40, D), torch.arange(10**6, 10**6 + 40))


def test_save_load_round_trip_and_version_checks(tmp_path):
    model = _model()
    model.add_items(torch.randn(2, D), torch.tensor([70000, 70001]))
    model.delete_items([5003])
    model.save(tmp_path / "a")
    loaded = RetrievalModel.load(tmp_path / "a")
    users, exprs = torch.arange(6).unsqueeze(1), ["cat:1", "", "NOT cat:1", "year:1995", "", "cat:3"]
    x, y = model.retrieve(users, exprs), loaded.retrieve(users, exprs)
    assert torch.equal(x.ids, y.ids) and torch.equal(x.scores, y.scores) and loaded.fresh_used == 2
    assert loaded.max_exact_terms == model.max_exact_terms == 4
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    del cfg["max_exact_terms"]  # artifacts written before the bound evaluate every slot exactly
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    assert RetrievalModel.load(tmp_path / "a").max_exact_terms == model.max_terms
    cfg["format_version"] = 99
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format version 99"):
        RetrievalModel.load(tmp_path / "a")
    cfg["format_version"] = 1  # the double-hashed Bloom rows' version: the way out named
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format version 1 .* reads silvertorch.RetrievalModel version 2 .*double hashing: build the model again"):
        RetrievalModel.load(tmp_path / "a")
    cfg["format_version"] = 2
    cfg["tensors"]["codes"]["shape"][1] += 1
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tensor codes"):
        RetrievalModel.load(tmp_path / "a")
    with pytest.raises(ValueError, match="config.json"):
        RetrievalModel.load(tmp_path / "missing")
    # a hand-edited config: a missing entry, a wrong type, a table size that disagrees with the
    # weights (made on the meta device: nothing of the claimed size is allocated)
    cfg["tensors"]["codes"]["shape"][1] -= 1
    for edit, match in ((lambda c: c.pop("nprobe"), "missing an entry .*nprobe"),
                        (lambda c: c.update(nprobe="8"), "wrong type"),
                        (lambda c: c["user_tower"]["config"].update(cardinalities=[10**12]), "user_tower weights do not fit"),
                        (lambda c: c.update(fresh_used=10**6), "fresh_used must be in"),
                        # in range, but not the k or multiplier the Bloom index was built with: it
                        # would test other rows and silently lose true matches
                        (lambda c: c.update(bloom_k=c["bloom_k"] + 1), "do not follow from k="),
                        (lambda c: c.update(bloom_k=c["bloom_k"] - 1), "do not follow from k="),
                        (lambda c: c.update(bloom_multiplier=c["bloom_multiplier"] * 2), "do not follow from k="),
                        # the entry named, not a RuntimeError from torch or a message reading "version 1 ... reads version 1"
                        (lambda c: c["overarch"].update(hidden=[-1]), r"config.json entry 'overarch' is not valid \(hidden\[0\] must be an integer >= 1"),
                        (lambda c: c["value_model"].update(num_tasks=2.0), "entry 'value_model' is not valid .*num_tasks must be an integer >= 1, got 2.0"),
                        (lambda c: c.update(format_version="1"), r"format version '1' \(str\) is not supported")):
        edited = json.loads(json.dumps(cfg))
        edit(edited)
        (tmp_path / "a" / "config.json").write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=match):
            RetrievalModel.load(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text("[1]")  # JSON, but not an object
    with pytest.raises(ValueError, match="config.json must hold a JSON object, got list"):
        RetrievalModel.load(tmp_path / "a")
    # Bloom bits from another build of the same shape
    model.bloom_bits.copy_(model.bloom_bits.roll(1, 0))
    model.save(tmp_path / "b")
    with pytest.raises(ValueError, match="Bloom index does not match the items' attributes: .* sampled terms are missing"):
        RetrievalModel.load(tmp_path / "b")


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(k_candidates=float(c["k_candidates"])), r"wrong type .*k_candidates must be an int, got 300.0"),
    (lambda c: c.update(num_results=True), r"wrong type .*num_results must be an int, got True"),
    (lambda c: c.update(max_ops=12.0), r"wrong type .*max_ops must be an int, got 12.0"),
    (lambda c: c.update(max_exact_terms=4.0), r"wrong type .*max_exact_terms must be an int, got 4.0"),
    (lambda c: c.update(max_nprobe=12.0), r"wrong type .*max_nprobe must be an int, got 12.0"),
    (lambda c: c.update(bloom_multiplier="5"), r"wrong type .*bloom_multiplier must be a number, got '5'"),
    (lambda c: c.update(exact_verify="no"), r"wrong type .*exact_verify must be True or False, got 'no'"),
    (lambda c: c.update(bloom_multiplier=float("nan")), r"bloom_multiplier must be a finite number > 1 .*got nan"),
    (lambda c: c["tensors"].update(codes=[1]), r"tensor codes is torch.int8 \[2500, 24\], the config says None None"),
    (lambda c: c["tensors"]["codes"].pop("dtype"), r"tensor codes is torch.int8 \[2500, 24\], the config says None \[2500, 24\]"),
], ids=["k_float", "n_bool", "max_ops_float", "exact_float", "max_nprobe_float", "multiplier_str", "verify_str", "multiplier_nan", "spec_list",
        "spec_no_dtype"])
def test_config_entries_of_the_wrong_json_type_are_refused_at_load(tmp_path, edit, match):
    """A config.json edited to k_candidates 300.0 (or true) loaded, and then every query failed with a
    TypeError from topk (a 500 per request in the server, a traceback in the CLI); a NaN multiplier, a
    tensor entry that is no object failed the load with a TypeError, KeyError or an unnamed ValueError."""
    directory = MODEL.save(tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        RetrievalModel.load(directory)


def test_numpy_int_options_build_as_python_ints():
    import numpy as np

    model = _model(k_candidates=np.int64(300), num_results=np.int32(10))
    assert type(model.k_candidates) is int and type(model.config()["num_results"]) is int
    with pytest.raises(TypeError, match="k_candidates must be an int, got 300.0"):
        _model(k_candidates=300.0)


@pytest.mark.parametrize("loader", ["model", "towers"])
@pytest.mark.parametrize("corrupt, problem", [
    (lambda c: [c], "{file} must hold a JSON object, got list"),
    (lambda c: dict(c, format="other"), "{file} has format 'other', expected '{format}'"),
    (lambda c: dict(c, format_version=str(c["format_version"])), r"{file}: format version '\d' \(str\) is not supported .* reads {format} version \d \(an int\)"),
    (lambda c: dict(c, format_version=99), r"{file}: format version 99 \(int\) is not supported .* reads {format} version \d \(an int\); save it again"),
    # an edited entry: the file it is in named (load_towers named config.json)
    (lambda c: dict(c, overarch=dict(c["overarch"], hidden=[-1])), r"{file} entry 'overarch' is not valid \(hidden\[0\] must be"),
], ids=["not_an_object", "wrong_format", "version_a_string", "version_99", "entry_edited"])
def test_a_corrupt_config_is_refused_alike_by_both_loaders(tmp_path, loader, corrupt, problem):
    """RetrievalModel.load and load_towers check their config alike: the file named, what was
    expected and what was found (load_towers said only "not a silvertorch.Towers version 1 directory")."""
    if loader == "model":
        directory, file, load, fmt = MODEL.save(tmp_path / "m"), "config.json", RetrievalModel.load, "silvertorch.RetrievalModel"
    else:
        directory, file, load, fmt = save_towers(tmp_path / "t", TOWER, OVERARCH, VALUE), "towers.json", load_towers, "silvertorch.Towers"
    load(directory)  # as saved: accepted
    (directory / file).write_text(json.dumps(corrupt(json.loads((directory / file).read_text()))))
    with pytest.raises(ValueError, match=problem.format(file=file, format=fmt.replace(".", "[.]"))):
        load(directory)


@pytest.mark.parametrize("name, value", [("overarch.mlp.0.weight", float("nan")), ("value_model.weights", float("inf")),
                                         ("user_tower.tables.0.weight", float("nan")), ("item_embeddings", float("nan")),
                                         ("value_model.weights", 3e38)])  # finite, but the scores overflow
def test_non_finite_weights_are_refused_at_load_and_build(tmp_path, name, value):
    """NaN or inf weights (a diverged training run, a damaged file) loaded and built: every query then
    answered ids -1. Refused, naming the tensor."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    MODEL.save(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[:2] = value
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=rf"model.safetensors: {name.replace('.', '[.]')} (has NaN or inf|must be finite numbers)"):
        RetrievalModel.load(tmp_path / "m")
    if name == "item_embeddings":
        return
    prefix = name.split(".")[0]
    modules = {"user_tower": TOWER, "overarch": OVERARCH, "value_model": VALUE}
    modules[prefix] = copy.deepcopy(modules[prefix])
    with torch.no_grad():
        dict(modules[prefix].named_parameters(), **dict(modules[prefix].named_buffers()))[name[len(prefix) + 1 :]].view(-1)[:2] = value
    with pytest.raises(ValueError, match=rf"^{name.replace('.', '[.]')} (has NaN or inf|must be finite numbers)"):
        RetrievalModel.build(modules["user_tower"], modules["overarch"], modules["value_model"], EMB, IDS, ATTRS, SCHEMA, n_clusters=12)


@pytest.mark.parametrize("rows, bad_row, match", [(N, 7, "item_dense must be finite"), (N + 5, None, r"item_dense must be \[num_items=2500, F\]"),
                                                  (N - 5, None, r"item_dense must be \[num_items=2500, F\]")])
def test_build_checks_dense_item_features(rows, bad_row, match):
    """A NaN row dropped its item silently; extra rows were dropped, missing ones an IndexError."""
    dense = torch.randn(rows, 3, dtype=torch.float64)
    if bad_row is not None:
        dense[bad_row, 1] = 1e39  # finite in float64, inf in the model's float32
    with pytest.raises(ValueError, match=match):
        RetrievalModel.build(TOWER, OverArch(D, 2, [16], dense_dim=3), VALUE, EMB, IDS, ATTRS, SCHEMA, n_clusters=12, item_dense=dense)


def test_float_features_take_the_user_towers_dtype():
    """A tower without input_spec: float64 features for a float32 tower failed in its matmul; a number
    past float32's range is refused, not turned into inf (which answered ids -1)."""
    torch.manual_seed(0)
    model = RetrievalModel.build(torch.nn.Linear(4, D), OVERARCH, VALUE, EMB[:300], IDS[:300], n_clusters=4, k_candidates=50)
    users = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(model.retrieve(users).ids, model.retrieve(users.float()).ids)
    users[1, 2] = 1e39
    with pytest.raises(ValueError, match=r"user_features: a number is out of range \(the user tower takes torch.float32\)"):
        model.retrieve(users)


def test_export_round_trip(tmp_path):
    users = torch.arange(4).unsqueeze(1)
    plans = MODEL.prepare_filters(["cat:1", "", "NOT year:1995", "cat:{2,3}"])
    program = torch.export.export(MODEL, (users, *plans))
    # the filter and scoring steps stay one custom op each: the kernels run inside the exported graph
    assert "silvertorch.probed_filter_words" in str(program.graph)
    assert "silvertorch.probed_scores" in str(program.graph)
    torch.export.save(program, str(tmp_path / "model.pt2"))
    loaded = torch.export.load(str(tmp_path / "model.pt2"))
    want = MODEL(users, *plans)
    got = loaded.module()(users, *plans)
    for a, b in zip(want, got):
        assert torch.equal(a, b)


def test_aoti_package_runs_without_silvertorch(tmp_path):
    """The AOTInductor package of a saved and loaded model, compiled from a 3-user example, run at
    another batch size in a fresh interpreter that imports torch alone, equals the eager model."""
    import subprocess
    import sys

    exprs = ["cat:1", "", "NOT year:1995", "cat:{2,3}", "year:1999 OR cat:0"]
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 6):  # no AOTInductor packages: refused clearly
        with pytest.raises(RuntimeError, match=r"needs torch >= 2.6"):
            MODEL.package(tmp_path / "model.pt2", torch.arange(3).unsqueeze(1), exprs[:3], max_batch=8)
        return
    MODEL.save(tmp_path / "artifact")  # packaged as `silvertorch package` does: from a loaded artifact
    path = RetrievalModel.load(tmp_path / "artifact").package(tmp_path / "model.pt2", torch.arange(3).unsqueeze(1), exprs[:3],
                                                              max_batch=8)
    users = torch.arange(7, 12).unsqueeze(1)
    plans = MODEL.prepare_filters(exprs)
    torch.save((users, *plans), tmp_path / "inputs.pt")
    code = ("import sys, torch; runner = torch._inductor.aoti_load_package(sys.argv[1]); "
            "out = runner(*torch.load(sys.argv[2], weights_only=True)); torch.save(tuple(out), sys.argv[3]); "
            "assert not any(m.split('.')[0] in ('silvertorch', 'gpukernels_common') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                   check=True, timeout=300)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    want = MODEL(users, *plans)
    assert torch.equal(got[0], want[0]) and torch.equal(got[3], want[3]) and torch.equal(got[4], want[4])
    assert (want[0] >= 0).sum() > 20  # results to compare: most queries return N items
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must end in .pt2"):
        MODEL.package(tmp_path / "model.zip", users)


@pytest.mark.parametrize("args, kwargs, error", [
    (("model.zip", [[1]]), {}, "must end in .pt2"),
    (("model.pt2", [[1]]), {"max_batch": 1}, "max_batch must be an int >= 2"),
    (("model.pt2", torch.zeros(0, 1, dtype=torch.long)), {}, r"user_features must be a batch \[Q >= 1"),
    (("model.pt2", [[1]] * 5), {"max_batch": 4}, r"example batch \[1..max_batch=4"),
    (("model.pt2", [[1], [2]], ["cat:1"]), {}, "filters must be a list of 2"),
    (("model.pt2", [[10**6]]), {}, "user_features"),  # an id past the tower's table
    (("model.pt2", [[True]]), {}, "user_features must be real numbers"),
    (("model.pt2", [[1]], ["cat:1 AND"]), {}, "position"),
])
def test_package_checks_its_arguments_before_compiling(tmp_path, monkeypatch, args, kwargs, error):
    """`silvertorch package --user 99` compiled for a minute an example the model refuses."""
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 6):  # no AOTInductor packages: refused first
        error = "needs torch >= 2.6"

    def no_export(*a, **k):
        raise AssertionError("the arguments were refused only after the export began")

    monkeypatch.setattr(torch.export, "export", no_export)
    with pytest.raises((ValueError, RuntimeError), match=error):
        MODEL.package(tmp_path / args[0], *args[1:], **kwargs)


def test_compile_full_graph():
    users = torch.arange(3).unsqueeze(1)
    plans = MODEL.prepare_filters(["cat:1", "", "NOT year:1995"])
    compiled = torch.compile(MODEL, backend="aot_eager", fullgraph=True)  # fullgraph: no graph breaks, no host syncs
    for a, b in zip(MODEL(users, *plans), compiled(users, *plans)):
        assert torch.equal(a, b)


def test_bad_inputs_are_named():
    users = torch.tensor([[1], [2]])
    with pytest.raises(ValueError, match="filters must be a list of 2"):
        MODEL.retrieve(users, ["cat:1"])
    with pytest.raises(FilterSyntaxError, match="position"):
        MODEL.retrieve(users, ["cat:1 AND", ""])
    with pytest.raises(FilterSyntaxError, match="known feature"):
        MODEL.retrieve(users, ["genre:1", ""])
    with pytest.raises(ValueError, match="value_weights"):
        MODEL.retrieve(users, ["", ""], [1.0, float("nan")])
    with pytest.raises(ValueError, match="max_terms"):
        MODEL.retrieve(users[:1], [" OR ".join(f"year:{1990 + i}" for i in range(17))])
    with pytest.raises(ValueError, match=r"'NOT year:\{1,2,3,4,5\}' has 5 terms under NOT .* max_exact_terms=4"):
        MODEL.retrieve(users, ["cat:1", "NOT year:{1,2,3,4,5}"])
    with pytest.raises(ValueError, match="max_exact_terms must be in"):
        _model(max_exact_terms=17)
    assert inspect.signature(RetrievalModel.build).parameters["max_exact_terms"].default == 8
    with pytest.raises(ValueError, match="k_candidates"):
        _model(nprobe=1, k_candidates=10**6)
    with pytest.raises(ValueError, match="num_results"):
        _model(num_results=301)
    with pytest.raises(ValueError, match="item_ids"):
        RetrievalModel.build(TOWER, OVERARCH, VALUE, EMB, torch.zeros(N), ATTRS, SCHEMA)
    with pytest.raises(ValueError, match="attribute offsets"):
        RetrievalModel.build(TOWER, OVERARCH, VALUE, EMB, IDS, (ATTRS[0], ATTRS[1][:-1], ATTRS[2]), SCHEMA)
    # user features are checked against the tower's input_spec before the forward
    with pytest.raises(ValueError, match=rf"user_features\[1, 0\] = {USERS} is out of range: column 0 takes ids in \[0, {USERS - 1}\]"):
        MODEL.retrieve(torch.tensor([[1], [USERS]]))
    with pytest.raises(ValueError, match=r"user_features\[0, 0\] = -1"):
        MODEL.retrieve(torch.tensor([[-1]]))
    for shape_wrong in (torch.tensor([1, 2]), torch.tensor([[1, 2]])):
        with pytest.raises(ValueError, match=r"user_features must be \[num_users, 1\]"):
            MODEL.retrieve(shape_wrong)
    with pytest.raises(ValueError, match="whole numbers"):
        MODEL.retrieve(torch.tensor([[1.9]]))
    assert torch.equal(MODEL.retrieve(torch.tensor([[3.0]])).ids, MODEL.retrieve(torch.tensor([[3]])).ids)
    # dense item features and the OverArch must agree at build time, not at the first query
    with pytest.raises(ValueError, match="OverArch reads 3 dense item features, the items have 0"):
        RetrievalModel.build(TOWER, OverArch(D, 2, [16], dense_dim=3), VALUE, EMB, IDS, ATTRS, SCHEMA, n_clusters=12)
    with pytest.raises(ValueError, match="the items have 2 dense features, the OverArch reads none"):
        RetrievalModel.build(TOWER, OVERARCH, VALUE, EMB, IDS, ATTRS, SCHEMA, n_clusters=12, item_dense=torch.zeros(N, 2))
    learned = RetrievalModel.build(TOWER, OVERARCH, ValueModel(2, learned=True), EMB, IDS, ATTRS, SCHEMA, n_clusters=12)

    def no_forward(*args):
        raise AssertionError("the forward ran before value_weights were refused")

    learned.forward = no_forward  # refused before any kernel runs
    with pytest.raises(ValueError, match="value_weights: this Value Model is learned"):
        learned.retrieve(users, None, [1.0, 0.0])
    with pytest.raises(ValueError, match="user_features must be real numbers, got torch.bool"):  # True was user 1
        MODEL.retrieve(torch.tensor([[True]]))
    # values a cast would change (fractions, huge floats) and malformed jagged attributes are named,
    # and a refused add_items writes nothing
    with pytest.raises(ValueError, match=r"user_features\[0, 0\] = 1e\+300 is out of range"):
        MODEL.retrieve(torch.tensor([[1e300]], dtype=torch.float64))
    with pytest.raises(ValueError, match="attributes: feature_ids and values must be integer tensors"):
        RetrievalModel.build(TOWER, OVERARCH, VALUE, EMB, IDS, (ATTRS[0], ATTRS[1], ATTRS[2].float() + 0.5), SCHEMA)
    with pytest.raises(ValueError, match="attributes: offsets must be non-decreasing"):
        RetrievalModel.build(TOWER, OVERARCH, VALUE, EMB, IDS, (ATTRS[0], ATTRS[1].index_put((torch.tensor([1]),), torch.tensor(5)), ATTRS[2]), SCHEMA)
    with pytest.raises(ValueError, match=r"bloom_k must be an integer in \[1, 10\]"):
        _model(bloom_k=0)
    before = (MODEL.fresh_used, MODEL.item_ids.clone())
    new_rows = EMB[:2]
    with pytest.raises(ValueError, match="ids must be integers, got torch.float32"):
        MODEL.add_items(new_rows, torch.tensor([90001.5, 90002.0]))
    with pytest.raises(ValueError, match="attributes: offsets end at 5"):
        MODEL.add_items(new_rows, [90001, 90002], (torch.tensor([1, 2]), torch.tensor([0, 1, 5]), torch.tensor([1, 1991])))
    with pytest.raises(ValueError, match="this model has no dense item features"):
        MODEL.add_items(new_rows, [90001, 90002], dense=torch.zeros(2, 3))
    assert MODEL.fresh_used == before[0] and torch.equal(MODEL.item_ids, before[1])


def test_build_and_publish_leave_the_model_and_towers_in_eval_mode(tmp_path):
    # dropout in the item tower must not reach the index, nor in the user tower the queries
    from silvertorch import publish

    torch.manual_seed(0)
    item_tower = torch.nn.Sequential(torch.nn.Linear(6, D), torch.nn.Dropout(0.5)).train()
    user_tower = torch.nn.Sequential(EmbeddingTower([USERS], D), torch.nn.Dropout(0.5)).train()
    features = torch.randn(300, 6)
    model = publish(tmp_path / "artifact", user_tower, OVERARCH, VALUE, item_tower=item_tower, item_features=features,
                    n_clusters=4, k_candidates=20)
    assert item_tower.training  # its mode is restored
    with torch.no_grad():
        expected = item_tower.eval()(features).bfloat16()
    assert torch.equal(model.item_embeddings[: model.num_main], expected[model.item_ids[: model.num_main]])  # ids: build rows
    assert not model.training and not user_tower.training
    users = torch.arange(8).unsqueeze(1)
    assert torch.equal(model.retrieve(users).ids, model.retrieve(users).ids)


def test_small_corpus_builds_with_default_probing_and_rebuilds_after_deletions():
    model = RetrievalModel.build(TOWER, OVERARCH, VALUE, EMB[:20], IDS[:20], (ATTRS[0][:40], ATTRS[1][:21], ATTRS[2][:40]), SCHEMA,
                                 k_candidates=15)
    assert model.centroids.shape[0] == 4 and model.nprobe == 4  # sqrt(20) clusters, all probed (default 8)
    assert model.delete_items(IDS[:10]) == 10
    rebuilt = model.rebuild()  # 10 live items < k_candidates=15
    assert rebuilt.k_candidates == 10 and rebuilt.num_main == 10
    assert set(rebuilt.retrieve(torch.tensor([[1]])).ids[0].tolist()) == set(IDS[10:20].tolist())


RARE = 3  # feature id of a tag carried by 3 of the 2,500 items (0.12%)


def _rare_catalog():
    fids, offsets, vals = ATTRS
    rare = torch.arange(N) % 1000 == 7
    per_item = [torch.tensor([1, 2] + ([RARE] if r else [])) for r in rare.tolist()]
    per_value = [torch.cat([vals[2 * i : 2 * i + 2], torch.ones(int(r), dtype=torch.int64)]) for i, r in enumerate(rare.tolist())]
    counts = torch.tensor([t.numel() for t in per_item])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return (torch.cat(per_item), offsets, torch.cat(per_value)), set(IDS[rare].tolist())


def _fixed_and_adaptive_over_the_rare_catalog(**options):
    """Two models of the rare catalog, probing 2 of 12 clusters: fixed, and adaptive (up to all 12);
    users every 4th, each filtering on the rare tag. (fixed, adaptive, rare ids, users, filters)."""
    attrs, rare_ids = _rare_catalog()
    schema = dict(SCHEMA, tag=RARE)
    options = dict(n_clusters=12, nprobe=2, **options)
    fixed = RetrievalModel.build(TOWER, OVERARCH, VALUE, EMB, IDS, attrs, schema, **options)
    adaptive = RetrievalModel.build(TOWER, OVERARCH, VALUE, EMB, IDS, attrs, schema, max_nprobe=12, **options)
    users = torch.arange(0, USERS, 4).unsqueeze(1)
    return fixed, adaptive, rare_ids, users, ["tag:1"] * users.shape[0]


def test_adaptive_probing_finds_the_rare_items_fixed_probing_misses():
    fixed, adaptive, rare_ids, users, exprs = _fixed_and_adaptive_over_the_rare_catalog(
        k_candidates=100, num_results=10, fresh_capacity=0)
    a, f = adaptive.retrieve(users, exprs), fixed.retrieve(users, exprs)
    got_a = [{i for i in row if i >= 0} for row in a.ids.tolist()]
    got_f = [{i for i in row if i >= 0} for row in f.ids.tolist()]
    assert all(got == rare_ids for got in got_a)  # every cluster probed: all 3 found (and only those)
    assert all(got <= rare_ids for got in got_f) and sum(map(len, got_f)) < sum(map(len, got_a))
    assert (a.found >= f.found).all() and (a.found > f.found).any()
    assert (a.found >= len(rare_ids)).all()  # Bloom false positives may add to the count, never take from it


def test_adaptive_probing_equals_fixed_when_the_first_clusters_suffice():
    fixed = _model(nprobe=3, k_candidates=100)
    adaptive = _model(nprobe=3, max_nprobe=12, k_candidates=100)
    users = torch.arange(0, USERS, 3).unsqueeze(1)
    exprs = [""] * users.shape[0]
    f, a = fixed.retrieve(users, exprs), adaptive.retrieve(users, exprs)
    assert (f.found >= 100).all()  # the premise: 3 clusters already hold K items
    for name in ("ids", "scores", "task_probs", "fresh", "found"):
        assert torch.equal(getattr(f, name), getattr(a, name)), name
    everything = MODEL.retrieve(users, exprs)  # all 12 clusters probed, no filter: every item is found
    assert (everything.found == N).all()


def test_adaptive_model_exports_and_round_trips(tmp_path):
    """Adaptive probing is tensor ops only: torch.export takes it whole (the fixed model's compile test
    covers the rest of the forward); the artifact keeps max_nprobe."""
    model = _model(nprobe=2, max_nprobe=12, k_candidates=200)
    users = torch.arange(4).unsqueeze(1)
    plans = model.prepare_filters(["cat:1 AND year:1999", "", "NOT year:1995", "cat:{2,3}"])
    want = model(users, *plans)
    assert (want[4][:1] < want[4][1:]).all()  # the selective filter needs more clusters, and still finds fewer
    program = torch.export.export(model, (users, *plans))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    loaded = RetrievalModel.load(model.save(tmp_path / "artifact"))
    assert loaded.max_nprobe == 12
    for got in (torch.export.load(str(tmp_path / "model.pt2")).module()(users, *plans), loaded(users, *plans)):
        for x, y in zip(want, got):
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match="max_nprobe must be in"):
        _model(nprobe=4, max_nprobe=3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_model_kernels_on_device_match_cpu_reference(device):
    """The model's filter-words and scoring ops with the backend `device` gets (compiled Triton on
    CUDA, the interpreter on the CPU) against their CPU references, and the whole forward on
    `device` against the CPU model."""
    from gpukernels_common import Backend, select_backend

    backend = select_backend(device=device)
    model = _model(bloom_k=2, bloom_multiplier=1.5, n_clusters=12, nprobe=3)
    exprs = list(FILTERS)
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, (model.num_main + 63) // 64, (len(exprs), 40), generator=g)
    args = _filter_words_args(model, exprs, words)
    want = probed_filter_words.run(Backend.REFERENCE, *args)
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    assert torch.equal(probed_filter_words.run(backend, *moved).cpu(), want)
    for queries in (3, CLUSTER_MAJOR_MIN_QUERIES + 1):  # query-major, cluster-major
        q_codes = torch.randint(-127, 128, (queries, D), dtype=torch.int8, generator=g)
        q_scales = torch.rand(queries, generator=g) + 0.01
        clusters = torch.stack([torch.randperm(12, generator=g)[:3] for _ in range(queries)])
        keep = (torch.rand(queries, 3, model.cluster_positions.shape[1], generator=g) < 0.7) & model.cluster_valid[clusters]
        args = (model.codes, model.scales, model.cluster_positions, model.cluster_offsets, clusters, keep, q_codes, q_scales)
        want = probed_scores.run(Backend.REFERENCE, *args)
        got = probed_scores.run(backend, *[a.to(device) for a in args]).cpu()
        assert torch.equal(torch.isinf(got), ~keep.reshape(queries, -1))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    users = torch.arange(0, USERS, 2).unsqueeze(1)
    plans = model.prepare_filters([exprs[i % len(exprs)] for i in range(users.shape[0])])
    with torch.no_grad():
        want_ids, want_scores = model(users, *plans)[:2]
        # a copy: Module.to moves in place, and the model's towers are the module-wide TOWER, OVERARCH
        # and VALUE every later test (MODEL's too) uses on the CPU
        on_device = copy.deepcopy(model).to(device)
        got_ids, got_scores = on_device(users.to(device), *[p.to(device) for p in plans])[:2]
    torch.testing.assert_close(got_scores.cpu(), want_scores, rtol=1e-4, atol=1e-5)
    agree = sum(len(set(a) & set(b)) for a, b in zip(got_ids.cpu().tolist(), want_ids.tolist()))
    assert agree >= 0.95 * want_ids.numel()  # near-ties may swap at the cut


def test_loaded_and_served_under_inference_mode(tmp_path):
    """A model loaded and queried under `torch.inference_mode()` (a serving idiom) answers as the
    built one, and a delete made there takes effect (its tensors have no version counter)."""
    users, exprs = torch.arange(4).unsqueeze(1), ["cat:1", "", "NOT year:1995", "cat:{2,3}"]
    want = MODEL.retrieve(users, exprs)
    MODEL.save(tmp_path / "m")
    with torch.inference_mode():
        model = RetrievalModel.load(tmp_path / "m")
        got = model.retrieve(users, exprs)
        model.delete_items([int(want.ids[1, 0])])
        after = model.retrieve(users, exprs)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)
    assert int(want.ids[1, 0]) not in after.ids.tolist()[1] and torch.equal(after.ids[1, :-1], want.ids[1, 1:])


def test_adaptive_probing_counts_true_matches_not_bloom_false_positives(monkeypatch):
    """The first clusters hold more Bloom passes than K but fewer true matches: adaptive probing
    goes on (verified counts) and returns K results, as probing every cluster does."""
    monkeypatch.setenv("GKC_BACKEND", "reference")
    from silvertorch import FilterSchema

    g = torch.Generator().manual_seed(0)
    items = [{"tag": [7] if i % 250 == 3 else [], "x": torch.randint(0, 10**6, (9,), generator=g).tolist()} for i in range(N)]
    schema = {"tag": 1, "x": 2}
    attrs = FilterSchema(schema).encode_items(items)
    options = dict(n_clusters=12, nprobe=2, k_candidates=5, num_results=5, fresh_capacity=0, max_attributes=10)
    adaptive = RetrievalModel.build(TOWER, OVERARCH, VALUE, EMB, IDS, attrs, schema, max_nprobe=12, **options)
    every = RetrievalModel.build(TOWER, OVERARCH, VALUE, EMB, IDS, attrs, schema, **dict(options, nprobe=12))
    users = torch.arange(0, USERS, 4).unsqueeze(1)
    exprs = ["tag:7"] * users.shape[0]
    a, e = adaptive.retrieve(users, exprs), every.retrieve(users, exprs)
    assert ((e.ids >= 0).sum(1) == 5).all()  # the premise: every cluster holds K true matches
    assert ((a.ids >= 0).sum(1) == 5).all()
    assert all((ids - 5000) % 250 == 3 for ids in a.ids.flatten().tolist())


def test_a_column_major_user_tower_gives_the_same_results():
    """The scoring kernels read the quantized user embeddings row-major: a tower returning a
    transposed view (on the interpreter) must score as its contiguous copy."""

    class ColumnMajor(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.input_spec = inner, inner.input_spec

        def forward(self, x):
            return self.inner(x).T.contiguous().T

    emb, _, _, attrs = _catalog(n=300)
    options = dict(n_clusters=4, nprobe=4, k_candidates=8, num_results=5, fresh_capacity=0)
    users, exprs = torch.tensor([[7], [12], [30]]), ["", "cat:1", "NOT cat:2"]
    got = []
    for tower in (TOWER, ColumnMajor(TOWER)):
        got.append(RetrievalModel.build(tower, OVERARCH, VALUE, emb, None, attrs, SCHEMA, **options).retrieve(users, exprs))
    assert torch.equal(got[0].ids, got[1].ids)
    torch.testing.assert_close(got[0].scores, got[1].scores)  # the OverArch's float sums may round apart


def test_probed_scores_kernel_reads_non_contiguous_inputs_row_major():
    from gpukernels_common import Backend

    args = list(_scoring_op_args(3))
    want = probed_scores.run(Backend.REFERENCE, *args)
    args[6] = args[6].T.contiguous().T  # column-major query codes
    args[0] = args[0].T.contiguous().T  # and item codes
    torch.testing.assert_close(probed_scores.run(Backend.INTERPRET, *args), want, rtol=1e-6, atol=0)


# -- device audit: the `meta` device stands in for a GPU (a CPU tensor beside a meta one raises as
# beside a CUDA one; reading a value, as an eager check's `if ...any()` does, is where meta stops)
def test_id_features_on_a_device_are_range_checked_there():
    features = torch.tensor([[1], [2]], device="meta")
    with pytest.raises(RuntimeError, match="cannot be called on meta"):  # past the comparison, at the value read
        MODEL.check_user_features(features)


@pytest.mark.parametrize("dtype, bad", [(torch.bfloat16, 500.0), (torch.float16, 4100.0)])
def test_low_precision_float_ids_past_the_range_are_refused(dtype, bad):
    """The id bound was compared in the features' dtype: 499 rounds to 500 in bfloat16 (4099 to 4100
    in float16), so id 500 passed the check and failed in the embedding with an IndexError."""
    tower = EmbeddingTower([int(bad)], D)
    model = RetrievalModel.build(tower, OVERARCH, VALUE, EMB[:40], IDS[:40], n_clusters=2, nprobe=2, k_candidates=10,
                                 num_results=3, fresh_capacity=0)
    with pytest.raises(ValueError, match=f"user_features\\[0, 0\\] = {bad:g} is out of range: column 0 takes ids in "
                                         f"\\[0, {int(bad) - 1}\\]"):
        model.retrieve(torch.tensor([[bad]], dtype=dtype))
    assert model.check_user_features(torch.tensor([[bad - 4]], dtype=dtype)).tolist() == [[int(bad) - 4]]


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_id_features_are_checked_and_served(dtype):
    """torch compares no uint16 / 32 / 64 tensors: valid ids in them (a numpy uint32 array, say) failed
    the range check with an unnamed NotImplementedError ("lt_cpu" not implemented)."""
    users = torch.tensor([[3], [7]])
    want = MODEL.retrieve(users)
    got = MODEL.retrieve(users.to(dtype))
    assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)
    with pytest.raises(ValueError, match=f"is out of range: column 0 takes ids in \\[0, {USERS - 1}\\]"):
        MODEL.retrieve(torch.tensor([[USERS]]).to(dtype))
    if dtype == torch.uint64:  # past int64: refused, not wrapped to a negative id
        with pytest.raises(ValueError, match="is out of range"):
            MODEL.check_user_features(torch.tensor([[2**63 + 5]], dtype=torch.uint64))


def test_item_tower_gets_the_item_table_on_its_own_device():
    from silvertorch.publish import item_embeddings_from_tower

    class RecordingTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(1, device="meta"))
            self.seen = []

        def forward(self, features):
            self.seen.append(features.device.type)
            return torch.ones(features.shape[0], 4)

    tower = RecordingTower()
    assert item_embeddings_from_tower(tower, torch.zeros(5, 3), batch_size=2).shape == (5, 4)
    assert tower.seen == ["meta"] * 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_item_tower_with_one_non_finite_row_is_refused(bad):
    from silvertorch.publish import item_embeddings_from_tower

    class OneBadRow(torch.nn.Module):
        def forward(self, features):  # the item whose first feature is 4 (the third chunk's) goes bad
            out = features.sum(1, keepdim=True).expand(-1, 4).clone()
            out[features[:, 0] == 4] = bad
            return out

    with pytest.raises(ValueError, match="NaN or inf"):
        item_embeddings_from_tower(OneBadRow(), torch.arange(10.0).view(5, 2), batch_size=2)


@pytest.mark.gpu
def test_rebuild_keeps_the_models_device():
    model = copy.deepcopy(_model()).to("cuda")  # a copy: Module.to would move the shared TOWER, OVERARCH and VALUE
    model.delete_items(IDS[:5])
    rebuilt = model.rebuild()
    assert {t.device.type for t in rebuilt.state_dict().values()} == {"cuda"}
    users = torch.arange(4).unsqueeze(1)
    on_gpu = rebuilt.retrieve(users).ids.cpu()
    on_cpu = model.rebuild().cpu().retrieve(users).ids
    agree = sum(len(set(a) & set(b)) for a, b in zip(on_gpu.tolist(), on_cpu.tolist()))
    assert agree >= 0.95 * on_cpu.numel()  # near-ties may swap at the cut (GPU and CPU float sums differ)
    assert {p.device.type for p in (*TOWER.parameters(), *OVERARCH.parameters())} == {"cpu"}


@pytest.mark.parametrize("ids", [[float(IDS[2]) + 0.7], torch.tensor([True, False])])
def test_delete_items_refuses_fractions_and_masks(ids):
    # [5002.7] deleted id 5002 and a bool mask ids 0 and 1 (or nothing): silently, as add_items refuses them
    model = _model()
    with pytest.raises(ValueError, match="ids must be integers"):
        model.delete_items(ids)
    assert bool(model.alive[: model.num_main].all())


def test_rebuild_passes_explicit_options_on_as_given():
    """The bounds carried over shrink to fit; an explicit override is no longer capped silently
    (rebuild(num_results=50) over 16 candidates gave num_results=16)."""
    model = _model(k_candidates=16, num_results=8)
    with pytest.raises(ValueError, match="num_results must be in \\[1, k_candidates=16\\], got 50"):
        model.rebuild(num_results=50)
    with pytest.raises(ValueError, match="nprobe must be in \\[1, n_clusters=12\\], got 13"):
        model.rebuild(nprobe=13)
    rebuilt = model.rebuild(k_candidates=32, num_results=20, n_clusters=6)
    assert (rebuilt.k_candidates, rebuilt.num_results, rebuilt.centroids.shape[0], rebuilt.nprobe) == (32, 20, 6, 6)
    model.delete_items(IDS)
    with pytest.raises(ValueError, match="every item is deleted"):
        model.rebuild()


def test_rebuild_after_many_deletions_without_fresh_capacity():
    """k_candidates must fit max_nprobe x the largest cluster + the fresh capacity; with no fresh capacity
    the rebuilt model's smaller clusters could not hold the carried 200, and rebuild() refused it (an
    option it was not given). Carried over, it shrinks to what the new clusters hold; given, it is refused."""
    model = _model(n_clusters=12, nprobe=1, k_candidates=200, num_results=10, fresh_capacity=0)
    assert model.delete_items(IDS[: N - 400]) == N - 400
    rebuilt = model.rebuild()
    largest = int(rebuilt.cluster_valid.sum(1).max())
    assert rebuilt.centroids.shape[0] == 12 and largest < 200 and rebuilt.k_candidates == largest
    assert rebuilt.num_results == 10 and set(rebuilt.retrieve(torch.tensor([[3]])).ids[0].tolist()) <= set(IDS[N - 400 :].tolist())
    with pytest.raises(ValueError, match="k_candidates must be in"):
        model.rebuild(k_candidates=200)
    tiny = _model(n_clusters=12, nprobe=1, k_candidates=200, num_results=10, fresh_capacity=0)
    tiny.delete_items(IDS[: N - 30])  # 30 items in 12 clusters: fewer candidates than results, both shrink
    rebuilt = tiny.rebuild()
    assert rebuilt.num_results == rebuilt.k_candidates == int(rebuilt.cluster_valid.sum(1).max()) < 10


def test_rebuild_takes_none_as_the_build_default():
    # rebuild(n_clusters=None) failed with a TypeError (min(int, None)); None asks what build() gives
    model = _model(k_candidates=16, num_results=8)
    rebuilt = model.rebuild(n_clusters=None, nprobe=None, max_nprobe=None)
    fresh = RetrievalModel.build(TOWER, OVERARCH, VALUE, EMB, IDS, ATTRS, SCHEMA, k_candidates=16, num_results=8)
    assert (rebuilt.centroids.shape[0], rebuilt.nprobe, rebuilt.max_nprobe) == (
        fresh.centroids.shape[0], fresh.nprobe, fresh.max_nprobe) == (round(N ** 0.5), 8, 8)


def test_load_keeps_the_value_model_and_overarch_dtypes(tmp_path):
    """A bf16 Value Model came back float32 (the loaded model's scores differed from the saved one's);
    a float64 one failed every query (its weights' matmul with the float32 probabilities)."""
    torch.manual_seed(3)
    for value in (ValueModel(2, learned=True).to(torch.bfloat16), ValueModel(2, [1.0, 0.3]).double()):
        model = RetrievalModel.build(TOWER, OverArch(D, 2, [8]).to(torch.bfloat16), value, EMB[:200], IDS[:200],
                                     n_clusters=4, k_candidates=20)
        loaded = RetrievalModel.load(model.save(tmp_path / str(value.learned)))
        assert {k: v.dtype for k, v in loaded.state_dict().items()} == {k: v.dtype for k, v in model.state_dict().items()}
        users = torch.arange(3).unsqueeze(1)
        want, got = model.retrieve(users), loaded.retrieve(users)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)


def test_numpy_sizes_and_schema_ids_publish(tmp_path):
    """Sizes and schema ids from numpy (a dataframe's max + 1) failed the config's JSON after the
    whole build, leaving an artifact directory with model.safetensors and no config.json."""
    import numpy as np

    from silvertorch import publish

    tower = EmbeddingTower([np.int64(USERS)], np.int64(D), hidden=[np.int32(8)])
    schema = {"cat": np.int64(1), "year": np.int64(2)}
    model = publish(tmp_path / "a", tower, OVERARCH, VALUE, item_embeddings=EMB[:100], item_ids=IDS[:100],
                    attributes=(ATTRS[0][:200], ATTRS[1][:101], ATTRS[2][:200]), schema=schema, n_clusters=4, k_candidates=20)
    loaded = RetrievalModel.load(tmp_path / "a")
    assert loaded.schema == {"cat": 1, "year": 2} and loaded.user_tower.config()["cardinalities"] == [USERS]
    users = torch.arange(2).unsqueeze(1)
    assert torch.equal(loaded.retrieve(users, ["cat:1", ""]).ids, model.retrieve(users, ["cat:1", ""]).ids)


@pytest.mark.parametrize("make, match", [
    (lambda: EmbeddingTower([10], 0), "dim must be an integer >= 1, got 0"),
    (lambda: EmbeddingTower([10], 8, embedding_dim=0), "embedding_dim must be an integer >= 1, got 0"),  # 0 became the default
    (lambda: EmbeddingTower([10.5], 8), r"cardinalities\[0\] must be an integer >= 1, got 10.5"),
    (lambda: EmbeddingTower(10, 8), "cardinalities must be a non-empty list"),  # was TypeError: 'int' object is not iterable
    (lambda: EmbeddingTower([10], 8, hidden=[-1]), r"hidden\[0\] must be an integer >= 1, got -1"),
])
def test_embedding_tower_sizes_are_checked(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_user_tower_of_another_width_is_refused():
    # built, then every query failed with "mat1 and mat2 shapes cannot be multiplied" (every server request a 500)
    with pytest.raises(ValueError, match="the user tower returns 16-dimensional vectors, the items are 24-dimensional"):
        RetrievalModel.build(EmbeddingTower([USERS], 16), OVERARCH, VALUE, EMB[:100], IDS[:100], n_clusters=4, k_candidates=20)
    custom = torch.nn.Sequential(torch.nn.Linear(3, 16))  # no `dim` to read: checked by the forward
    model = RetrievalModel.build(custom, OVERARCH, VALUE, EMB[:100], IDS[:100], n_clusters=4, k_candidates=20)
    with pytest.raises(ValueError, match=r"the user tower returned \(2, 16\); this model's items need \[num_users, 24\]"):
        model.retrieve(torch.randn(2, 3))


def test_value_weights_by_task_name_round_trip_and_rank(tmp_path):
    value = ValueModel(task_names=["watch", "like"], weights={"watch": 1.0, "like": 0.5})
    model = RetrievalModel.build(TOWER, OVERARCH, value, EMB[:300], IDS[:300], n_clusters=4, k_candidates=30)
    loaded = RetrievalModel.load(model.save(tmp_path / "a"))
    assert loaded.value_model.task_names == ["watch", "like"] and loaded.value_model.weights.tolist() == [1.0, 0.5]
    users = torch.arange(3).unsqueeze(1)
    by_name = loaded.retrieve(users, None, {"like": 1.0, "watch": 0.0})
    assert torch.equal(by_name.ids, loaded.retrieve(users, None, [0.0, 1.0]).ids)
    assert torch.equal(by_name.scores, by_name.task_probs[..., 1])  # the like head alone
    with pytest.raises(ValueError, match=r"value_weights must name every task exactly: unknown \['likes'\]; missing \['like'\]"):
        loaded.retrieve(users, None, {"watch": 1.0, "likes": 1.0})


@pytest.mark.parametrize("saved", [{"cat": 1, "release year": 2}, {"cat": 1, "2024": 2}, {"cat": 1, "year": 2, "kind": 1}])
def test_an_artifact_whose_schema_the_checks_now_refuse_still_loads(tmp_path, saved):
    """Earlier versions saved any schema; the FilterSchema checks made such an artifact fail to load
    ("schema feature name 'release year' cannot be written in a filter"), and with it every query
    and rebuild. It loads as saved, with a warning naming what the checks refuse, and answers as before."""
    model = _model()
    directory = model.save(tmp_path / "a")
    config = json.loads((directory / "config.json").read_text())
    config["schema"] = saved  # what an earlier version wrote
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="kept as saved .* a filter schema FilterSchema now refuses"):
        loaded = RetrievalModel.load(directory)
    assert loaded.schema == saved
    users = torch.arange(3).unsqueeze(1)
    assert torch.equal(loaded.retrieve(users, ["cat:1"] * 3).ids, model.retrieve(users, ["cat:1"] * 3).ids)
    rebuilt = loaded.rebuild()  # the periodic rebuild of a served artifact keeps working
    assert rebuilt.schema == saved and torch.equal(rebuilt.retrieve(users, ["cat:1"] * 3).ids, model.retrieve(users, ["cat:1"] * 3).ids)
    with pytest.raises(ValueError, match="cannot be written in a filter|is a number|share feature id"):
        RetrievalModel.build(TOWER, OVERARCH, VALUE, EMB[:100], IDS[:100], schema=saved, n_clusters=4, k_candidates=20)


def test_deleting_no_ids_deletes_nothing():
    # [] reads as float32 to torch: the fraction check refused it ("ids must be integers, got
    # torch.float32"), where an empty batch of removals (a day without any) deleted nothing
    model = _model()
    assert model.delete_items([]) == 0 and model.delete_items(()) == 0
    assert bool(model.alive[: model.num_main].all())


def test_fresh_matches_count_towards_adaptive_probing_and_empty_slots_are_not_fresh():
    """Adaptive probing widens only while fewer than K items passed: matching fresh items count,
    so with K of them the adaptive model probes what the fixed one does. A result slot left empty
    (id -1) is never tagged fresh."""
    fixed, adaptive, _, users, exprs = _fixed_and_adaptive_over_the_rare_catalog(k_candidates=5, num_results=5,
                                                                                 fresh_capacity=8)
    for model in (fixed, adaptive):
        r = model.retrieve(users, exprs)
        assert (r.ids < 0).any() and not (r.fresh & (r.ids < 0)).any()
    g = torch.Generator().manual_seed(5)
    fresh = torch.nn.functional.normalize(torch.randn(5, D, generator=g), dim=1)
    fresh_attrs = (torch.tensor([1, 2, RARE] * 5), torch.arange(0, 16, 3), torch.tensor([0, 1990, 1] * 5))
    for model in (fixed, adaptive):
        model.add_items(fresh, torch.arange(90000, 90005), fresh_attrs)
    f, a = fixed.retrieve(users, exprs), adaptive.retrieve(users, exprs)
    assert (a.found >= 5).all() and not (a.fresh & (a.ids < 0)).any()
    for name in ("ids", "scores", "fresh", "found"):
        assert torch.equal(getattr(f, name), getattr(a, name)), name


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_empty_result_slots_hold_zero_task_probs(monkeypatch, backend):
    """A result slot left empty (id -1: fewer than N items passed) holds score -inf, fresh False and
    task probabilities 0, on the query-major and cluster-major scoring paths, eagerly and on the
    traced path (captured, compiled and exported graphs): they held whatever candidate the top-N
    had gathered there, probabilities of no item."""
    import silvertorch.model
    import silvertorch.scoring
    from silvertorch.ivf import probed, quantize

    monkeypatch.setenv("GKC_BACKEND", backend)
    fixed, _, _, _, _ = _fixed_and_adaptive_over_the_rare_catalog(k_candidates=5, num_results=5, fresh_capacity=8)
    for q in (1, CLUSTER_MAJOR_MIN_QUERIES + 1):
        users = (torch.arange(q) % USERS).unsqueeze(1)
        plans = fixed.prepare_filters(["tag:1"] * q)
        with torch.no_grad():
            eager = fixed(users, *plans)
            with monkeypatch.context() as traced_path:
                for module in (silvertorch.model, silvertorch.scoring, probed, quantize):
                    traced_path.setattr(module, "tracing", lambda: True)
                traced = fixed(users, *plans)
        for ids, scores, task_probs, fresh, _ in (eager, traced):
            empty = ids < 0
            assert empty.any() and (~empty).any(), "the test needs both filled and empty slots"
            assert (scores[empty] == float("-inf")).all() and not fresh[empty].any()
            assert (task_probs[empty] == 0).all(), task_probs[empty]
            assert (task_probs[~empty] > 0).all()
        for a, b in zip(eager, traced):
            assert torch.equal(a, b)


def test_capture_refuses_a_model_off_cuda():
    with pytest.raises(RuntimeError, match="capture needs the model on a CUDA device"):
        _model().capture(torch.arange(4).unsqueeze(1))


@pytest.mark.gpu
def test_captured_forward_matches_the_eager_forward():
    """The CUDA graphs of the forward (fixed-pool verification, the traced paths), captured at three
    sizes sharing one memory pool, against the eager forward on the same device: whole batches and
    smaller ones padded, the sizes replayed out of their capture order and back and forth."""
    model = copy.deepcopy(_model()).to("cuda")  # a copy: Module.to would move the shared TOWER, OVERARCH and VALUE
    exprs = list(FILTERS)
    captured = model.capture(torch.zeros(6, 1, dtype=torch.int64), batch_sizes=[1, 3, 6])
    assert captured.batch_sizes == [1, 3, 6]
    batches = (torch.arange(0, 12, 2).unsqueeze(1), torch.tensor([[3], [7], [11]]), torch.tensor([[5]]),
               torch.tensor([[1], [4]]), torch.arange(1, 7).unsqueeze(1), torch.tensor([[9]]))
    for users in batches:
        filters = [exprs[i % len(exprs)] for i in range(users.shape[0])]
        with torch.no_grad():
            want = model(users.cuda(), *model.prepare_filters(filters))
        got = captured.retrieve(users, filters)
        assert torch.equal(got.ids, want[0]) and torch.equal(got.fresh, want[3]) and torch.equal(got.found, want[4])
        torch.testing.assert_close(got.scores, want[1])
    with pytest.raises(ValueError, match="1 to batch_size=6"):
        captured.retrieve(torch.arange(7).unsqueeze(1))


def test_captured_retrieval_runs_the_smallest_captured_size_that_holds_the_batch():
    """The dispatch over captured sizes, with stand-in graphs (the eager forward at exactly the
    captured size): a batch is padded with its last user to the smallest size that holds it and
    the outputs cut back, so each user gets the eager model's answer."""
    from silvertorch import CapturedRetrieval

    ran = []

    def graph_of(size):
        def replay(*inputs):
            assert all(t.shape[0] == size for t in inputs)
            ran.append(size)
            with torch.no_grad():
                return MODEL(*inputs)
        return replay

    captured = CapturedRetrieval(MODEL, {size: graph_of(size) for size in (8, 2)})
    assert captured.batch_sizes == [2, 8] and captured.batch_size == 8
    exprs = list(FILTERS)
    for users, size in ((torch.tensor([[3]]), 2), (torch.tensor([[3], [7], [11]]), 8), (torch.arange(8).unsqueeze(1), 8)):
        filters = [exprs[i % len(exprs)] for i in range(users.shape[0])]
        got, want = captured.retrieve(users, filters), MODEL.retrieve(users, filters)
        assert ran[-1] == size
        for name in ("ids", "fresh", "found"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        torch.testing.assert_close(got.scores, want.scores)  # the OverArch's sums may round apart per batch size
    with pytest.raises(ValueError, match="1 to batch_size=8"):
        captured.retrieve(torch.arange(9).unsqueeze(1))
    with pytest.raises(ValueError, match="ops must have one row per user"):
        captured(torch.tensor([[1], [2]]), *MODEL.prepare_filters([""]))


def test_the_model_verifies_its_candidates_through_the_verify_op():
    """The retrieval model's exact verification of its pool and of its fresh items is one custom op
    (one kernel on a Triton backend, tested in test_bloom_verify.py), not the tensor-op stack
    machine in the forward (about six ops per program step: some two hundred launches a forward
    on a GPU). Ops inside a custom op are not dispatched to the mode: on any backend it sees the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    exprs = list(FILTERS)
    plans = MODEL.prepare_filters(exprs)
    with torch.no_grad(), Ops():
        MODEL(torch.arange(len(exprs)).unsqueeze(1), *plans)
    assert ops.count("verify_plans.default") == 2, ops  # the pool, the fresh items
    assert not any(name.startswith("scatter_") for name in ops)  # run_plans' step
