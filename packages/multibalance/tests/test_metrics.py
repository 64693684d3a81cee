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


def _fill(m, logits, labels):
    for lo, la in zip(logits.split(5), labels.split(5)):
        m.update(lo, la)


def test_reset_forgets_every_sample():
    """reset() starts over (per evaluation epoch): the next compute sees only the new samples."""
    torch.manual_seed(0)
    logits, labels = torch.randn(30), (torch.rand(30) < 0.5).double()
    fresh, used = MultiTaskMetrics(["a", "b"]), MultiTaskMetrics(["a", "b"])
    used.update({"a": torch.randn(7), "b": torch.randn(7)}, {"a": torch.ones(7), "b": torch.zeros(7)})
    used.reset()
    with pytest.raises(ValueError, match="no samples"):
        used.compute()
    for m in (fresh, used):
        m.update({"a": logits, "b": -logits}, {"a": labels, "b": labels})
    assert used.compute() == fresh.compute()
    single = BinaryTaskMetrics()
    _fill(single, logits, labels)
    single.reset()
    _fill(single, logits[:10], labels[:10])
    assert single.compute()["count"] == 10


def test_merge_equals_one_metrics_over_all_samples():
    """merge() is exact: AUC over the union of the pairs (not an average of the parts' AUCs)."""
    torch.manual_seed(1)
    logits, labels = torch.randn(40).round(decimals=1), (torch.rand(40) < 0.3).double()
    whole, left, right = BinaryTaskMetrics(), BinaryTaskMetrics(), BinaryTaskMetrics()
    _fill(whole, logits, labels)
    _fill(left, logits[:15], labels[:15])
    _fill(right, logits[15:], labels[15:])
    left.merge(right)
    got, expected = left.compute(), whole.compute()
    assert got["auc"] == expected["auc"] and got["count"] == 40
    assert got["logloss"] == pytest.approx(expected["logloss"]) and got["ne"] == pytest.approx(expected["ne"])
    assert right.compute()["count"] == 25  # left as it was
    multi, other = MultiTaskMetrics(["a", "b"]), MultiTaskMetrics(["b", "a"])
    multi.update({"a": logits[:20], "b": logits[:20]}, {"a": labels[:20], "b": labels[:20]})
    other.update({"a": logits[20:], "b": logits[20:]}, {"a": labels[20:], "b": labels[20:]})
    multi.merge(other)
    assert multi.compute()["a"]["auc"] == whole.compute()["auc"]
    with pytest.raises(ValueError, match=r"merge: other has tasks \['a'\], these metrics \['a', 'b'\]"):
        multi.merge(MultiTaskMetrics(["a"]))
    with pytest.raises(TypeError, match="merge: other must be a BinaryTaskMetrics, got dict"):
        left.merge({})


def test_sync_without_torch_distributed_says_so():
    m = BinaryTaskMetrics()
    m.update(torch.zeros(2), torch.tensor([0.0, 1.0]))
    with pytest.raises(RuntimeError, match=r"compute\(sync=True\) needs torch.distributed initialised"):
        m.compute(sync=True)


def test_sync_over_two_gloo_ranks_equals_one_process(tmp_path):
    """compute(sync=True) on 2 gloo ranks, each holding part of the samples (one rank none of a
    task): every rank gets the one-process metrics of all samples; ranks with other task names
    get a ValueError naming the rank."""
    import sys
    from pathlib import Path

    from gpukernels_common.testing import free_port, run_workers

    worker = Path(__file__).with_name("metrics_ddp_worker.py")
    out = tmp_path / "results.pt"
    run_workers([sys.executable, worker, free_port(), out], out, timeout=120)
    ranks = torch.load(out, weights_only=False)
    sys.path.insert(0, str(worker.parent))
    from metrics_ddp_worker import data

    logits, labels = data()
    expected = MultiTaskMetrics(["a", "b"])
    expected.update(logits, labels)
    expected = expected.compute()
    for rank, results in enumerate(ranks):
        assert results["local_count"] == (11 if rank == 0 else 10)
        for task in "ab":
            got = results["multi"][task]
            assert got["auc"] == expected[task]["auc"] and got["count"] == 21, (rank, task)
            assert got["logloss"] == pytest.approx(expected[task]["logloss"], rel=1e-12)
            assert got["ne"] == pytest.approx(expected[task]["ne"], rel=1e-12)
        assert results["single"]["auc"] == expected["b"]["auc"]
        assert "different task names (rank 0 ['a', 'b'], rank 1 ['a', 'c'])" in results["mismatch"]
    assert ranks[0]["multi"] == ranks[1]["multi"]  # the same floats on every rank
