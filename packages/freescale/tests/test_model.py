"""HSTURecommender on edge-case batches."""

import pytest
import torch

from freescale import HSTURecommender
from freescale.model import pad_jagged


def _model():
    torch.manual_seed(0)
    return HSTURecommender(20, d_model=8, n_layers=1, max_len=10)


def test_empty_histories_get_the_state_they_get_in_any_batch():
    model = _model()
    mixed = model(torch.tensor([3, 4, 5]), torch.tensor([0, 3, 0]))
    empty = model(torch.tensor([], dtype=torch.long), torch.tensor([0, 0]))
    torch.testing.assert_close(empty, mixed[[0, 2]])
    # rows looked up elsewhere, none of them: the same state
    no_rows = torch.zeros(1, 0, 8)
    torch.testing.assert_close(model.user_state(None, torch.tensor([0]), item_embeddings=no_rows),
                               model.user_state(torch.tensor([], dtype=torch.long), torch.tensor([0])))


def test_empty_batch():
    model = _model()
    assert model(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)).shape == (0, 20)


@pytest.mark.parametrize("lengths", [[3], [6], [2, -1, 4]])
def test_lengths_must_sum_to_the_items(lengths):
    with pytest.raises(ValueError, match="lengths must be non-negative and sum to the 5 values"):
        _model()(torch.arange(5), torch.tensor(lengths))
    with pytest.raises(ValueError, match="sum to the 5 values"):
        pad_jagged(torch.arange(5), torch.tensor(lengths))


@pytest.mark.parametrize("sizes, named", [
    ({"n_items": 30, "d_model": 16.0}, "d_model must be an integer >= 1, got 16.0"),
    ({"n_items": 0}, "n_items must be an integer >= 1, got 0"),
    ({"n_items": 30, "n_heads": 2.0}, "n_heads must be an integer >= 1, got 2.0"),
    ({"n_items": 30, "max_len": True}, "max_len must be an integer >= 1, got True"),
    ({"n_items": 30, "n_layers": -1}, "n_layers must be an integer >= 0, got -1"),
])
def test_model_sizes_must_be_integers(sizes, named):
    with pytest.raises(ValueError, match=named):
        HSTURecommender(**sizes)


def test_padding_mask_lives_on_the_items_device():
    """pad_jagged made its mask on the CPU whatever the values' device, so a model on a GPU failed
    in its first forward (device mismatch); "meta" stands in for the GPU here."""
    padded, mask = pad_jagged(torch.arange(3, device="meta"), torch.tensor([1, 2]))
    assert padded.device.type == mask.device.type == "meta"
    model = HSTURecommender(20, d_model=8, n_layers=1, max_len=10).to("meta")
    assert model(torch.arange(3, device="meta"), torch.tensor([1, 2])).shape == (2, 20)


def test_trailing_must_be_integer_counts():
    """Float trailing counts were truncated to whole positions without a word."""
    with pytest.raises(ValueError, match="trailing must be integer position counts"):
        _model().sequence_states(torch.tensor([1, 2]), torch.tensor([2]), trailing=torch.tensor([0.5]))
