"""silvertorch command line: build an artifact, query it, serve it.

    silvertorch build --towers towers/ --items items.safetensors --out artifact/ [--n-clusters 64 --max-nprobe 32 ...]
    silvertorch query artifact/ --user 42 --filter 'genre:Comedy AND year:{1995,1996}' -n 10
        -> {"found": 1234, "results": [{"id": ..., "score": ..., "fresh": false}, ...]}
    silvertorch serve artifact/ [--host 127.0.0.1] [--port 8080] [--max-batch 64]
    silvertorch package artifact/ model.pt2 --user 42 [--max-batch 1024]
        -> an AOTInductor package of the forward (see RetrievalModel.package)
"""

from __future__ import annotations

import argparse
import json
import socket
import sys


def _build(args) -> int:
    from .publish import load_item_table, load_towers, publish

    user_tower, overarch, value_model = load_towers(args.towers)
    embeddings, ids, attributes, schema = load_item_table(args.items)
    model = publish(args.out, user_tower, overarch, value_model, item_embeddings=embeddings, item_ids=ids,
                    attributes=attributes, schema=schema, progress=not args.quiet, n_clusters=args.n_clusters,
                    nprobe=args.nprobe, max_nprobe=args.max_nprobe, k_candidates=args.k_candidates, num_results=args.num_results,
                    fresh_capacity=args.fresh_capacity, bloom_k=args.bloom_k, bloom_multiplier=args.bloom_multiplier,
                    **({} if args.max_exact_terms is None else {"max_exact_terms": args.max_exact_terms}))
    print(json.dumps({"artifact": str(args.out), "items": model.num_main, "clusters": model.centroids.shape[0],
                      "bloom_bytes_per_item": round(model.bloom_bits.numel() * 8 / model.num_main, 2)}))
    return 0


def _query(args) -> int:
    from .model import RetrievalModel

    model = RetrievalModel.load(args.artifact)
    features = _user_features(model, args.user)
    weights = [float(w) for w in args.value_weights.split(",")] if args.value_weights else None
    r = model.retrieve(features, [args.filter], weights)
    keep = r.ids[0] >= 0
    rows = [{"id": int(i), "score": round(float(s), 5), "fresh": bool(f)}
            for i, s, f in zip(r.ids[0][keep], r.scores[0][keep], r.fresh[0][keep])]
    print(json.dumps({"found": int(r.found[0]), "results": rows[: args.n]}, indent=1))
    return 0


def _user_features(model, text: str):
    """One user's features from a comma-separated list, in the dtype the user tower takes."""
    import torch

    features = torch.tensor([[float(v) for v in text.split(",")]])
    spec = model.config()["user_tower"].get("input") or {}
    return features.long() if spec.get("dtype") == "int64" else features


def _package(args) -> int:
    from .model import RetrievalModel

    model = RetrievalModel.load(args.artifact)
    path = model.package(args.out, _user_features(model, args.user), [args.filter], max_batch=args.max_batch)
    print(json.dumps({"package": str(path), "max_batch": args.max_batch, "inputs": "user_features, ops, args, hashes",
                      "outputs": "ids, scores, task_probs, fresh, found"}))
    return 0


def _serve(args) -> int:
    from .model import RetrievalModel
    from .server import ServerLimits, serve

    with socket.socket() as probe:
        try:
            probe.bind((args.host, args.port))
        except OSError as err:
            print(f"silvertorch serve: cannot bind {args.host}:{args.port} ({err.strerror}); pass another --port", file=sys.stderr)
            return 2
    model = RetrievalModel.load(args.artifact)
    serve(model, args.host, args.port, ServerLimits(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, timeout_s=args.timeout))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="silvertorch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="publish towers + an item table into a retrieval model artifact")
    b.add_argument("--towers", required=True, help="directory written by silvertorch.save_towers")
    b.add_argument("--items", required=True, help="safetensors file written by silvertorch.save_item_table")
    b.add_argument("--out", required=True, help="artifact directory to write")
    b.add_argument("--n-clusters", type=int, default=None, help="IVF clusters (default sqrt(items))")
    b.add_argument("--nprobe", type=int, default=8)
    b.add_argument("--max-nprobe", type=int, default=None,
                   help="adaptive probing: probe up to this many clusters until k-candidates items pass the filter (default: --nprobe)")
    b.add_argument("--max-exact-terms", type=int, default=None,
                   help="terms under NOT one filter may have (evaluated exactly; the forward's cost grows with it; "
                        "default: RetrievalModel.build's)")
    b.add_argument("--k-candidates", type=int, default=256, help="candidates re-scored by OverArch")
    b.add_argument("--num-results", type=int, default=10, help="top-N returned per query (the most a request may ask)")
    b.add_argument("--fresh-capacity", type=int, default=1024, help="items that can be added without a rebuild")
    b.add_argument("--bloom-k", type=int, default=3)
    b.add_argument("--bloom-multiplier", type=float, default=5.0)
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_build)
    q = sub.add_parser("query", help="run one query against an artifact")
    q.add_argument("artifact")
    q.add_argument("--user", required=True, help="user features, comma-separated (e.g. a user id)")
    q.add_argument("--filter", default="", help="filter expression, e.g. 'genre:Comedy AND NOT year:1995'")
    q.add_argument("-n", type=int, default=10)
    q.add_argument("--value-weights", default=None, help="per-task weights for the Value Model, comma-separated")
    q.set_defaults(func=_query)
    s = sub.add_parser("serve", help="serve an artifact over HTTP (needs silvertorch[serve])")
    s.add_argument("artifact")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--max-batch", type=int, default=64)
    s.add_argument("--max-wait-ms", type=float, default=2.0)
    s.add_argument("--timeout", type=float, default=10.0, help="seconds before a request gets a 504")
    s.set_defaults(func=_serve)

    pk = sub.add_parser("package", help="compile the model into an AOTInductor package (.pt2) that runs without silvertorch")
    pk.add_argument("artifact")
    pk.add_argument("out", help="the package file to write (.pt2)")
    pk.add_argument("--user", required=True, help="an example user's features, comma-separated (traced with)")
    pk.add_argument("--filter", default="", help="an example filter expression")
    pk.add_argument("--max-batch", type=int, default=1024, help="the most users one call of the package may take")
    pk.set_defaults(func=_package)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError) as err:
        print(f"silvertorch {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
