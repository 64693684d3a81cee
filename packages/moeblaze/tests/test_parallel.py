"""Expert parallelism over 2 gloo processes equals the single-process layer (outputs and every
gradient), with rows de-duplicated per (token, rank) and capacity drops that never travel."""

import datetime
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import moeblaze
from gpukernels_common import select_backend
from gpukernels_common.distributed import destroy_process_group
from gpukernels_common.testing import assert_close, free_port, run_workers
from moeblaze import MoE, expert_parallel_experts, moe_experts
from moeblaze.parallel import local_expert_count

WORKER = Path(__file__).with_name("ep_worker.py")
_spec = importlib.util.spec_from_file_location("moe_ep_worker", WORKER)
ep_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ep_worker)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every case of ep_worker.py, run once over 2 gloo processes: one result dict per rank."""
    out = tmp_path_factory.mktemp("ep") / "ep.pt"
    run_workers([sys.executable, WORKER, free_port(), out], out)
    return torch.load(out, weights_only=True)


def close(actual, expected, name):
    assert_close(actual, expected, backend=select_backend(expected), name=name)


def expected_traffic(ids, tokens, rank):
    """Slots and (token, rank) rows one rank sends, counted independently of the implementation."""
    ids = ids[ep_worker.rank_slice(tokens, rank)].tolist()
    kept = [(t, e // ep_worker.LOCAL) for t, row in enumerate(ids) for e in row if e < ep_worker.N_EXPERTS]
    rows = set(kept)
    return {"slots": len(kept), "rows": len(rows), "remote_slots": sum(r != rank for _, r in kept),
            "remote_rows": sum(r != rank for _, r in rows)}


def test_expert_parallel_under_ddp_equals_single_process(tmp_path):
    """`prepare_ddp` then DistributedDataParallel: each rank keeps its own experts (DDP broadcast rank
    0's over the others) and every gradient is that of one process on the global batch with the
    ranks' mean loss (DDP averaged different experts' gradients)."""
    out = tmp_path / "ddp.pt"
    run_workers([sys.executable, WORKER, free_port(), out, "ddp"], out)
    got = torch.load(out, weights_only=True)
    net = ep_worker.DDPNet()
    init = {name: p.detach().clone() for name, p in net.named_parameters()}
    grads = ep_worker.ddp_step(net, net, ep_worker.ddp_inputs())
    for rank, r in enumerate(got):
        assert r["ignored"] == ["moe.w_gate", "moe.w_up", "moe.w_down"]
        for name, grad in grads.items():
            part = ep_worker.expert_slice(rank) if name.startswith("moe.w_") else slice(None)
            close(r["params"][name], init[name][part], f"rank {rank} {name} after wrapping")
            close(r["grads"][name], grad[part], f"rank {rank} d{name}")


def test_prepare_ddp_needs_an_expert_parallel_moe():
    with pytest.raises(ValueError, match="prepare_ddp: the model has no MoE with expert_group="):
        moeblaze.prepare_ddp(torch.nn.Sequential(MoE(4, 8, 2, 1)))


@pytest.mark.parametrize("name", sorted(ep_worker.CASES))
def test_expert_parallel_equals_single_process(ranks, name):
    x, ids, w, params, grad_out = ep_worker.case_inputs(name)
    leaves = [t.clone().requires_grad_() for t in (x, w, *params)]
    y = moe_experts(leaves[0], ids, leaves[1], *leaves[2:], checkpoint=ep_worker.CASES[name]["checkpoint"])
    y.backward(grad_out)
    got = [r[name] for r in ranks]
    close(torch.cat([r["y"] for r in got]), y.detach(), "y")
    close(torch.cat([r["dx"] for r in got]), leaves[0].grad, "dx")
    close(torch.cat([r["dw"] for r in got]), leaves[1].grad, "d routing weights")
    for i, full in enumerate(leaves[2:]):
        close(torch.cat([r["dparams"][i] for r in got]), full.grad, f"d expert weights {i}")
    tokens = ep_worker.CASES[name]["tokens"]
    for rank, r in enumerate(got):
        assert r["traffic"] == expected_traffic(ids, tokens, rank)


def test_deduplication_sends_one_row_per_token_and_rank(ranks):
    # every token of every rank has both choices on rank 0: half the slots' rows travel
    for r in ranks:
        t = r["all_on_rank0"]["traffic"]
        assert t["rows"] * 2 == t["slots"] > 0
    # k = E: each token sends one row to each rank, carrying its 2 choices there
    for rank, r in enumerate(ranks):
        tokens = ep_worker.CASES["top_k_equals_experts"]["tokens"][rank]
        assert r["top_k_equals_experts"]["traffic"]["rows"] == 2 * tokens
    assert all(r["top1_odd_d"]["traffic"]["rows"] == r["top1_odd_d"]["traffic"]["slots"] for r in ranks)


def test_expert_parallel_layer_with_capacity_equals_single_process_per_rank(ranks):
    """The capacity is per rank: the EP layer equals the single-process layer applied to each
    rank's tokens on its own (same parameters), in the output and every gradient."""
    layer, x, grad_out = ep_worker.layer_inputs()
    x = x.requires_grad_()
    tokens = ep_worker.LAYER_CASE["tokens"]
    ys, dropped, aux = [], [], []
    for rank in range(ep_worker.WORLD):
        sl = ep_worker.rank_slice(tokens, rank)
        ys.append(layer(x[sl]))
        dropped.append(int(layer.last_dropped))
        aux.append(layer.aux_loss.detach())
    y = torch.cat(ys)
    (y * grad_out).sum().backward()
    got = [r["layer"] for r in ranks]
    assert all(d > 0 for d in dropped), "the case must drop slots on every rank"
    assert [r["dropped"] for r in got] == dropped
    for r, a in zip(got, aux):
        close(r["aux_loss"], a, "aux_loss")
    close(torch.cat([r["y"] for r in got]), y.detach(), "y")
    close(torch.cat([r["dx"] for r in got]), x.grad, "dx")
    for name, p in layer.named_parameters():
        if name.startswith("w_"):  # sharded experts: each rank holds its slice
            close(torch.cat([r["grads"][name] for r in got]), p.grad, f"d {name}")
        else:  # replicated router and shared expert: the ranks' gradients sum to the whole batch's
            close(sum(r["grads"][name] for r in got), p.grad, f"d {name}")
    for rank, r in enumerate(got):  # dropped slots never travel
        assert r["traffic"]["slots"] == ep_worker.LAYER_CASE["k"] * tokens[rank] - r["dropped"]


