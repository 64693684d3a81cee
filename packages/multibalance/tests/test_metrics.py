import itertools
import math

import pytest
import torch

from multibalance import BinaryTaskMetrics, MultiTaskMetrics, auc


def test_auc_matches_pair_count():
    torch.manual_seed(0)
    s = torch.randint(0, 5, (40,)).double()
    y = (torch.rand(40) < 0.4).double()
    pos = [a for a, b in zip(s, y) if b == 1]
    neg = [a for a, b in zip(s, y) if b == 0]
    brute = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))
    assert auc(s, y) == pytest.approx(brute)


def test_ne_of_base_rate_predictor_is_one_and_streaming():
    m = BinaryTaskMetrics()
    p = 0.3
    y = torch.tensor([1.0] * 3 + [0.0] * 7)
    for chunk in y.split(4):
        m.update(torch.full_like(chunk, math.log(p / (1 - p))), chunk)
    out = m.compute()
    assert out["ne"] == pytest.approx(1.0) and out["count"] == 10 and out["auc"] == pytest.approx(0.5)


def test_metrics_bad_input():
    m = BinaryTaskMetrics()
    with pytest.raises(ValueError, match="no samples"):
        m.compute()
    with pytest.raises(ValueError, match="0 or 1"):
        m.update(torch.zeros(2), torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match="NaN"):
        m.update(torch.tensor([float("nan")]), torch.tensor([1.0]))
    mt = MultiTaskMetrics(["a"])
    mt.update({"a": torch.tensor([2.0, -2.0])}, {"a": torch.tensor([1.0, 0.0])})
    assert mt.compute()["a"]["auc"] == 1.0
