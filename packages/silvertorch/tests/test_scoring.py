import pytest
import torch

from silvertorch import OverArch, scoring


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
