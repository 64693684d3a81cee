"""Multi-process gloo tests (world sizes 2-3), each bounded by a timeout."""

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from gpukernels_common.testing import free_port, run_workers

HERE = Path(__file__).parent
WORKER = HERE / "dist_worker.py"
_spec = importlib.util.spec_from_file_location("fs_dist_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)




def _run(scenario, world, tmp_path, timeout=120, check=True):
    result = tmp_path / "result.pt"
    proc = run_workers([sys.executable, WORKER, scenario, world, free_port(), tmp_path], result, timeout=timeout, check=check)
    return proc, (torch.load(result, weights_only=True) if result.exists() else None)


@pytest.mark.parametrize("world", [2, 3])
def test_balanced_batch_is_permutation_with_equal_gradients(tmp_path, world):
    """Planned from cost lengths, from the features (per-key lengths gathered) and for a larger
    batch (the gather's padding bound grows): each a permutation with the unbalanced gradients."""
    proc, res = _run("balance", world, tmp_path)
    for name, n in (("lengths", 23), ("features", 23), ("grown", 31)):
        assert res[name]["ids"].tolist() == list(range(n)), name
        torch.testing.assert_close(res[name]["g_bal"], res[name]["g_naive"], rtol=1e-5, atol=1e-5, msg=name)
        assert float(res[name]["bubble_after"]) <= float(res[name]["bubble_before"]), name
    kept, moved = res["min_gain 0.99"], res["min_gain 0.01"]  # this batch's balancing gains between the two
    assert bool(kept["kept"]) and bool(kept["same"]) and torch.equal(kept["ids"], kept["local"])
    assert float(kept["bubble_after"]) == float(kept["bubble_before"])
    assert not bool(moved["kept"]) and not torch.equal(moved["ids"], moved["local"])
    assert float(moved["bubble_after"]) < float(moved["bubble_before"])


@pytest.mark.parametrize("world", [2, 3])
def test_global_batch_smaller_than_the_world(tmp_path, world):
    """A final partial batch with fewer samples than ranks, or none: some ranks get no sample."""
    proc, res = _run("tiny", world, tmp_path, timeout=90)
    for n in (1, world - 1, 0):
        for mode in ("report", "split"):
            assert res[f"{n} {mode}"] == list(range(n)), (n, mode)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_embeddings_equal_local_embedding_bag(tmp_path, world):
    """Owner-side pooling (sum, mean) and unpooled rows equal a local nn.EmbeddingBag / lookup in
    forward and gradients, table-wise and row-wise, with empty bags and a rank without ids (at
    3 ranks: uneven row blocks, and table-wise a rank that owns no table); the copy-engine
    transport gives the collective's outputs and gradients bit for bit."""
    proc, res = _run("embeddings", world, tmp_path)
    assert len(res) == 2 * 2 * len(worker.POOLINGS)
    for name, r in res.items():
        idle_rank = None if name.startswith("None/") else world - 1
        pooling = name.rsplit("/", 1)[1]
        seqs, _ = worker.embedding_batch(world, idle_rank)
        assert any(s.numel() == 0 for s in seqs["a"])  # empty bags are in the batch
        lookups, outputs = {}, {}
        for key, bags in seqs.items():
            ids = torch.cat(bags)
            if pooling == "none":
                lookups[key] = torch.nn.Embedding.from_pretrained(r["full"][key].clone(), freeze=False)
                outputs[key] = lookups[key](ids)
            else:
                lookups[key] = torch.nn.EmbeddingBag.from_pretrained(r["full"][key].clone(), freeze=False, mode=pooling)
                offsets = torch.tensor([0] + [s.numel() for s in bags[:-1]]).cumsum(0)
                outputs[key] = lookups[key](ids, offsets)
            torch.testing.assert_close(r["outputs"][key], outputs[key].detach(), msg=name)
        worker.embedding_loss(outputs, pooling, {k: 0 for k in seqs}).backward()
        for key in seqs:  # the copy-engine transport's pull protocol (gloo here) moves the same rows
            assert torch.equal(r["copy_engine_outputs"][key], r["outputs"][key]), f"{name} {key} copy_engine"
            assert torch.equal(r["copy_engine_grads"][key], r["grads"][key]), f"{name} {key} copy_engine grad"
        for key, lookup in lookups.items():
            torch.testing.assert_close(r["grads"][key], lookup.weight.grad, msg=f"{name} {key}")
            expected = r["full"][key] - worker.FUSED_LR * lookup.weight.grad  # fused_lr: one SGD step in the backward
            torch.testing.assert_close(r["fused_updated"][key], expected, msg=f"{name} {key} fused")


def test_full_weight_of_a_table_without_rows(tmp_path):
    """A table of 0 rows: `full_weight` is its [0, dim] table, as on one rank (torch.cat of no
    shards raised on more ranks)."""
    proc, res = _run("empty_table", 2, tmp_path, timeout=90)
    for sharding in ("row", "table"):
        assert torch.equal(res[f"{sharding}/small"], worker.initial_rows(0, 0, 1, 3, 0, 1)), res
        empty = res[f"{sharding}/empty"]
        assert isinstance(empty, torch.Tensor) and empty.shape == (0, 3), empty


@pytest.mark.parametrize("world", [2, 3])
def test_copy_engine_transport_equals_all_to_all(tmp_path, world):
    proc, res = _run("transport", world, tmp_path)
    assert bool(res["float64 3-D"]) and bool(res["int64"]) and bool(res["nothing"])
    assert "differ from what the ranks send this rank" in res["mismatch"]
    # wrong output_splits on the last rank only: every rank raises the same ValueError (the others
    # hung in the staged all-gather until the process group's timeout)
    one = res["one rank"]
    assert len(set(one)) == 1 and one[0].startswith("ValueError: CopyEngineTransport: "), one
    assert f"rank {world - 1}: output_splits" in one[0] and "differ from what the ranks send this rank" in one[0], one


@pytest.mark.parametrize("world", [2, 3])
def test_exchange_refuses_cost_lengths_other_than_the_features(tmp_path, world):
    """cap/split plans made from cost lengths that are not the features' positions: the exchange
    cut the features with the plan's windows, silently wrong. Now the same ValueError on every
    rank (only rank 0's lengths differ), with or without dense tensors."""
    proc, res = _run("cost_lengths_mismatch", world, tmp_path)
    outcomes = res["outcomes"]
    for key in ("cap no dense", "cap dense", "split no dense", "split dense"):
        errors = {o[key] for o in outcomes}
        assert len(errors) == 1, (key, errors)
        error = errors.pop()
        assert error.startswith("BatchBalancer.exchange: rank 0: the features' positions per sample differ from the "
                                "lengths the plan was made from (local sample 0: 100 positions, the plan's lengths "
                                "say 50)"), (key, error)
    samples = 4 if world == 2 else 5  # planned from the right lengths: every sample arrives (split: in pieces)
    assert sum(o["cap ok"] for o in outcomes) == samples < sum(o["split ok"] for o in outcomes)


@pytest.mark.parametrize("world", [2, 3])
def test_exchange_refuses_one_ranks_input_on_every_rank(tmp_path, world):
    """A plan made from the features and dense tensors, input that does not fit it on the last
    rank only (a sample short, a dense dtype, a missing dense key; whole and split samples): every
    rank raises, naming that rank, where the others waited out the group's timeout; the next
    exchange moves every sample."""
    proc, res = _run("one_rank_input", world, tmp_path, timeout=90)
    outcomes, bad = res["outcomes"], world - 1
    for mode in ("report", "split"):
        for case, text in (("samples", "the features have {} samples, the plan expects {}"),
                           ("dtype", "the features or dense tensors differ from those the plan was made from"),
                           ("keys", "the features or dense tensors differ from those the plan was made from")):
            errors = [o[f"{mode} {case}"] for o in outcomes]
            size = 17 // world + (1 if bad < 17 % world else 0)
            expected = f"BatchBalancer.exchange: rank {bad}: " + text.format(size - 1, size)
            assert all(e.startswith(expected) for e in errors), (mode, case, errors)
        assert "dense['x'] is torch.float64" in outcomes[bad][f"{mode} dtype"]  # the rank's own reason
        assert "dense keys ['id'] differ" in outcomes[bad][f"{mode} keys"]
        assert all(o[f"{mode} after"] == list(range(17)) for o in outcomes) and all(o[f"{mode} rows ok"] for o in outcomes)


@pytest.mark.parametrize("world", [2, 3])
def test_pipeline_hands_step_fn_the_plan_of_its_batch(tmp_path, world):
    """A split balancer in TrainPipeline: step_fn(..., plan) gets its own batch's plan (the
    received windows match the features, checked in the worker), the loss masks over the ranks
    add up to plan.global_positions; a step_fn without `plan` runs as before."""
    proc, res = _run("pipeline_plan", world, tmp_path)
    seen = res["seen"]
    for step in range(3):
        positions = seen[0][step][1]
        assert all(s[step][1] == positions for s in seen)
        samples, total = (6, 137) if world == 2 else (5, 130)
        assert sum(s[step][0] for s in seen) == positions == total + step * samples
        assert all(s[step][2] == samples for s in seen)
        assert any(s[step][3] for s in seen)  # a piece with trailing positions: the history was split
    assert res["old_style"] == [6 if world == 2 else 5]


def test_invalid_ids_on_one_rank_fail_every_rank_promptly(tmp_path):
    """ShardedEmbeddings given bad input on one rank only (ids out of range, float ids, a missing
    key; either rank, row- and table-wise), on a group with a 300 s timeout: that rank raised alone
    and the other waited in the counts all-to-all for the timeout (here: past this test's bound).
    Now the counts all-to-all carries the flag: every rank raises the same class in the same step,
    within seconds, and the next lookup works on every rank."""
    start = time.perf_counter()
    proc, res = _run("bad_ids", 2, tmp_path, timeout=120)
    texts = {"range": ("IndexError", "ids for table 'a' must be in [0, 20), got [1, 25]"),
             "dtype": ("TypeError", "ids for table 'a' must have an integer dtype, got torch.float32"),
             "key": ("KeyError", "features have no ids for the tables ['b']")}
    for rank, outcomes in enumerate(res["outcomes"]):
        for sharding in ("row", "table"):
            for case, (cls, text) in texts.items():
                for bad in range(2):
                    outcome, seconds = outcomes[f"{sharding} {case} {bad}"]
                    if rank == bad:
                        expected = f"{cls}: ShardedEmbeddings.distribute: rank {bad} sent invalid input: {text}"
                    else:
                        expected = f"{cls}: ShardedEmbeddings.distribute: rank(s) [{bad}] reported invalid input"
                    assert outcome.startswith(expected), (rank, sharding, case, bad, outcome)
                    assert seconds < 10, (rank, sharding, case, bad, seconds)
                    assert outcomes[f"{sharding} {case} {bad} after"] == [(2, 4), (2, 4)]
    assert time.perf_counter() - start < 120


# what each BatchBalancer call raises on both ranks when rank 1's input is bad (scenario_rank_errors),
# then what rank 1 adds: its own reason
_LENGTHS = "cost lengths must be 1-D non-negative integer counts, one per sample (or pass the features, a KeyedJagged)"
_DENSE = "dense must be a dict of tensors, one row per sample"
_EXCHANGE = "TypeError: BatchBalancer.exchange: rank 1: features must be a KeyedJagged and dense a dict of tensors with one row per sample"
_KINDS = ("ValueError: BatchBalancer.plan: the ranks passed different kinds of input (rank 0: features with 2 key(s); "
          "rank 1: {}); every rank must pass features with the same keys, or every rank cost lengths")
RANK_ERRORS = {
    "plan nan": (f"ValueError: BatchBalancer.plan: rank 1: {_LENGTHS}", " (lengths must be integer counts of positions, got dtype torch.float32)"),
    "plan 2-d": (f"ValueError: BatchBalancer.plan: rank 1: {_LENGTHS}", " (lengths must be 1-D (one length per sample), got shape (6, 1))"),
    "plan str": ("TypeError: BatchBalancer.plan: rank 1: lengths_or_features must be a KeyedJagged or cost lengths (1-D "
                 "integer counts, one per sample)", " (got str)"),
    "plan dense": (f"TypeError: BatchBalancer.plan: rank 1: {_DENSE}", " (got Tensor)"),
    "plan keys": (_KINDS.format("features with 3 key(s)"), ""),
    "plan kinds": (_KINDS.format("cost lengths"), ""),
    "plan_async nan": (f"ValueError: BatchBalancer.plan_async: rank 1: {_LENGTHS}", " (lengths must be integer counts"),
    "plan_async dense": (f"TypeError: BatchBalancer.plan_async: rank 1: {_DENSE}", " (got {'x': 'list'})"),
    "balance features": ("TypeError: BatchBalancer.balance: rank 1: features must be a KeyedJagged", " (got Tensor)"),
    "balance dense": (f"TypeError: BatchBalancer.balance: rank 1: {_DENSE}", " (got Tensor)"),
    "balance_async features": ("TypeError: BatchBalancer.balance_async: rank 1: features must be a KeyedJagged", " (got list)"),
    "balance_async dense": (f"TypeError: BatchBalancer.balance_async: rank 1: {_DENSE}", " (got {'x': 'a 0-d tensor'})"),
    "exchange features": (_EXCHANGE, " (features must be a KeyedJagged, got Tensor)"),
    "exchange dense": (_EXCHANGE, " (dense must be a dict of tensors (one row per sample), got Tensor)"),
    "exchange planned features": (_EXCHANGE, " (features must be a KeyedJagged, got list)"),
    "exchange planned keys": ("ValueError: BatchBalancer.exchange: rank 1: the features have 3 keys, the plan was made "
                              "from features with 2", ""),
    "config": ("ValueError: BatchBalancer.plan: the ranks' balancers are configured differently: rank(s) [1] differ from "
               "rank 0 in the cost model", ""),
}


def test_one_ranks_bad_input_fails_every_balancer_call_promptly(tmp_path):
    """Bad input on rank 1 only to every BatchBalancer call with a collective (plan, plan_async,
    balance, balance_async, exchange: NaN, 2-D or string cost lengths, a dense tensor that is not
    a dict, features with another number of keys or of another kind, features that are not a
    KeyedJagged) and a balancer configured otherwise, on a group with a 10 s timeout: rank 1
    raised alone before the collective and rank 0 waited in it until the timeout (or got an
    error of gloo's, or a plan of garbage). Now both ranks raise the same error naming rank 1,
    within seconds (it rides on the call's own all-gather or all-to-all), and the next call works."""
    start = time.perf_counter()
    proc, res = _run("rank_errors", 2, tmp_path, timeout=240)
    outcomes = res["outcomes"]
    assert set(outcomes[0]) == {k for case in RANK_ERRORS for k in (case, f"{case} after")}
    for case, (common, own) in RANK_ERRORS.items():
        for rank, outcome in enumerate(outcomes):
            text, seconds = outcome[case]
            assert text.startswith(common), (case, rank, text)
            assert own in text if rank == 1 else text == common or case == "config", (case, rank, text)
            assert seconds < 5, (case, rank, seconds)  # the group's timeout is 10 s
            assert outcome[f"{case} after"][0] == "ok: 12", (case, rank, outcome[f"{case} after"])
        if case == "config":  # each rank says what it has
            assert "CostModel(a=1.0, b=1.0)" in outcomes[0][case][0] and "CostModel(a=1.0, b=2.0)" in outcomes[1][case][0]
    assert time.perf_counter() - start < 240


def test_a_batch_that_is_not_a_batch_on_one_rank_fails_the_pipeline_on_every_rank(tmp_path):
    """TrainPipeline, with a balancer and without one, given a batch that is not a (features,
    dense) pair on rank 1 only: rank 1 raised when staging it, a step before it was due, while
    rank 0 ran that step and waited in step_fn's all-reduce (a group with a 10 s timeout). Now the
    refusal rides on the staging's own collective (the balancer's gather, the count's
    all-reduce): both ranks run the same two steps, then raise the same TypeError naming rank 1,
    and the next run() works."""
    proc, res = _run("pipeline_rank_errors", 2, tmp_path, timeout=240)
    expected = {"balancer": "TypeError: TrainPipeline.run: rank 1: each batch must be a (KeyedJagged, dict of dense "
                            "tensors) pair",
                "plain": "TypeError: TrainPipeline.run: rank(s) [1]: each batch must be a (KeyedJagged, dict of dense "
                         "tensors) pair"}
    expected["embeddings"] = expected["plain"]  # no balancer, embeddings, no input-dist thread (a GPU's path)
    for name, common in expected.items():
        for rank, outcome in enumerate(res["outcomes"]):
            text, seconds = outcome[name]
            assert text == (common + " (got a KeyedJagged)" if rank == 1 else common), (name, rank, text)
            assert seconds < 5, (name, rank, seconds)
            assert outcome[f"{name} steps"] == [12, 12], (name, rank, outcome[f"{name} steps"])
            if name != "embeddings":
                assert outcome[f"{name} after"][0] == "ok: 2", (name, rank, outcome[f"{name} after"])


def test_close_releases_background_groups_and_reports_staged_errors(tmp_path):
    """BatchBalancer and TrainPipeline had no close(): their threads and background gloo groups
    lived on (a group freed late can deadlock teardown before torch 2.8), and the failure of a
    batch the pipeline had staged before its step raised was dropped."""
    proc, res = _run("close", 2, tmp_path, timeout=90)
    made, left, done, planned, foreground = res["balancer"]
    assert (made, left, done, planned, foreground) == (1, 0, True, 6, 6), res
    assert res["pipeline groups"] == [2, 0], res  # the module's id group and the count's
    assert res["run"] == "step failed"
    assert res["close"].startswith("TrainPipeline.close: the background work of the batch staged before run() "
                                   "stopped failed: IndexError: ShardedEmbeddings.distribute: rank(s) [1] reported "
                                   "invalid input"), res["close"]
    assert res["close"].endswith("<- IndexError")


@pytest.mark.gpu
def test_copy_engine_transport_on_gpus(tmp_path):
    """Symmetric-memory staging and side-stream peer copies equal NCCL's all-to-all (2 GPUs)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs that are peers of each other; found {torch.cuda.device_count()}")
    proc, res = _run("transport_cuda", 2, tmp_path, timeout=300)
    assert res and all(bool(v) for v in res.values()), res


@pytest.mark.gpu
def test_host_made_collective_tensors_under_nccl(tmp_path):
    """NCCL all-reduces and all-gathers CUDA tensors only: the balancer's plan gathers, the
    scheduler's agreements and `full_weight`'s shards were host tensors (2 GPUs)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs (NCCL, one per rank); found {torch.cuda.device_count()}")
    proc, res = _run("collectives_cuda", 2, tmp_path, timeout=300)
    assert res and all(bool(v) for v in res.values()), res


def test_train_pipeline_moves_every_sample_once(tmp_path):
    """Balanced, the next batch is planned and exchanged, and its embedding ids distributed, in
    the background while the current step runs its own collective; every step still gets each
    sample of its global batch once, and its lookups the right rows (checked in the worker)."""
    proc, res = _run("pipeline", 2, tmp_path)
    for name in ("balanced", "plain"):
        assert res[name]["ids"] == [list(range(19 + 4 * i)) for i in range(4)], name
    # the global sample count with and without a balancer (without, it was rank 0's own share)
    for name in ("balanced", "plain"):
        assert res[name]["global_batch"] == [19 + 4 * i for i in range(4)], name


def test_scheduler_completes_in_priority_order(tmp_path):
    proc, res = _run("scheduler", 2, tmp_path)
    assert res["order"] == ["urgent", "reduce", "background"]


@pytest.mark.parametrize("world", [2, 3])
def test_scheduler_uneven_all_to_all_larger_than_a_chunk(tmp_path, world):
    """Rank 0 sends far more than the others: every rank still issues the same chunks (agreed on
    the communication thread), a 0-column op goes through, and later ops line up."""
    proc, res = _run("scheduler_uneven", world, tmp_path, timeout=90)
    assert res == {"preempt=False": True, "preempt=True": True}, res


def test_scheduler_preempts_an_earlier_round(tmp_path):
    proc, res = _run("preempt", 2, tmp_path)
    assert res["fifo"] == ["background", "urgent"]  # per-round order: the earlier round finishes first
    assert res["preempt"] == ["urgent", "background"]  # the urgent op jumps the queued chunks


def test_teardown_while_collectives_run(tmp_path):
    """The process groups destroyed while gloo still runs collectives on dropped tensors (on
    torch < 2.8 a worker thread waited for the GIL held by the destructor joining it)."""
    proc, res = _run("teardown", 2, tmp_path, timeout=90)
    assert bool(res["issued"])


def test_simulator_matches_real_run(tmp_path):
    proc, res = _run("sim", 2, tmp_path)
    for method, r in res.items():
        # stated tolerance: step time within 20%, bubble ratio within 0.1 (sleep jitter on a loaded 2-core box)
        assert abs(float(r["real_step_ms"]) / float(r["sim_step_ms"]) - 1) < 0.20, (method, r)
        assert abs(float(r["real_bubble"]) - float(r["sim_bubble"])) < 0.10, (method, r)
    assert float(res["lpt_equal"]["real_bubble"]) < float(res["contiguous"]["real_bubble"])


@pytest.mark.parametrize("hung", [1, 0])
def test_hung_rank_gives_clear_error_within_timeout(tmp_path, hung):
    """BubbleMeter(timeout=2): the rank that is not hung fails within the timeout, whichever rank
    hangs (gloo's monitored barrier enforced it on rank 0 only: rank 1 waited 30 s)."""
    start = time.perf_counter()
    proc, res = _run(f"hang{hung}", 2, tmp_path, timeout=90, check=False)
    assert res is not None, proc.stderr[-3000:]
    assert float(res["seconds"]) < 5, res  # was 30 s (the process group's timeout) when rank 0 hung
    assert "timeout of 2.0 s" in res["error"] and f"rank {1 - hung}" in res["error"], res["error"]
    assert time.perf_counter() - start < 60


def test_ranks_agree_on_dtypes_and_shapes(tmp_path):
    """A rank without samples whose empty values/dense tensors have other dtypes or shapes (the
    defaults of from_dict / torch.tensor([]) / torch.zeros(0)) got garbage or aborted gloo; now it
    adopts the others'. Ranks with samples that disagree get a ValueError, all of them."""
    proc, res = _run("schema", 2, tmp_path)
    for rank, outcome in enumerate(res["outcomes"]):
        for path in ("balance", "balance_async", "from lengths", "plan without dense"):
            assert isinstance(outcome[path], int), (rank, path)
        assert "differ in dtype" in outcome["values dtype"] and "rank 1: torch.int64" in outcome["values dtype"], outcome
        assert "differ in dtype" in outcome["values dtype async"], outcome
        for name in ("key order", "key order from lengths"):
            assert "same keys in the same order" in outcome[name], (name, outcome)
        for name in ("dense shape", "dense shape from lengths"):
            assert "trailing shape" in outcome[name] and "rank 1: torch.float32 [4]" in outcome[name], (name, outcome)
        assert isinstance(outcome["after"], int)
    assert sum(o["balance"] for o in res["outcomes"]) == 4


def test_balance_agrees_on_dense_tensors_in_one_gather(tmp_path):
    """balance() planned without the dense tensors, so every exchange all-gathered again."""
    proc, res = _run("balance_gathers_once", 2, tmp_path, timeout=90)
    assert res == {"dense": (1, True), "none": (1, True)}, res


def test_background_groups_take_the_process_group_timeout(tmp_path):
    proc, res = _run("group_timeout", 2, tmp_path, timeout=90, check=False)
    assert res is not None, proc.stderr[-3000:]
    assert res["seconds"] == {"balancer": 2.0, "pipeline": 2.0, "count": 2.0, "explicit": 3.0}
    assert res["error"] != "no error" and res["waited"] < 5, res


def test_scheduler_ranks_that_submit_differently_fail_on_every_rank(tmp_path):
    """preempt=True: the round agreement carries a fingerprint of each flush()'s ops (kinds,
    shapes, dtypes, priorities, order); ranks whose submissions differ get a RuntimeError on every
    op of that round, on every rank, instead of each other's equal-sized payloads."""
    proc, res = _run("scheduler_mismatch", 2, tmp_path, timeout=90)
    for case in ("priorities", "flushes"):
        for rank, got in enumerate(res[case]):
            errors = [g for g in got if isinstance(g, str)]
            assert len(errors) >= 2 and not any(isinstance(g, list) for g in got), (case, rank, got)
            assert all("submissions differ" in e and "flush() round 1" in e for e in errors), (case, rank, got)
    assert res["after"] == [3.0] * 4


def test_cut_plans_are_never_worse_than_the_batch_as_it_stands(tmp_path):
    proc, res = _run("cut_plans_never_worse", 2, tmp_path)
    for name, (before, after, _, _) in res["plans"].items():
        assert after <= before, (name, before, after)
    # the reviewed case: kept, nothing moves
    assert res["plans"]["split kk_equal"] == (40.0, 40.0, "kept", True), res["plans"]


def test_every_rank_costs_samples_alike(tmp_path):
    """Aligned keys on one rank, not on the other: the cost length was decided per rank (positions
    on one, total ids on the other); now from the gathered per-key lengths, the same everywhere."""
    proc, res = _run("cost_lengths", 2, tmp_path)
    for got in res["lengths"]:
        assert got == {"plan": [100, 99], "plan_async": [100, 99]}, res


def test_resume_continues_the_same_loss_curve(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    def train(steps, log, ckpt=None, resume=False):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "freescale.train", "--batch-size", "16", "--steps", str(steps), "--loss-log", str(log)]
        cmd += (["--checkpoint", str(ckpt)] if ckpt else []) + (["--resume"] if resume else [])
        run_workers(cmd, log, timeout=150, env=env)
        return json.loads(Path(log).read_text())

    straight = train(4, tmp_path / "a.json")
    train(2, tmp_path / "b.json", ckpt=tmp_path / "c.pt")
    resumed = train(4, tmp_path / "d.json", ckpt=tmp_path / "c.pt", resume=True)
    assert resumed["start"] == 2
    assert straight["losses"][2:] == pytest.approx(resumed["losses"], rel=1e-4)


def test_training_script_on_every_position_with_split_histories(tmp_path):
    """--all-positions: balancing leaves the losses of one process unchanged; splitting the
    histories that exceed a rank's fair share changes only what the split pieces no longer see."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "freescale.train", "--all-positions", "--max-len", "300", "--batch-size", "16", "--steps", "2"]

    def train(log, *extra, ranks=2):
        launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
        run_workers([sys.executable, *(launch if ranks > 1 else []), *args, "--loss-log", str(log), *extra], log,
                    timeout=150, env=env)
        return json.loads(Path(log).read_text())["losses"]

    single = train(tmp_path / "single.json", ranks=1)
    balanced = train(tmp_path / "balanced.json")
    split = train(tmp_path / "split.json", "--long-sequences", "split")
    assert balanced == pytest.approx(single, rel=1e-5)
    assert split[0] != pytest.approx(single[0], rel=1e-7)  # a history of the first batch was split
    assert split == pytest.approx(single, rel=0.02)
    with pytest.raises(SystemExit):
        from freescale import train as train_module
        train_module.main(["--long-sequences", "split"])  # split needs --all-positions


def test_long_sequences_floor_cap_and_split(tmp_path):
    proc, res = _run("long_sequences", 2, tmp_path)
    items, targets, dense = worker.long_batch()
    floor = float(res["report"]["floor_cost"])
    # report: the long sample is named and no placement gets under its cost
    assert res["report"]["oversized"].tolist() == [3] and floor > float(res["report"]["fair_share"])
    assert float(res["report"]["max_rank_cost"]) >= floor
    assert float(res["report"]["bubble_after"]) >= float(res["report"]["bubble_floor"]) - 1e-9 > 0
    assert [int(res[m]["warnings"]) for m in ("report", "cap", "split")] == [1, 0, 0]  # said once, where it applies
    for mode in ("cap", "split"):  # cutting it brings the busiest rank under that floor
        assert float(res[mode]["max_rank_cost"]) < floor, mode
        assert float(res[mode]["max_rank_cost"]) == pytest.approx(float(res[mode]["max_load_after"]))
    assert int(res["cap"]["positions"]) < int(res["report"]["positions"]) == int(res["split"]["positions"])
    # what the cap cut off is in the report, and warned about (once per plan: this one drops > 10%)
    dropped = int(res["report"]["positions"]) - int(res["cap"]["positions"])
    assert int(res["cap"]["dropped"]) == dropped > 0.1 * int(res["report"]["positions"])
    assert float(res["cap"]["dropped_frac"]) == pytest.approx(dropped / int(res["report"]["positions"]))
    assert [int(res[m]["dropped"]) for m in ("report", "split")] == [0, 0]
    assert [int(res[m]["drop_warnings"]) for m in ("report", "cap", "split")] == [0, 2, 0]
    # split + merge (loss over the global position count, gradients summed) equals the unsplit run
    # for a model whose receptive field fits the split context
    torch.manual_seed(0)
    weight = torch.randn(50, 3, requires_grad=True)
    lengths = torch.tensor([s.numel() for s in items])
    loss = worker.windowed_loss(weight, torch.cat(items), torch.cat(targets).float(), dense,
                                torch.ones(int(lengths.sum()), dtype=torch.bool), lengths) / int(lengths.sum())
    loss.backward()
    torch.testing.assert_close(res["split"]["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res["split"]["grad"], weight.grad, rtol=1e-5, atol=1e-6)
