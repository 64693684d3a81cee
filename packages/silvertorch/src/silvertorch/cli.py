"""silvertorch command line: build an artifact, query it, serve it.

    silvertorch build --towers towers/ --items items.safetensors --out artifact/ [--n-clusters 64 --max-nprobe 32 ...]
    silvertorch query artifact/ --user 42 --filter 'genre:Comedy AND year:{1995,1996}' -n 10
        -> {"found": 1234, "results": [{"id": ..., "score": ..., "fresh": false}, ...]}
    silvertorch serve artifact/ [--host 127.0.0.1] [--port 8080] [--max-batch 64] [--device cuda --cuda-graphs]
    silvertorch package artifact/ model.pt2 --user 42 [--max-batch 1024]
        -> an AOTInductor package of the forward (see RetrievalModel.package)
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import socket
import sys


def _build(args) -> int:
    from .publish import load_item_table, load_towers, publish

    user_tower, overarch, value_model = load_towers(args.towers)
    items = load_item_table(args.items)
    model = publish(args.out, user_tower, overarch, value_model, item_embeddings=items.embeddings, item_ids=items.ids,
                    attributes=items.attributes, schema=items.schema, item_dense=items.dense, progress=not args.quiet,
                    n_clusters=args.n_clusters, nprobe=args.nprobe, max_nprobe=args.max_nprobe, k_candidates=args.k_candidates, num_results=args.num_results,
                    fresh_capacity=args.fresh_capacity, bloom_k=args.bloom_k, bloom_multiplier=args.bloom_multiplier,
                    **({} if args.max_exact_terms is None else {"max_exact_terms": args.max_exact_terms}))
    print(json.dumps({"artifact": str(args.out), "items": model.num_main, "clusters": model.centroids.shape[0],
                      "bloom_bytes_per_item": round(model.bloom_bits.numel() * 8 / model.num_main, 2)}))
    return 0


def _query(args) -> int:
    from .model import RetrievalModel

    model = RetrievalModel.load(args.artifact)
    n = model.num_results if args.n is None else args.n
    if n > model.num_results:
        raise ValueError(f"-n: expected at most the model's num_results ({model.num_results}), got {n}")
    features = _user_features(model, args.user)
    weights = _value_weights(args.value_weights) if args.value_weights else None
    r = model.retrieve(features, [args.filter], weights)
    keep = r.ids[0] >= 0
    rows = [{"id": int(i), "score": round(float(s), 5), "fresh": bool(f)}
            for i, s, f in zip(r.ids[0][keep], r.scores[0][keep], r.fresh[0][keep])]
    print(json.dumps({"found": int(r.found[0]), "results": rows[:n]}, indent=1))
    return 0


def _user_features(model, text: str):
    """One user's features from a comma-separated list, in the dtype the user tower takes."""
    import torch

    spec = model.config()["user_tower"].get("input") or {}
    if spec.get("dtype") == "int64":  # ids: "1.9" is an error, not user 1
        try:
            return torch.tensor([[int(v) for v in text.split(",")]])
        except ValueError:
            raise ValueError(f"--user: expected comma-separated integers (the user tower takes ids), got {text!r}") from None
    return torch.tensor([_floats("--user", text)])


def _value_weights(text: str):
    """--value-weights: comma-separated numbers (task order) or name=number pairs (a Value Model with task_names)."""
    if "=" not in text:
        return _floats("--value-weights", text)
    weights = {}
    for pair in text.split(","):
        name, _, number = pair.partition("=")
        if not name.strip() or name.strip() in weights:
            raise ValueError(f"--value-weights: expected distinct name=number pairs, got {text!r}")
        weights[name.strip()] = _floats("--value-weights", number)[0]
    return weights


