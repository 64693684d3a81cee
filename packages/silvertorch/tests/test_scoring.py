import pytest
import torch

from silvertorch import OverArch, ValueModel, scoring


@pytest.mark.parametrize("hidden", [[], [16, 8]])
@pytest.mark.parametrize("dense_dim", [0, 3])
@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_overarch_is_the_mlp_over_user_item_product_and_dense(monkeypatch, hidden, dense_dim, batch, chunk_bytes):
    """One user per row of candidates takes the first layer without building [u, v, u*v, dense];
    it must equal the MLP over that concatenation, values and gradients, as must per-candidate users.
    `chunk_bytes=1`: eager on the CPU, one user at a time (the batch's users in chunks)."""
    if chunk_bytes is not None:
        monkeypatch.setattr(scoring, "CPU_CHUNK_BYTES", chunk_bytes)
        assert scoring._cpu_chunk_rows(torch.Size(batch), 7 * 16, torch.device("cpu")) == (1 if batch else 0)
    torch.manual_seed(0)
    arch = OverArch(12, 3, hidden, dense_dim)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(*batch, 12, generator=g, requires_grad=True)
    v = torch.randn(*batch, 7, 12, generator=g, requires_grad=True)
    dense = torch.randn(*batch, 7, dense_dim, generator=g) if dense_dim else None
    per_candidate = u.unsqueeze(-2).expand_as(v)
    parts = [per_candidate, v, per_candidate * v] + ([dense] if dense_dim else [])
    want = arch.mlp(torch.cat(parts, -1))
    got = arch(u, v, dense)
    assert got.shape == (*batch, 7, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(arch(per_candidate, v, dense), want, rtol=0, atol=0)
    grads = torch.autograd.grad(got.sum(), [u, v, *arch.parameters()])
    want_grads = torch.autograd.grad(want.sum(), [u, v, *arch.parameters()])
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_overarch_chunks_broadcast_users(monkeypatch):
    """A user row broadcast over several rows of candidates, chunked one row at a time."""
    monkeypatch.setattr(scoring, "CPU_CHUNK_BYTES", 1)
    arch = OverArch(6, 2, [5], dense_dim=2)
    g = torch.Generator().manual_seed(2)
    u, v, dense = torch.randn(1, 6, generator=g), torch.randn(3, 4, 6, generator=g), torch.randn(1, 4, 2, generator=g)
    want = arch(u.expand(3, 6).unsqueeze(-2).expand(3, 4, 6), v, dense.expand(3, 4, 2))
    torch.testing.assert_close(arch(u, v, dense), want, rtol=1e-5, atol=1e-6)


def test_overarch_needs_its_dense_features():
    with pytest.raises(ValueError, match="dense_dim=3"):
        OverArch(4, 2, [8], dense_dim=3)(torch.randn(2, 4), torch.randn(2, 5, 4))


@pytest.mark.parametrize("make, match", [
    (lambda: OverArch(16, 2.0), "num_tasks must be an integer >= 1, got 2.0"),
    (lambda: OverArch(16.0, 2), "dim must be an integer >= 1, got 16.0"),
    (lambda: OverArch(16, 2, [0]), r"hidden\[0\] must be an integer >= 1, got 0"),
    (lambda: OverArch(16, 2, [8, -3]), r"hidden\[1\] must be an integer >= 1, got -3"),
    (lambda: OverArch(16, 2, 8), "hidden must be a list of layer widths"),
    (lambda: OverArch(16, 2, dense_dim=-1), "dense_dim must be an integer >= 0"),
    (lambda: ValueModel(2, hidden=0), "hidden must be an integer >= 1"),
    (lambda: ValueModel(2, learned="no"), "learned must be True or False, got 'no'"),
])
def test_sizes_must_be_integers_in_range(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("user, items, dense, match", [
    ((3, 15), (3, 7, 16), None, r"user must be \[\.\.\., 16\] or \[\.\.\., K, 16\] .* got \(3, 15\)"),
    ((3, 16), (3, 7, 15), None, r"items must be \[\.\.\., K, 16\] .* got \(3, 7, 15\)"),
    ((3, 16), (3, 7, 16), (3, 7, 5), "dense_dim=0; leave dense out"),  # it was ignored
])
def test_overarch_refuses_inputs_of_other_widths(user, items, dense, match):
    arch = OverArch(16, 2, [8])
    with pytest.raises(ValueError, match=match):
        arch(torch.randn(user), torch.randn(items), None if dense is None else torch.randn(dense))


@pytest.mark.parametrize("weights, match", [
    ([[1.0], [2.0], [3.0]], r"value_weights must be \[2\] or \[3, 2\] \(one weight per task\), got \[3, 1\]"),  # was broadcast
    ([1.0, 2.0, 3.0], r"got \[3\]"),
    ([float("nan"), 1.0], "value_weights must be finite numbers"),
    ([3e38, 3e38], "absolute values sum to at most 3.403e"),  # finite, but the scores overflow to inf
    ([[1.0, 0.0], [1.0, 0.0], [-3e38, -3e38]], "absolute values sum to at most"),
])
def test_value_model_checks_per_request_weights(weights, match):
    logits = torch.randn(3, 7, 2)
    with pytest.raises(ValueError, match=match):
        ValueModel(2, [1.0, 0.5])(logits, torch.tensor(weights))


def test_value_model_weights_keep_scores_finite():
    for weights in ([float("nan"), 1.0], [3e38, 3e38], [1e39, 0.0]):
        with pytest.raises(ValueError, match="weights must be finite numbers whose absolute values sum to at most"):
            ValueModel(2, weights)
    logits = torch.full((1, 4, 2), 30.0)  # probabilities 1: the largest score the weights allow
    assert torch.isfinite(ValueModel(2, [1.7e38, 1.7e38])(logits)).all()
    with pytest.raises(ValueError, match="this Value Model is learned"):
        ValueModel(2, learned=True)(logits, torch.ones(2))


def test_per_request_weights_given_as_numbers_follow_the_logits_device():
    # meta stands in for a GPU: the weights list becomes a CPU tensor, which meta logits refuse as CUDA would
    value = ValueModel(2)(torch.zeros(3, 4, 2, device="meta"), [[1.0, 0.5]] * 3)
    assert value.device.type == "meta" and value.shape == (3, 4)


def test_value_model_takes_weights_by_task_name():
    """A mapping names every task (the sister package's form); the positional form still works, and
    per-request weights take either form, a list of mappings as one row per query."""
    by_name = ValueModel(task_names=["watch", "like"], weights={"like": 0.5, "watch": 1.0})
    assert by_name.num_tasks == 2 and by_name.weights.tolist() == [1.0, 0.5]
    assert by_name.config()["task_names"] == ["watch", "like"]
    assert torch.equal(ValueModel(2, [1.0, 0.5], task_names=["watch", "like"]).weights, by_name.weights)
    logits = torch.randn(2, 5, 2)
    want = ValueModel(2)(logits, torch.tensor([[0.0, 1.0], [2.0, 0.5]]))
    torch.testing.assert_close(by_name(logits, [{"watch": 0.0, "like": 1.0}, {"like": 0.5, "watch": 2.0}]), want)
    assert by_name.check_request_weights({"watch": 3, "like": 0}).tolist() == [3.0, 0.0]


@pytest.mark.parametrize("make, match", [
    (lambda: ValueModel(task_names=["watch", "like"], weights={"watch": 1.0}), r"must name every task exactly: missing \['like'\]"),
    (lambda: ValueModel(task_names=["watch", "like"], weights={"watch": 1.0, "like": 1.0, "share": 2.0}),
     r"unknown \['share'\] \(tasks: \['watch', 'like'\]\)"),
    (lambda: ValueModel(2, {"watch": 1.0, "like": 0.5}), "weights by task name need the Value Model's task_names"),  # was "must be numbers"
    (lambda: ValueModel(3, task_names=["watch", "like"]), r"task_names must name the 3 tasks"),
    (lambda: ValueModel(task_names="watch"), "got the string 'watch'"),
    (lambda: ValueModel(task_names=["watch", "watch"]), "distinct non-empty strings"),
    (lambda: ValueModel(), "needs num_tasks"),
    (lambda: ValueModel(task_names=["a", "b"], weights={"a": 1.0, "b": float("nan")}), "weights must be finite numbers"),
    (lambda: ValueModel(task_names=["a", "b"])(torch.zeros(1, 2, 2), {"a": 1.0}), r"missing \['b'\]"),  # per request
])
def test_value_weights_by_name_are_checked(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_learned_value_model_refuses_fixed_weights():
    # the MLP replaces the weighted sum: the weights were kept in a buffer and never used
    with pytest.raises(ValueError, match="a learned Value Model .* has no weighted sum"):
        ValueModel(2, [1.0, 0.3], learned=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_value_model_in_another_dtype_scores(dtype):
    # .double() or .to(bf16) made its weights buffer that dtype: the float32 probabilities' matmul failed
    logits = torch.randn(2, 4, 2)
    want = ValueModel(2, [1.0, 0.5])(logits)
    torch.testing.assert_close(ValueModel(2, [1.0, 0.5]).to(dtype)(logits), want)
