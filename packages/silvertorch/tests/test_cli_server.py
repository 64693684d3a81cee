"""The CLI (build, query, serve) and the real HTTP server on loopback."""

import concurrent.futures
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpukernels_common.testing import free_port
from silvertorch import (
    EmbeddingTower,
    OverArch,
    RetrievalModel,
    ValueModel,
    load_item_table,
    load_towers,
    save_item_table,
    save_towers,
)
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
    # a batch of users, each with its own filter, on the loaded artifact
    batch = model.retrieve(torch.tensor([[1], [5], [7]]), ["genre:1", "", "NOT genre:0"])
    passes = [lambda g: g == 1, lambda g: True, lambda g: g != 0]
    for row, ok in zip(batch.ids, passes):
        assert (row >= 0).all() and all(ok(int(genre[i - 1])) for i in row.tolist())
    assert main(["query", str(path), "--user", "3", "--filter", "genre:2 AND"]) == 2
    assert "position" in capsys.readouterr().err
    assert main(["build", "--towers", str(path), "--items", "nope", "--out", str(path / "x"), "--quiet"]) == 2
    # towers whose config and tensors disagree: one line and exit 2, not a traceback
    import shutil

    bad = path.parent / "towers_bad"
    shutil.copytree(path.parent / "towers", bad, dirs_exist_ok=True)
    config = json.loads((bad / "towers.json").read_text())
    config["overarch"]["hidden"] = [5]
    (bad / "towers.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["build", "--towers", str(bad), "--items", str(path.parent / "items.safetensors"), "--out", str(bad / "x"), "--quiet"]) == 2
    assert "do not describe the towers" in capsys.readouterr().err


def test_package_command(artifact, tmp_path, capsys, monkeypatch):
    """`silvertorch package` hands the loaded artifact, the example user and filter and
    --max-batch to `RetrievalModel.package` and prints what it wrote. The compile itself (minutes
    of C++) is `test_aoti_package_runs_without_silvertorch`'s, on a saved and loaded model."""
    path, _ = artifact
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 6):  # no AOTInductor packages: refused clearly
        assert main(["package", str(path), str(tmp_path / "m.pt2"), "--user", "3"]) == 2
        assert "needs torch >= 2.6" in capsys.readouterr().err
        return
    assert main(["package", str(path), str(tmp_path / "m.zip"), "--user", "3"]) == 2
    assert "must end in .pt2" in capsys.readouterr().err
    calls = []

    def spy(model, out, user_features, filters=None, max_batch=1024):
        calls.append((model, out, user_features, filters, max_batch))
        return Path(out)

    monkeypatch.setattr(RetrievalModel, "package", spy)
    assert main(["package", str(path), str(tmp_path / "m.pt2"), "--user", "3", "--filter", "genre:2", "--max-batch", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["package"] == str(tmp_path / "m.pt2")
    [(model, out, users, filters, max_batch)] = calls
    assert str(out) == str(tmp_path / "m.pt2") and filters == ["genre:2"] and max_batch == 4
    assert torch.equal(users, torch.tensor([[3]]))
    want = RetrievalModel.load(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))


def test_serve_port_in_use_is_reported(artifact, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", str(artifact[0]), "--port", str(s.getsockname()[1])]) == 2
    assert "pass another --port" in capsys.readouterr().err



@pytest.mark.parametrize("host", ["no-such-host.invalid", "256.1.1.1", "192.0.2.1"])  # unresolvable; not this machine's
def test_serve_names_a_host_it_cannot_bind(artifact, capsys, host):
    """A --host that does not resolve, or is no address of this machine, was reported as a port to
    change ("pass another --port"): the error names --host."""
    capsys.readouterr()
    assert main(["serve", str(artifact[0]), "--host", host, "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"silvertorch serve: --host: expected an address of this machine or a name that resolves to one, "
                          f"cannot bind {host}"), err
    assert "--port" not in err and err.count("\n") == 1, err

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

        def chunked(spaces):  # a generator body goes out chunked, with no content-length to check up front
            yield b'{"user_features": [1]'
            for _ in range(spaces // 1000):
                yield b" " * 1000
            yield b"}"

        r = httpx.post(f"{base}/v1/retrieve", content=chunked(5_000_000), headers={"content-type": "application/json"}, timeout=30)
        assert r.request.headers["transfer-encoding"] == "chunked" and "content-length" not in r.request.headers
        assert r.status_code == 413 and "larger than 65536 bytes" in r.json()["error"], r.text
        r = httpx.post(f"{base}/v1/retrieve", content=chunked(20_000), headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 200 and len(r.json()["ids"]) == 8, r.text
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


class _PickyTower(torch.nn.Module):
    """A custom user tower (no input_spec): 4 floats per user; fails on a user it cannot embed (666)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, D)

    def forward(self, x):
        if hasattr(self, "batches"):
            self.batches.append(x.shape[0])
        if (x == 666).any():
            raise KeyError("unknown user 666")
        return self.lin(x)


@pytest.fixture(scope="module")
def custom_model():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    attrs = (torch.ones(N, dtype=torch.int64), torch.arange(N + 1), torch.randint(0, 4, (N,), generator=g))
    return RetrievalModel.build(_PickyTower(), OverArch(D, 2, [8]), ValueModel(2, [1.0, 0.3]), torch.randn(N, D, generator=g),
                                torch.arange(N) + 1, attrs, {"genre": 1}, n_clusters=4, nprobe=2, k_candidates=32, num_results=5)


def test_server_a_bad_request_fails_alone_in_its_batch(custom_model):
    """Without an input spec the server cannot check widths up front: a request the tower rejects (another
    width, or a value it cannot embed) fails alone, and the requests batched with it are still answered."""
    from fastapi.testclient import TestClient

    from silvertorch.server import ServerLimits, create_app

    def together(client, bodies):
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            return list(pool.map(lambda f: client.post("/v1/retrieve", json={"user_features": f}), bodies))

    custom_model.user_tower.batches = []
    with TestClient(create_app(custom_model, ServerLimits(max_wait_ms=1000, max_batch=16)), raise_server_exceptions=False) as client:
        wide = together(client, [[0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0], [0.5, 0.1, 0.2, 0.3], [0.3, 0.3, 0.1, 0.0]])
        unknown = together(client, [[0.1, 0.2, 0.3, 0.4], [666.0, 0.0, 0.0, 0.0], [0.5, 0.1, 0.2, 0.3]])
        metrics = client.get("/metrics").json()
    for r in wide[:1] + wide[2:] + unknown[:1] + unknown[2:]:
        assert r.status_code == 200 and len(r.json()["ids"]) == 5, r.text
    assert [r.json()["batch_size"] for r in wide[:1] + wide[2:]] == [3] * 3  # the requests of one width still ran together
    assert wide[1].status_code == 500 and "RuntimeError" in wide[1].json()["error"]
    assert unknown[1].status_code == 500 and "unknown user 666" in unknown[1].json()["error"]
    assert [3, 1, 1, 1] == custom_model.user_tower.batches[-4:], "666 was not batched with the others, then run alone"
    assert (metrics["requests"], metrics["errors"]) == (7, 2)


def test_server_refuses_float_features_past_the_towers_range(custom_model):
    """Checked in float64, then cast to the tower's float32: 1e300 became inf and answered 200 with no ids."""
    from fastapi.testclient import TestClient

    from silvertorch.server import create_app

    with TestClient(create_app(custom_model), raise_server_exceptions=False) as client:
        for features in ([1e300, 0.1, 0.2, 0.3], [1e39, 0.0, 0.0, 0.0]):
            r = client.post("/v1/retrieve", json={"user_features": features})
            assert r.status_code == 400 and r.json()["error"].startswith("user_features: a number is out of range"), r.text
        assert client.post("/v1/retrieve", json={"user_features": [0.5, 0.1, 0.2, 0.3]}).status_code == 200


def test_server_metrics_count_every_retrieve_request_and_error(custom_model, monkeypatch):
    """`requests` counts every POST /v1/retrieve and `errors` every non-2xx answer to it, whatever
    answered it: the handler, request validation, the body cap or an unhandled exception."""
    from fastapi.testclient import TestClient

    from silvertorch.server import ServerLimits, create_app

    feats = {"user_features": [0.1, 0.2, 0.3, 0.4]}
    with TestClient(create_app(custom_model, ServerLimits(max_body_bytes=1000)), raise_server_exceptions=False) as client:
        post = client.post
        assert post("/v1/retrieve", json=feats).status_code == 200
        assert post("/v1/retrieve", json={"filter": ""}).status_code == 400  # validation: no user_features
        assert post("/v1/retrieve", content=b"{", headers={"content-type": "application/json"}).status_code == 400
        assert post("/v1/retrieve", json={**feats, "filter": "colour:red"}).status_code == 400  # the handler
        assert post("/v1/retrieve", content=b" " * 2000, headers={"content-type": "application/json"}).status_code == 413
        r = post("/v1/retrieve", content=(b" " * 500 for _ in range(4)), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json() == {"error": "request body larger than 1000 bytes"}
        # a length that is no number is refused as too large, not parsed into a 500 (an ASGI server in front
        # may pass it on; the test client does)
        r = post("/v1/retrieve", json=feats, headers={"content-length": "12abc"})
        assert r.status_code == 413 and r.json() == {"error": "request body larger than 1000 bytes"}
        with monkeypatch.context() as m:
            m.setattr(custom_model, "prepare_filters", lambda exprs: 1 / 0)
            r = post("/v1/retrieve", json=feats)
        assert r.status_code == 500 and r.json() == {"error": "internal error: ZeroDivisionError"}
        assert client.get("/v1/retrieve").status_code == 405 and client.get("/nope").json() == {"error": "Not Found"}
        metrics = client.get("/metrics").json()
    assert (metrics["requests"], metrics["errors"]) == (8, 7)


def test_server_times_out_a_body_that_stops_arriving(custom_model):
    """A client that sent its headers and part of its body, then nothing, held the request (and its
    connection, and a graceful shutdown) forever: no timeout covered the body. Driven as ASGI, since a
    test client sends the whole body at once."""
    import asyncio

    from silvertorch.server import ServerLimits, create_app

    app = create_app(custom_model, ServerLimits(timeout_s=0.5))
    body = b'{"user_features": [0.1, 0.2, 0.3, 0.4]}'
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/retrieve", "raw_path": b"/v1/retrieve", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent = []

    async def stalled(chunks):
        queue = list(chunks)

        async def receive():
            if queue:
                return queue.pop(0)
            await asyncio.Event().wait()  # the client sends nothing more (and does not hang up)

        await asyncio.wait_for(app(scope, receive, send), 10)

    async def send(message):
        sent.append(message)

    asyncio.run(stalled([{"type": "http.request", "body": body[:5], "more_body": True}]))
    assert sent[0]["status"] == 408 and json.loads(sent[1]["body"]) == {"error": "the request body took longer than 0.5 s to arrive"}
    sent.clear()  # a whole body reaches the handler (no lifespan here, so no worker: the handler's own 504)
    asyncio.run(stalled([{"type": "http.request", "body": body[:5], "more_body": True}, {"type": "http.request", "body": body[5:]}]))
    assert sent[0]["status"] == 504, sent


def test_serve_binds_loopback_unless_told_otherwise(artifact, monkeypatch):
    """Safe by default: `silvertorch serve` without --host listens on 127.0.0.1 only."""
    import uvicorn

    import silvertorch.server

    path, _ = artifact
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kwargs: calls.append((host, port)))
    silvertorch.server.serve(RetrievalModel.load(path))  # the library's default as well
    assert calls.pop() == ("127.0.0.1", 8080)
    monkeypatch.setattr(silvertorch.server, "serve", lambda model, host, port, limits, cuda_graphs: calls.append((host, port)))
    port = free_port()  # the CLI checks that it can bind before loading the model
    assert main(["serve", str(path), "--port", str(port)]) == 0
    assert main(["serve", str(path), "--port", str(port), "--host", "0.0.0.0"]) == 0
    assert calls == [("127.0.0.1", port), ("0.0.0.0", port)]


def test_serve_restarts_on_a_port_its_last_run_left_in_time_wait(artifact, monkeypatch, capsys):
    """A server that closed its clients' connections (a shutdown with keep-alive clients) leaves them
    in TIME_WAIT for a minute; uvicorn binds such a port (SO_REUSEADDR), but the CLI's probe did not
    and refused the restart: 'cannot bind ... Address already in use; pass another --port'."""
    import socket

    import silvertorch.server

    with socket.socket() as old:
        old.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        old.bind(("127.0.0.1", 0))
        old.listen()
        port = old.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            conn, _ = old.accept()
            conn.close()  # the server side closes first: its end of the connection waits in TIME_WAIT
            time.sleep(0.05)
    calls = []
    monkeypatch.setattr(silvertorch.server, "serve", lambda model, host, port, limits, cuda_graphs: calls.append(port))
    assert main(["serve", str(artifact[0]), "--port", str(port)]) == 0, capsys.readouterr().err
    assert calls == [port]


def test_serve_binds_an_ipv6_host(artifact, monkeypatch, capsys):
    """--host ::1 (which uvicorn serves) was refused by the CLI's IPv4 port probe: 'cannot bind ::1:8080
    (Address family for hostname not supported)'."""
    import socket

    import silvertorch.server

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError:  # no IPv6 loopback on this machine: the CLI says so in one line (exit 2), no traceback
        port = None
    calls = []
    monkeypatch.setattr(silvertorch.server, "serve", lambda model, host, port, limits, cuda_graphs: calls.append((host, port)))
    if port is None:
        assert main(["serve", str(artifact[0]), "--host", "::1", "--port", "8080"]) == 2
        err = capsys.readouterr().err  # as a --host of no address here (EADDRNOTAVAIL), or a refused family
        assert err.startswith("silvertorch serve: ") and "cannot bind ::1" in err and err.count("\n") == 1, err
        assert not calls
        return
    assert main(["serve", str(artifact[0]), "--host", "::1", "--port", str(port)]) == 0, capsys.readouterr().err
    assert calls == [("::1", port)]


def test_cli_validates_its_options(artifact, capsys):
    """Bad flags are argparse errors that name the flag; a ValueError from the library is one clean line."""
    path, _ = artifact
    for flags, flag in [(["-n", "0"], "argument -n"), (["-n", "-1"], "argument -n")]:
        with pytest.raises(SystemExit) as exit_:
            main(["query", str(path), "--user", "3", *flags])
        assert exit_.value.code == 2 and flag in capsys.readouterr().err
    assert main(["query", str(path), "--user", "3", "-n", "9"]) == 2  # the artifact returns at most 8
    assert "-n: expected at most the model's num_results (8), got 9" in capsys.readouterr().err
    assert main(["query", str(path), "--user", "3"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 8
    assert main(["query", str(path), "--user", "1.9"]) == 2  # an id, not user 1
    assert "--user: expected comma-separated integers" in capsys.readouterr().err
    assert main(["query", str(path), "--user", "3", "--value-weights", "1,x"]) == 2
    assert "--value-weights" in capsys.readouterr().err
    for weights in ("1", "3e38,3e38"):  # the model has 2 tasks; scores past float32 would all be dropped
        assert main(["query", str(path), "--user", "3", "--value-weights", weights]) == 2
        err = capsys.readouterr().err
        assert err.startswith("silvertorch query: error: value_weights") and err.count("\n") == 1, err
    build = ["build", "--towers", "t", "--items", "i", "--out", "o", "--quiet"]
    for flags in (["--fresh-capacity", "-5"], ["--bloom-k", "0"], ["--bloom-k", "11"], ["--bloom-multiplier", "1"],
                  ["--bloom-multiplier", "nan"], ["--nprobe", "0"], ["--num-results", "x"]):
        with pytest.raises(SystemExit) as exit_:
            main([*build, *flags])
        assert exit_.value.code == 2 and f"argument {flags[0]}:" in capsys.readouterr().err, flags


def test_cli_reports_paths_it_cannot_write_or_read(artifact, capsys, monkeypatch):
    """--out under a file, and an artifact that is not there: one line and exit 2, not a traceback;
    the unwritable --out before the build's work (no clustering runs)."""
    path, _ = artifact
    blocker = path.parent / "a_file"
    blocker.write_text("")
    import silvertorch.model as model_module

    def no_build(*args, **kwargs):
        raise AssertionError("the build ran before --out was checked")

    monkeypatch.setattr(model_module.RetrievalModel, "build", no_build)
    capsys.readouterr()
    assert main(["build", "--towers", str(path.parent / "towers"), "--items", str(path.parent / "items.safetensors"),
                 "--out", str(blocker / "art"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("silvertorch build: error: ") and err.count("\n") == 1, err
    assert main(["query", str(path.parent / "missing"), "--user", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("silvertorch query: error: ") and err.count("\n") == 1, err


def test_documented_curl_commands_send_json():
    """`curl -d` alone sends form-urlencoded, which the server answers with a 400."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    docs = [root / "README.md", *sorted((root / "examples").glob("*.py")), *sorted((root / "src").rglob("*.py"))]
    lines = [line for doc in docs for line in doc.read_text().splitlines() if line.lstrip().startswith("curl ")]
    assert lines, "no curl command documented"
    for line in lines:
        if " -d " in line or "--data" in line:
            assert "-H 'Content-Type: application/json'" in line, line


def test_server_app_needs_a_loaded_model(artifact):
    from silvertorch.server import ServerLimits, create_app

    app = create_app(RetrievalModel.load(artifact[0]), ServerLimits(max_batch=2))
    assert {r.path for r in app.routes} >= {"/v1/retrieve", "/healthz", "/readyz", "/metrics"}


def test_build_reads_dense_item_features_from_the_item_table(tmp_path, capsys):
    """An OverArch over dense item features builds from an item table that carries them, and the
    build refuses a table without them (before, it wrote an artifact every query failed on)."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    save_towers(tmp_path / "towers", EmbeddingTower([30], D), OverArch(D, 2, [8], dense_dim=3), ValueModel(2))
    attrs = (torch.ones(40, dtype=torch.int64), torch.arange(41), torch.randint(0, 4, (40,), generator=g))
    emb, dense = torch.randn(40, D, generator=g), torch.randn(40, 3, generator=g)
    save_item_table(tmp_path / "plain.safetensors", emb, torch.arange(40), attrs, {"genre": 1})
    save_item_table(tmp_path / "dense.safetensors", emb, torch.arange(40), attrs, {"genre": 1}, dense=dense)
    table = load_item_table(tmp_path / "dense.safetensors")
    assert torch.equal(table.dense, dense) and load_item_table(tmp_path / "plain.safetensors").dense is None
    build = ["build", "--towers", str(tmp_path / "towers"), "--k-candidates", "20", "--num-results", "5", "--quiet"]
    assert main([*build, "--items", str(tmp_path / "plain.safetensors"), "--out", str(tmp_path / "a")]) == 2
    assert "OverArch reads 3 dense item features, the items have 0" in capsys.readouterr().err
    assert main([*build, "--items", str(tmp_path / "dense.safetensors"), "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert main(["query", str(tmp_path / "b"), "--user", "3", "-n", "5"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 5
    with pytest.raises(ValueError, match=r"dense must be \[num_items=40, F\]"):
        save_item_table(tmp_path / "x.safetensors", emb, torch.arange(40), attrs, dense=dense[:5])


def test_server_refuses_value_weights_for_a_learned_value_model():
    from fastapi.testclient import TestClient

    from silvertorch.server import create_app

    g = torch.Generator().manual_seed(2)
    attrs = (torch.ones(N, dtype=torch.int64), torch.arange(N + 1), torch.randint(0, 4, (N,), generator=g))
    model = RetrievalModel.build(EmbeddingTower([30], D), OverArch(D, 2, [8]), ValueModel(2, learned=True),
                                 torch.randn(N, D, generator=g), torch.arange(N), attrs, {"genre": 1}, n_clusters=4, k_candidates=32,
                                 num_results=5)
    with TestClient(create_app(model)) as client:
        bad = client.post("/v1/retrieve", json={"user_features": [3], "value_weights": [1.0, 0.0]})
        ok = client.post("/v1/retrieve", json={"user_features": [3]})
    assert bad.status_code == 400 and "Value Model is learned" in bad.json()["error"]
    assert ok.status_code == 200 and len(ok.json()["ids"]) == 5


def test_server_refuses_unknown_fields_and_non_numbers(artifact):
    """A misspelled field ("filters") was ignored, answering unfiltered with a 200; true and "42"
    passed as user ids; an integer past float64 was a 500 that reset the connection."""
    from fastapi.testclient import TestClient

    from silvertorch.server import create_app

    path, genre = artifact
    with TestClient(create_app(RetrievalModel.load(path)), raise_server_exceptions=False) as client:
        post = client.post
        for body, reason in (({"user_features": [3], "filters": "genre:2"}, "filters"),
                             ({"user_features": [3], "value_weight": [0.0, 1.0]}, "value_weight"),
                             ({"user_features": [True]}, "user_features"),
                             ({"user_features": ["42"]}, "user_features"),
                             ({"user_features": [3], "n": "5"}, "n"),
                             ({"user_features": [3], "value_weights": ["1", 0.3]}, "value_weights"),
                             ({"user_features": [10**400]}, "out of range"),
                             # a 500 (OverflowError), and finite weights whose scores overflow (a 200 with no ids)
                             ({"user_features": [3], "value_weights": [10**400, 1]}, "value_weights: a number is out of range"),
                             ({"user_features": [3], "value_weights": [3e38, 3e38]}, "value_weights must be finite numbers")):
            r = post("/v1/retrieve", json=body)
            assert r.status_code == 400 and reason in r.text, (body, r.status_code, r.text)
        r = post("/v1/retrieve", json={"user_features": [3], "filter": "genre:2", "n": 5, "value_weights": [1, 0.3]})
        assert r.status_code == 200 and all(int(genre[i - 1]) == 2 for i in r.json()["ids"])


@pytest.mark.parametrize("edit, match", [
    (lambda d: (d / "config.json").write_text("[1]"), "config.json must hold a JSON object"),  # was an AttributeError
    (lambda d: _edit_config(d, lambda c: c["overarch"].update(hidden=[-1])), "entry 'overarch' is not valid"),  # a RuntimeError
    (lambda d: _edit_tensor(d, "model.safetensors", "overarch.mlp.0.weight"), "overarch.mlp.0.weight has NaN or inf"),  # ids -1
])
def test_cli_reports_a_damaged_artifact_in_one_line(artifact, tmp_path, capsys, edit, match):
    import shutil

    damaged = tmp_path / "art"
    shutil.copytree(artifact[0], damaged)
    edit(damaged)
    capsys.readouterr()
    assert main(["query", str(damaged), "--user", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("silvertorch query: error: ") and match in err and err.count("\n") == 1, err


def _edit_config(directory, edit):
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def _edit_tensor(directory, file, name, value=float("nan")):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(directory / file), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(directory / file), metadata=meta)


def test_item_table_and_towers_are_checked_as_build_checks_them(artifact, tmp_path, capsys):
    """save_item_table truncated fractional ids and attribute values (1000.7 -> 1000) and refused
    attributes=None with a TypeError; load_towers took NaN weights, which `silvertorch build` published."""
    import shutil

    emb, ids = torch.randn(40, D), torch.arange(1000, 1040)
    attrs = (torch.ones(40, dtype=torch.int64), torch.arange(41), torch.randint(0, 4, (40,)))
    with pytest.raises(ValueError, match="item_ids must be integers, got torch.float64"):
        save_item_table(tmp_path / "x.safetensors", emb, ids.double() + 0.7, attrs)
    with pytest.raises(ValueError, match="attributes: feature_ids and values must be integer tensors"):
        save_item_table(tmp_path / "x.safetensors", emb, ids, (attrs[0], attrs[1], attrs[2].double() + 0.5))
    with pytest.raises(ValueError, match="item_ids must be 40 distinct non-negative ids"):
        save_item_table(tmp_path / "x.safetensors", emb, ids[:39], attrs)
    save_item_table(tmp_path / "plain.safetensors", emb, ids, None)  # no attributes, as build allows
    table = load_item_table(tmp_path / "plain.safetensors")
    assert torch.equal(table.ids, ids) and table.attributes[0].numel() == 0 and torch.equal(table.attributes[1], torch.zeros(41, dtype=torch.int64))
    towers = tmp_path / "towers"
    shutil.copytree(artifact[0].parent / "towers", towers)
    _edit_tensor(towers, "towers.safetensors", "value_model.weights")
    capsys.readouterr()
    assert main(["build", "--towers", str(towers), "--items", str(tmp_path / "plain.safetensors"), "--out", str(tmp_path / "a"),
                 "--k-candidates", "20", "--num-results", "5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "towers.safetensors: value_model.weights has NaN or inf values" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("content", [b"", b"xx", b"\x00garbage" * 10])
def test_a_towers_file_that_is_no_safetensors_is_one_line(artifact, tmp_path, capsys, content):
    """A towers.safetensors that is no safetensors file (empty, truncated, garbage): load_towers raised
    safetensors' own SafetensorError, which `silvertorch build` printed as a traceback."""
    import shutil

    towers = tmp_path / "towers"
    shutil.copytree(artifact[0].parent / "towers", towers)
    (towers / "towers.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match="towers: no readable towers.safetensors"):
        load_towers(towers)
    capsys.readouterr()
    assert main(["build", "--towers", str(towers), "--items", str(artifact[0].parent / "items.safetensors"),
                 "--out", str(tmp_path / "a"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("silvertorch build: error: ") and "no readable towers.safetensors" in err, err
    assert err.count("\n") == 1, err


@pytest.mark.parametrize("version", ["2", "banana", None])
def test_an_item_table_of_another_format_version_is_refused(tmp_path, capsys, version):
    """load_item_table read the format but not its version: a table from a later version was built from silently."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    attrs = (torch.ones(4, dtype=torch.int64), torch.arange(5), torch.arange(4))
    path = save_item_table(tmp_path / "items.safetensors", torch.randn(4, D), torch.arange(4), attrs, {"genre": 1})
    assert torch.equal(load_item_table(path).ids, torch.arange(4))  # as saved: read
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta.pop("format_version")
    save_file(tensors, str(path), metadata=meta if version is None else dict(meta, format_version=version))
    with pytest.raises(ValueError, match=f"format version {version!r} is not supported .* reads version 1"):
        load_item_table(path)
    save_towers(tmp_path / "towers", EmbeddingTower([30], D), OverArch(D, 2, [8]), ValueModel(2))
    assert main(["build", "--towers", str(tmp_path / "towers"), "--items", str(path), "--out", str(tmp_path / "a"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("silvertorch build: error: ") and "format version" in err and err.count("\n") == 1, err


def test_server_hands_the_model_its_inputs_on_the_models_device(artifact):
    """Requests are parsed onto the CPU; the warm-up and every batch (features, per-request weights
    stacked with the fixed ones) must reach the model on its device. The model's buffers sit on
    meta, which stands in for a GPU, and its forward records the devices it is given."""
    from fastapi.testclient import TestClient

    from silvertorch.server import create_app

    model = RetrievalModel.load(artifact[0])
    model.codes = model.codes.to("meta")  # the device the server reads off the model
    model.value_model.weights = model.value_model.weights.to("meta")
    seen = []

    def forward(*inputs):
        seen.append({t.device.type for t in inputs if isinstance(t, torch.Tensor)})
        q, n = inputs[0].shape[0], model.num_results
        return (torch.arange(n).repeat(q, 1), torch.zeros(q, n), torch.zeros(q, n, 2), torch.zeros(q, n, dtype=torch.bool),
                torch.zeros(q, dtype=torch.int64))

    model.forward = forward
    with TestClient(create_app(model)) as client:
        for body in ({"user_features": [3]}, {"user_features": [3], "value_weights": [1, 0.5]}):
            assert client.post("/v1/retrieve", json=body).status_code == 200
    assert seen == [{"meta"}] * 3  # the warm-up, then the two requests


def test_value_weights_by_task_name_in_the_server_and_the_cli(tmp_path, capsys):
    """A Value Model with task names takes per-request weights as {task name: weight} (JSON object,
    `--value-weights watch=0,like=1`) beside the positional form; wrong names get a 400 or one line."""
    from fastapi.testclient import TestClient

    from silvertorch.server import create_app

    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    attrs = (torch.ones(N, dtype=torch.int64), torch.arange(N + 1), torch.randint(0, 4, (N,), generator=g))
    save_towers(tmp_path / "towers", EmbeddingTower([30], D), OverArch(D, 2, [8]),
                ValueModel(task_names=["watch", "like"], weights={"watch": 1.0, "like": 0.3}))
    save_item_table(tmp_path / "items.safetensors", torch.randn(N, D, generator=g), torch.arange(N), attrs, {"genre": 1})
    assert main(["build", "--towers", str(tmp_path / "towers"), "--items", str(tmp_path / "items.safetensors"),
                 "--out", str(tmp_path / "art"), "--k-candidates", "32", "--num-results", "5", "--quiet"]) == 0
    capsys.readouterr()
    model = RetrievalModel.load(tmp_path / "art")
    assert model.value_model.task_names == ["watch", "like"] and model.value_model.weights.tolist() == pytest.approx([1.0, 0.3])
    want = model.retrieve(torch.tensor([[3]]), [""], [0.0, 1.0]).ids[0].tolist()
    assert main(["query", str(tmp_path / "art"), "--user", "3", "--value-weights", "watch=0,like=1"]) == 0
    assert [row["id"] for row in json.loads(capsys.readouterr().out)["results"]] == want
    assert main(["query", str(tmp_path / "art"), "--user", "3", "--value-weights", "watch=0"]) == 2
    assert "value_weights must name every task exactly: missing ['like']" in capsys.readouterr().err
    with TestClient(create_app(model), raise_server_exceptions=False) as client:
        by_name = client.post("/v1/retrieve", json={"user_features": [3], "value_weights": {"like": 1, "watch": 0}})
        positional = client.post("/v1/retrieve", json={"user_features": [3], "value_weights": [0, 1]})
        assert by_name.status_code == positional.status_code == 200 and by_name.json()["ids"] == positional.json()["ids"] == want
        for weights, reason in (({"watch": 1}, "missing ['like']"), ({"watch": 1, "like": 1, "share": 1}, "unknown ['share']"),
                                ({"watch": "1", "like": 1}, "must be a list of 2 JSON numbers"), ([True, 1], "must be a list of 2"),
                                ([1.0], "value_weights must be [2] (one weight per task), got [1]")):
            r = client.post("/v1/retrieve", json={"user_features": [3], "value_weights": weights})
            assert r.status_code == 400 and reason in r.json()["error"], (weights, r.text)


def test_towers_keep_their_dtype_through_save_towers(tmp_path):
    # load_towers copied the weights into float32 modules: `silvertorch build` published other towers than were trained
    save_towers(tmp_path, EmbeddingTower([30], D).to(torch.bfloat16), OverArch(D, 2, [8]).to(torch.bfloat16),
                ValueModel(2, [1.0, 0.5]).to(torch.bfloat16))
    from silvertorch import load_towers

    modules = load_towers(tmp_path)
    assert {t.dtype for m in modules for t in m.state_dict().values()} == {torch.bfloat16}


def test_graph_batch_sizes_cover_every_batch_at_most_doubled():
    from silvertorch.server import graph_batch_sizes

    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert graph_batch_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    for max_batch in (1, 5, 48, 64):
        sizes = graph_batch_sizes(max_batch)
        assert all(next(s for s in sizes if s >= q) < 2 * q for q in range(1, max_batch + 1))


def test_cuda_graphs_need_a_cuda_model(artifact, capsys):
    from silvertorch.server import create_app

    with pytest.raises(ValueError, match="cuda_graphs needs the model on a CUDA device, it is on cpu"):
        create_app(RetrievalModel.load(artifact[0]), cuda_graphs=True)
    assert main(["serve", str(artifact[0]), "--port", "1", "--cuda-graphs"]) == 2
    assert "--cuda-graphs needs --device cuda" in capsys.readouterr().err
    assert main(["serve", str(artifact[0]), "--device", "gpu0"]) == 2
    assert "--device: expected a torch device such as cpu or cuda, got 'gpu0'" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["mps", "xpu", "meta"])
def test_serve_refuses_a_device_this_torch_cannot_serve_on_in_one_line(artifact, capsys, device):
    """--device of a type this torch build lacks (mps on Linux, xpu without XPU support) failed with
    a traceback from the model's load; meta (no data) with "model.safetensors is not readable"."""
    capsys.readouterr()
    assert main(["serve", str(artifact[0]), "--device", device, "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"silvertorch serve: --device: expected a device this torch can compute on, got {device!r}"), err
    assert err.count("\n") == 1, err


@pytest.mark.gpu
def test_server_replays_cuda_graphs_and_keeps_per_request_weights_eager(artifact):
    from fastapi.testclient import TestClient

    from silvertorch.server import ServerLimits, create_app

    model = RetrievalModel.load(artifact[0], device="cuda")
    want = model.retrieve(torch.tensor([[3]]), ["genre:1"])
    with TestClient(create_app(model, ServerLimits(max_batch=4), cuda_graphs=True)) as client:
        got = client.post("/v1/retrieve", json={"user_features": [3], "filter": "genre:1"}).json()
        weighted = client.post("/v1/retrieve", json={"user_features": [3], "value_weights": [1, 0.5]})
    assert got["ids"] == [i for i in want.ids[0].tolist() if i >= 0]
    assert weighted.status_code == 200
