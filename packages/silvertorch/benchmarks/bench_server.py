"""The HTTP server under loopback load (MovieLens-100k artifact, CPU): throughput and client-side
p50/p99 latency at several concurrency levels with dynamic batching, against the same model
called in-process one request at a time (no batching) and in batches of 32 (the ceiling).
"""

from __future__ import annotations

import concurrent.futures
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpukernels_common.bench import BenchRecord, bench_args, write_records
from gpukernels_common.testing import free_port
from silvertorch import publish

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
from movielens import SCHEMA, item_attributes, item_dense_features, item_features, load_movielens, train  # noqa: E402

FILTERS = ["", "genre:Comedy", "genre:Drama AND year:{1995,1996,1997,1998}", "NOT genre:Drama", "genre:{Action,Thriller}"]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main():
    args = bench_args()
    import httpx

    ml = load_movielens()
    user_tower, item_tower, overarch, value_model = train(ml, epochs=2, overarch_epochs=1, log=lambda m: None)
    with torch.no_grad():
        item_emb = item_tower(item_features(ml))
    tmp = Path(tempfile.mkdtemp())
    model = publish(tmp / "artifact", user_tower, overarch, value_model, item_embeddings=item_emb, item_ids=torch.arange(item_emb.shape[0]),
                    attributes=item_attributes(ml), schema=SCHEMA, item_dense=item_dense_features(ml), n_clusters=32, nprobe=8,
                    k_candidates=200, num_results=10)
    n_req = 64 if args.quick else 512
    bodies = [{"user_features": ml.users[i % ml.users.shape[0]].tolist(), "filter": FILTERS[i % len(FILTERS)], "n": 10} for i in range(n_req)]
    setting = f"silvertorch server, MovieLens-100k artifact ({item_emb.shape[0]} items, K=200, N=10), loopback, CPU ({n_req} requests)"
    records = []

    # in-process baselines: one request per forward, and batches of 32
    for batch in (1, 32):
        lat = []
        t0 = time.perf_counter()
        for s in range(0, n_req, batch):
            chunk = bodies[s : s + batch]
            t1 = time.perf_counter()
            model.retrieve(torch.tensor([b["user_features"] for b in chunk]), [b["filter"] for b in chunk])
            lat += [time.perf_counter() - t1] * len(chunk)
        qps = n_req / (time.perf_counter() - t0)
        fig = {"qps": round(qps, 1), "p50_ms": round(pct(lat, 50) * 1e3, 2), "p99_ms": round(pct(lat, 99) * 1e3, 2)}
        name = "in-process, no batching" if batch == 1 else "in-process, batches of 32"
        print(f"{name:32s} {fig}")
        records.append(BenchRecord(setting, name, {"concurrency": 1, "batch": batch}, fig))

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "silvertorch.cli", "serve", str(tmp / "artifact"), "--port", str(port),
                             "--max-batch", "64", "--max-wait-ms", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        for concurrency in (1, 8, 32):
            with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as client:

                def ask(body):
                    t1 = time.perf_counter()
                    r = client.post(f"{base}/v1/retrieve", json=body)
                    r.raise_for_status()
                    return time.perf_counter() - t1, r.json()["batch_size"]

                with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                    list(pool.map(ask, bodies[: 2 * concurrency]))  # warm-up
                    t0 = time.perf_counter()
                    out = list(pool.map(ask, bodies))
                    wall = time.perf_counter() - t0
            lat = [o[0] for o in out]
            fig = {"qps": round(n_req / wall, 1), "p50_ms": round(pct(lat, 50) * 1e3, 2), "p99_ms": round(pct(lat, 99) * 1e3, 2),
                   "mean_batch": round(statistics.mean(o[1] for o in out), 2)}
            print(f"server, concurrency {concurrency:3d}        {fig}")
            records.append(BenchRecord(setting, "HTTP server, dynamic batching", {"concurrency": concurrency, "batch": "dynamic"}, fig))
    finally:
        proc.terminate()
        proc.wait(30)
    if args.quick:
        return
    write_records(HERE / "results" / "server.jsonl", records)


if __name__ == "__main__":
    sys.exit(main())
