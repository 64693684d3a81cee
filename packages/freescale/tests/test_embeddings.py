"""ShardedEmbeddings in one process (every table local): pooling against nn.EmbeddingBag and
bad input. The sharded lookups on 2-3 gloo ranks are in test_distributed.py."""

import pytest
import torch

from freescale import KeyedJagged, ShardedEmbeddings, TrainPipeline


def _features(seed=0):
    g = torch.Generator().manual_seed(seed)
    bags = {key: [torch.randint(0, rows, (int(n),), generator=g) for n in torch.randint(0, 5, (9,), generator=g)]
            for key, rows in (("b", 30), ("a", 50))}  # features in another key order than the tables
    return bags, KeyedJagged.from_dict(bags)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_one_process_pooling_equals_embedding_bag(pooling):
    bags, features = _features()
    assert any(b.numel() == 0 for b in bags["a"] + bags["b"])
    emb = ShardedEmbeddings({"a": 50, "b": 30}, dim=5, init_seed=1)
    out = emb(features, pooling=pooling)
    for key in ("a", "b"):
        reference = torch.nn.EmbeddingBag.from_pretrained(emb.shards[key].detach(), mode=pooling)
        offsets = torch.tensor([0] + [b.numel() for b in bags[key][:-1]]).cumsum(0)
        torch.testing.assert_close(out[key], reference(torch.cat(bags[key]), offsets))
    rows = emb(features, pooling="none")
    assert torch.equal(rows["a"], emb.shards["a"].detach()[torch.cat(bags["a"])])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.uint16, torch.uint32, torch.uint64])
@pytest.mark.parametrize("sharding", ["row", "table"])
def test_ids_of_any_integer_dtype_look_up_as_int64_ids(dtype, sharding):
    """uint16/32/64 ids (numpy's uint32 hashes through torch.from_numpy, say) failed the range
    check with a NotImplementedError ("aminmax_cpu" not implemented), 8/16-bit ids unpooled and
    row-wise in repeat_interleave: raised on that rank alone, not an input error flagged to the
    others (who waited in the counts all-to-all)."""
    bags, features = _features(seed=4)
    emb = ShardedEmbeddings({"a": 50, "b": 30}, dim=5, init_seed=1, sharding=sharding)
    as_dtype = KeyedJagged(features.keys, features.values.to(dtype), features.lengths)
    for pooling in ("sum", "none"):
        want = emb(features, pooling=pooling)
        got = emb(as_dtype, pooling=pooling)
        for key in ("a", "b"):
            assert torch.equal(got[key], want[key]), (pooling, key)
    too_large = KeyedJagged(["a", "b"], torch.tensor([3, 50], dtype=dtype), torch.tensor([1, 1]))
    with pytest.raises(IndexError, match="ids for table 'b' must be in \\[0, 30\\), got \\[50, 50\\]"):
        emb(too_large)


def test_sparse_gradients_equal_dense():
    _, features = _features(seed=1)
    grads = {}
    for sparse_grad in (False, True):
        emb = ShardedEmbeddings({"a": 50, "b": 30}, dim=5, init_seed=2, sparse_grad=sparse_grad)
        out = emb(features, pooling="mean")
        (out["a"].pow(2).sum() + out["b"].sum()).backward()
        grads[sparse_grad] = {k: p.grad for k, p in emb.shards.items()}
    for key, dense in grads[False].items():
        assert grads[True][key].is_sparse
        torch.testing.assert_close(grads[True][key].to_dense(), dense)


@pytest.mark.parametrize("fused_update", ["eager", "compiled"])
@pytest.mark.parametrize("pooling", ["sum", "mean", "none"])
def test_fused_sgd_updates_like_sgd_on_dense_gradients(pooling, fused_update):
    _, features = _features(seed=3)
    dense = ShardedEmbeddings({"a": 50, "b": 30}, dim=5, init_seed=2)
    fused = ShardedEmbeddings({"a": 50, "b": 30}, dim=5, init_seed=2, fused_lr=0.3, fused_update=fused_update)
    for emb in (dense, fused):
        out = emb(features, pooling=pooling)
        (out["a"].pow(2).sum() + 3 * out["b"].sum()).backward()
    torch.optim.SGD(dense.parameters(), lr=0.3).step()
    for key in ("a", "b"):
        assert fused.shards[key].grad is None
        torch.testing.assert_close(fused.shards[key].detach(), dense.shards[key].detach())
    assert not torch.equal(fused.shards["a"].detach(), ShardedEmbeddings({"a": 50, "b": 30}, dim=5, init_seed=2).shards["a"].detach())


