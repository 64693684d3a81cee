"""One data-parallel rank of the demo's training (launched by stack.py through torchrun, gloo).

    torchrun --standalone --nproc_per_node 2 tools/demo/train.py --out DIR [--balance kk_equal|none]

Per step, every rank draws the same global batch of (history, next item) samples and takes a
contiguous slice; freescale's BatchBalancer re-partitions it by sequence cost (unless
`--balance none`). Item rows come from a row-sharded freescale.ShardedEmbeddings table
(all-to-all). The user tower (HSTU with moeblaze MoE feed-forward blocks) and silvertorch's
OverArch heads run locally; multibalance.MultiBalance balances the tasks' gradients on the user
vector. Communication after backward: the embedding gradients go back through the all-to-all,
then the dense gradients are summed through freescale's CommScheduler in forward order. The
BubbleMeter splits every step into compute, wait (at the barriers: the bubble) and comm.
Rank 0 writes the per-step log and, with --checkpoint, the trained weights (safetensors + JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F

import freescale
import multibalance
from gpukernels_common.distributed import destroy_process_group

from movielens import load, training_windows
from recommender import HEAD_TASKS, TASKS, Config, build


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the log (and checkpoint)")
    p.add_argument("--tag", default="train", help="log file name: <out>/<tag>.json")
    p.add_argument("--balance", default="kk_equal", help="freescale partition method, or 'none' (contiguous slices)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--samples-per-user", type=int, default=4, help="history windows per user per epoch (random ends)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--negatives", type=int, default=256, help="uniform negatives shared by the global batch")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--config", default="{}", help="JSON overrides of the model Config")
    p.add_argument("--checkpoint", action="store_true", help="write <out>/checkpoint.safetensors + .json")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def split_sizes(n: int, world: int) -> list[int]:
    return [n // world + (1 if r < n % world else 0) for r in range(world)]


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*all_to_all_single is deprecated")  # torch's own notice, once per rank
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(1)  # one core per rank: compute imbalance shows as waiting, as on a cluster
    torch.manual_seed(args.seed)  # identical initial dense weights on every rank
    cfg = Config.from_json({**Config().to_json(), **json.loads(args.config)})
    ml = load()

    table = freescale.ShardedEmbeddings({"item": ml.n_items}, cfg.dim, sharding="row", init_seed=args.seed)
    tower, heads = build(cfg)
    dense_groups = [[tower.hstu.position, tower.hstu.layers[0], tower.hstu.ffns[0]]]  # forward order
    dense_groups += [[tower.hstu.layers[i], tower.hstu.ffns[i]] for i in range(1, cfg.layers)]
    dense_groups += [[tower.hstu.final_norm, heads]]
    dense_params = [[p for m in group for p in m.parameters()] for group in dense_groups]
    balancer = multibalance.MultiBalance(list(TASKS), relax=0.7, beta=0.9)
    opt = torch.optim.Adam([*table.parameters(), *tower.parameters(), *heads.parameters()], lr=args.lr)
    scheduler = freescale.CommScheduler(chunk_bytes=256 << 10)
    batch_balancer = None
    if args.balance != "none":
        cost = freescale.CostModel.from_model_shape(cfg.dim, cfg.heads, cfg.layers, d_ff=2 * cfg.dim)
        batch_balancer = freescale.BatchBalancer(cost_model=cost, method=args.balance)
    meter = freescale.BubbleMeter(timeout=120)
    neg_gen = torch.Generator().manual_seed(args.seed + 1)  # same negatives on every rank

    steps_per_epoch = -(-ml.n_users * args.samples_per_user // args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    log = {"world_size": world, "balance": args.balance, "config": cfg.to_json(), "steps": []}
    step, t_start = 0, time.perf_counter()
    for epoch in range(args.epochs):
        if step >= total_steps:
            break
        samples = training_windows(ml, args.samples_per_user, cfg.max_len, seed=args.seed * 1000 + epoch)
        bar = _progress(min(steps_per_epoch, total_steps - step), f"epoch {epoch + 1}/{args.epochs}", rank == 0)
        for batch in samples.split(args.batch_size):
            if step >= total_steps:
                break
            lo = sum(split_sizes(batch.shape[0], world)[:rank])
            local = batch[lo : lo + split_sizes(batch.shape[0], world)[rank]]
            negatives = torch.randint(0, ml.n_items, (args.negatives,), generator=neg_gen)
            global_positions = int((batch[:, 2] - batch[:, 1] - 1).sum())
            record = train_step(ml, local, global_positions, negatives, table, tower, heads, balancer, opt, scheduler,
                                dense_params, batch_balancer, meter)
            record["step"], record["epoch"] = step, epoch
            log["steps"].append(record)
            step += 1
            bar.update(1, record)
        bar.close()
    scheduler.close()
    per_rank = [None] * world
    dist.all_gather_object(per_rank, [{k: s[k] for k in ("step", "wait", "compute", "comm")} for s in meter.steps])
    summary = meter.summary(skip=min(2, max(0, len(meter.steps) - 1)))
    item_table = table.full_weight("item")  # every rank takes part in the gather
    if rank == 0:
        for i, rec in enumerate(log["steps"]):  # the step's bubble: waiting over all ranks' step time
            rec["bubble_ratio"] = sum(r[i]["wait"] for r in per_rank) / sum(r[i]["step"] for r in per_rank)
            rec["step_ms"] = 1e3 * max(r[i]["step"] for r in per_rank)
        log["summary"] = {**summary, "wall_s": time.perf_counter() - t_start, "steps": step}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.tag}.json").write_text(json.dumps(log))
        if args.checkpoint:
            save_checkpoint(out, cfg, item_table, tower, heads, step)
    dist.barrier()
    destroy_process_group()
    return 0


def train_step(ml, local, global_positions, negatives, table, tower, heads, balancer, opt, scheduler, dense_params,
               batch_balancer, meter) -> dict:
    """One step on this rank's windows; every window position predicts its next item."""
    offsets = ml.offsets
    spans = [(int(offsets[u]) + a, int(offsets[u]) + b) for u, a, b in local.tolist()]
    features = freescale.KeyedJagged.from_dict({
        "history": [ml.items[a : b - 1] for a, b in spans],
        "target": [ml.items[a + 1 : b] for a, b in spans],
        "liked": [(ml.ratings[a + 1 : b] >= 4).long() for a, b in spans],
    })
    with meter.step(samples=int(local.shape[0])):
        if batch_balancer is not None:
            with meter.comm("balance"):  # cost by history length (the three keys share it)
                plan = batch_balancer.plan(features["history"][1])
                features, _ = batch_balancer.exchange(plan, features)
        history, lengths = features["history"]
        targets, liked = features["target"][0], features["liked"][0].float()
        ids = torch.cat([history, targets, negatives])
        with meter.comm("embedding_lookup"):  # ids to their owners and rows back (all-to-all)
            rows = table(freescale.KeyedJagged(["item"], ids, torch.ones_like(ids)), pooling="none")["item"]
        with meter.compute("forward"):
            leaf = rows.detach().requires_grad_(True)  # the backward stays local until the comm phase
            hist_rows, target_rows, neg_rows = leaf.split([history.numel(), targets.numel(), negatives.numel()])
            target_rows, neg_rows = F.normalize(target_rows, dim=-1), F.normalize(neg_rows, dim=-1)
            opt.zero_grad()
            states = balancer.attach(F.normalize(tower(hist_rows, lengths), dim=-1))  # unit vectors: cosine retrieval
            t = states.shape[0]
            logits = torch.cat([(states * target_rows).sum(-1, keepdim=True), states @ neg_rows.T], 1) / 0.1
            pair_neg = neg_rows[torch.arange(t) % neg_rows.shape[0]]
            head_logits = heads(states, torch.stack([target_rows, pair_neg], 1))  # [t, 2 (pos, neg), 2 tasks]
            watch_label = torch.tensor([1.0, 0.0]).expand(t, 2)
            like_label = torch.stack([liked, torch.zeros(t)], 1)
            n = max(global_positions, 1)
            losses = {  # sums over the local positions / the global count: ranks add up to the global mean
                "next": F.cross_entropy(logits, torch.zeros(t, dtype=torch.long), reduction="sum") / n,
                "watch": F.binary_cross_entropy_with_logits(head_logits[..., 0], watch_label, reduction="sum") / (2 * n),
                "like": F.binary_cross_entropy_with_logits(head_logits[..., 1], like_label, reduction="sum") / (2 * n),
            }
            aux = tower.aux_loss() * t / n  # MoE load balancing, a loss of the bottom alone: not balanced
        meter.sync(name="task_norms")  # the balancer all-reduces gradient norms: ranks meet here
        with meter.compute("backward"):
            scales = balancer.backward(losses, aux_loss=aux)  # joins the bottom's one backward (one grad per parameter)

        def communicate():
            rows.backward(leaf.grad)  # embedding gradients to their owners (all-to-all)
            futures, buffers = [], []
            for priority, params in enumerate(dense_params):
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                flat = torch.cat([g.reshape(-1) for g in grads])
                buffers.append((params, flat))
                futures.append(scheduler.all_reduce(flat, priority=priority, name=f"dense{priority}"))
            loss_sum = torch.stack([v.detach() for v in losses.values()])
            futures.append(scheduler.all_reduce(loss_sum, priority=len(dense_params), name="losses"))
            scheduler.flush()
            for f in futures:
                f.result(timeout=120)
            for params, flat in buffers:
                for p, g in zip(params, flat.split([p.numel() for p in params])):
                    p.grad = g.view_as(p)
            return loss_sum
        loss_sum = meter.sync(communicate, name="gradients")
        with meter.compute("optimizer"):
            opt.step()
    return {"samples": int(lengths.numel()), "losses": dict(zip(TASKS, loss_sum.tolist())), "scales": dict(scales),
            "tokens": int(lengths.sum())}


def save_checkpoint(out: Path, cfg: Config, item_table, tower, heads, steps: int) -> None:
    from safetensors.torch import save_file

    tensors = {"item_table": item_table.contiguous()}
    tensors.update({f"tower.{k}": v.contiguous() for k, v in tower.state_dict().items()})
    tensors.update({f"heads.{k}": v.contiguous() for k, v in heads.state_dict().items()})
    save_file(tensors, str(out / "checkpoint.safetensors"))
    (out / "checkpoint.json").write_text(json.dumps({"format_version": 1, "config": cfg.to_json(), "steps": steps,
                                                      "tasks": list(TASKS), "head_tasks": list(HEAD_TASKS)}))


class _progress:
    """A per-epoch progress bar on rank 0 (tqdm when installed, else one line per 10%)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled, self.n, self.bar = total, desc, enabled, 0, None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stdout, dynamic_ncols=True, leave=True)
            except ImportError:
                pass

    def update(self, n: int, record: dict) -> None:
        self.n += n
        if not self.enabled:
            return
        text = " ".join(f"{k} {v:.3f}" for k, v in record["losses"].items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(n)
        elif self.n == self.total or self.n % max(1, self.total // 10) == 0:
            print(f"{self.desc}: {self.n}/{self.total} steps, {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
