"""Multi-process scenarios for test_distributed.py, run as a script:

    python dist_worker.py SCENARIO WORLD PORT OUT_DIR
Each rank runs the scenario under gloo; rank 0 writes OUT_DIR/result.pt (tensors/ints only).
"""

import contextlib
import datetime
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from freescale import (
    BatchBalancer,
    BubbleMeter,
    CommScheduler,
    CostModel,
    KeyedJagged,
    ShardedEmbeddings,
    TrainPipeline,
    simulate,
)
from freescale.embeddings import initial_rows
from gpukernels_common.distributed import destroy_process_group


def global_batch(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths_a = torch.randint(0, 9, (n,), generator=g)
    lengths_b = torch.randint(1, 4, (n,), generator=g)
    a = [torch.randint(0, 50, (int(x),), generator=g) for x in lengths_a]
    b = [torch.randint(0, 30, (int(x),), generator=g) for x in lengths_b]
    dense = torch.randn(n, 3, generator=g)
    return a, b, dense


def local_slice(world, rank, n):
    sizes = [n // world + (1 if r < n % world else 0) for r in range(world)]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def sample_loss(weight, a_vals, dense_row):
    return (weight[a_vals].sum(0) * dense_row).sum() ** 2 if a_vals.numel() else (dense_row.sum() * 0.0)


def scenario_balance(rank, world):
    # one balancer, three steps: a plan from cost lengths (the exchange all-to-alls the lengths),
    # then from the features (per-key lengths gathered: no lengths all-to-all), then a larger
    # global batch (the gather's padding bound grows)
    bal = BatchBalancer(cost_model=CostModel(a=1.0, b=1.0), method="kk_equal")
    out = {}
    for name, n, from_features in (("lengths", 23, False), ("features", 23, True), ("grown", 31, True)):
        a, b, dense = global_batch(n)
        lo, hi = local_slice(world, rank, n)
        feats = KeyedJagged.from_dict({"a": a[lo:hi], "b": b[lo:hi]})
        ids = torch.arange(lo, hi)
        plan = bal.plan_async(feats if from_features else feats.sample_lengths()).result()
        assert (plan.key_lengths is not None) == from_features
        if from_features:  # features other than those planned are refused before any collective
            try:
                bal.exchange(plan, KeyedJagged.from_dict({"a": b[lo:hi], "b": a[lo:hi]}))
                raise AssertionError("exchange accepted features the plan was not made from")
            except ValueError as err:
                assert "differ from those the plan was made from" in str(err), err
        # dense tensors of any dtypes travel with the values (1-D, 2-D, 3-D, int64, bool, empty rows)
        new, moved = bal.exchange(plan, feats, {"id": ids, "dense": dense[lo:hi], "label": dense[lo:hi, 0],
                                                "pair": dense[lo:hi, :2].reshape(-1, 1, 2), "odd": ids % 2 == 1,
                                                "none": dense[lo:hi, :0]})
        assert list(moved) == ["id", "dense", "label", "pair", "odd", "none"]
        assert moved["odd"].dtype == torch.bool and moved["none"].shape == (moved["id"].numel(), 0)
        # content check: every received sample equals the original with that id
        for j, gid in enumerate(moved["id"].tolist()):
            assert torch.equal(new.permute(torch.tensor([j]))["a"][0], a[gid])
            assert torch.equal(new.permute(torch.tensor([j]))["b"][0], b[gid])
            assert torch.equal(moved["dense"][j], dense[gid]) and bool(moved["odd"][j]) == (gid % 2 == 1)
            assert torch.equal(moved["label"][j], dense[gid, 0]) and torch.equal(moved["pair"][j], dense[gid, :2].reshape(1, 2))
        all_ids = [None] * world
        dist.all_gather_object(all_ids, moved["id"].tolist())
        # gradients with balancing equal the unbalanced ones (global-count normalisation, SUM all-reduce)
        torch.manual_seed(0)
        weight = torch.randn(50, 3, requires_grad=True)

        def grads(feats_, dense_):
            weight.grad = None
            vals, lengths = feats_["a"]
            chunks = torch.split(vals, lengths.tolist())
            loss = sum(sample_loss(weight, c, d) for c, d in zip(chunks, dense_)) / n
            loss.backward()
            g = weight.grad.clone()
            dist.all_reduce(g)
            return g

        out[name] = {"ids": torch.tensor(sorted(sum(all_ids, []))), "g_bal": grads(new, moved["dense"]),
                     "g_naive": grads(feats, dense[lo:hi]), "bubble_before": torch.tensor(plan.report()["bubble_before"]),
                     "bubble_after": torch.tensor(plan.report()["bubble_after"])}
    # min_gain: a gain below it keeps every sample in place, with no collective; above it, the samples move
    a, b, dense = global_batch(23)
    lo, hi = local_slice(world, rank, 23)
    feats = KeyedJagged.from_dict({"a": a[lo:hi], "b": b[lo:hi]})
    for min_gain in (0.99, 0.01):
        keeper = BatchBalancer(cost_model=CostModel(a=1.0, b=1.0), method="kk_equal", background=False, min_gain=min_gain)
        plan = keeper.plan(feats)
        new, moved = keeper.exchange(plan, feats, {"id": torch.arange(lo, hi)})
        out[f"min_gain {min_gain}"] = {"kept": torch.tensor(plan.partition.method == "kept"), "same": torch.tensor(new is feats),
                                       "ids": moved["id"], "local": torch.arange(lo, hi),
                                       "bubble_before": torch.tensor(plan.report()["bubble_before"]),
                                       "bubble_after": torch.tensor(plan.report()["bubble_after"])}
    return out


def scenario_tiny(rank, world):
    """Global batches smaller than the world (a final partial batch), and an empty one: ranks
    may receive no sample; every sample still arrives once, with its dense rows."""
    a, _, dense = global_batch(5)
    out = {}
    for n in (1, world - 1, 0):
        lo, hi = local_slice(world, rank, n)
        feats = KeyedJagged.from_dict({"a": a[lo:hi]})
        for mode in ("report", "split"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a lone sample exceeds the fair share: the warning is expected
                bal = BatchBalancer(cost_model=CostModel(a=1.0, b=1.0), long_sequences=mode)
                new, moved, plan = bal.balance(feats, {"id": torch.arange(lo, hi), "dense": dense[lo:hi]})
                async_plan = bal.plan_async(feats).result(timeout=30)  # the background gather too
            assert async_plan.global_batch == plan.global_batch == n
            assert plan.report()["counts_after"] is not None  # the report of a tiny or empty batch
            vals, lengths = new["a"]
            got = plan.received()
            for j, gid in enumerate(moved["id"].tolist()):
                assert torch.equal(vals[int(lengths[:j].sum()) : int(lengths[: j + 1].sum())],
                                   a[gid][int(got.start[j]) : int(got.stop[j])])
                assert torch.equal(moved["dense"][j], dense[gid])
            ids = [None] * world
            dist.all_gather_object(ids, sorted(set(moved["id"].tolist())))
            out[f"{n} {mode}"] = sorted({i for r in ids for i in r})  # split: a sample's pieces on several ranks
    return out


def scenario_schema(rank, world):
    """Ranks that differ in values dtype, dense dtype or dense trailing shape: a rank without
    samples (a final partial batch; `from_dict({"a": []})` is int64, `torch.tensor([])` float32,
    `torch.zeros(0)` 1-D) adopts what the others send, through every path (balance, balance_async,
    a plan from cost lengths, a plan without the dense tensors); ranks with samples that disagree
    get a ValueError, every one of them. Rank 0 gets every rank's outcome."""
    n = 4
    values = [torch.arange(i + 1, dtype=torch.int32) + 10 * i for i in range(n)]
    x = torch.arange(3.0 * n).view(n, 3)
    if rank == 0:
        feats = KeyedJagged.from_dict({"a": values})
        dense = {"target": torch.arange(n), "x": x}
    else:
        feats = KeyedJagged.from_dict({"a": []})
        dense = {"target": torch.tensor([]), "x": torch.zeros(0)}
    cost = CostModel(a=1.0, b=1.0)
    bal = BatchBalancer(cost_model=cost)
    outcome = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = {"balance": lambda: bal.balance(feats, dense)[:2],
                 "balance_async": lambda: bal.balance_async(feats, dense).result(timeout=30)[:2],
                 "from lengths": lambda: bal.exchange(bal.plan(feats.sample_lengths()), feats, dense),
                 "plan without dense": lambda: bal.exchange(bal.plan(feats), feats, dense)}
        for name, run_path in paths.items():
            new, moved = run_path()
            assert new.values.dtype == torch.int32, (name, new.values.dtype)
            assert moved["target"].dtype == torch.int64 and moved["x"].shape == (moved["target"].numel(), 3), name
            for j, gid in enumerate(moved["target"].tolist()):
                assert torch.equal(new.permute([j])["a"][0], values[gid]), (name, j)
                assert torch.equal(moved["x"][j], x[gid]), (name, j)
            got = [None] * world
            dist.all_gather_object(got, moved["target"].tolist())
            assert sorted(sum(got, [])) == list(range(n)), (name, got)
            outcome[name] = moved["target"].numel()
        # ranks with samples that disagree: a clear error on every rank, and the group still works
        mine = KeyedJagged.from_dict({"a": values[:2]}, dtype=torch.int32 if rank == 0 else torch.int64)
        wide = {"x": torch.zeros(2, 3 + rank)}
        # the same keys in another order on rank 1: moved samples would get their keys' values swapped
        two = {"a": values[:2], "b": values[2:4]}
        swapped = KeyedJagged.from_dict(two if rank == 0 else dict(reversed(two.items())))
        for name, run_path in {"values dtype": lambda: bal.balance(mine, {}),
                               "key order": lambda: bal.balance(swapped, {}),
                               "key order from lengths": lambda: bal.exchange(bal.plan(swapped.sample_lengths()), swapped, {}),
                               "values dtype async": lambda: bal.balance_async(mine, {}).result(timeout=30),
                               "dense shape": lambda: bal.balance(KeyedJagged.from_dict({"a": values[:2]}), wide),
                               "dense shape from lengths": lambda: bal.exchange(bal.plan(torch.tensor([3, 1])),
                                                                                KeyedJagged.from_dict({"a": values[:2]}), wide)}.items():
            try:
                run_path()
                outcome[name] = "no error"
            except ValueError as err:
                outcome[name] = str(err)
        new, moved = bal.balance(feats, dense)[:2]  # still in step
        outcome["after"] = moved["target"].numel()
    every = [None] * world
    dist.all_gather_object(every, outcome)
    return {"outcomes": every}


def scenario_balance_gathers_once(rank, world):
    """balance(features, dense) agrees on the dense tensors in the plan's all-gather, as documented:
    it planned without them and the exchange all-gathered a second time, every step."""
    bal = BatchBalancer(cost_model=CostModel(a=1.0, b=1.0), background=False)
    a, b, dense = global_batch(12)
    lo, hi = local_slice(world, rank, 12)
    feats = KeyedJagged.from_dict({"a": a[lo:hi], "b": b[lo:hi]})
    gather, calls = dist.all_gather, []
    dist.all_gather = lambda *args, **kwargs: calls.append(1) or gather(*args, **kwargs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bal.balance(feats, {"x": dense[lo:hi]})  # the first gather grows its padding bound: a second one
            counts = {}
            for name, given in (("dense", {"x": dense[lo:hi]}), ("none", None)):
                calls.clear()
                _, moved, plan = bal.balance(feats, given)
                counts[name] = (len(calls), plan.partition.method != "kept")
    finally:
        dist.all_gather = gather
    return counts


def scenario_cut_plans_never_worse(rank, world):
    """Cutting a sample only just over the fair share: split's pieces recompute context and cost
    more than the whole, and both landed on one rank (max load 40 -> 50). A cut plan that is no
    better than the batch as it stands keeps every sample, whole, in place."""
    lens = [0, 0, 20] if rank == 0 else [0, 0, 1, 6, 0, 0, 16]
    feats = KeyedJagged.from_dict({"items": [torch.arange(n) + 100 * rank for n in lens]})
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in ("split", "cap"):
            for method in ("kk_equal", "contiguous"):
                bal = BatchBalancer(cost_model=CostModel(1.0, 0.05), method=method, long_sequences=mode)
                plan = bal.plan(feats)
                new, _ = bal.exchange(plan, feats)
                report = plan.report()
                out[f"{mode} {method}"] = (report["max_load_before"], report["max_load_after"], plan.partition.method,
                                           torch.equal(new.values, feats.values))
    return {"rank": rank, "plans": out}


def scenario_cost_lengths(rank, world):
    """Two keys aligned on rank 0 (history 50, query 50) but not on rank 1 (50 and 49): every
    rank must cost the samples alike (total ids, since not every sample is aligned)."""
    query = 50 if rank == 0 else 49
    feats = KeyedJagged.from_dict({"history": [torch.zeros(50, dtype=torch.long)], "query": [torch.zeros(query, dtype=torch.long)]})
    bal = BatchBalancer(cost_model=CostModel(a=1.0))
    plans = {"plan": bal.plan(feats), "plan_async": bal.plan_async(feats).result(timeout=30)}
    every = [None] * world
    dist.all_gather_object(every, {k: p.lengths.tolist() for k, p in plans.items()})
    return {"lengths": every}


def scenario_group_timeout(rank, world):
    """The balancer's and the pipeline's background gloo groups take the timeout of the group
    they serve (here a 2 s group; they had torch's 30 min default): a rank that never joins the
    background gather fails it within about that."""
    from freescale.balance import group_timeout

    short = dist.new_group(timeout=datetime.timedelta(seconds=2))
    bal = BatchBalancer(process_group=short)
    emb = ShardedEmbeddings(EMBEDDING_TABLES, dim=EMBEDDING_DIM, process_group=short)
    pipe = TrainPipeline(lambda *a: None, embeddings=emb)
    plain = TrainPipeline(lambda *a: None, process_group=short)
    seconds = {"balancer": group_timeout(bal._gather_group).total_seconds(),
               "pipeline": group_timeout(pipe._groups[0]).total_seconds(),
               "count": group_timeout(plain._count_group).total_seconds(),
               "explicit": group_timeout(BatchBalancer(timeout=3)._gather_group).total_seconds()}
    if rank == 1:
        time.sleep(7)  # alive, but never joins the gather
        os._exit(0)
    start = time.perf_counter()
    try:
        bal.plan_async(KeyedJagged.from_dict({"a": [torch.arange(3)]})).result(timeout=60)
        error = "no error"
    except RuntimeError as err:
        error = str(err)
    return {"seconds": seconds, "error": error, "waited": time.perf_counter() - start}


def scenario_cost_lengths_mismatch(rank, world):
    """long_sequences cap/split with a plan made from cost lengths that are not the features' own
    (rank 0's 100-long history planned as 50): the exchange cut the real features with the plan's
    windows, silently (cap kept positions 40-49 instead of 90-99). Now every rank gets the same
    ValueError, though only rank 0's lengths differ; a plan from the right lengths still works."""
    lens = [[100, 2], [3, 4], [5]][rank]
    feats = KeyedJagged.from_dict({"h": [torch.arange(n) for n in lens], "t": [torch.arange(n) + 1 for n in lens]})
    out = {}
    for mode in ("cap", "split"):
        bal = BatchBalancer(cost_model=CostModel(a=1.0, b=1.0), long_sequences=mode, background=False)
        true = bal.lengths_of(feats)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cap drops most positions of this batch: said elsewhere
            for name, dense in (("no dense", None), ("dense", {"id": torch.arange(len(lens))})):
                try:
                    bal.exchange(bal.plan(true.clamp_max(50)), feats, dense)
                    out[f"{mode} {name}"] = "no error"
                except ValueError as err:
                    out[f"{mode} {name}"] = str(err)
            new, _ = bal.exchange(bal.plan(true), feats)  # still in step, and the right lengths pass
        out[f"{mode} ok"] = new.batch_size
    every = [None] * world
    dist.all_gather_object(every, out)
    return {"outcomes": every}


def scenario_one_rank_input(rank, world):
    """Plans made from the features and dense tensors (the exchange gathers nothing): input that does
    not fit the plan on the last rank only. It raised there alone while the others waited in the
    all-to-all until the group's timeout; now every rank raises a ValueError naming that rank, and
    the ranks stay in step (the next exchange moves every sample)."""
    n, last = 17, rank == world - 1
    a, b, dense = global_batch(n)
    lo, hi = local_slice(world, rank, n)
    lens = [60 if i == 0 else 1 + i % 5 for i in range(n)]  # one history to split
    seqs = [torch.arange(x) + 1000 * i for i, x in enumerate(lens)]
    cases = {"report": KeyedJagged.from_dict({"a": a[lo:hi], "b": b[lo:hi]}),
             "split": KeyedJagged.from_dict({"h": seqs[lo:hi], "t": [x + 1 for x in seqs[lo:hi]]})}
    out = {}
    for mode, feats in cases.items():
        bal = BatchBalancer(cost_model=CostModel(a=1.0, b=1.0), long_sequences=mode, split_context=4, background=False)
        good = {"id": torch.arange(lo, hi), "x": dense[lo:hi]}
        wrong = {"samples": (feats.permute(torch.arange(feats.batch_size - 1)), {k: v[:-1] for k, v in good.items()}),
                 "dtype": (feats, {"id": good["id"], "x": good["x"].double()}),
                 "keys": (feats, {"id": good["id"]})}
        for case, (bad_feats, bad_dense) in wrong.items():
            plan = bal.plan(feats, good)
            assert plan.partition.method != "kept" and (plan.windows is not None) == (mode == "split")
            try:
                bal.exchange(plan, bad_feats if last else feats, bad_dense if last else good)
                out[f"{mode} {case}"] = "no error"
            except ValueError as err:
                out[f"{mode} {case}"] = str(err)
        plan = bal.plan(feats, good)
        new, moved = bal.exchange(plan, feats, good)
        got = [None] * world
        dist.all_gather_object(got, moved["id"].tolist())
        out[f"{mode} after"] = sorted(set(sum(got, [])))
        key = "a" if mode == "report" else "h"
        values, lengths = new[key]
        out[f"{mode} rows ok"] = all(torch.equal(moved["x"][j], dense[g]) for j, g in enumerate(moved["id"].tolist()))
        if mode == "report":
            out[f"{mode} rows ok"] &= all(torch.equal(v, a[g]) for v, g in zip(values.split(lengths.tolist()), moved["id"].tolist()))
    every = [None] * world
    dist.all_gather_object(every, out)
    return {"outcomes": every}


def scenario_pipeline_plan(rank, world):
    """TrainPipeline with a split balancer: a step_fn with a `plan` parameter gets the plan of the
    batch it trains (pipeline.last_plan is the same object), whose received windows, loss mask
    and global_positions are what a split step needs; a three-parameter step_fn is called as before."""
    per_rank = {2: [[2, 3, 7], [120, 1, 4]], 3: [[2, 3], [120, 1, 4], []]}[world]  # one history to split
    lens, first = per_rank[rank], sum(len(x) for x in per_rank[:rank])
    batches = []
    for step in range(3):
        h = [torch.arange(n + step) + 1000 * (first + i) for i, n in enumerate(lens)]  # value: (sample, position)
        batches.append((KeyedJagged.from_dict({"h": h, "n": [x + 1 for x in h]}), {"uid": torch.arange(first, first + len(h))}))
    bal = BatchBalancer(cost_model=CostModel(a=1.0, b=1.0), long_sequences="split", split_context=4)
    pipe = None
    seen = []

    def step(feats, dense, global_batch, plan):
        got = plan.received()
        items, lengths = feats["h"]
        assert pipe.last_plan is plan
        assert torch.equal(lengths, got.lengths) and torch.equal(dense["uid"], got.source)
        for j, seq in enumerate(items.split(lengths.tolist())):  # every piece is its windows' positions
            assert torch.equal(seq, torch.arange(int(got.start[j]), int(got.stop[j])) + 1000 * int(got.source[j]))
        mask = got.loss_mask()
        assert mask.numel() == items.numel()
        seen.append([int(mask.sum()), plan.global_positions, global_batch, bool(got.trailing.any())])

    pipe = TrainPipeline(step, balancer=bal)
    pipe.run(iter(batches))
    old_style = []
    TrainPipeline(lambda f, d, g: old_style.append(g), balancer=bal).run(iter(batches[:1]))
    every = [None] * world
    dist.all_gather_object(every, seen)
    return {"seen": every, "old_style": old_style}


def long_batch(seed=1):
    """Ten histories, one far longer than the rest: alone it costs more than a rank's fair share."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (10,), generator=g)
    lengths[3] = 40
    items = [torch.randint(0, 50, (int(n),), generator=g) for n in lengths]
    targets = [torch.randint(0, 5, (int(n),), generator=g) for n in lengths]
    return items, targets, torch.randn(10, 3, generator=g)


LONG_COST, LONG_CONTEXT, LONG_FIELD = CostModel(a=1.0, b=1.0), 4, 5  # receptive field <= context + 1


def windowed_loss(weight, items, targets, dense, mask, lengths):
    """Per-position loss whose output at position t reads positions t-4..t only (a receptive field
    that fits the split context): summed over the positions in `mask`."""
    loss = weight.sum() * 0.0
    offsets = [0] + torch.cumsum(lengths, 0).tolist()
    for i in range(lengths.numel()):
        seq, tgt, keep = items[offsets[i]:offsets[i + 1]], targets[offsets[i]:offsets[i + 1]], mask[offsets[i]:offsets[i + 1]]
        for t in keep.nonzero().reshape(-1).tolist():
            h = weight[seq[max(0, t - LONG_FIELD + 1) : t + 1]].sum(0)
            loss = loss + ((h * dense[i]).sum() - tgt[t]) ** 2
    return loss


def scenario_long_sequences(rank, world):
    items, targets, dense = long_batch()
    n = len(items)
    lo, hi = local_slice(world, rank, n)
    feats = KeyedJagged.from_dict({"item": items[lo:hi], "target": targets[lo:hi]})
    out = {}
    for mode in ("report", "cap", "split"):
        bal = BatchBalancer(cost_model=LONG_COST, method="lpt_equal", long_sequences=mode, split_context=LONG_CONTEXT)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            new, moved, plan = bal.balance(feats, {"id": torch.arange(lo, hi), "dense": dense[lo:hi]})
            bal.plan(bal.lengths_of(feats))  # a second step warns no more
        got = plan.received()
        assert torch.equal(got.source, moved["id"]), (got.source, moved["id"])
        vals, lengths = new["item"]
        chunks = torch.split(vals, lengths.tolist())
        for j, src in enumerate(got.source.tolist()):  # every received window is its source's positions
            assert torch.equal(chunks[j], items[src][int(got.start[j]) : int(got.stop[j])])
            assert torch.equal(moved["dense"][j], dense[src])
            assert int(got.trailing[j]) == items[src].numel() - int(got.stop[j])
        loads = [None] * world
        dist.all_gather_object(loads, float(LONG_COST(lengths).sum()))
        rep = plan.report()
        out[mode] = {"max_rank_cost": torch.tensor(max(loads)), "floor_cost": torch.tensor(rep["floor_cost"]),
                     "fair_share": torch.tensor(rep["fair_share"]), "oversized": torch.tensor(rep["oversized_samples"]),
                     "max_load_after": torch.tensor(rep["max_load_after"]), "positions": torch.tensor(plan.global_positions),
                     "bubble_floor": torch.tensor(rep["bubble_floor"]), "bubble_after": torch.tensor(rep["bubble_after"]),
                     "warnings": torch.tensor(sum("fair share" in str(w.message) for w in caught)),
                     "drop_warnings": torch.tensor(sum("positions" in str(w.message) for w in caught)),
                     "dropped": torch.tensor(rep["positions_dropped"]), "dropped_frac": torch.tensor(rep["positions_dropped_frac"])}
        if mode == "split":
            torch.manual_seed(0)
            weight = torch.randn(50, 3, requires_grad=True)
            loss = windowed_loss(weight, vals, new["target"][0].float(), moved["dense"], got.loss_mask(), lengths)
            loss = loss / plan.global_positions
            loss.backward()
            grad, total = weight.grad.clone(), loss.detach().clone()
            dist.all_reduce(grad)
            dist.all_reduce(total)
            out[mode].update(grad=grad, loss=total)
    return out


EMBEDDING_TABLES, EMBEDDING_DIM = {"a": 50, "b": 30}, 4
POOLINGS = ("sum", "mean", "none")


def embedding_batch(world, idle_rank):
    """The global batch of `global_batch`; with `idle_rank`, that rank's samples have no ids at all."""
    a, b, dense = global_batch()
    if idle_rank is not None:
        lo, hi = local_slice(world, idle_rank, len(a))
        a[lo:hi] = [t[:0] for t in a[lo:hi]]
        b[lo:hi] = [t[:0] for t in b[lo:hi]]
    return {"a": a, "b": b}, dense


def embedding_loss_weights(key, pooling):
    """Fixed random weights for the output rows of the whole batch (more than it has), so the loss
    tells rows apart; always drawn whole (a prefix of a longer draw differs)."""
    return torch.randn(256, EMBEDDING_DIM, generator=torch.Generator().manual_seed(sum(map(ord, key)) * 7 + POOLINGS.index(pooling)))


def embedding_loss(outputs, pooling, first_row):
    """sum over keys of (output * weights)^2; `first_row[key]`: this rank's first row in the global batch."""
    return sum((out * embedding_loss_weights(key, pooling)[first_row[key] : first_row[key] + out.shape[0]]).pow(2).sum()
               for key, out in outputs.items())


FUSED_LR = 0.25


def scenario_embeddings(rank, world):
    """Every sharding x pooling, with ids on every rank and with the last rank holding none; rank 0
    gets the outputs, full tables and full gradients."""
    out = {}
    for idle_rank in (None, world - 1):
        seqs, _ = embedding_batch(world, idle_rank)
        lo, hi = local_slice(world, rank, len(seqs["a"]))
        feats = KeyedJagged.from_dict({k: v[lo:hi] for k, v in seqs.items()})
        for sharding in ("row", "table"):
            for pooling in POOLINGS:
                first_row = {k: (lo if pooling != "none" else sum(t.numel() for t in v[:lo])) for k, v in seqs.items()}
                seen = {}
                for transport in ("collective", "copy_engine"):  # the rows through all-to-all, or pulled by copies
                    emb = ShardedEmbeddings(EMBEDDING_TABLES, dim=EMBEDDING_DIM, sharding=sharding, init_seed=3, transport=transport)
                    outputs = emb(feats, pooling=pooling)
                    embedding_loss(outputs, pooling, first_row).backward()
                    grads = {}
                    for k in emb.keys:
                        parts = [None] * world
                        g = emb.shards[k].grad if emb.shards[k].grad is not None else torch.zeros_like(emb.shards[k])
                        dist.all_gather_object(parts, (emb._row_start[k], g))
                        grads[k] = torch.cat([p for _, p in sorted(parts, key=lambda x: x[0]) if p.numel()])
                    got = [None] * world
                    dist.all_gather_object(got, {k: v.detach() for k, v in outputs.items()})
                    seen[transport] = (got, grads)
                got, grads = seen["collective"]
                copied, copied_grads = seen["copy_engine"]
                # the same step with SGD fused into the backward: the tables come out updated
                fused = ShardedEmbeddings(EMBEDDING_TABLES, dim=EMBEDDING_DIM, sharding=sharding, init_seed=3, fused_lr=FUSED_LR)
                embedding_loss(fused(feats, pooling=pooling), pooling, first_row).backward()
                assert all(p.grad is None for p in fused.shards.values())
                out[f"{idle_rank}/{sharding}/{pooling}"] = {
                    "full": {k: emb.full_weight(k) for k in emb.keys}, "grads": grads,
                    "fused_updated": {k: fused.full_weight(k) for k in emb.keys},
                    "outputs": {k: torch.cat([g[k] for g in got]) for k in emb.keys},
                    "copy_engine_outputs": {k: torch.cat([g[k] for g in copied]) for k in emb.keys},
                    "copy_engine_grads": copied_grads}
    return out


def scenario_empty_table(rank, world):
    """A table of 0 rows (the constructor takes it) beside a table smaller than the world:
    `full_weight` of each, table-wise and row-wise."""
    out = {}
    for sharding in ("row", "table"):
        emb = ShardedEmbeddings({"small": 1, "empty": 0}, dim=3, sharding=sharding)
        for key in emb.keys:
            try:
                out[f"{sharding}/{key}"] = emb.full_weight(key)
            except Exception as err:  # noqa: BLE001 (reported to the test)
                out[f"{sharding}/{key}"] = f"{type(err).__name__}: {err}"
    return out


def scenario_bad_ids(rank, world):
    """Invalid input to ShardedEmbeddings on one rank only (ids out of a table's range, float ids, a
    missing key), on a group with a 300 s timeout: the rank raised alone and the others waited in
    the counts all-to-all until that timeout. Every rank must raise in the same step, within
    seconds, and the ranks stay in step (a good lookup follows)."""
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=300))
    g = torch.Generator().manual_seed(rank)
    good = KeyedJagged.from_dict({"a": [torch.randint(0, 20, (3,), generator=g), torch.tensor([], dtype=torch.long)],
                                  "b": [torch.randint(0, 30, (2,), generator=g), torch.randint(0, 30, (1,), generator=g)]})
    wrong = {"range": KeyedJagged.from_dict({"a": [torch.tensor([1, 25]), torch.tensor([3])], "b": [[2], [4]]}),
             "dtype": KeyedJagged.from_dict({"a": [torch.tensor([1.0]), torch.tensor([3.0])], "b": [[2.0], [4.0]]}),
             "key": KeyedJagged.from_dict({"a": [[1], [3]], "c": [[2], [4]]})}
    out = {}
    for sharding in ("row", "table"):
        emb = ShardedEmbeddings({"a": 20, "b": 30}, dim=4, sharding=sharding, process_group=group)
        for case, bad_feats in wrong.items():
            for bad in range(world):
                start = time.perf_counter()
                try:
                    emb(bad_feats if rank == bad else good, pooling="sum")
                    outcome = "no error"
                except Exception as err:  # noqa: BLE001 (the class is part of the outcome)
                    outcome = f"{type(err).__name__}: {err.args[0] if err.args else err}"  # a KeyError's str() quotes
                out[f"{sharding} {case} {bad}"] = (outcome, time.perf_counter() - start)
                # as a training loop's error handling would: no rank takes the next step before every
                # rank is out of this one (the old code's waiting rank never got out: this barrier timed out)
                dist.barrier()
                looked_up = emb(good, pooling="sum")  # still in step
                out[f"{sharding} {case} {bad} after"] = [tuple(v.shape) for v in looked_up.values()]
    every = [None] * world
    dist.all_gather_object(every, out)
    return {"outcomes": every}


def _attempt(call):
    """(outcome, seconds) of `call()`: "ok: ..." or "ErrorClass: message"."""
    start = time.perf_counter()
    try:
        outcome = f"ok: {call()}"
    except Exception as err:  # noqa: BLE001 (the class is part of the outcome)
        outcome = f"{type(err).__name__}: {err}"
    return outcome, time.perf_counter() - start


def scenario_rank_errors(rank, world):
    """Bad input to a BatchBalancer call on rank 1 only, each case on a fresh group with a 10 s
    timeout (a timed-out gloo group stays broken): that rank raised alone before the call's
    collective and the other waited in it until the timeout. Every rank must raise in the same
    call, within seconds, and a good call on the same group must follow."""
    bad = rank == 1
    a, b, dense = global_batch(12)
    lo, hi = local_slice(world, rank, 12)
    feats = KeyedJagged.from_dict({"a": a[lo:hi], "b": b[lo:hi]})
    three = KeyedJagged.from_dict({"a": a[lo:hi], "b": b[lo:hi], "c": b[lo:hi]})
    good_dense = {"x": dense[lo:hi]}
    n = hi - lo
    nan_lengths = torch.tensor([3.0, float("nan")] + [1.0] * (n - 2))

    def exchange(plan_dense, features, dense_):  # a plan the others' exchange needs no gather for, or one it does
        return lambda fg: fg.exchange(fg.plan(feats, good_dense) if plan_dense else fg.plan(feats.sample_lengths()),
                                      features, dense_)[0].batch_size

    cases = {  # name: call(foreground balancer, background balancer), with rank 1's input bad
        "plan nan": lambda fg, bg: fg.plan(nan_lengths if bad else feats.sample_lengths()).global_batch,
        "plan 2-d": lambda fg, bg: fg.plan(feats.sample_lengths().view(-1, 1) if bad else feats.sample_lengths()).global_batch,
        "plan str": lambda fg, bg: fg.plan("lengths" if bad else feats.sample_lengths()).global_batch,
        "plan dense": lambda fg, bg: fg.plan(feats, dense[lo:hi] if bad else good_dense).global_batch,
        "plan keys": lambda fg, bg: fg.plan(three if bad else feats).global_batch,
        "plan kinds": lambda fg, bg: fg.plan(feats.sample_lengths() if bad else feats).global_batch,
        "plan_async nan": lambda fg, bg: bg.plan_async(nan_lengths if bad else feats.sample_lengths()).result(timeout=60).global_batch,
        "plan_async dense": lambda fg, bg: bg.plan_async(feats, {"x": [1]} if bad else good_dense).result(timeout=60).global_batch,
        "balance features": lambda fg, bg: fg.balance(feats.sample_lengths() if bad else feats)[2].global_batch,
        "balance dense": lambda fg, bg: fg.balance(feats, dense[lo:hi] if bad else good_dense)[2].global_batch,
        "balance_async features": lambda fg, bg: bg.balance_async([feats] if bad else feats).result(timeout=60)[2].global_batch,
        "balance_async dense": lambda fg, bg: bg.balance_async(feats, {"x": torch.tensor(1.0)} if bad else good_dense)
        .result(timeout=60)[2].global_batch,
        "exchange features": lambda fg, bg: exchange(False, feats.sample_lengths() if bad else feats, None)(fg),
        "exchange dense": lambda fg, bg: exchange(False, feats, dense[lo:hi] if bad else good_dense)(fg),
        "exchange planned features": lambda fg, bg: exchange(True, [feats] if bad else feats, good_dense)(fg),
        "exchange planned keys": lambda fg, bg: exchange(True, three if bad else feats, good_dense)(fg),
        # a balancer configured otherwise on rank 1 (another cost model): the partitions would differ
        "config": lambda fg, bg: BatchBalancer(fg.group, CostModel(a=1.0, b=2.0 if bad else 1.0), background=False)
        .plan(feats).global_batch,
    }
    out = {}
    for name, call in cases.items():
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=10))
        with BatchBalancer(group, CostModel(a=1.0, b=1.0), background=False) as fg, \
                BatchBalancer(group, CostModel(a=1.0, b=1.0)) as bg, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[name] = _attempt(lambda: call(fg, bg))
            # as a training loop's error handling would: no rank takes the next step before every
            # rank is out of this one (a rank left waiting in the collective never got out)
            dist.barrier()
            out[f"{name} after"] = _attempt(lambda: fg.balance(feats, good_dense)[2].global_batch)
    every = [None] * world
    dist.all_gather_object(every, out)
    return {"outcomes": every}


