import pytest
import torch

from gpukernels_common import Backend
from moeblaze import dispatch
from moeblaze.dispatch import build_dispatch


def _ids(t, k, e, hot=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if hot is not None:
        ids = torch.stack([torch.cat([torch.tensor([hot]), torch.randperm(e, generator=g)[torch.randperm(e, generator=g) != hot][: k - 1]]) for _ in range(t)])
        return ids.int()
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).int()


@pytest.mark.parametrize("t, k, e", [(1, 1, 1), (37, 2, 8), (50, 1, 3), (13, 5, 5), (300, 2, 16)])
def test_kernel_matches_reference(t, k, e):
    ids = _ids(t, k, e, seed=t)
    ref = build_dispatch.run(Backend.REFERENCE, ids, e)
    tri = build_dispatch.run(Backend.INTERPRET, ids, e)
    for a, b in zip(tri, ref):
        assert torch.equal(a, b)


def test_structure_and_empty_and_hot_experts(backend):
    ids = torch.tensor([[2, 0], [2, 3], [0, 2], [2, 0]], dtype=torch.int32)  # expert 1 gets nothing
    d = dispatch(ids, 4)
    assert d.expert_offsets.tolist() == [0, 3, 3, 7, 8]
    assert d.sorted_slots.tolist() == [1, 4, 7, 0, 2, 5, 6, 3]  # stable: slot order within each expert
    assert d.sorted_tokens.tolist() == [0, 2, 3, 0, 1, 2, 3, 1]
    flat = ids.reshape(-1)
    assert torch.equal(d.sorted_slots[d.slot_position.long()], torch.arange(8, dtype=torch.int32))
    assert (flat[d.sorted_slots.long()].diff() >= 0).all()
    hot = dispatch(torch.zeros(9, 1, dtype=torch.int32), 3)
    assert hot.counts().tolist() == [9, 0, 0]


def test_bad_dispatch_inputs():
    with pytest.raises(ValueError, match="tokens, top_k"):
        dispatch(torch.zeros(3, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="empty"):
        dispatch(torch.zeros(0, 2, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="int32 or int64"):
        dispatch(torch.zeros(2, 2), 2)


@pytest.mark.parametrize("bad", [[[0, 4]], [[0, -1]], [[7, 1]]])
def test_dispatch_refuses_ids_out_of_range(backend, bad):
    """The Triton build returned uninitialised rows, the reference an unrelated error."""
    with pytest.raises(ValueError, match=r"expert_ids must be in \[0, n_experts=4\)"):
        dispatch(torch.tensor(bad, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="n_experts must be an integer >= 1, got 0"):
        dispatch(torch.zeros(1, 1, dtype=torch.int32), 0)


@pytest.mark.parametrize("n_experts", [4.0, "4", True])
def test_dispatch_refuses_a_non_integer_expert_count(n_experts):
    """4.0 failed inside the custom op's schema check, "4" with a bare TypeError comparing it."""
    with pytest.raises(ValueError, match=f"n_experts must be an integer >= 1, got {n_experts!r}"):
        dispatch(torch.zeros(2, 1, dtype=torch.int32), n_experts)


@pytest.mark.parametrize("backend_name", ["reference", "interpret"])
def test_dispatch_op_passes_opcheck(monkeypatch, backend_name):
    """torch.library.opcheck on the dispatch op: schema, fake kernel (shapes and strides of the
    real outputs, which compiled graphs check), autograd registration, AOT dispatch."""
    monkeypatch.setenv("GKC_BACKEND", backend_name)
    torch.library.opcheck(build_dispatch.op, (_ids(37, 2, 8, seed=3), 8))
