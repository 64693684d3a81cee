import pytest
import torch

from gpukernels_common.device import _packed_copy, to_device


def _mixed_tensors():
    g = torch.Generator().manual_seed(7)
    return [
        torch.randint(-5, 5, (3, 7), dtype=torch.int32, generator=g),
        torch.randn(5, 3, generator=g).t(),  # not contiguous
        torch.tensor([], dtype=torch.int64),
        torch.tensor(True),
        torch.randint(0, 2**62, (11,), dtype=torch.int64, generator=g),
        torch.randn(3, dtype=torch.float16, generator=g),
        torch.randint(-100, 100, (2, 2, 3), dtype=torch.int8, generator=g),
    ]


def test_packed_copy_round_trips_every_dtype_and_shape():
    tensors = _mixed_tensors()
    out = _packed_copy([t.contiguous() for t in tensors], torch.device("cpu"), pin_memory=False)
    assert len(out) == len(tensors)
    for got, want in zip(out, tensors):
        assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
        assert torch.equal(got, want)


def test_packed_copy_resolves_conjugate_and_negative_views():
    """A byte view of a conjugate (or negative) view is refused by torch: packed as its values."""
    z = torch.tensor([1 + 2j, 3 - 1j])
    tensors = [z.conj(), torch.tensor([1.5, -2.0])._neg_view(), z]
    out = _packed_copy([t.contiguous() for t in tensors], torch.device("cpu"), pin_memory=False)
    for got, want in zip(out, tensors):
        assert got.dtype == want.dtype and torch.equal(got.resolve_conj().resolve_neg(), want.resolve_conj().resolve_neg())


def test_to_device_moves_tensors_of_another_device():
    """Only host tensors are packed; one on another device is moved with `.to`, never returned
    where it is (here a meta tensor, which cannot be moved: an error, not a silent meta result)."""
    with pytest.raises((RuntimeError, AssertionError, NotImplementedError)):
        to_device([torch.ones(2, device="meta")], "cuda")
    out = _packed_copy([torch.ones(2), torch.ones(3, device="meta")], torch.device("meta"), pin_memory=False)
    assert [t.device.type for t in out] == ["meta", "meta"]


def test_to_device_on_the_cpu_returns_the_tensors():
    tensors = _mixed_tensors()
    for got, want in zip(to_device(tensors, "cpu"), tensors):
        assert torch.equal(got, want) and got.is_contiguous()


@pytest.mark.gpu
def test_to_device_moves_host_tensors_in_one_copy():
    tensors = _mixed_tensors() + [torch.arange(4, device="cuda")]
    out = to_device(tensors, "cuda")
    torch.cuda.synchronize()
    for got, want in zip(out, tensors):
        assert got.device.type == "cuda" and got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.cpu(), want.cpu())


def test_graphed_call_refuses_host_examples():
    from gpukernels_common.graphs import GraphedCall

    with pytest.raises(ValueError, match="example 0 must be a CUDA tensor"):
        GraphedCall(lambda x: x * 2, torch.ones(3))


@pytest.mark.gpu
def test_graphed_call_replays_with_new_inputs():
    from gpukernels_common.graphs import GraphedCall

    def fn(x, y):
        return (x @ y).relu(), x.sum(1)

    x, y = torch.randn(5, 7, device="cuda"), torch.randn(7, 3, device="cuda")
    graphed = GraphedCall(fn, x, y)
    for _ in range(2):
        x, y = torch.randn(5, 7, device="cuda"), torch.randn(7, 3, device="cuda")
        got, want = graphed(x, y), fn(x, y)
        assert isinstance(got, tuple) and len(got) == 2
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    with pytest.raises(ValueError, match=r"input 1 must be torch.float32 \(7, 3\)"):
        graphed(x, torch.randn(7, 4, device="cuda"))


@pytest.mark.gpu
def test_graphed_calls_sharing_a_pool_replay_in_any_order():
    """Graphs of one function at three sizes in one memory pool (captured largest first), replayed
    in every order against the eager function: no graph's intermediates clobber another's."""
    from gpukernels_common.graphs import GraphedCall

    w = torch.randn(64, 64, device="cuda")

    def fn(x):
        h = (x @ w).relu()  # intermediates in the pool
        return (h @ w).softmax(1), h.sum(1)

    pool = torch.cuda.graph_pool_handle()
    graphs = {n: GraphedCall(fn, torch.randn(n, 64, device="cuda"), pool=pool) for n in (32, 8, 1)}
    for n in (1, 32, 8, 32, 1, 8, 8, 1):
        x = torch.randn(n, 64, device="cuda")
        for g, want in zip(graphs[n](x), fn(x)):
            torch.testing.assert_close(g, want)


def test_padded_batch_pads_with_the_last_row_and_refuses_a_larger_batch():
    from gpukernels_common.graphs import padded_batch

    rows = torch.arange(10.0).view(5, 2)
    out = padded_batch(rows[:3], 5)
    assert out.shape == (5, 2) and torch.equal(out[:3], rows[:3]) and torch.equal(out[3:], rows[2:3].expand(2, 2))
    assert torch.equal(padded_batch(rows, 5), rows)
    for q, size in ((5, 4), (5, 3), (0, 3)):  # 5 rows into 4 gave 6 rows (expand(-1) keeps the size)
        with pytest.raises(ValueError, match=rf"rows must hold 1 to size={size} rows, got {q}"):
            padded_batch(rows[:q], size)