def scenario_pipeline_rank_errors(rank, world):
    """A batch that is not a (features, dense) pair on rank 1 only, in TrainPipeline with a
    balancer and without one (the global count's all-reduce), step_fn all-reducing on a group with
    a 10 s timeout: rank 1 raised when staging it, one step early, while rank 0 waited in its
    step's all-reduce. Every rank must raise when the batch is due, after the same steps."""
    a, b, dense = global_batch(12)
    lo, hi = local_slice(world, rank, 12)
    good = (KeyedJagged.from_dict({"a": a[lo:hi], "b": b[lo:hi]}), {"x": dense[lo:hi]})
    bad = good[0] if rank == 1 else good
    steps, groups = [], []

    def step(features, dense_, global_batch):
        total = torch.tensor([float(features.batch_size)])
        dist.all_reduce(total, group=groups[-1])  # as DDP's gradient all-reduce would
        steps.append(int(total))

    out = {}
    for name in ("balancer", "plain"):
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=10))  # a timed-out one stays broken
        groups.append(group)
        with contextlib.ExitStack() as stack:
            balancer = (stack.enter_context(BatchBalancer(group, CostModel(a=1.0, b=1.0), timeout=10))
                        if name == "balancer" else None)
            pipe = stack.enter_context(TrainPipeline(step, balancer, process_group=group, timeout=10))
            steps.clear()
            out[name] = _attempt(lambda: pipe.run([good, good, bad, good]))
            out[f"{name} steps"] = list(steps)
            dist.barrier()
            steps.clear()
            out[f"{name} after"] = _attempt(lambda: len(pipe.run([good, good])))
    # without a balancer, with embeddings, on the path a GPU device takes (no input-dist thread:
    # the ids are distributed in the step's thread): the count's flag is read before the ids of a
    # refused batch are distributed (they failed with the embeddings' own error first)
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=10))
    groups.append(group)
    emb = ShardedEmbeddings({"a": 50, "b": 30}, dim=2, process_group=group)  # global_batch's id ranges

    def lookup_step(features, dense_, global_batch):
        emb(features, "sum")
        step(features, dense_, global_batch)

    with TrainPipeline(lookup_step, None, embeddings=emb, process_group=group, timeout=10) as pipe:
        pipe._pool.shutdown()
        pipe._pool, pipe._groups = None, [None]  # what TrainPipeline(device="cuda", embeddings=...) has
        steps.clear()
        out["embeddings"] = _attempt(lambda: pipe.run([good, good, bad, good]))
        out["embeddings steps"] = list(steps)
    every = [None] * world
    dist.all_gather_object(every, out)
    return {"outcomes": every}


