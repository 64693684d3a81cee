"""Smoke test run from the built wheel in an isolated venv: public API + tiny calls."""

import pytest
import torch

import freescale


def test_partition_simulate_and_model():
    assert freescale.__version__.count(".") == 2
    part = freescale.partition([5.0, 1.0, 4.0, 2.0], 2, method="kk_equal")
    assert sorted(torch.cat(part.assignments).tolist()) == [0, 1, 2, 3]
    res = freescale.simulate([torch.tensor([10, 1, 8, 2])], 2, freescale.CostModel(a=1.0, b=0.1), method="lpt_equal")
    assert 0 <= res.bubble_ratio < 1
    model = freescale.HSTURecommender(n_items=10, d_model=8, n_layers=1, n_heads=2)
    logits = model(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([2, 3]))
    assert logits.shape == (2, 10)


def test_user_state_from_looked_up_rows_equals_own_table():
    from freescale.model import pad_jagged

    torch.manual_seed(3)
    model = freescale.HSTURecommender(50, d_model=16, n_layers=2, max_len=7)
    lengths = torch.tensor([3, 9, 1, 5])
    items = torch.randint(0, 50, (int(lengths.sum()),))
    padded, _ = pad_jagged(items, lengths, 7)
    rows = model.item(padded)  # padding slots hold item 0's row: the mask must zero them
    torch.testing.assert_close(model.user_state(None, lengths, item_embeddings=rows), model.user_state(items, lengths))
    with pytest.raises(ValueError, match="item_embeddings"):
        model.user_state(None, lengths, item_embeddings=torch.zeros(4, 8, 16))


def test_sequence_states_are_causal():
    torch.manual_seed(4)
    model = freescale.HSTURecommender(30, d_model=8, n_layers=2, max_len=6, ffn_factory=lambda d: torch.nn.Linear(d, d))
    items = torch.randint(0, 30, (5,))
    states, mask = model.sequence_states(items, torch.tensor([5]))
    assert mask.all() and states.shape == (1, 5, 8)
    changed = items.clone()
    changed[3:] = (changed[3:] + 1) % 30  # a different future after position 2
    states2, _ = model.sequence_states(changed, torch.tensor([5]))
    torch.testing.assert_close(states2[:, :3], states[:, :3])
    assert not torch.allclose(states2[:, 3:], states[:, 3:])
    torch.testing.assert_close(states[:, -1], model.user_state(items, torch.tensor([5])))
