"""Built-in towers that an artifact can rebuild from JSON alone.

A RetrievalModel takes any `nn.Module` as its user tower; a published artifact stores its
weights either way, but only towers listed in `TOWERS` are rebuilt from the artifact's JSON
config. Any other tower is passed to `RetrievalModel.load(..., user_tower=module)`.
"""

from __future__ import annotations

import torch
from torch import nn

from gpukernels_common.checks import check_sizes


class EmbeddingTower(nn.Module):
    """Categorical features int64 [Q, F] -> one embedding per feature, concatenated -> MLP -> [Q, dim].

    With one feature and no hidden layers this is a lookup table, which is how precomputed user
    embeddings (for example from a sequence model) are served.
    """

    def __init__(self, cardinalities: list[int], dim: int, embedding_dim: int | None = None, hidden: list[int] | tuple = (),
                 normalize: bool = False):
        super().__init__()
        # sizes as Python ints (numpy ones, say a table size from a dataframe, would fail the artifact's
        # JSON config after the whole build); 0, negative or fractional sizes refused by name
        if isinstance(cardinalities, (str, bytes)) or not hasattr(cardinalities, "__iter__") or not len(cardinalities):
            raise ValueError(f"cardinalities must be a non-empty list of positive sizes, got {cardinalities!r}")
        if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__iter__"):
            raise ValueError(f"hidden must be a list of layer widths, got {hidden!r}")
        cardinalities = list(check_sizes(**{f"cardinalities[{i}]": c.item() if isinstance(c, torch.Tensor) else c
                                            for i, c in enumerate(cardinalities)}))
        (dim,) = check_sizes(dim=dim)
        hidden = list(check_sizes(**{f"hidden[{i}]": h for i, h in enumerate(hidden)}))
        if embedding_dim is not None:
            (embedding_dim,) = check_sizes(embedding_dim=embedding_dim)
        self.cardinalities, self.dim, self.hidden, self.normalize = cardinalities, dim, hidden, bool(normalize)
        self.embedding_dim = embedding_dim or (dim if not hidden and len(cardinalities) == 1 else 16)
        self.tables = nn.ModuleList(nn.Embedding(c, self.embedding_dim) for c in cardinalities)
        layers: list[nn.Module] = []
        width = self.embedding_dim * len(cardinalities)
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        if width != dim or self.hidden:
            layers.append(nn.Linear(width, dim))
        self.mlp = nn.Sequential(*layers)

    @property
    def input_spec(self) -> dict:
        return {"dtype": "int64", "width": len(self.cardinalities), "max": [c - 1 for c in self.cardinalities]}

    def config(self) -> dict:
        return {"cardinalities": self.cardinalities, "dim": self.dim, "embedding_dim": self.embedding_dim,
                "hidden": self.hidden, "normalize": self.normalize}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = torch.cat([t(features[:, i]) for i, t in enumerate(self.tables)], -1) if len(self.tables) > 1 else self.tables[0](features[:, 0])
        x = self.mlp(x)
        return nn.functional.normalize(x, dim=-1) if self.normalize else x


TOWERS = {"EmbeddingTower": EmbeddingTower}