def scenario_close(rank, world):
    """close() of a BatchBalancer and of a TrainPipeline: the background plan in flight finishes
    (its future keeps its result), the background gloo groups are destroyed, and a batch the
    pipeline staged before its step raised, whose background id distribution failed (ids out of
    range on rank 1 only), is reported by close() on every rank rather than dropped."""
    def groups():
        return len(dist.distributed_c10d._world.pg_map)

    out, before = {}, groups()
    feats = KeyedJagged.from_dict({"a": [torch.arange(rank + 1)] * 3})
    balancer = BatchBalancer(cost_model=CostModel(a=1.0, b=1.0))
    made = groups()
    future = balancer.plan_async(feats)
    balancer.close()
    balancer.close()
    out["balancer"] = [made - before, groups() - before, future.done(), future.result().global_batch,
                       balancer.plan(feats).global_batch]
    emb = ShardedEmbeddings({"a": 10}, dim=2)

    def step(features, dense, global_batch):
        raise RuntimeError("step failed")

    bad = KeyedJagged.from_dict({"a": [torch.tensor([11 if rank == 1 else 1])]})
    with TrainPipeline(step, embeddings=emb, timeout=300) as pipe:  # a hang would outlast the test
        made = groups()
        try:
            pipe.run([(feats, {}), (bad, {})])
        except RuntimeError as err:
            out["run"] = str(err)
        try:
            pipe.close()
        except RuntimeError as err:
            out["close"] = f"{err} <- {type(err.__cause__).__name__}"
    out["pipeline groups"] = [made - before, groups() - before]
    return out


