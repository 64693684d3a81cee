import pytest
import torch

from freescale import KeyedJagged


def _kj():
    return KeyedJagged.from_dict({"a": [torch.tensor([1, 2]), torch.tensor([], dtype=torch.long), torch.tensor([3])],
                                  "b": [torch.tensor([7]), torch.tensor([8, 9, 10]), torch.tensor([11])]})


def test_layout_and_access():
    kj = _kj()
    assert kj.batch_size == 3 and kj.lengths.tolist() == [2, 0, 1, 1, 3, 1]
    assert kj.offsets.tolist() == [0, 2, 2, 3, 4, 7, 8]
    vals, lens = kj["b"]
    assert vals.tolist() == [7, 8, 9, 10, 11] and lens.tolist() == [1, 3, 1]
    assert kj.sample_lengths().tolist() == [3, 3, 2]


def test_permute_split_concat_roundtrip():
    kj = _kj()
    p = kj.permute(torch.tensor([2, 0, 1]))
    assert p["a"][0].tolist() == [3, 1, 2] and p["b"][1].tolist() == [1, 1, 3]
    parts = kj.split([1, 2])
    assert KeyedJagged.concat(parts) == kj
    assert kj.permute(torch.tensor([1])).values.tolist() == [8, 9, 10]
    d = kj.to_dict()
    assert KeyedJagged.from_dict(d) == kj


def test_bad_inputs():
    with pytest.raises(ValueError, match="sum to"):
        KeyedJagged(["a"], torch.arange(3), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="multiple"):
        KeyedJagged(["a", "b"], torch.arange(3), torch.tensor([3]))
    with pytest.raises(ValueError, match="distinct"):
        KeyedJagged(["a", "a"], torch.arange(2), torch.tensor([1, 1]))
    with pytest.raises(IndexError):
        _kj().permute(torch.tensor([3]))
    with pytest.raises(ValueError, match="split sizes"):
        _kj().split([1, 1])
