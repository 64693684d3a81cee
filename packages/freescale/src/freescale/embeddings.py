"""Embedding tables sharded over ranks, looked up through all-to-all.

- `sharding="table"`: each table lives whole on one rank (round-robin by table).
- `sharding="row"`: each table's rows are split in contiguous blocks over all ranks.

A lookup sends every id, with the bag it belongs to, to the rank that owns its row (one
all-to-all for all tables). Each owner sums the rows it holds per bag and sends back one vector
per bag it was sent (a second all-to-all); the requester adds the owners' vectors. With
`pooling="sum"` or `"mean"` a bag is a (sample, key): under table-wise sharding its one owner
returns the final sum, under row-wise sharding each owner a partial sum, so the return traffic is
one vector per (sample, key) per owner instead of one per id (as TorchRec does). With
`pooling="none"` every id is its own bag: the rows come back one per id (jagged, e.g. a sequence
model's items). Backward sends the gradients back the reverse way, so they land on the owner's
shard only.

Table updates: dense gradients by default; `sparse_grad=True` gives sparse ones (the looked-up
rows) for optimizers that take them; `fused_lr=` applies SGD to the looked-up rows inside the
backward, as TorchRec's fused embedding optimizers do: no gradient tensor for the tables, no
optimizer step over them (leave the shards out of the optimizer). `fused_update="compiled"`
runs that update through `torch.compile`: one loop (gather the bag's gradient, scale, add to the
row) instead of `index_add_` over a [ids, dim] tensor of per-id steps.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from .jagged import KeyedJagged
from .transport import CollectiveTransport, make_transport

POOLINGS = ("sum", "mean", "none")
FUSED_UPDATES = ("eager", "compiled")
_COLLECTIVE = CollectiveTransport()


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _exchange(tensor: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Uneven all_to_all_single along dim 0, no autograd (ids and counts; `_AllToAll` moves the
    rows, with a backward)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tensor
    return _COLLECTIVE.exchange(tensor, output_splits, input_splits, group)


@dataclasses.dataclass
class DistributedIds:
    """One batch's ids at their owners: all a lookup needs but the rows' values (`distribute()`)."""

    rows: list[torch.Tensor]  # per table: the owner-local rows of the bags sent to this rank
    offsets: list[torch.Tensor]  # per table: where each of those bags starts in `rows`
    order: torch.Tensor | None  # the per-table sums back to the order the bags arrived in (None: already)
    bags_to_owner: list[int]  # bags this rank sent to each owner: the vectors it gets back from each
    bags_from_source: list[int]  # bags each rank sent here: the vectors sent back to each
    sent_bag: torch.Tensor | None  # this rank's bag of every vector it gets back (None: the identity)
    n_bags: int
    features: KeyedJagged | None = None
    pooling: str = "sum"
    split_sizes: list[int] = dataclasses.field(default_factory=list)  # output rows per key
    bag_lengths: torch.Tensor | None = None  # ids per bag, for pooling="mean"


# what `distribute` refuses a rank's input with; a rank's code in the counts all-to-all is its
# error's index here + 1 (0: none), so every rank raises the same class
_INPUT_ERRORS = (ValueError, TypeError, IndexError, KeyError)


def _raise_reported(flags: torch.Tensor, rank: int, own: Exception | None) -> None:
    """Raise, on every rank alike, where a rank flagged its input in the counts all-to-all
    (`flags`: one code per source rank): this rank's own error (`own`) prefixed with its rank, or
    on the others an error of the same class naming the rank(s)."""
    bad = [(r, code) for r, code in enumerate(flags.tolist()) if code]
    if not bad:
        return
    others = [r for r, _ in bad if r != rank]
    error = _INPUT_ERRORS[bad[0][1] - 1]  # the lowest flagged rank's class, on every rank
    if own is not None:
        also = f" (rank(s) {others} reported invalid input too)" if others else ""
        text = own.args[0] if isinstance(own, KeyError) and own.args else str(own)  # KeyError's str() quotes it
        raise error(f"ShardedEmbeddings.distribute: rank {rank} sent invalid input: {text}{also}") from own
    raise error(f"ShardedEmbeddings.distribute: rank(s) {others} reported invalid input (their own errors say "
                "what); no rank looked anything up")


INIT_BLOCK_ROWS = 4096


def initial_rows(seed: int, table: int, num_rows: int, dim: int, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of table number `table`'s initial weights, N(0, 1/dim). The table is
    drawn in blocks of `INIT_BLOCK_ROWS` rows, each from a generator seeded by (seed, table,
    block), so a rank draws only the blocks its shard overlaps and every world size and sharding
    gets the same table."""
    if not 0 <= start <= end <= num_rows:
        raise ValueError(f"rows [{start}, {end}) are not within the table's {num_rows} rows")
    out = torch.empty(end - start, dim)
    gen = torch.Generator()
    for block in range(start // INIT_BLOCK_ROWS, -(-end // INIT_BLOCK_ROWS)):
        b0 = block * INIT_BLOCK_ROWS
        gen.manual_seed(((seed * 1_000_003 + table) * 1_000_003 + block) % 2**63)
        values = torch.randn(min(INIT_BLOCK_ROWS, num_rows - b0), dim, generator=gen)  # the whole block: same draw for every range
        lo, hi = max(start, b0), min(end, b0 + values.shape[0])
        out[lo - start : hi - start] = values[lo - b0 : hi - b0]
    return out.mul_(dim**-0.5)


def _world(group):
    return (dist.get_world_size(group), dist.get_rank(group)) if dist.is_initialized() else (1, 0)


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all along dim 0 through `transport` whose backward returns the gradients the
    reverse way (through the same transport)."""

    @staticmethod
    def forward(ctx, input, output_splits, input_splits, group, transport):
        ctx.splits, ctx.group, ctx.transport = (output_splits, input_splits), group, transport
        return transport.exchange(input, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_output):
        output_splits, input_splits = ctx.splits
        return _AllToAll.apply(grad_output, input_splits, output_splits, ctx.group, ctx.transport), None, None, None, None


def _scatter_bag_steps(weight, ids, bag, grad, lr: float):
    """weight[ids[i]] -= lr * grad[bag[i]] for every i, duplicates adding up, as a dense gradient
    would: the step scaled on the [bags, dim] gradient, not per id (int64 ids: `index_add_`'s fast
    path on CPU). Run as is, or through `torch.compile` (`fused_update="compiled"`), which fuses
    the gather, the scaling and the adds into one loop with no [ids, dim] tensor."""
    weight.index_add_(0, ids, (grad * -lr).to(weight.dtype).index_select(0, bag))


_compiled_scatter = None


def _compiled_scatter_bag_steps():
    """`_scatter_bag_steps` through torch.compile, made on first use (dynamic shapes: one build
    for every id count; on CPUs Inductor writes C++ and needs a compiler, on GPUs Triton)."""
    global _compiled_scatter
    if _compiled_scatter is None:
        _compiled_scatter = torch.compile(_scatter_bag_steps, dynamic=True)
    return _compiled_scatter


class _FusedSGDBagSum(torch.autograd.Function):
    """Per-bag sums of `weight` rows whose backward updates the rows in place (w -= lr * grad)
    instead of returning a gradient for `weight`."""

    @staticmethod
    def forward(ctx, ids, offsets, weight, lr, compiled):
        ctx.save_for_backward(ids, offsets)
        ctx.weight, ctx.lr, ctx.compiled = weight, lr, compiled
        return F.embedding_bag(ids, weight.detach(), offsets, mode="sum")

    @staticmethod
    def backward(ctx, grad_output):
        ids, offsets = ctx.saved_tensors
        if ids.numel():
            sizes = torch.diff(offsets, append=offsets.new_tensor([ids.numel()]))
            bag = torch.repeat_interleave(torch.arange(offsets.numel(), device=ids.device), sizes, output_size=ids.numel())
            step = _compiled_scatter_bag_steps() if ctx.compiled else _scatter_bag_steps
            try:
                with torch.no_grad():
                    step(ctx.weight, ids.long(), bag, grad_output, ctx.lr)
            except Exception as error:
                if not ctx.compiled:
                    raise
                raise RuntimeError(f"fused_update='compiled' failed: {error}. torch.compile builds this update on "
                                   "first use and needs a C++ compiler on CPUs; fused_update='eager' needs none") from error
        return None, None, None, None, None


class ShardedEmbeddings(nn.Module):
    def __init__(self, tables: dict[str, int], dim: int, sharding: str = "row", process_group=None, init_seed: int = 0,
                 sparse_grad: bool = False, fused_lr: float | None = None, transport: str = "collective",
                 fused_update: str = "eager"):
        """`sparse_grad=True`: the shards get sparse gradients holding the looked-up rows only (for
        optimizers that take them, e.g. SGD or SparseAdam; saves zeroing and updating whole tables).
        `fused_lr`: SGD with this learning rate on the looked-up rows inside the backward; the
        shards get no gradient (keep them out of the optimizer).
        `fused_update`: how that update runs, "eager" (`index_add_` of per-id steps) or
        "compiled" (one gather-scale-add loop from `torch.compile`, built on first use: a few
        seconds, and a C++ compiler on CPUs; about 3 times faster on the CPU, see the README).
        `transport`: how the looked-up vectors and their gradients move, "collective"
        (all-to-all) or "copy_engine" (peers pull them with copies: the GPUs' copy engines, no SM;
        see `freescale.transport`). The ids' all-to-alls stay collectives.
        `init_seed`: the tables' initial weights, N(0, 1/dim), the same for every world size and
        sharding; each rank draws only its own rows (`initial_rows`)."""
        super().__init__()
        if isinstance(init_seed, bool) or not isinstance(init_seed, numbers.Integral):
            raise ValueError(f"init_seed must be an int, got {init_seed!r}")
        if sharding not in ("row", "table"):
            raise ValueError(f"sharding must be 'row' or 'table', got {sharding!r}")
        if fused_lr is not None and (sparse_grad or not fused_lr > 0):
            raise ValueError(f"fused_lr must be a positive learning rate and excludes sparse_grad=True, got "
                             f"fused_lr={fused_lr!r}, sparse_grad={sparse_grad!r}")
        if fused_update not in FUSED_UPDATES:
            raise ValueError(f"fused_update must be one of {FUSED_UPDATES}, got {fused_update!r}")
        if fused_update != "eager" and fused_lr is None:
            raise ValueError(f"fused_update={fused_update!r} needs fused_lr= (it is how the fused SGD update runs)")
        if not isinstance(tables, Mapping):  # a list failed with an AttributeError on .items()
            raise ValueError(f"tables must be a mapping from table name to row count (e.g. {{'items': 1000}}), "
                             f"got {type(tables).__name__}")
        if not tables:
            raise ValueError("tables must name at least one table and its row count")
        bad_rows = {k: n for k, n in tables.items() if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0}
        if bad_rows:
            raise ValueError(f"tables: row counts must be non-negative ints, got {bad_rows}")
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ValueError(f"dim must be an int >= 1 (the embedding width), got {dim!r}")
        self.fused_update = fused_update
        self.group, self.sharding, self.dim, self.sparse_grad, self.fused_lr = process_group, sharding, dim, sparse_grad, fused_lr
        self.transport = make_transport(transport)
        self.keys = list(tables)
        self.num_rows = dict(tables)
        world, rank = _world(process_group)
        self.world, self.rank = world, rank
        # routing per table: its owner (table-wise) or its rows per rank (row-wise)
        self.register_buffer("_table_owner", torch.arange(len(self.keys)) % world, persistent=False)
        self.register_buffer("_rows_per_rank", torch.tensor([-(-tables[key] // world) for key in self.keys]), persistent=False)
        self._index_dtype = torch.int32 if max(tables.values()) < 2**31 else torch.int64  # rows and bag sizes on the wire
        self.shards = nn.ParameterDict()
        self._row_start = {}
        for t, key in enumerate(self.keys):
            if sharding == "table":
                rows = (0, tables[key]) if int(self._table_owner[t]) == rank else (0, 0)
            else:
                per = int(self._rows_per_rank[t])
                rows = (min(rank * per, tables[key]), min((rank + 1) * per, tables[key]))
            self._row_start[key] = rows[0]
            # only this rank's rows are drawn: no rank ever holds a whole table it does not own
            self.shards[key] = nn.Parameter(initial_rows(init_seed, t, tables[key], dim, *rows))
        self._prefetched: DistributedIds | None = None

    def _route(self, table: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Owner rank of every id of table index `table`, and its row within that owner's shard."""
        if self.sharding == "table":
            return self._table_owner[table], ids
        per = self._rows_per_rank[table]
        owner = ids // per
        return owner, ids - owner * per

    def _table_index(self, key: str) -> int:
        if key not in self.num_rows:  # not list.index's bare ValueError, nor the ParameterDict's KeyError
            raise KeyError(f"no table {key!r}; tables: {self.keys}")
        return self.keys.index(key)

    def owner_of(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        return self._route(torch.full_like(ids, self._table_index(key)), ids)[0]

    def full_weight(self, key: str) -> torch.Tensor:
        """Gather the whole table (for checks and checkpoints)."""
        self._table_index(key)  # before the gather
        if self.world == 1:
            return self.shards[key].detach()
        parts = [None] * self.world
        # host copies: a pickled GPU shard would unpickle onto its owner's GPU index on every rank
        shard = self.shards[key].detach()
        dist.all_gather_object(parts, (self._row_start[key], shard.cpu()), group=self.group)
        # every shard is [rows, dim], empty ones too: a table of 0 rows is [0, dim], as on one rank
        return torch.cat([p for _, p in sorted(parts, key=lambda x: x[0])]).to(shard.device)

    def forward(self, features: KeyedJagged, pooling: str = "sum") -> dict[str, torch.Tensor]:
        """Per table key: `"sum"` / `"mean"` pooled per sample, {key: [batch, dim]} (an empty bag
        gives zeros, as `nn.EmbeddingBag`); `"none"`: {key: [ids of that key, dim]}, one row per id
        in the order of the features' values. Uses the ids `prefetch()` distributed for these very
        features and this pooling when there are some; otherwise distributes them now."""
        prefetched = self._prefetched
        if prefetched is not None and prefetched.features is features and prefetched.pooling == pooling:
            self._prefetched, distributed = None, prefetched
        else:  # (a prefetch for other features stays, so that the pipeline can warn about it)
            distributed = self.distribute(features, pooling)
        return self._lookup(distributed)

    def distribute(self, features: KeyedJagged, pooling: str = "sum", process_group=None) -> DistributedIds:
        """The first half of a lookup, TorchRec's "input distribution": check the ids, route them
        and send every owner the bags and rows it must sum (two all-to-alls of integers, no
        autograd). `process_group`: where those all-to-alls run (default the module's), e.g. a
        group of its own in a background thread while another batch computes."""
        group = process_group or self.group
        try:
            ids_per_key, lengths_per_key = self._checked_input(features, pooling)
        except _INPUT_ERRORS as err:
            if self.world == 1:
                raise
            # the other ranks are on their way into the counts all-to-all: join it with a flag rather
            # than leave them waiting there until the group's timeout; every rank raises after it
            counts = self._rows_per_rank.new_zeros(self.world, 2 + len(self.keys))
            counts[:, -1] = next(i for i, cls in enumerate(_INPUT_ERRORS) if isinstance(err, cls)) + 1
            _raise_reported(_exchange(counts, [1] * self.world, [1] * self.world, group)[:, -1], self.rank, err)
            raise  # not reached: this rank's own flag is among those received
        if pooling == "none":  # every id its own bag
            bag_sizes, sizes = [torch.ones_like(ids) for ids in ids_per_key], [ids.numel() for ids in ids_per_key]
        else:
            bag_sizes, sizes = list(lengths_per_key), [features.batch_size] * len(self.keys)
        distributed = self._send_requests(list(ids_per_key), bag_sizes, group)
        distributed.features, distributed.pooling, distributed.split_sizes = features, pooling, sizes
        if pooling == "mean":
            distributed.bag_lengths = torch.cat(lengths_per_key)
        return distributed

    def _checked_input(self, features: KeyedJagged, pooling: str):
        """(ids, lengths) per table of `features`; a ValueError, TypeError, IndexError or KeyError
        (see `_INPUT_ERRORS`) where they or `pooling` are not what a lookup takes."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not isinstance(features, KeyedJagged):
            raise TypeError(f"features must be a KeyedJagged, got {type(features).__name__}")
        missing = [key for key in self.keys if key not in features.keys]
        if missing:
            raise KeyError(f"features have no ids for the tables {missing} (features: {features.keys}, tables: {self.keys})")
        ids_per_key, lengths_per_key = zip(*(features[key] for key in self.keys))
        ids_per_key = list(ids_per_key)
        for t, (key, ids) in enumerate(zip(self.keys, ids_per_key)):
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:  # would be truncated to rows
                raise TypeError(f"ids for table {key!r} must have an integer dtype, got {ids.dtype}")
            if ids.dtype not in (torch.int32, torch.int64):
                # torch has no min/max for uint16-64 (numpy's uint32 ids, say), no repeat_interleave
                # for 8/16-bit sizes: NotImplementedErrors on that rank alone; looked up as int64
                # (uint64 ids past 2**63 - 1 wrap negative and are refused as out of range)
                ids_per_key[t] = ids = ids.long()
            if ids.numel():
                low, high = torch.aminmax(ids)  # one pass
                if low < 0 or high >= self.num_rows[key]:
                    raise IndexError(f"ids for table {key!r} must be in [0, {self.num_rows[key]}), got [{int(low)}, {int(high)}]")
        return ids_per_key, lengths_per_key

    def prefetch(self, distributed: DistributedIds) -> None:
        """Hand the module the ids `distribute()` sent ahead (e.g. in a pipeline's background
        thread): the next `forward` on the same features object and pooling uses them. One batch
        is held at a time."""
        self._prefetched = distributed

    def _requests_table_wise(self, ids_per_key: list[torch.Tensor], sizes_per_key: list[torch.Tensor]):
        """Table-wise routing from the keys alone: all of a key's bags (empty ones too) go to its
        table's owner, the owners' keys in table order; no per-id owner or bag index."""
        world, n_tables = self.world, len(self.keys)
        owners = self._table_owner.tolist()
        order = sorted(range(n_tables), key=lambda t: (owners[t], t))
        bag_base = [0]
        for sizes in sizes_per_key:
            bag_base.append(bag_base[-1] + sizes.numel())
        device = ids_per_key[0].device
        sent_bag = torch.cat([torch.arange(bag_base[t], bag_base[t + 1], device=device) for t in order])
        bags_to = torch.zeros(world, n_tables, dtype=torch.long, device=device)
        ids_to = torch.zeros(world, dtype=torch.long, device=device)
        for t in range(n_tables):
            bags_to[owners[t], t] = sizes_per_key[t].numel()
            ids_to[owners[t]] += ids_per_key[t].numel()
        bag_size = torch.cat([sizes_per_key[t] for t in order])
        row = torch.cat([ids_per_key[t] for t in order])
        return sent_bag, bag_size, bags_to, ids_to, row, bag_base[-1]

    def _requests_per_id(self, ids_per_key: list[torch.Tensor], sizes_per_key: list[torch.Tensor]):
        """Row-wise routing: every id's owner; a bag whose ids live on several owners becomes one
        partial bag per owner (runs of equal (owner, bag) in owner order)."""
        world, n_tables = self.world, len(self.keys)
        ids = torch.cat(ids_per_key).long()  # key-major in the tables' order, like the bag sizes
        device = ids.device
        ids_count = torch.tensor([t.numel() for t in ids_per_key], device=device)
        table = torch.repeat_interleave(torch.arange(n_tables, device=device), ids_count)
        sizes = torch.cat(sizes_per_key)
        n_bags = sizes.numel()
        bag = torch.repeat_interleave(torch.arange(n_bags, device=device), sizes)
        owner, row = self._route(table, ids)
        if owner.numel() > 1 and bool((owner[1:] < owner[:-1]).any()):
            order = torch.argsort(owner, stable=True)  # grouped by owner, bag order kept within each
            owner, row, table, bag = owner[order], row[order], table[order], bag[order]
        stride = max(n_bags, 1)
        sent, bag_size = torch.unique_consecutive(owner * stride + bag, return_counts=True)
        sent_owner, sent_bag = sent // stride, sent % stride
        sent_table = table[bag_size.cumsum(0) - bag_size]
        bags_to = torch.bincount(sent_owner * n_tables + sent_table, minlength=world * n_tables).view(world, n_tables)
        ids_to = torch.bincount(owner, minlength=world)
        return sent_bag, bag_size, bags_to, ids_to, row, n_bags

    def _send_requests(self, ids_per_key: list[torch.Tensor], sizes_per_key: list[torch.Tensor], group) -> DistributedIds:
        """Send every owner the bags it sums: `sizes_per_key[t]`, the sizes of key t's bags, whose
        ids follow each other in `ids_per_key[t]`. What the owner received comes back cut per table."""
        world, n_tables = self.world, len(self.keys)
        requests = self._requests_table_wise if self.sharding == "table" else self._requests_per_id
        sent_bag, bag_size, bags_to, ids_to, row, n_bags = requests(ids_per_key, sizes_per_key)
        # per owner: ids, bags per table, and 0: no input error here (see `distribute`)
        counts = torch.cat([ids_to.unsqueeze(1), bags_to, ids_to.new_zeros(world, 1)], 1)
        # one message per owner: the sizes of the bags sent to it, then the rows asked for
        index_dtype = self._index_dtype
        sizes_to = bag_size.to(index_dtype).split(bags_to.sum(1).tolist())
        rows_to = row.to(index_dtype).split(ids_to.tolist())
        request = torch.cat([part for d in range(world) for part in (sizes_to[d], rows_to[d])])

        # on the owner: the bags every rank sent, source-major, each source's bags in its order
        counts_from = _exchange(counts, [1] * world, [1] * world, group)
        _raise_reported(counts_from[:, -1], self.rank, None)  # a rank whose input was refused: all raise now
        ids_from, bags_from = counts_from[:, 0], counts_from[:, 1:-1]
        bags_per_source = bags_from.sum(1)
        message = _exchange(request, (ids_from + bags_per_source).tolist(), (ids_to + bags_to.sum(1)).tolist(), group)
        parts = message.split(torch.stack([bags_per_source, ids_from], 1).reshape(-1).tolist())
        slot_size = torch.cat(parts[0::2])
        # each source's bags and ids come grouped by table: cut them into (source, table) runs and
        # gather each table's runs, rather than a table id per id and a mask per table
        slots_st = bags_from.reshape(-1)  # [world * n_tables] bags per (source, table)
        slot_bounds = torch.cat([slots_st.new_zeros(1), slots_st.cumsum(0)])
        id_bounds = torch.cat([slot_size.new_zeros(1, dtype=torch.long), slot_size.long().cumsum(0)])
        ids_st = (id_bounds[slot_bounds[1:]] - id_bounds[slot_bounds[:-1]]).tolist()
        slot_runs = slot_size.split(slots_st.tolist())
        id_runs = [run for s in range(world) for run in parts[2 * s + 1].split(ids_st[s * n_tables:(s + 1) * n_tables])]
        slot_starts = slot_bounds.tolist()
        table_rows, table_offsets, slots = [], [], []
        for t in range(n_tables):  # every table, even with no ids: the backward all-to-all needs the graph
            runs = [s * n_tables + t for s in range(world)]
            sizes = _cat([slot_runs[r] for r in runs])
            table_rows.append(_cat([id_runs[r] for r in runs]))
            table_offsets.append((sizes.cumsum(0) - sizes).to(message.dtype))
            slots.append(_cat([torch.arange(slot_starts[r], slot_starts[r + 1], device=row.device) for r in runs]))
        table_major = torch.cat(slots)
        # back to slot order after the per-table sums (not needed from one source)
        order = torch.argsort(table_major) if bool((table_major[1:] < table_major[:-1]).any()) else None
        if sent_bag.numel() == n_bags and bool((sent_bag == torch.arange(n_bags, device=row.device)).all()):
            sent_bag = None  # every bag from one owner, in order (e.g. unpooled rows grouped by owner already)
        return DistributedIds(table_rows, table_offsets, order, bags_to.sum(1).tolist(), bags_per_source.tolist(),
                              sent_bag, n_bags)

    def _lookup(self, d: DistributedIds) -> dict[str, torch.Tensor]:
        """The second half of a lookup: the owner's per-bag sums (autograd into the shards), one
        all-to-all back, and the requester adds up each bag's vectors."""
        sums = []
        for t, key in enumerate(self.keys):
            if self.fused_lr is not None:
                sums.append(_FusedSGDBagSum.apply(d.rows[t], d.offsets[t], self.shards[key], self.fused_lr,
                                                   self.fused_update == "compiled"))
            else:
                sums.append(F.embedding_bag(d.rows[t], self.shards[key], d.offsets[t], mode="sum", sparse=self.sparse_grad))
        owner_sums = _cat(sums)
        if d.order is not None:
            owner_sums = owner_sums.index_select(0, d.order)
        # back on the requester: one vector per bag per owner, added up
        got = self._all_to_all(owner_sums, d.bags_to_owner, d.bags_from_source)
        pooled = got if d.sent_bag is None else got.new_zeros(d.n_bags, self.dim).index_add(0, d.sent_bag, got)
        if d.pooling == "mean":
            pooled = pooled / d.bag_lengths.clamp(min=1).unsqueeze(1).to(pooled.dtype)
        return dict(zip(self.keys, pooled.split(d.split_sizes)))

    def _all_to_all(self, tensor: torch.Tensor, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
        return tensor if self.world == 1 else _AllToAll.apply(tensor, output_splits, input_splits, self.group, self.transport)