def scenario_transport(rank, world):
    """The copy-engine transport's pull protocol against all_to_all_single on raw tensors: random
    uneven splits with zeros (a rank sending nothing), 3-D float64 and 1-D int64 rows, nobody
    sending anything, and counts that contradict what the ranks send (an error on every rank)."""
    from freescale.transport import CollectiveTransport, CopyEngineTransport

    copy_engine, collective = CopyEngineTransport(), CollectiveTransport()
    g = torch.Generator().manual_seed(7)
    table = torch.randint(0, 4, (world, world), generator=g)  # rows rank r sends to rank j
    table[0] = 0  # rank 0 sends nothing
    sends, receives = table[rank].tolist(), table[:, rank].tolist()
    out = {}
    for name, tensor in (("float64 3-D", torch.randn(sum(sends), 3, 2, dtype=torch.float64) + rank),
                         ("int64", torch.arange(sum(sends)) + 100 * rank)):
        got = copy_engine.exchange(tensor, receives, sends, None)
        out[name] = torch.tensor(torch.equal(got, collective.exchange(tensor, receives, sends, None)) and got.shape[0] == sum(receives))
    nothing = copy_engine.exchange(torch.zeros(0, 5), [0] * world, [0] * world, None)
    out["nothing"] = torch.tensor(nothing.shape == (0, 5))
    try:
        copy_engine.exchange(torch.zeros(sum(sends), 2), [r + 1 for r in receives], sends, None)
        out["mismatch"] = "no error"
    except ValueError as err:
        out["mismatch"] = str(err)
    # wrong on the last rank only: it raised alone and the others hung in the staged all-gather
    # until the group's timeout; now every rank raises the same error
    wrong = [receives[0] + 1, *receives[1:]] if rank == world - 1 else receives
    try:
        copy_engine.exchange(torch.zeros(sum(sends), 2), wrong, sends, None)
        one = "no error"
    except (ValueError, RuntimeError) as err:
        one = f"{type(err).__name__}: {err}"
    out["one rank"] = [None] * world
    dist.all_gather_object(out["one rank"], one)
    out["receives"] = receives
    return out


