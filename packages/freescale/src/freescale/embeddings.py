"""Embedding tables sharded over ranks, looked up through all-to-all.

- `sharding="table"`: each table lives whole on one rank (round-robin by table).
- `sharding="row"`: each table's rows are split in contiguous blocks over all ranks.
Forward: every rank sends each id to the rank that owns its row (all-to-all), owners gather
the rows, rows come back (all-to-all) and are sum-pooled per (sample, key). Backward runs the
reverse all-to-all (torch.distributed.nn's differentiable all_to_all_single), so gradients
land on the owner's shard only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .jagged import KeyedJagged


def _world(group):
    return (dist.get_world_size(group), dist.get_rank(group)) if dist.is_initialized() else (1, 0)


class ShardedEmbeddings(nn.Module):
    def __init__(self, tables: dict[str, int], dim: int, sharding: str = "row", process_group=None, init_seed: int = 0):
        super().__init__()
        if sharding not in ("row", "table"):
            raise ValueError(f"sharding must be 'row' or 'table', got {sharding!r}")
        if not tables:
            raise ValueError("tables must name at least one table and its row count")
        self.group, self.sharding, self.dim = process_group, sharding, dim
        self.keys = list(tables)
        self.num_rows = dict(tables)
        world, rank = _world(process_group)
        self.world, self.rank = world, rank
        gen = torch.Generator().manual_seed(init_seed)
        self.shards = nn.ParameterDict()
        self._row_start = {}
        for t, key in enumerate(self.keys):
            full = torch.randn(tables[key], dim, generator=gen) * dim**-0.5  # same full table on every rank
            if sharding == "table":
                owner = t % world
                rows = (0, tables[key]) if owner == rank else (0, 0)
            else:
                per = -(-tables[key] // world)
                rows = (min(rank * per, tables[key]), min((rank + 1) * per, tables[key]))
            self._row_start[key] = rows[0]
            self.shards[key] = nn.Parameter(full[rows[0] : rows[1]].clone())

    def owner_of(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        if self.sharding == "table":
            return torch.full_like(ids, self.keys.index(key) % self.world)
        per = -(-self.num_rows[key] // self.world)
        return ids // per

    def full_weight(self, key: str) -> torch.Tensor:
        """Gather the whole table (for checks and checkpoints)."""
        if self.world == 1:
            return self.shards[key].detach()
        parts = [None] * self.world
        dist.all_gather_object(parts, (self._row_start[key], self.shards[key].detach()), group=self.group)
        return torch.cat([p for _, p in sorted(parts, key=lambda x: x[0]) if p.numel()])

    def forward(self, features: KeyedJagged) -> dict[str, torch.Tensor]:
        """Sum-pooled embeddings per key: {key: [batch, dim]}."""
        out = {}
        for key in self.keys:
            ids, lengths = features[key]
            if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_rows[key]):
                raise IndexError(f"ids for table {key!r} must be in [0, {self.num_rows[key]})")
            rows = self._fetch(key, ids)
            segment = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
            pooled = rows.new_zeros(lengths.numel(), self.dim).index_add(0, segment, rows)
            out[key] = pooled
        return out

    def _fetch(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return self.shards[key][ids]
        owner = self.owner_of(key, ids)
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=self.world)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        asked = ids.new_empty(sum(recv))
        dist.all_to_all_single(asked, ids[order].contiguous(), recv, send, group=self.group)
        local_rows = self.shards[key][asked - self._row_start[key]]
        import torch.distributed.nn.functional as dnn

        got = dnn.all_to_all_single(local_rows.new_empty(ids.numel(), self.dim), local_rows, send, recv, group=self.group)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        return got[inverse]
