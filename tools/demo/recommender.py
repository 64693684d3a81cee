"""The demo's model: an HSTU sequence encoder whose feed-forward blocks are moeblaze MoE layers
(the user tower), an item embedding table (the item tower), and silvertorch's OverArch as the
multi-task heads over [u, v, u*v]. The same OverArch is published into the retrieval model.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import freescale
import moeblaze
import silvertorch

TASKS = ("next", "watch", "like")  # next: sampled softmax over items; watch, like: OverArch logits
HEAD_TASKS = ("watch", "like")
VALUE_WEIGHTS = (1.0, 0.5)  # the Value Model: watch + 0.5 * like


@dataclasses.dataclass
class Config:
    dim: int = 32
    layers: int = 2
    heads: int = 2
    experts: int = 4
    top_k: int = 2
    max_len: int = 200
    overarch_hidden: tuple[int, ...] = (64,)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "overarch_hidden": list(self.overarch_hidden)}

    @classmethod
    def from_json(cls, d: dict) -> Config:
        return cls(**{**d, "overarch_hidden": tuple(d["overarch_hidden"])})


class SequenceUserTower(nn.Module):
    """HSTU over the item embeddings of a history -> user vector. Histories are run in
    length-sorted micro-batches so that padding (and so compute) follows the jagged lengths,
    which is what freescale's cost model balances."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.hstu = freescale.HSTURecommender(1, cfg.dim, cfg.layers, cfg.heads, cfg.max_len,
                                              ffn_factory=lambda d: moeblaze.MoE(d, 2 * d, cfg.experts, cfg.top_k))
        del self.hstu.item  # item rows come from the (sharded) item table

    def aux_loss(self) -> torch.Tensor:
        return sum(ffn.aux_loss for ffn in self.hstu.ffns)

    def forward(self, rows: torch.Tensor, lengths: torch.Tensor, last_only: bool = False, micro_batch: int = 8) -> torch.Tensor:
        """rows [sum(lengths), D]: the item embeddings of jagged histories (each at most max_len
        long) -> the state after every position [sum(lengths), D] (causal: position t has seen
        items up to t), or after each whole history [B, D] with `last_only`."""
        if lengths.numel() == 0 or int(lengths.min()) < 1 or int(lengths.max()) > self.hstu.max_len:
            raise ValueError(f"lengths must be in [1, {self.hstu.max_len}], got {lengths.tolist()[:8]}...")
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        out = rows.new_empty(lengths.numel() if last_only else rows.shape[0], rows.shape[1])
        for chunk in torch.argsort(lengths, stable=True).split(micro_batch):
            lens = lengths[chunk]
            width = int(lens.max())
            # right-aligned row indices (the newest item last); padding slots read row 0 and are masked
            index = (offsets[chunk].unsqueeze(1) + torch.arange(width) - (width - lens).unsqueeze(1)).clamp_min(0)
            states, mask = self.hstu.sequence_states(None, lens, item_embeddings=rows[index])
            if last_only:
                out[chunk] = states[:, -1]
            else:
                out[index[mask]] = states[mask]
        return out


def build(cfg: Config) -> tuple[SequenceUserTower, silvertorch.OverArch]:
    return SequenceUserTower(cfg), silvertorch.OverArch(cfg.dim, len(HEAD_TASKS), cfg.overarch_hidden)