def scenario_transport_cuda(rank, world):
    """On GPUs (NCCL, one GPU per rank): the copy-engine transport's symmetric-memory pulls
    against NCCL's all_to_all_single, fp32 and bf16 rows, twice (the buffer is reused)."""
    from freescale.transport import CollectiveTransport, CopyEngineTransport

    copy_engine, collective = CopyEngineTransport(), CollectiveTransport()
    g = torch.Generator().manual_seed(7)
    table = torch.randint(0, 300, (world, world), generator=g)
    sends, receives = table[rank].tolist(), table[:, rank].tolist()
    out = {}
    for step in range(2):
        for dtype in (torch.float32, torch.bfloat16):
            tensor = (torch.randn(sum(sends), 64, generator=g) + rank).to("cuda", dtype)
            got = copy_engine.exchange(tensor, receives, sends, None)
            want = collective.exchange(tensor, receives, sends, None)
            out[f"{step} {dtype}"] = torch.tensor(torch.equal(got, want))
    torch.cuda.synchronize()
    return out


def scenario_scheduler(rank, world):
    sched = CommScheduler(chunk_bytes=4096)
    big_in = torch.full((world * 4, 2048), float(rank))  # 32 KB per rank-slice: chunked
    big_out = torch.empty_like(big_in)
    small_in = torch.full((world,), float(rank + 10))
    small_out = torch.empty_like(small_in)
    f_big = sched.all_to_all(big_out, big_in, priority=5, name="background")
    f_small = sched.all_to_all(small_out, small_in, priority=0, name="urgent")
    grads = torch.arange(3000, dtype=torch.float32) * (rank + 1)  # 12 KB: three chunks
    f_reduce = sched.all_reduce(grads, priority=1, name="reduce")
    sched.flush()
    f_big.result(timeout=60)
    f_small.result(timeout=60)
    assert f_reduce.result(timeout=60) is grads
    # column slices as input and output, small enough to go as one op: as contiguous tensors would
    # (gloo wrote a strided output as if it were contiguous, and refused a strided input)
    wide_in = (torch.arange(world * 3 * 10, dtype=torch.float32).view(world * 3, 10) + 1000 * rank)
    wide_out = torch.full((world * 3, 9), -1.0)
    order = list(sched.completed)
    f_views = sched.all_to_all(wide_out[:, :6], wide_in[:, 2:8], name="views")
    sched.flush()
    f_views.result(timeout=60)
    want = torch.empty(world * 3, 6)
    dist.all_to_all_single(want, wide_in[:, 2:8].contiguous())
    assert torch.equal(wide_out[:, :6], want) and (wide_out[:, 6:] == -1).all(), (wide_out, want)
    sched.close()
    assert torch.equal(grads, torch.arange(3000, dtype=torch.float32) * sum(range(1, world + 1)))
    expect_big = torch.cat([torch.full((4, 2048), float(s)) for s in range(world)])
    assert torch.equal(big_out, expect_big)
    assert small_out.tolist() == [float(s + 10) for s in range(world)]
    return {"order": order}