def test_compiled_update_repeats_ids_and_skips_empty_bags():
    """Many ids per row (duplicates add up), empty bags, a second step with another id count
    (one dynamic-shape build), against the eager update."""
    g = torch.Generator().manual_seed(4)
    tables = {"a": 7, "b": 40}
    eager = ShardedEmbeddings(tables, dim=6, init_seed=5, fused_lr=0.1)
    compiled = ShardedEmbeddings(tables, dim=6, init_seed=5, fused_lr=0.1, fused_update="compiled")
    for n_bags in (13, 21):
        bags = {key: [torch.randint(0, rows, (int(n),), generator=g) for n in torch.randint(0, 9, (n_bags,), generator=g)]
                for key, rows in tables.items()}
        features = KeyedJagged.from_dict(bags)
        weights = torch.randn(n_bags, 6, generator=g)
        for emb in (eager, compiled):
            out = emb(features)
            ((out["a"] * weights).sum() + out["b"].pow(2).sum()).backward()
    for key in tables:
        torch.testing.assert_close(compiled.shards[key].detach(), eager.shards[key].detach(), rtol=1e-6, atol=1e-6)
    assert not torch.equal(eager.shards["a"].detach(), ShardedEmbeddings(tables, dim=6, init_seed=5).shards["a"].detach())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_update_on_gpu(dtype):
    """On CUDA torch.compile writes a Triton kernel (atomic adds): both updates against the fp32
    step. Many duplicate ids in fp32; in bf16 about two per row, so that the eager update's
    per-add rounding stays within the tolerance."""
    from freescale.embeddings import _FusedSGDBagSum

    g = torch.Generator().manual_seed(6)
    rows, lr = (300 if dtype == torch.float32 else 3000), 0.05
    lengths = torch.randint(0, 40, (257,), generator=g)
    ids = torch.randint(0, rows, (int(lengths.sum()),), generator=g).cuda()
    offsets = (lengths.cumsum(0) - lengths).cuda()
    grad = torch.randn(257, 24, generator=g).cuda().to(dtype)
    start = torch.randn(rows, 24, generator=g).cuda().to(dtype)
    bags = torch.repeat_interleave(torch.arange(257, device="cuda"), lengths.cuda())
    expected = start.float().index_add(0, ids, grad.float()[bags] * -lr)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for compiled in (False, True):
        weight = torch.nn.Parameter(start.clone())
        _FusedSGDBagSum.apply(ids, offsets, weight, lr, compiled).backward(grad)
        torch.testing.assert_close(weight.detach().float(), expected, rtol=tol, atol=tol, msg=f"compiled={compiled}")


def test_compiled_update_failure_names_the_option(monkeypatch):
    from freescale import embeddings

    def broken():
        def fail(*args):
            raise OSError("no compiler")
        return fail

    monkeypatch.setattr(embeddings, "_compiled_scatter_bag_steps", broken)
    _, features = _features(seed=5)
    emb = ShardedEmbeddings({"a": 50, "b": 30}, dim=5, fused_lr=0.1, fused_update="compiled")
    out = emb(features)
    with pytest.raises(RuntimeError, match="fused_update='compiled' failed: no compiler.*fused_update='eager'"):
        (out["a"].sum() + out["b"].sum()).backward()


def test_bad_input_is_named():
    _, features = _features()
    emb = ShardedEmbeddings({"a": 50, "b": 30}, dim=5)
    with pytest.raises(ValueError, match="pooling must be one of"):
        emb(features, pooling="max")
    with pytest.raises(KeyError, match=r"tables \['c'\]"):
        ShardedEmbeddings({"a": 50, "c": 30}, dim=5)(features)
    with pytest.raises(ValueError, match="fused_lr must be a positive learning rate"):
        ShardedEmbeddings({"a": 50}, dim=5, fused_lr=0.1, sparse_grad=True)
    with pytest.raises(ValueError, match="fused_lr must be a positive learning rate"):
        ShardedEmbeddings({"a": 50}, dim=5, fused_lr=-1.0)
    with pytest.raises(ValueError, match="fused_update must be one of \\('eager', 'compiled'\\), got 'fast'"):
        ShardedEmbeddings({"a": 50}, dim=5, fused_lr=0.1, fused_update="fast")
    with pytest.raises(ValueError, match="fused_update='compiled' needs fused_lr="):
        ShardedEmbeddings({"a": 50}, dim=5, fused_update="compiled")
    with pytest.raises(IndexError, match="table 'a' must be in \\[0, 20\\)"):
        ShardedEmbeddings({"a": 20, "b": 30}, dim=5)(features)
    with pytest.raises(ValueError, match="transport must be one of \\('collective', 'copy_engine'\\), got 'nccl'"):
        ShardedEmbeddings({"a": 50}, dim=5, transport="nccl")
    with pytest.raises(TypeError, match="ids for table 'a' must have an integer dtype, got torch.float32"):
        ShardedEmbeddings({"a": 5}, dim=3)(KeyedJagged.from_dict({"a": [torch.tensor([1.7])]}))  # not row 1
    with pytest.raises(ValueError, match="dim must be an int >= 1 \\(the embedding width\\), got 0"):
        ShardedEmbeddings({"a": 5}, dim=0)
    with pytest.raises(ValueError, match="tables: row counts must be non-negative ints, got \\{'a': -3\\}"):
        ShardedEmbeddings({"a": -3}, dim=3)
    with pytest.raises(ValueError, match="tables must be a mapping from table name to row count .*got list"):
        ShardedEmbeddings([("a", 5)], dim=3)
    for unknown in (lambda: emb.full_weight("c"), lambda: emb.owner_of("c", torch.tensor([1]))):
        with pytest.raises(KeyError, match=r"no table 'c'; tables: \['a', 'b'\]"):
            unknown()


