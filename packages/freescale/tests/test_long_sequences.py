"""Samples that alone exceed a rank's fair share: floor, capping, splitting (single process;
the 2-rank runs are in test_distributed.py)."""

import pytest
import torch

from freescale import BatchBalancer, CostModel, HSTURecommender, KeyedJagged, cap_lengths, oversized, simulate
from freescale.longseq import floor_of, split_windows

COST = CostModel(a=256.0, b=1.0)


def _floor_bound_batch(world=16, per_rank=16, seed=0):
    """Short histories and a few far longer ones: some alone exceed a rank's fair share."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 300, (world * per_rank,), generator=g)
    lengths[torch.randperm(lengths.numel(), generator=g)[:3]] = torch.tensor([4096, 3000, 1500])
    assert floor_of(COST(lengths), world)["floor_bound"]
    return lengths


@pytest.mark.parametrize("context", [None, 0, 7, 10_000])
def test_split_windows_train_every_position_once_within_the_fair_share(context):
    world = 16
    lengths = _floor_bound_batch(world)
    w = split_windows(lengths, COST, world, context=context)
    assert oversized(COST(w.lengths), world).numel() == 0  # no piece alone exceeds the fair share
    assert torch.equal(w.source, torch.sort(w.source, stable=True).values)  # ordered by source
    for i, length in enumerate(lengths.tolist()):
        rows = (w.source == i).nonzero().reshape(-1)
        trained = torch.cat([torch.arange(int(w.start[r] + w.context[r]), int(w.stop[r])) for r in rows])
        assert trained.tolist() == list(range(length))  # every position's loss exactly once, in order
        assert int(w.start[rows[0]]) == 0 and int(w.context[rows[0]]) == 0
        assert int(w.stop[rows[-1]]) == length and (w.trailing[rows] == length - w.stop[rows]).all()
    later = w.context[w.start > 0]  # one context for every later piece, below every window
    assert later.numel() > 0 and (later == later[0]).all() and (w.lengths[w.start > 0] > later).all()
    longest = int(w.lengths.max())
    if context in (0, 7):
        assert int(later[0]) == context
    else:  # half the window by default; as much as the window allows when asked for more
        assert int(later[0]) >= (longest // 2 if context is None else longest - 1)
    assert w.positions() == int(lengths.sum())
    mask = w.loss_mask()
    assert int(mask.sum()) == int(lengths.sum()) and mask.numel() == int(w.lengths.sum())


def test_cap_is_the_largest_that_fits():
    world = 16
    lengths = _floor_bound_batch(world)
    capped = cap_lengths(lengths, COST, world)
    assert oversized(COST(capped), world).numel() == 0
    cap = int(capped.max())
    assert cap < int(lengths.max()) and torch.equal(capped, lengths.clamp_max(cap))
    looser = lengths.clamp_max(cap + 1)
    assert oversized(COST(looser), world).numel() > 0  # one position more and the floor is back


def test_cap_leaves_a_batch_whole_when_every_sample_has_a_rank_to_itself():
    """No more non-empty samples than ranks: the fair share is below every sample but the
    shortest, and the cap collapsed to it (one 200-long history on 3 ranks kept 1 position, 99.5%
    of the loss positions gone, for no idle rank filled). Such a batch now stays whole; one sample
    more than ranks and the fair-share cap is back."""
    cost = CostModel.from_model_shape(32, 2, 2)  # what freescale.train uses
    for world, lengths in ((3, [200]), (3, [200, 5, 1]), (4, [300, 0, 0, 7]), (2, [0, 0])):
        assert cap_lengths(torch.tensor(lengths), cost, world).tolist() == lengths, (world, lengths)
    capped = cap_lengths(torch.tensor([200, 5, 1, 1]), cost, 3)
    assert int(capped.max()) < 200 and oversized(cost(capped), 3).numel() == 0


@pytest.mark.parametrize("lengths, world, match", [
    ([5.7, 3.2, 1.0], 1, "lengths must be integer counts of positions"),  # truncated to [5, 3, 1]
    ([400, 380, 20, 30, 25, 10, 12, 8], 0, "world_size must be an int >= 1, got 0"),  # no cap
    ([400, 380, 20, 30, 25, 10, 12, 8], 2.5, "world_size must be an int >= 1, got 2.5"),  # a cap of 145
    ([400, 380, 20, 30, 25, 10, 12, 8], -1, "world_size must be an int >= 1, got -1"),  # no cap
])
def test_cap_lengths_refuses_float_lengths_and_bad_world_sizes(lengths, world, match):
    with pytest.raises(ValueError, match=match):
        cap_lengths(torch.tensor(lengths), COST, world)


def test_split_and_cap_remove_the_floor_in_the_simulator():
    world = 16
    batches = [_floor_bound_batch(world, seed=s) for s in (0, 100)]
    whole = simulate(batches, world, COST, method="lpt_equal")
    floor = max(floor_of(COST(b), world)["bubble_floor"] for b in batches)
    assert whole.bubble_ratio >= 0.5 * floor > 0
    for mode in ("split", "cap"):
        cut = simulate(batches, world, COST, method="lpt_equal", long_sequences=mode)
        assert cut.bubble_ratio < 0.5 * whole.bubble_ratio, mode


@pytest.mark.parametrize("method", ["kk_equal", "contiguous", "lpt_equal"])
def test_simulator_keeps_the_batch_whole_when_cutting_is_no_better(method):
    """BatchBalancer's rule (test_distributed's cut_plans_never_worse, these samples): split's
    pieces recompute context and their best plan (max 50.05) is worse than the batch as it
    stands on the ranks (the naive contiguous split, max 40), so every sample stays whole and in
    place; the simulator ran the worse plan."""
    batch = torch.tensor([0, 0, 20, 0, 0, 1, 6, 0, 0, 16])
    cost = CostModel(1.0, 0.05)
    kw = dict(method=method, seconds_per_cost=1.0)
    whole = simulate([batch], 2, cost, **kw)
    split = simulate([batch], 2, cost, long_sequences="split", **kw)
    assert split.step_times == pytest.approx([40.0]) and split.step_times == pytest.approx(whole.step_times)
    assert split.bubble_ratio == pytest.approx(whole.bubble_ratio)
    assert simulate([batch], 2, cost, long_sequences="cap", **kw).step_times[0] < 40.0  # capping helps: kept cut


def test_floor_report():
    costs = CostModel(a=1.0, b=1.0)(torch.tensor([40, 3, 4, 2, 5, 3]))
    f = floor_of(costs, 2)
    assert f["floor_bound"] and f["floor_cost"] == 1640.0 and f["fair_share"] == 860.0
    assert f["bubble_floor"] == pytest.approx(1 - 860.0 / 1640.0)
    assert not floor_of(costs, 1)["floor_bound"] and floor_of(costs, 1)["bubble_floor"] == 0.0


def test_balancer_bad_options_and_misaligned_keys():
    with pytest.raises(ValueError, match="long_sequences"):
        BatchBalancer(long_sequences="trim")
    with pytest.raises(ValueError, match="split_context"):
        BatchBalancer(long_sequences="split", split_context=-1)
    with pytest.raises(ValueError, match="min_gain must be a fraction in \\[0, 1\\), got 1.5"):
        BatchBalancer(min_gain=1.5)
    with pytest.raises(ValueError, match="method must be one of .* got 'kk-equal'"):
        BatchBalancer(method="kk-equal")  # at construction, not at the first plan
    with pytest.raises(ValueError, match="lengths must be non-negative, got -5"):
        BatchBalancer().plan(torch.tensor([-5, 2]))
    for floats in (torch.tensor([1.9, 2.7]), [1.5, 2.0]):
        with pytest.raises(ValueError, match="lengths must be integer counts of positions, got dtype torch.float"):
            BatchBalancer().plan(floats)
    feats = KeyedJagged.from_dict({"a": [torch.arange(3), torch.arange(2)], "b": [torch.arange(1), torch.arange(2)]})
    with pytest.raises(ValueError, match="same length in every sample"):
        BatchBalancer(long_sequences="cap").lengths_of(feats)
    assert BatchBalancer().lengths_of(feats).tolist() == [4, 4]  # report mode: total over keys


def test_empty_batch_in_one_process():
    for mode in ("report", "cap", "split"):
        new, moved, plan = BatchBalancer(long_sequences=mode).balance(KeyedJagged.from_dict({"a": []}), {"x": torch.zeros(0, 2)})
        assert new.batch_size == 0 and moved["x"].shape == (0, 2) and plan.global_batch == 0
        assert plan.report()["max_sample_cost_after"] == 0.0


def test_keyed_jagged_windows():
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 100, (n,), generator=g) for n in (5, 0, 9, 3)]
    feats = KeyedJagged.from_dict({"item": seqs, "target": [s + 1000 for s in seqs]})
    idx, start, stop = torch.tensor([2, 0, 2, 3]), torch.tensor([0, 1, 4, 3]), torch.tensor([6, 5, 9, 3])
    got = feats.windows(idx, start, stop).to_dict()
    for j in range(4):
        expect = seqs[int(idx[j])][int(start[j]) : int(stop[j])]
        assert torch.equal(got["item"][j], expect) and torch.equal(got["target"][j], expect + 1000)
    with pytest.raises(ValueError, match="start <= stop"):
        feats.windows(torch.tensor([0]), torch.tensor([2]), torch.tensor([6]))
    with pytest.raises(ValueError, match="start <= stop"):  # a reversed window (a negative length)
        feats.windows(torch.tensor([0]), torch.tensor([3]), torch.tensor([1]))


def _states(model, seqs, trailing=None):
    lengths = torch.tensor([s.numel() for s in seqs])
    states, mask = model.sequence_states(torch.cat(seqs), lengths, trailing=trailing)
    return [states[i][mask[i]] for i in range(len(seqs))]


def test_hstu_states_do_not_depend_on_the_batch_and_split_pieces_match_where_promised():
    torch.manual_seed(0)
    model = HSTURecommender(60, d_model=16, n_layers=2, n_heads=2, max_len=64).eval()
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, 60, (30,), generator=g)
    alone = _states(model, [seq])[0]
    # padded next to a longer sequence: the same states (the attention normaliser is max_len, not the width)
    beside = _states(model, [seq, torch.randint(0, 60, (50,), generator=g)])[0]
    torch.testing.assert_close(beside, alone, rtol=1e-5, atol=1e-6)
    # pieces as the balancer cuts them: the first piece holds its whole prefix and has the unsplit states
    w = split_windows(torch.tensor([30, 3, 4, 2, 5]), CostModel(a=1.0, b=1.0), 2, context=12)
    rows = (w.source == 0).nonzero().reshape(-1)
    assert rows.numel() == 2 and int(w.context[rows[1]]) == 12
    pieces = [seq[int(w.start[r]) : int(w.stop[r])] for r in rows]
    got = _states(model, pieces, trailing=w.trailing[rows])
    torch.testing.assert_close(got[0], alone[: pieces[0].numel()], rtol=1e-5, atol=1e-6)
    # the later piece attends to its window only: an approximation, not the unsplit states
    assert not torch.allclose(got[1][12:], alone[int(w.start[rows[1]]) + 12 :], atol=1e-4)
    # without the trailing offset, recency positions would be wrong and the first piece would differ
    assert not torch.allclose(_states(model, pieces[:1])[0], alone[: pieces[0].numel()], atol=1e-4)
    with pytest.raises(ValueError, match="trailing"):
        model.sequence_states(seq, torch.tensor([30]), trailing=torch.tensor([40]))
