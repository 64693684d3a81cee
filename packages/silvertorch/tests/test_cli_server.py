"""The CLI (build, query, serve) and the real HTTP server on loopback."""

import concurrent.futures
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from gpukernels_common.testing import free_port
from silvertorch import EmbeddingTower, OverArch, RetrievalModel, ValueModel, save_item_table, save_towers
from silvertorch.cli import main

httpx = pytest.importorskip("httpx", reason="the server tests need silvertorch[serve]")

D, N = 16, 600


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("st")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    save_towers(root / "towers", EmbeddingTower([30], D), OverArch(D, 2, [8]), ValueModel(2, [1.0, 0.3]))
    genre = torch.randint(0, 4, (N,), generator=g)
    attrs = (torch.ones(N, dtype=torch.int64), torch.arange(N + 1), genre)
    save_item_table(root / "items.safetensors", torch.randn(N, D, generator=g), torch.arange(N) + 1, attrs, {"genre": 1})
    rc = main(["build", "--towers", str(root / "towers"), "--items", str(root / "items.safetensors"), "--out", str(root / "art"),
               "--n-clusters", "8", "--nprobe", "4", "--max-nprobe", "8", "--max-exact-terms", "3", "--k-candidates", "64", "--num-results", "8", "--quiet"])
    assert rc == 0
    return root / "art", genre


def test_build_and_query(artifact, capsys):
    path, genre = artifact
    assert main(["query", str(path), "--user", "3", "--filter", "genre:2", "-n", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["results"]
    assert len(rows) == 5 and all(int(genre[r["id"] - 1]) == 2 for r in rows)
    model = RetrievalModel.load(path)
    assert (model.nprobe, model.max_nprobe, model.max_exact_terms) == (4, 8, 3)  # the options reached the artifact
    assert out["found"] == int(model.retrieve(torch.tensor([[3]]), ["genre:2"]).found[0]) >= 5
    assert main(["query", str(path), "--user", "3", "--filter", "genre:2 AND"]) == 2
    assert "position" in capsys.readouterr().err
    assert main(["build", "--towers", str(path), "--items", "nope", "--out", str(path / "x"), "--quiet"]) == 2


def test_package_command(artifact, tmp_path, capsys):
    """`silvertorch package` writes an AOTInductor package whose answers equal the model's."""
    path, _ = artifact
    assert main(["package", str(path), str(tmp_path / "m.zip"), "--user", "3"]) == 2
    assert "must end in .pt2" in capsys.readouterr().err
    assert main(["package", str(path), str(tmp_path / "m.pt2"), "--user", "3", "--filter", "genre:2", "--max-batch", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["package"] == str(tmp_path / "m.pt2")
    model = RetrievalModel.load(path)
    users, exprs = torch.tensor([[1], [5], [7]]), ["genre:1", "", "NOT genre:0"]
    runner = torch._inductor.aoti_load_package(str(tmp_path / "m.pt2"))
    got, want = runner(users, *model.prepare_filters(exprs)), model(users, *model.prepare_filters(exprs))
    assert torch.equal(got[0], want[0]) and (want[0] >= 0).all()
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_serve_port_in_use_is_reported(artifact, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", str(artifact[0]), "--port", str(s.getsockname()[1])]) == 2
    assert "pass another --port" in capsys.readouterr().err


def test_real_server_batches_concurrent_requests_and_rejects_bad_ones(artifact):
    path, genre = artifact
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "silvertorch.cli", "serve", str(path), "--port", str(port), "--max-wait-ms", "40",
                             "--max-batch", "16"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None, "server did not become ready"
            time.sleep(0.2)

        def ask(i):
            body = {"user_features": [i % 30], "filter": f"genre:{i % 4}", "n": 5}
            return i, httpx.post(f"{base}/v1/retrieve", json=body, timeout=30)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(48)))
        for i, r in answers:
            assert r.status_code == 200, r.text
            out = r.json()
            assert len(out["ids"]) == 5 and all(int(genre[x - 1]) == i % 4 for x in out["ids"])
            assert 5 <= out["found"] <= N  # Bloom passes in the probed clusters, before verification
        assert max(r.json()["batch_size"] for _, r in answers) > 1, "concurrent requests were never batched"

        bad = [({"user_features": [1], "filter": "genre:1 AND"}, "position"),
               ({"user_features": [1], "filter": "colour:red"}, "known feature"),
               ({"user_features": [99]}, "user_features"),
               ({"user_features": [1, 2]}, "user_features"),
               ({"user_features": [1], "n": 1000}, "n"),
               ({"user_features": [1], "filter": "x" * 5000}, "filter"),
               ({"filter": ""}, "user_features"),
               ({"user_features": [1], "value_weights": [1.0]}, "value_weights")]
        for body, reason in bad:
            r = httpx.post(f"{base}/v1/retrieve", json=body, timeout=10)
            assert r.status_code == 400 and reason in r.json()["error"], (body, r.text)
        r = httpx.post(f"{base}/v1/retrieve", content=b"{not json", headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == 400
        r = httpx.post(f"{base}/v1/retrieve", content=b" " * 70000, headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == 413
        assert httpx.get(f"{base}/healthz", timeout=5).json() == {"status": "ok"}
        metrics = httpx.get(f"{base}/metrics", timeout=5).json()
        assert metrics["requests"] >= 48 and metrics["latency_ms"]["p99"] is not None and metrics["batch_size"]["max"] > 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    # graceful: the lifespan drains and finishes (uvicorn then re-raises SIGTERM, so -15 is a clean exit too)
    assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in out, out


def test_server_app_needs_a_loaded_model(artifact):
    from silvertorch.server import ServerLimits, create_app

    app = create_app(RetrievalModel.load(artifact[0]), ServerLimits(max_batch=2))
    assert {r.path for r in app.routes} >= {"/v1/retrieve", "/healthz", "/readyz", "/metrics"}