def scenario_scheduler_uneven(rank, world, device="cpu"):
    """Uneven splits whose sizes differ a lot between ranks, larger than chunk_bytes on some
    ranks only (every rank must still issue the same chunks), then a 0-column all-to-all and a
    later op that must still line up; FIFO and preempt ordering."""
    out = {}
    for preempt in (False, True):
        sched = CommScheduler(chunk_bytes=1 << 12, preempt=preempt)
        rows = 200 if rank == 0 else 1  # rows this rank sends to each rank
        senders = [200 if r == 0 else 1 for r in range(world)]
        big_in = torch.full((rows * world, 16), float(rank), device=device)
        big_out = torch.empty(sum(senders), 16, device=device)
        f_big = sched.all_to_all(big_out, big_in, senders, [rows] * world, name="uneven")
        empty_out = torch.empty(sum(senders), 0, device=device)
        f_empty = sched.all_to_all(empty_out, torch.empty(rows * world, 0, device=device), senders, [rows] * world,
                                   name="no columns")
        sched.flush()
        tail = torch.full((3,), float(rank + 1), device=device)
        f_tail = sched.all_reduce(tail, name="tail")
        sched.flush()
        f_big.result(timeout=30)
        f_empty.result(timeout=30)
        f_tail.result(timeout=30)
        sched.close()
        expect = torch.cat([torch.full((n, 16), float(r)) for r, n in enumerate(senders)])
        out[f"preempt={preempt}"] = torch.tensor(torch.equal(big_out.cpu(), expect) and empty_out.shape == (sum(senders), 0)
                                                 and torch.equal(tail.cpu(), torch.full((3,), float(sum(range(1, world + 1))))))
    return out


