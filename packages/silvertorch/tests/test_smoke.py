"""Smoke tests run from the built wheel in an isolated venv: public API + one tiny call each."""

import torch

import silvertorch


def test_version():
    assert silvertorch.__version__.count(".") == 2


def test_bloom_smoke():
    offsets = torch.tensor([0, 2, 3, 3])
    idx = silvertorch.BloomIndex.build(torch.tensor([1, 2, 1]), offsets, torch.tensor([7, 8, 9]), k=2, b_multiplier=4)
    words = idx.search(silvertorch.parse_filters(["1:7 OR 1:9", "NOT 1:7"]))
    assert words.shape == (2, 1)
    assert int(words[0, 0]) & 0b011 == 0b011  # items 0 and 1 pass (Bloom: a superset)
    assert int(words[1, 0]) == 0b110  # NOT is exact


def test_ivf_smoke():
    x = torch.nn.functional.normalize(torch.randn(200, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    index = silvertorch.IVFIndex.build(x, n_clusters=4)
    scores, ids = index.search(x[:3], k=5, nprobe=4)
    assert ids.shape == (3, 5) and (ids[:, 0] == torch.arange(3)).all()  # unit vectors: each item's best inner product is itself
