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


@pytest.mark.parametrize("scores, labels, match", [
    ([0.1, 0.9, 0.8], [0, 1], "same number of elements, got 3 and 2"),
    ([float("nan"), 0.9, 0.1, 0.2], [1, 1, 0, 0], "NaN"),
    ([0.1, 0.9, 0.8], [0, 2, 2], r"labels must be 0 or 1, got values \[2.0\]"),
])
def test_auc_bad_input(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        auc(torch.tensor(scores), torch.tensor(labels))


def test_auc_infinite_scores_still_rank():
    assert auc(torch.tensor([float("-inf"), 0.0, float("inf")]), torch.tensor([0, 1, 1])) == 1.0


def test_multitask_update_checks_every_task_before_counting_any():
    mt = MultiTaskMetrics(["a", "b"])
    ok = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0])}
    with pytest.raises(ValueError, match=r"logits: missing tasks \['b'\], unknown tasks \[\]"):
        mt.update({"a": torch.zeros(2)}, ok)
    with pytest.raises(ValueError, match=r"labels: missing tasks \[\], unknown tasks \['c'\]"):
        mt.update({"a": torch.zeros(2), "b": torch.zeros(2)}, {**ok, "c": torch.ones(2)})
    with pytest.raises(ValueError, match="task 'b': logits contain NaN"):
        mt.update({"a": torch.zeros(2), "b": torch.tensor([float("nan"), 0.0])}, ok)
    assert all(m.count == 0 for m in mt.tasks.values())  # task a was not counted either
    mt.update({"a": torch.zeros(2), "b": torch.zeros(2)}, ok)
    assert all(m.count == 2 for m in mt.tasks.values())
    with pytest.raises(ValueError, match="sequence of task names"):
        MultiTaskMetrics("ab")


def test_multitask_metrics_refuse_repeated_names_and_non_mappings():
    """A repeated task name made one task's counts serve both; a list of tensors in `update` was
    reported as "unknown tasks [tensor(...)]"."""
    with pytest.raises(ValueError, match="distinct non-empty strings"):
        MultiTaskMetrics(["a", "a"])
    with pytest.raises(ValueError, match="distinct non-empty strings"):
        MultiTaskMetrics([])
    mt = MultiTaskMetrics(["a"])
    with pytest.raises(TypeError, match=r"logits must be a mapping from task name to tensor \(keys \['a'\]\), got list"):
        mt.update([torch.zeros(2)], {"a": torch.ones(2)})
    with pytest.raises(TypeError, match="labels must be a mapping"):
        mt.update({"a": torch.zeros(2)}, torch.ones(1, 2))
    assert mt.tasks["a"].count == 0