def scenario_collectives_cuda(rank, world):
    """On GPUs (NCCL, one GPU per rank; NCCL takes CUDA tensors only): the balancer's gathers made
    on the host (a plan from the features, and the dense agreement of a plan without them), the
    scheduler's chunk and round agreements, and `full_weight`'s gather of GPU shards."""
    out = {}
    bal = BatchBalancer(background=False)
    a, b, _ = global_batch(23)
    lo, hi = local_slice(world, rank, 23)
    host = KeyedJagged.from_dict({"a": a[lo:hi], "b": b[lo:hi]})
    feats = KeyedJagged(host.keys, host.values.cuda(), host.lengths.cuda())
    for name, plan in (("features", bal.plan(feats)), ("lengths", bal.plan(bal.lengths_of(feats)))):
        _, moved = bal.exchange(plan, feats, {"id": torch.arange(lo, hi, device="cuda")})
        every = [None] * world
        dist.all_gather_object(every, moved["id"].tolist())
        out[f"balance from {name}"] = torch.tensor(sorted(sum(every, [])) == list(range(23)))
    out.update(scenario_scheduler_uneven(rank, world, device="cuda"))
    emb = ShardedEmbeddings({"a": 50}, dim=4).cuda()
    whole = emb.full_weight("a")
    out["full_weight"] = torch.tensor(whole.device == torch.device("cuda", rank)
                                      and torch.equal(whole.cpu(), initial_rows(0, 0, 50, 4, 0, 50)))
    torch.cuda.synchronize()
    return out


def scenario_preempt(rank, world):
    """An urgent op flushed after a large background round, while that round is still queued."""
    orders = {}
    for preempt in (False, True):
        sched = CommScheduler(chunk_bytes=1024, preempt=preempt)
        big_in = torch.full((world * 4, 8192), float(rank))  # 256 chunks: still queued when urgent comes
        big_out = torch.empty_like(big_in)
        f_big = sched.all_to_all(big_out, big_in, priority=5, name="background")
        sched.flush()
        urgent = torch.full((8,), float(rank + 1))
        f_urgent = sched.all_reduce(urgent, priority=0, name="urgent")
        sched.flush()
        f_urgent.result(timeout=60)
        f_big.result(timeout=60)
        sched.close()
        assert torch.equal(urgent, torch.full((8,), float(sum(range(1, world + 1)))))
        assert torch.equal(big_out, torch.cat([torch.full((4, 8192), float(s)) for s in range(world)]))
        every = [None] * world
        dist.all_gather_object(every, sched.completed)
        assert all(o == every[0] for o in every), every  # the same order on every rank
        orders[preempt] = sched.completed
    return {"fifo": orders[False], "preempt": orders[True]}


def scenario_scheduler_mismatch(rank, world):
    """preempt=True, ranks that submit differently: A and B (equal-sized all-reduces) with their
    priorities swapped on rank 1 (its A met rank 0's B, silently), or flushed in one round on
    rank 0 and in two on rank 1. Per case and rank: each op's result, or its error; then a
    scheduler given the same submissions everywhere still works (the ranks stayed in step)."""
    out = {}
    for case in ("priorities", "flushes"):
        sched = CommScheduler(preempt=True)
        a, b = torch.full((4,), float(rank + 1)), torch.full((4,), 10.0 * (rank + 1))
        swap = case == "priorities" and rank == 1
        futures = [sched.all_reduce(a, priority=1 if swap else 0, name="A")]
        if case == "flushes" and rank == 1:
            sched.flush()
        futures.append(sched.all_reduce(b, priority=0 if swap else 1, name="B"))
        got = []
        try:
            sched.flush()
        except RuntimeError as err:  # the thread may have stopped on the mismatch already
            got.append(str(err))
        for f in futures:
            try:
                got.append(f.result(timeout=20).tolist())
            except RuntimeError as err:
                got.append(str(err))
        sched.close()
        every = [None] * world
        dist.all_gather_object(every, got)
        out[case] = every
    sched = CommScheduler(preempt=True)
    ok = torch.full((4,), float(rank + 1))
    sched.all_reduce(ok, priority=3, name="ok")
    sched.flush()
    sched.close()
    out["after"] = ok.tolist()
    return out


