"""State derived from a model's or an index's tensors (`filtering.derived_from`) is kept per
tensor version: a copy of the owner must not take the original's kept values for its own."""

import copy
import pickle

import torch

from silvertorch import EmbeddingTower, OverArch, RetrievalModel, ValueModel
from silvertorch.model import _int64_words

D = 8


def _model():
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(200, D, generator=g), dim=1)
    torch.manual_seed(0)
    return RetrievalModel.build(EmbeddingTower([10], D), OverArch(D, 1, [4]), ValueModel(1), emb, torch.arange(200),
                                n_clusters=3, nprobe=3, k_candidates=20, num_results=5, fresh_capacity=4, kmeans_iters=2)


def _edited_after_reading(model):
    """The model's derived tables read at one tensor version, then the tensors edited: items
    deleted and added after the tables were last read (as between two forwards)."""
    model.delete_items([0])
    model.add_items(torch.ones(1, D), [900])
    model._alive_words(), model._fresh_embeddings()  # kept at this version
    model.delete_items([1, 2, 3])
    model.add_items(torch.full((1, D), 2.0), [901])
    return model


def test_a_deep_copy_does_not_reuse_the_originals_derived_tables():
    model = _edited_after_reading(_model())
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(twin._alive_words(), _int64_words(twin.alive[: twin.num_main]))
        assert torch.equal(twin._fresh_embeddings(), twin.item_embeddings[twin.num_main:].float())
    # and the original's own, made again
    assert torch.equal(model._alive_words(), _int64_words(model.alive[: model.num_main]))
    assert torch.equal(model._fresh_embeddings(), model.item_embeddings[model.num_main:].float())
