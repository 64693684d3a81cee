"""HTTP server for a published RetrievalModel (optional extra: pip install silvertorch[serve]).

    silvertorch serve artifact/ --port 8080        # binds 127.0.0.1 unless --host says otherwise

POST /v1/retrieve  {"user_features": [42], "filter": "genre:Comedy", "n": 10, "value_weights": [1, 0.5]}
                   ("value_weights": {"watch": 1, "like": 0.5} for a Value Model with task_names)
             ->    {"ids": [...], "scores": [...], "task_probs": [[...], ...], "fresh": [...], "found": 1234,
                    "batch_size": 7}
`found`: the items that passed the filter in the probed clusters and the fresh index (exact up to
4 x k_candidates, see RetrievalModel); fewer than the model's k_candidates means the filter starved the candidates.
GET  /healthz (alive), /readyz (model loaded and warmed up), /metrics (latency percentiles, batch sizes;
`requests` counts every POST /v1/retrieve, `errors` every non-2xx answer to one)

Requests are validated and their filters compiled in the handler (a bad request is a 400 with the
reason and never reaches the model); valid ones wait at most `max_wait_ms` in a queue, and one
worker runs up to `max_batch` of them as one forward in a worker thread (if that forward fails, its
requests are retried apart, so only the one the model rejects fails). Requests are capped in body
size (the bytes received: chunked uploads too), expression length and n, and time out after
`timeout_s` (504; a body that has not arrived within `timeout_s`: 408). On shutdown the server stops taking requests, finishes the queued ones, then exits.
"""


import asyncio
import collections
import contextlib
import dataclasses
import time

import torch

from .bloom.parser import FilterSyntaxError
from .model import RetrievalModel


@dataclasses.dataclass
class ServerLimits:
    max_batch: int = 64
    max_wait_ms: float = 2.0
    max_expression_length: int = 1024
    max_body_bytes: int = 65536
    timeout_s: float = 10.0
    max_queue: int = 4096


class _Pending:
    __slots__ = ("features", "plan", "weights", "n", "future")

    def __init__(self, features, plan, weights, n, future):
        self.features, self.plan, self.weights, self.n, self.future = features, plan, weights, n, future