def scenario_sim(rank, world):
    # sleep-simulated compute proportional to cost; compare the measured step with the simulator,
    # which is given the fixed per-step overhead (plan all-gather + barrier) measured on empty steps
    sec_per_cost = 2e-4
    # the long samples sit on rank 0 in contiguous slices: a clear bubble that balancing removes
    batches = [torch.tensor([400, 350, 30, 10, 20, 40, 25, 15]), torch.tensor([500, 300, 20, 30, 20, 10, 10, 60])]
    cost = CostModel(a=1.0, b=0.0)
    res = {}

    def run_steps(method, scale):
        meter = BubbleMeter()
        bal = BatchBalancer(cost_model=cost, method=method)
        for lengths in batches + batches:  # the first pass warms up (first collectives, thread start)
            lo, hi = local_slice(world, rank, lengths.numel())
            with meter.step(samples=hi - lo):
                plan = bal.plan(lengths[lo:hi])
                with meter.compute():
                    time.sleep(float(cost(lengths[plan.partition.assignments[rank]]).sum()) * sec_per_cost * scale)
                meter.sync(name="allreduce")
        return meter.summary(skip=len(batches))

    overhead = run_steps("contiguous", 0.0)["step_ms"] / 1e3
    for method in ("contiguous", "lpt_equal"):
        s = run_steps(method, 1.0)
        sim = simulate(batches, world, cost, method=method, seconds_per_cost=sec_per_cost, allreduce_seconds=overhead)
        res[method] = {"real_step_ms": torch.tensor(s["step_ms"]), "sim_step_ms": torch.tensor(sim.as_dict()["step_ms"]),
                       "real_bubble": torch.tensor(s["bubble_ratio"]), "sim_bubble": torch.tensor(sim.bubble_ratio)}
    return res


def scenario_pipeline(rank, world):
    """TrainPipeline over 4 global batches, balanced (plan and exchange in the background while
    the previous batch's step runs, which does collectives of its own) and not: per step, the ids
    each rank received, with their samples checked against the originals. The step looks its
    features up in two sharded modules whose ids the pipeline distributed ahead (row-wise summed,
    table-wise unpooled); the rows are checked against the whole tables."""
    batches = [global_batch(19 + 4 * i, seed=i) for i in range(4)]
    local = []
    for a, b, dense in batches:
        lo, hi = local_slice(world, rank, len(a))
        local.append((KeyedJagged.from_dict({"a": a[lo:hi], "b": b[lo:hi]}), {"id": torch.arange(lo, hi), "dense": dense[lo:hi]}))
    tables = [ShardedEmbeddings(EMBEDDING_TABLES, dim=EMBEDDING_DIM, sharding=sharding, init_seed=5) for sharding in ("row", "table")]
    full = [{k: t.full_weight(k) for k in t.keys} for t in tables]
    out = {}
    for name, balancer in (("balanced", BatchBalancer(cost_model=CostModel(a=1.0, b=1.0), method="kk_equal")), ("plain", None)):
        meter = BubbleMeter()
        seen = []

        def step(feats, dense, global_batch, seen=seen, meter=meter):
            step_index = len(seen)
            a, b, dense_all = batches[step_index]
            for j, gid in enumerate(dense["id"].tolist()):  # every received sample is the original one
                one = feats.permute(torch.tensor([j]))
                assert torch.equal(one["a"][0], a[gid]) and torch.equal(one["b"][0], b[gid])
                assert torch.equal(dense["dense"][j], dense_all[gid])
            for module in tables:  # the ids were sent ahead for these very features
                assert module._prefetched is not None and module._prefetched.features is feats
            summed, rows = tables[0](feats, "sum"), tables[1](feats, "none")
            for k in EMBEDDING_TABLES:
                ids, lengths = feats[k]
                offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
                torch.testing.assert_close(summed[k], torch.nn.functional.embedding_bag(ids, full[0][k], offsets, mode="sum"))
                torch.testing.assert_close(rows[k], full[1][k][ids])
            total = torch.tensor([float(dense["dense"].sum())])
            meter.sync(lambda: dist.all_reduce(total), name="dense_allreduce")  # the step's own collective
            seen.append((dense["id"], global_batch))

        TrainPipeline(step, balancer=balancer, meter=meter, embeddings=tables, pooling=["sum", "none"]).run(iter(local))
        # one metered step per batch, counting the batch's received samples, and every wait of the
        # pipeline's own inside a step (they fell between steps)
        assert len(meter.steps) == len(batches), meter.steps
        assert [s["samples"] for s in meter.steps] == [int(ids.numel()) for ids, _ in seen]
        spans = [(e["ts"], e["ts"] + e["dur"]) for e in meter.events if e["name"] == "step"]
        waits = [e for e in meter.events if e["name"].removeprefix("wait:").startswith(("balance", "input_dist", "global_batch"))]
        assert waits and all(any(a <= e["ts"] and e["ts"] + e["dur"] <= b for a, b in spans) for e in waits), (waits, spans)
        gathered = [None] * world
        dist.all_gather_object(gathered, [(ids.tolist(), g) for ids, g in seen])
        out[name] = {"ids": [sorted(i for r in range(world) for i in gathered[r][s][0]) for s in range(len(batches))],
                     "global_batch": [gathered[0][s][1] for s in range(len(batches))]}
    return out


def _hang(rank, hung, out_dir):
    """BubbleMeter(timeout=2) with rank `hung` hung: the other rank must fail within the timeout
    (gloo's monitored barrier enforced it on rank 0 only). The other rank's outcome reaches
    rank 0's result (through a file when rank 0 is the hung one)."""
    meter = BubbleMeter(timeout=2.0)
    if rank == hung:
        time.sleep(6)  # a hung rank
        if rank != 0:
            os._exit(0)
        other = os.path.join(out_dir, "other.pt")
        deadline = time.time() + 30
        while not os.path.exists(other) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # let the write finish
        return torch.load(other, weights_only=True)
    start = time.perf_counter()
    try:
        with meter.step():
            meter.sync(name="allreduce")
        result = {"error": "no error", "seconds": torch.tensor(time.perf_counter() - start)}
    except RuntimeError as err:
        result = {"error": str(err), "seconds": torch.tensor(time.perf_counter() - start)}
    if rank != 0:
        torch.save(result, os.path.join(out_dir, "other.tmp"))
        os.replace(os.path.join(out_dir, "other.tmp"), os.path.join(out_dir, "other.pt"))
        os._exit(0)
    return result


def scenario_teardown(rank, world):
    """Collectives still running on tensors Python has dropped when the groups are destroyed: on
    torch < 2.8, dist.destroy_process_group() waited forever for gloo's threads (see gpukernels_common.distributed.destroy_process_group)."""
    other = dist.new_group(backend="gloo")
    dist.all_reduce(torch.ones(1 << 23), async_op=True)  # 32 MB each, the tensors and works dropped at once
    dist.all_reduce(torch.ones(1 << 23), group=other, async_op=True)
    return {"issued": torch.tensor(True)}


def run(rank, scenario, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    backend = "gloo"
    if scenario.endswith("_cuda"):  # one GPU per rank
        torch.cuda.set_device(rank)
        backend = "nccl"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    if scenario.startswith("hang"):  # hang0 / hang1: that rank hangs
        result = _hang(rank, int(scenario[4:]), out_dir)
    else:
        result = globals()[f"scenario_{scenario}"](rank, world)
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "result.pt"))
    if not scenario.startswith("hang") and scenario != "group_timeout":
        dist.barrier()
    destroy_process_group()  # not dist's: on torch < 2.8 it can deadlock with gloo's threads (see there)


if __name__ == "__main__":
    scenario, world, port, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    mp.spawn(run, args=(scenario, world, port, out_dir), nprocs=world, join=True)