def test_expert_shards_start_as_slices_of_the_single_process_init(ranks):
    """Every rank seeded alike (data-parallel seeding): each rank's experts are the matching
    slice of a single-process MoE built with that seed (they were E_local copies of the same
    experts on every rank), and the replicated router and shared expert equal it."""
    c = ep_worker.INIT_CASE
    torch.manual_seed(c["seed"])
    full = MoE(c["d"], c["f"], ep_worker.N_EXPERTS, c["k"], n_shared_experts=c["n_shared_experts"])
    got = [r["init"] for r in ranks]
    for name, p in full.named_parameters():
        if name.startswith("w_"):
            assert torch.equal(torch.cat([r[name] for r in got]), p.detach()), name
        else:
            assert all(torch.equal(r[name], p.detach()) for r in got), name
    assert not torch.equal(got[0]["w_gate"], got[1]["w_gate"])


@pytest.fixture
def single_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield dist.group.WORLD
    destroy_process_group()


def test_bad_inputs_fail_before_any_collective(single_rank_group, monkeypatch):
    x, ids, w, (wg, wu, wd), _ = ep_worker.case_inputs("top2_hot_expert")
    with pytest.raises(ValueError, match=r"expert_ids must be in \[0, 4\]"):
        expert_parallel_experts(x, ids + 2, w, wg, wu, wd, n_experts=4)
    with pytest.raises(ValueError, match=r"w_gate must be \[n_experts / world = 4"):
        expert_parallel_experts(x, ids, w, wg[:2], wu[:2], wd[:2], n_experts=4)
    with pytest.raises(ValueError, match="expert_ids and weights must both be"):
        expert_parallel_experts(x, ids, w[:, :1], wg, wu, wd, n_experts=4)
    with pytest.raises(ValueError, match="w_down must be"):
        expert_parallel_experts(x, ids, w, wg, wu, wd.transpose(1, 2), n_experts=4)
    with pytest.raises(ValueError, match=r"activation 'silu' needs w_up=None"):
        expert_parallel_experts(x, ids, w, wg, wu, wd, n_experts=4, activation="silu")
    for n_experts in (4.0, "4", True, 0):  # 4.0 failed in a bincount, "4" with a bare TypeError
        with pytest.raises(ValueError, match=f"n_experts must be an integer >= 1, got {n_experts!r}"):
            expert_parallel_experts(x, ids, w, wg, wu, wd, n_experts=n_experts)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    with pytest.raises(ValueError, match="n_experts=4 must be divisible by the expert-parallel group size 3"):
        local_expert_count(4)
    with pytest.raises(ValueError, match="must be divisible"):
        MoE(8, 12, 4, 2, expert_group=single_rank_group)