class Metrics:
    def __init__(self, window: int = 10000):
        self.latencies = collections.deque(maxlen=window)
        self.batch_sizes = collections.Counter()
        self.requests = self.errors = self.batches = 0

    def snapshot(self) -> dict:
        lat = sorted(self.latencies)

        def pct(p):
            return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000, 3) if lat else None

        total = sum(self.batch_sizes.values())
        mean = sum(b * c for b, c in self.batch_sizes.items()) / total if total else None
        return {"requests": self.requests, "errors": self.errors, "batches": self.batches,
                "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99)},
                "batch_size": {"mean": mean, "max": max(self.batch_sizes, default=None),
                               "histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())}}}


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes a server captures with `cuda_graphs`: powers of two below max_batch, and
    max_batch (a batch runs the smallest that holds it, so padding at most doubles its work)."""
    return sorted({2**i for i in range(max_batch.bit_length()) if 2**i < max_batch} | {max_batch})


def create_app(model: RetrievalModel, limits: ServerLimits | None = None, cuda_graphs: bool = False):
    """The FastAPI app serving `model`. `cuda_graphs`: the forward is captured at start-up as CUDA
    graphs (`RetrievalModel.capture`, at `graph_batch_sizes(limits.max_batch)`) and batches
    without per-request value weights replay them; needs the model on a CUDA device."""
    try:
        from fastapi import FastAPI, HTTPException
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse
        from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError as err:
        raise ImportError("the server needs the serve extra: pip install 'silvertorch[serve]'") from err

    limits = limits or ServerLimits()
    if cuda_graphs and model.codes.device.type != "cuda":
        raise ValueError(f"cuda_graphs needs the model on a CUDA device, it is on {model.codes.device}")
    model.eval()
    spec = model.config()["user_tower"].get("input") or {}
    if cuda_graphs and "width" not in spec:  # the batch captured is made from it
        raise ValueError("cuda_graphs needs a user tower with an input_spec ({'dtype', 'width', ...}: the features "
                         "the graphs are captured for)")
    n_tasks = model.value_model.num_tasks

    class RetrieveRequest(BaseModel):
        # strict: a misspelled field is a 400, not ignored (a dropped "filter" would answer unfiltered),
        # and true or "42" are not numbers
        model_config = ConfigDict(extra="forbid")
        user_features: list[StrictInt | StrictFloat] = Field(min_length=1, max_length=4096)
        filter: StrictStr = Field(default="", max_length=limits.max_expression_length)
        n: StrictInt = Field(default=model.num_results, ge=1, le=model.num_results)
        # one weight per task, in task order, or {task name: weight} naming every task (a Value Model with
        # task_names); the count and the names are checked by the Value Model, which names what is wrong
        value_weights: list[StrictInt | StrictFloat] | dict[StrictStr, StrictInt | StrictFloat] | None = None

        @field_validator("value_weights", mode="before")
        @classmethod
        def _weights_are_numbers(cls, value):  # one message for both forms (the union's would name a branch)
            numbers = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
            if value is not None and (numbers is None or not all(type(x) in (int, float) for x in numbers)):
                raise ValueError(f"must be a list of {n_tasks} JSON numbers (one per task) or an object {{task name: number}}")
            return value

    state = {"ready": False, "accepting": True, "captured": None}
    metrics = Metrics()
    queue: asyncio.Queue = asyncio.Queue(maxsize=limits.max_queue)

    def run_batch(batch: list[_Pending]):
        device = model.codes.device  # the handlers build features and weights on the CPU
        feats = torch.stack([p.features for p in batch]).to(device)
        ops, args, hashes = (torch.cat(parts) for parts in zip(*(p.plan for p in batch)))
        weights = None
        if any(p.weights is not None for p in batch):
            fixed = model.value_model.weights
            weights = torch.stack([p.weights.to(device) if p.weights is not None else fixed for p in batch])
        if state["captured"] is not None and weights is None:  # the graphs hold the fixed weights only
            return state["captured"](feats, ops, args, hashes)
        with torch.no_grad():
            return model(feats, ops, args, hashes, weights)

    async def worker():
        while True:
            first = await queue.get()
            batch = [first]
            deadline = time.perf_counter() + limits.max_wait_ms / 1000
            while len(batch) < limits.max_batch:
                wait = deadline - time.perf_counter()
                if wait <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), wait))
                except asyncio.TimeoutError:
                    break
            batch = [p for p in batch if not p.future.done()]  # timed-out requests are dropped
            if not batch:
                continue
            await answer(batch)

    async def answer(batch: list[_Pending]):
        try:
            ids, scores, probs, fresh, found = await asyncio.to_thread(run_batch, batch)
        except Exception as err:  # a failed batch fails its requests, never the server
            if len(batch) > 1:  # e.g. one request of another width (a tower without input spec): only it fails
                groups: dict = {}
                for p in batch:
                    groups.setdefault(tuple(p.features.shape), []).append(p)
                # requests of one shape still run together; a batch of one shape that fails runs one by one
                for part in groups.values() if len(groups) > 1 else ([p] for p in batch):
                    if any(not p.future.done() for p in part):
                        await answer([p for p in part if not p.future.done()])
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(err)
            return
        metrics.batches += 1
        metrics.batch_sizes[len(batch)] += 1
        for i, p in enumerate(batch):
            if not p.future.done():
                p.future.set_result((ids[i, : p.n], scores[i, : p.n], probs[i, : p.n], fresh[i, : p.n], int(found[i]),
                                     len(batch)))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(worker())
        warm = torch.zeros(1, spec.get("width", 1), dtype=torch.int64 if spec.get("dtype") == "int64" else torch.float32,
                           device=model.codes.device)
        if cuda_graphs:  # before ready: a capture that fails stops the start-up, with its error
            state["captured"] = await asyncio.to_thread(model.capture, warm, graph_batch_sizes(limits.max_batch))
        with contextlib.suppress(Exception):  # a tower with another input shape warms up on its first request
            await asyncio.to_thread(model, warm, *model.prepare_filters([""]))
        state["ready"] = True
        yield
        state["ready"] = state["accepting"] = False
        for _ in range(int(limits.timeout_s * 100)):  # drain: queued requests are answered before exit
            if queue.empty():
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = FastAPI(title="silvertorch", lifespan=lifespan)

    def bad(reason: str, status: int = 400):  # counted in the metrics by the guard below
        return JSONResponse({"error": reason}, status_code=status)

    too_large = f"request body larger than {limits.max_body_bytes} bytes"
    too_slow = f"the request body took longer than {limits.timeout_s} s to arrive"

    class Guard:
        """Pure ASGI: caps the body bytes actually received (a chunked upload has no content-length) and the
        time they take to arrive (timeout_s: 408), and counts every POST /v1/retrieve in `requests` and every non-2xx answer to it in `errors`."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            counted = scope["method"] == "POST" and scope["path"] == "/v1/retrieve"
            status = None

            async def send_counted(message):
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    if counted and not 200 <= status < 300:
                        metrics.errors += 1
                await send(message)

            if counted:
                metrics.requests += 1
            size = dict(scope["headers"]).get(b"content-length")
            if size is not None and (not size.isdigit() or int(size) > limits.max_body_bytes):
                return await bad(too_large, 413)(scope, receive, send_counted)
            received, body_done = 0, False
            deadline = time.perf_counter() + limits.timeout_s

            async def capped_receive():
                nonlocal received, body_done
                if body_done:  # after the body: disconnect notices, not timed
                    return await receive()
                try:
                    # a client that stops sending its body held the request and its connection open forever
                    message = await asyncio.wait_for(receive(), max(deadline - time.perf_counter(), 0))
                except asyncio.TimeoutError:
                    raise HTTPException(408, too_slow) from None
                body_done = message["type"] != "http.request" or not message.get("more_body", False)
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limits.max_body_bytes:
                        # an HTTPException passes FastAPI's body parsing as is (anything else becomes a 400)
                        raise HTTPException(413, too_large)
                return message

            try:
                await self.app(scope, capped_receive, send_counted)
            except Exception:
                if counted and status is None:  # the 500 is sent by the outermost middleware, past send_counted
                    metrics.errors += 1
                raise

    app.add_middleware(Guard)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_crash(request, exc):
        return bad(f"internal error: {type(exc).__name__}", 500)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
        return bad(f"{where}: {first.get('msg', 'invalid request')}")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        ok = state["ready"] and state["accepting"]
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def get_metrics():
        return metrics.snapshot()

    @app.post("/v1/retrieve")
    async def retrieve(req: RetrieveRequest):
        start = time.perf_counter()
        if not state["accepting"]:
            return bad("the server is shutting down", 503)
        try:  # float64 holds every id a JSON number can carry exactly; an id tower gets int64 back
            features = model.check_user_features(torch.tensor([req.user_features], dtype=torch.float64))[0]
        except ValueError as err:
            return bad(str(err))
        except OverflowError:  # an integer past float64's range
            return bad("user_features: a number is out of range")
        try:
            plan = model.prepare_filters([req.filter])
        except (FilterSyntaxError, ValueError, TypeError) as err:
            return bad(f"filter: {err}")
        try:  # one request's weights, [T]: finite, their scores too, and only for a weighted-sum Value Model
            weights = None if req.value_weights is None else model.value_model.check_request_weights(req.value_weights)
        except ValueError as err:
            return bad(str(err))
        future = asyncio.get_running_loop().create_future()
        try:
            queue.put_nowait(_Pending(features, plan, weights, req.n, future))
        except asyncio.QueueFull:
            return bad("the server is overloaded; retry later", 503)
        try:
            ids, scores, probs, fresh, found, batch_size = await asyncio.wait_for(future, limits.timeout_s)
        except asyncio.TimeoutError:
            return bad(f"the request took longer than {limits.timeout_s} s", 504)
        except Exception as err:
            return bad(f"internal error: {type(err).__name__}: {err}", 500)
        keep = ids >= 0
        metrics.latencies.append(time.perf_counter() - start)
        return {"ids": ids[keep].tolist(), "scores": scores[keep].tolist(), "task_probs": probs[keep].tolist(),
                "fresh": fresh[keep].tolist(), "found": found, "batch_size": batch_size}

    return app


def serve(model: RetrievalModel, host: str = "127.0.0.1", port: int = 8080, limits: ServerLimits | None = None,
          log_level: str = "info", cuda_graphs: bool = False) -> None:
    """Run the server until interrupted (SIGINT/SIGTERM shut it down gracefully); `cuda_graphs`:
    see `create_app`."""
    try:
        import uvicorn
    except ImportError as err:
        raise ImportError("the server needs the serve extra: pip install 'silvertorch[serve]'") from err
    uvicorn.run(create_app(model, limits, cuda_graphs), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