def test_pipeline_sends_ids_ahead_and_warns_when_the_step_does_not_use_them():
    """One process: TrainPipeline(embeddings=) distributes each batch's ids before its step, the
    step's lookup uses them (mean pooling, against nn.EmbeddingBag); a step that looks up other
    features leaves them unused and the pipeline says so."""
    emb = ShardedEmbeddings({"a": 50, "b": 30}, dim=5, init_seed=1)
    batches = [(_features(seed)[1], {}) for seed in range(3)]
    reference = torch.nn.EmbeddingBag.from_pretrained(emb.shards["a"].detach(), mode="mean")

    def step(features, dense, global_batch):
        assert emb._prefetched is not None and emb._prefetched.features is features
        out = emb(features, pooling="mean")
        assert emb._prefetched is None  # used
        ids, lengths = features["a"]
        torch.testing.assert_close(out["a"], reference(ids, torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])))
        return global_batch

    assert TrainPipeline(step, embeddings=emb, pooling="mean").run(iter(batches)) == [9, 9, 9]

    def step_on_a_copy(features, dense, global_batch):
        emb(KeyedJagged(features.keys, features.values.clone(), features.lengths.clone()), pooling="mean")

    with pytest.warns(UserWarning, match="distributed ahead for nothing"):
        TrainPipeline(step_on_a_copy, embeddings=emb, pooling="mean").run(iter(batches))
    with pytest.raises(ValueError, match="pooling"):
        TrainPipeline(step, embeddings=[emb], pooling=["sum", "mean"])


def test_initial_rows_are_the_same_table_in_any_ranges():
    """A table drawn in pieces (ranges crossing the init blocks) equals the table drawn whole, so
    every world size and sharding starts from the same weights."""
    from freescale.embeddings import INIT_BLOCK_ROWS, initial_rows

    n = 2 * INIT_BLOCK_ROWS + 123
    whole = initial_rows(7, 1, n, 3, 0, n)
    cuts = [0, 5, INIT_BLOCK_ROWS - 1, INIT_BLOCK_ROWS + 1, 2 * INIT_BLOCK_ROWS, n, n]
    pieces = [initial_rows(7, 1, n, 3, a, b) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(pieces), whole)
    assert abs(float(whole.std()) - 3**-0.5) < 0.02
    assert not torch.equal(initial_rows(7, 2, n, 3, 0, 9), whole[:9])  # another table, other weights
    assert not torch.equal(initial_rows(8, 1, n, 3, 0, 9), whole[:9])  # another seed
    with pytest.raises(ValueError, match=r"rows \[5, 2\) are not within"):
        initial_rows(7, 1, n, 3, 5, 2)
    with pytest.raises(ValueError, match="init_seed must be an int"):
        ShardedEmbeddings({"a": 5}, dim=2, init_seed=1.5)


@pytest.mark.parametrize("sharding", ["row", "table"])
def test_a_rank_draws_only_its_own_rows(sharding, monkeypatch):
    """Rank 1 of 4 holds, and draws, only its shard: at most the few init blocks its rows overlap,
    never a whole table (a 40,000-row table sharded by rows is 10,000 rows a rank; table-wise,
    rank 1 owns table "b" alone). Its rows are the one-rank table's."""
    from freescale import embeddings

    tables = {"a": 40_000, "b": 7, "c": 3_000}
    whole = ShardedEmbeddings(tables, dim=4, sharding=sharding, init_seed=3)
    drawn = []
    randn = torch.randn

    def counting_randn(*shape, **kwargs):
        drawn.append(shape[0])
        return randn(*shape, **kwargs)

    monkeypatch.setattr(embeddings, "_world", lambda group: (4, 1))
    monkeypatch.setattr(embeddings.torch, "randn", counting_randn)
    shard = ShardedEmbeddings(tables, dim=4, sharding=sharding, init_seed=3)
    monkeypatch.undo()
    for t, key in enumerate(tables):
        if sharding == "row":
            per = -(-tables[key] // 4)
            start, end = min(per, tables[key]), min(2 * per, tables[key])
        else:
            start, end = (0, tables[key]) if t % 4 == 1 else (0, 0)
        assert torch.equal(shard.shards[key].detach(), whole.shards[key].detach()[start:end]), key
    assert max(drawn) <= embeddings.INIT_BLOCK_ROWS
    assert sum(drawn) <= (4 * embeddings.INIT_BLOCK_ROWS if sharding == "row" else 7)


def test_features_of_the_wrong_kind_are_named():
    """A dict (or anything but a KeyedJagged) failed with an AttributeError inside the lookup."""
    emb = ShardedEmbeddings({"a": 5}, dim=3)
    with pytest.raises(TypeError, match="features must be a KeyedJagged, got dict"):
        emb({"a": torch.tensor([1])})
