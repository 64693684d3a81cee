import pytest
import torch

from multibalance.data import movielens_100k, synthetic


def test_movielens_from_installed_wheel():
    d = movielens_100k()
    assert d["like"].numel() == 100_000
    assert 0.5 < float(d["like"].mean()) < 0.6  # ratings >= 4 are about 55% of ML-100k
    assert float(d["love"].mean()) < float(d["like"].mean())
    assert d["genre"].shape[1] == d["cardinality"]["genre"] and int(d["user"].max()) + 1 == d["cardinality"]["user"] == 943


def test_synthetic_imbalance_and_validation():
    d = synthetic(n=256, n_tasks=3, loss_scales=[1, 10, 100], seed=3)
    assert d["task2"].abs().mean() > 50 * d["task0"].abs().mean()
    with pytest.raises(ValueError, match="loss_scales"):
        synthetic(n_tasks=2, loss_scales=[1.0])
    assert torch.equal(synthetic(n=8, seed=1)["x"], synthetic(n=8, seed=1)["x"])


@pytest.mark.parametrize("kw, name", [({"d": 0}, "d"), ({"n_tasks": 0}, "n_tasks"), ({"n": 10.5}, "n"), ({"n": 0}, "n")])
def test_synthetic_sizes_are_checked(kw, name):
    # d=0 gave NaN targets (0 / sqrt(0)) and n_tasks=0 no task, silently; a float n a bare TypeError
    with pytest.raises(ValueError, match=f"^{name} must be an integer >= 1"):
        synthetic(**kw)