def _equals_moe_experts(x, ids, w, params, grad_out) -> dict:
    """expert_parallel_experts on the current (one-rank) group against moe_experts, output and
    every gradient; returns the call's traffic counts."""
    a = [t.clone().requires_grad_() for t in (x, w, *params)]
    b = [t.clone().requires_grad_() for t in (x, w, *params)]
    traffic = {}
    y_ep = expert_parallel_experts(a[0], ids, a[1], *a[2:], n_experts=4, traffic=traffic)
    y = moe_experts(b[0], ids, b[1], *b[2:])
    (y_ep * grad_out).sum().backward()
    (y * grad_out).sum().backward()
    close(y_ep.detach(), y.detach(), "y")
    for i, (ta, tb) in enumerate(zip(a, b)):
        close(ta.grad, tb.grad, f"grad {i}")
    return traffic


@pytest.mark.filterwarnings("error::FutureWarning")
def test_one_rank_group_equals_moe_experts(single_rank_group):
    """World 1: every row stays home, rows with 1 and 2 choices run as separate groups. No
    FutureWarning (torch.distributed.nn's all_to_all_single, deprecated, gave one)."""
    x, ids, w, params, grad_out = ep_worker.case_inputs("top_k_equals_experts")
    ids, w = ids[:, :2].contiguous(), w[:, :2].contiguous()  # some tokens with one kept choice
    traffic = _equals_moe_experts(x, ids, w, params, grad_out)
    kept = int((ids < 4).sum())
    assert traffic == {"slots": kept, "rows": int((ids < 4).any(1).sum()), "remote_slots": 0, "remote_rows": 0}
    assert traffic["rows"] < kept


def test_expert_parallel_needs_a_process_group():
    x, ids, w, (wg, wu, wd), _ = ep_worker.case_inputs("top2_hot_expert")
    with pytest.raises((RuntimeError, ValueError)):
        expert_parallel_experts(x, ids, w, wg, wu, wd, n_experts=4)


def test_rank_without_tokens_reports_zero_losses(single_rank_group):
    """An expert-parallel rank with an empty batch: empty output, aux_loss 0 (was NaN)."""
    layer = MoE(8, 12, 4, 2, expert_group=single_rank_group)
    out = layer(torch.randn(0, 8, requires_grad=True))
    assert out.shape == (0, 8)
    assert layer.aux_loss.item() == 0
    (out.sum() + layer.aux_loss).backward()
    assert torch.isfinite(layer.router.proj.weight.grad).all()


def test_autocast_matches_moe_experts(single_rank_group):
    """Under autocast (bf16 x from an earlier autocast op, fp32 expert weights) the expert-parallel
    path casts as moe_experts does, instead of refusing the mixed dtypes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g).bfloat16()
    ids = torch.randint(0, 4, (6, 2), generator=g).int()
    w = torch.rand(6, 2, generator=g)
    wg, wu, wd = torch.randn(4, 8, 12, generator=g), torch.randn(4, 8, 12, generator=g), torch.randn(4, 12, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = expert_parallel_experts(x, ids, w, wg, wu, wd, n_experts=4, group=single_rank_group)
        want = moe_experts(x, ids, w, wg, wu, wd)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


def test_a_token_picking_one_expert_twice(single_rank_group):
    """Repeated choices of one expert (moe_experts accepts them) travel once with their summed
    weight: k = 5 over 4 experts on one rank was an IndexError (more choices than E_local places)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g)
    ids = torch.tensor([[0, 0, 1, 2, 3], [2, 2, 2, 1, 4], [3, 1, 0, 3, 3], [1, 4, 0, 2, 2]], dtype=torch.int32)
    w = torch.rand(4, 5, generator=g).masked_fill(ids == 4, 0.0)
    params = [torch.randn(4, 6, 8, generator=g), torch.randn(4, 6, 8, generator=g), torch.randn(4, 8, 6, generator=g)]
    grad_out = torch.randn(4, 6, generator=g)
    traffic = _equals_moe_experts(x, ids, w, params, grad_out)
    assert traffic["slots"] == int((ids < 4).sum()) and traffic["rows"] == 4
