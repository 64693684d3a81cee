import pytest
import torch


class TwoTower(torch.nn.Module):
    """Shared bottom (embedding + MLP) and one linear head per task."""

    def __init__(self, n_tasks=2, d_in=5, d=7, n_items=11):
        super().__init__()
        self.emb = torch.nn.Embedding(n_items, d_in)
        self.bottom = torch.nn.Sequential(torch.nn.Linear(2 * d_in, d), torch.nn.Tanh())
        self.heads = torch.nn.ModuleList(torch.nn.Linear(d, 1) for _ in range(n_tasks))

    def shared(self, ids, x):
        return self.bottom(torch.cat([self.emb(ids), x], dim=1))


@pytest.fixture
def toy():
    torch.manual_seed(0)
    model = TwoTower()
    ids = torch.randint(0, 11, (13,))
    x = torch.randn(13, 5)
    y = [torch.randn(13, 1), 10 * torch.randn(13, 1)]
    return model, ids, x, y