def _floats(flag: str, text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an int in [lo, hi] (argparse names the flag in the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected an integer {f'in [{lo}, {hi}]' if hi is not None else f'>= {lo}'}, got {value}")
        return value
    return parse


def _float_above(lo: float, inclusive: bool = False):
    """An argparse type: a finite float > lo (>= lo when inclusive)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < lo or (value == lo and not inclusive):
            raise argparse.ArgumentTypeError(f"expected a finite number {'>=' if inclusive else '>'} {lo}, got {text}")
        return value
    return parse


def _package(args) -> int:
    from .model import RetrievalModel, aoti_unsupported

    if (reason := aoti_unsupported()) is not None:
        print(f"silvertorch package: error: {reason}", file=sys.stderr)
        return 2
    model = RetrievalModel.load(args.artifact)
    path = model.package(args.out, _user_features(model, args.user), [args.filter], max_batch=args.max_batch)
    print(json.dumps({"package": str(path), "max_batch": args.max_batch, "inputs": "user_features, ops, args, hashes",
                      "outputs": "ids, scores, task_probs, fresh, found"}))
    return 0


def _serve(args) -> int:
    import torch

    from .model import RetrievalModel
    from .server import ServerLimits, serve

    try:
        # the family of --host's address: an IPv6 one (::1) failed an IPv4 probe ("Address family ... not supported")
        family = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family) as probe:
            if os.name == "posix":  # as uvicorn (asyncio) binds: a port whose closed connections wait in TIME_WAIT is free
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
    except OSError as err:
        if isinstance(err, socket.gaierror) or err.errno == errno.EADDRNOTAVAIL:  # the host is wrong, not the port
            print(f"silvertorch serve: --host: expected an address of this machine or a name that resolves to one, "
                  f"cannot bind {args.host} ({err.strerror})", file=sys.stderr)
            return 2
        print(f"silvertorch serve: cannot bind {args.host}:{args.port} ({err.strerror}); pass another --port", file=sys.stderr)
        return 2
    try:
        device = torch.device(args.device)
    except RuntimeError:
        print(f"silvertorch serve: --device: expected a torch device such as cpu or cuda, got {args.device!r}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("silvertorch serve: --device: CUDA is not available on this machine", file=sys.stderr)
        return 2
    try:
        # a device type this torch build lacks (mps, xpu) failed in the model's load with a traceback;
        # meta holds no data to serve (its load said "model.safetensors is not readable")
        torch.empty(0, device=device)
        usable = device.type != "meta"
    except Exception:  # RuntimeError, NotImplementedError, AssertionError ("Torch not compiled with XPU enabled")
        usable = False
    if not usable:
        print(f"silvertorch serve: --device: expected a device this torch can compute on, got {args.device!r} "
              f"(e.g. cpu, or cuda where CUDA is available)", file=sys.stderr)
        return 2
    if args.cuda_graphs and device.type != "cuda":
        print("silvertorch serve: --cuda-graphs needs --device cuda", file=sys.stderr)
        return 2
    model = RetrievalModel.load(args.artifact, device=args.device)
    serve(model, args.host, args.port, ServerLimits(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, timeout_s=args.timeout),
          cuda_graphs=args.cuda_graphs)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="silvertorch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="publish towers + an item table into a retrieval model artifact")
    b.add_argument("--towers", required=True, help="directory written by silvertorch.save_towers")
    b.add_argument("--items", required=True, help="safetensors file written by silvertorch.save_item_table")
    b.add_argument("--out", required=True, help="artifact directory to write")
    b.add_argument("--n-clusters", type=_int_in(1), default=None, help="IVF clusters (default sqrt(items))")
    b.add_argument("--nprobe", type=_int_in(1), default=None, help="clusters probed per query (default: 8, or every cluster of a small corpus)")
    b.add_argument("--max-nprobe", type=_int_in(1), default=None,
                   help="adaptive probing: probe up to this many clusters until k-candidates items pass the filter (default: --nprobe)")
    b.add_argument("--max-exact-terms", type=_int_in(1), default=None,
                   help="terms under NOT one filter may have (evaluated exactly; the forward's cost grows with it; "
                        "default: RetrievalModel.build's)")
    b.add_argument("--k-candidates", type=_int_in(1), default=256, help="candidates re-scored by OverArch")
    b.add_argument("--num-results", type=_int_in(1), default=10, help="top-N returned per query (the most a request may ask)")
    b.add_argument("--fresh-capacity", type=_int_in(0), default=1024, help="items that can be added without a rebuild")
    b.add_argument("--bloom-k", type=_int_in(1, 10), default=3, help="hash functions per attribute term (1-10)")
    b.add_argument("--bloom-multiplier", type=_float_above(1.0), default=5.0, help="Bloom bits per term per hash (> 1)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_build)
    q = sub.add_parser("query", help="run one query against an artifact")
    q.add_argument("artifact")
    q.add_argument("--user", required=True, help="user features, comma-separated (e.g. a user id)")
    q.add_argument("--filter", default="", help="filter expression, e.g. 'genre:Comedy AND NOT year:1995'")
    q.add_argument("-n", type=_int_in(1), default=None, help="results to print (default and most: the model's num_results)")
    q.add_argument("--value-weights", default=None, help="per-task weights for the Value Model, comma-separated in task order (1,0.5) "
                        "or by task name (watch=1,like=0.5)")
    q.set_defaults(func=_query)
    s = sub.add_parser("serve", help="serve an artifact over HTTP (needs silvertorch[serve])")
    s.add_argument("artifact")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=_int_in(1, 65535), default=8080)
    s.add_argument("--max-batch", type=_int_in(1), default=64)
    s.add_argument("--max-wait-ms", type=_float_above(0.0, inclusive=True), default=2.0)
    s.add_argument("--timeout", type=_float_above(0.0), default=10.0, help="seconds before a request gets a 504")
    s.add_argument("--device", default="cpu", help="device to serve on, e.g. cuda (default cpu)")
    s.add_argument("--cuda-graphs", action="store_true",
                   help="replay the forward as CUDA graphs captured at start-up (needs --device cuda)")
    s.set_defaults(func=_serve)

    pk = sub.add_parser("package", help="compile the model into an AOTInductor package (.pt2) that runs without silvertorch")
    pk.add_argument("artifact")
    pk.add_argument("out", help="the package file to write (.pt2)")
    pk.add_argument("--user", required=True, help="an example user's features, comma-separated (traced with)")
    pk.add_argument("--filter", default="", help="an example filter expression")
    pk.add_argument("--max-batch", type=_int_in(2), default=1024, help="the most users one call of the package may take")
    pk.set_defaults(func=_package)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError, OSError) as err:  # OSError: a path that cannot be read or written
        print(f"silvertorch {args.command}: error: {err}", file=sys.stderr)  # one line, no traceback
        return 2


if __name__ == "__main__":
    sys.exit(main())
