"""Benchmark helpers: timing, saved-for-backward bytes, peak memory, JSON-lines records."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import env
from .checks import check_numbers
from .device import device_name, has_cuda, triton_version

_RECORD_DEVICE: list[str] = []  # set by bench_args: the device a record's conditions describe by default


def bench_args(argv=None, gpu_help: str = "measure the GPU figures (needs CUDA)") -> argparse.Namespace:
    """The flags every benchmark script takes: --quick (small shapes, print only, record nothing)
    and --gpu. From here on a `BenchRecord` describes the GPU under --gpu and the CPU without it
    (a CPU run on a GPU host is not stamped with the GPU's name); pass `env=environment(device)`
    for a record measured elsewhere."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small shapes; print only, record nothing")
    parser.add_argument("--gpu", action="store_true", help=gpu_help)
    args = parser.parse_args(argv)
    _RECORD_DEVICE[:] = ["cuda" if args.gpu else "cpu"]
    return args


def time_fn(fn: Callable[[], object], *, device: torch.device | str = "cpu", warmup_ms=None, rep_ms=None) -> dict:
    """Median (and p20/p80) milliseconds of `fn()`.

    CUDA: `triton.testing.do_bench` (CUDA events, cache flushed). CPU: perf_counter over
    repeated calls after a warm-up, as many as fill `rep_ms` at the warm calls' pace (3 to 1000).
    """
    warmup_ms = env.bench_warmup_ms() if warmup_ms is None else warmup_ms
    rep_ms = env.bench_rep_ms() if rep_ms is None else rep_ms
    check_numbers(0.0, warmup_ms=warmup_ms, rep_ms=rep_ms)  # a NaN failed as "cannot convert float NaN to integer"
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"ms": p50, "ms_p20": p20, "ms_p80": p80}
    fn()  # cold: a JIT compile, a lazy init
    warm_start = time.perf_counter()
    deadline, calls = warm_start + warmup_ms / 1e3, 0
    while (now := time.perf_counter()) < deadline:
        fn()
        calls += 1
    # calls to fill rep_ms, sized by the warm calls: a cold first call (a JIT compile, a lazy
    # init) would leave 3 samples where rep_ms asks for hundreds; a warm-up too short for any
    # call (warmup_ms=0) times one warm call for it
    if calls:
        per_call = (now - warm_start) * 1e3 / calls
    else:
        t0 = time.perf_counter()
        fn()
        per_call = (time.perf_counter() - t0) * 1e3
    n = max(3, min(1000, int(rep_ms / max(per_call, 1e-3))))
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    # "inclusive": within the measured range (the default extrapolates past it from few samples)
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return {"ms": statistics.median(samples), "ms_p20": q[1], "ms_p80": q[7]}


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes of distinct storages that autograd saves for backward while `fn()` runs.

    Counted through `saved_tensors_hooks`, so it is exact on the CPU too. A storage saved
    twice (e.g. a weight used by two ops) counts once; parameters and inputs count if saved.
    """
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device.type, getattr(t.device, "index", None))
        seen[key] = max(seen.get(key, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def peak_cuda_memory(fn: Callable[[], object], device=None) -> int:
    """Peak CUDA bytes allocated during `fn()` above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def device_time_us(event) -> float:
    """A torch.profiler event's own device time in microseconds (`self_device_time_total`; torch
    before 2.4 named it `self_cuda_time_total`), 0 for a host-only event."""
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)


# host events that show where a call waits or launches: synchronisations, copies, launches
HOST_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "aten::item", "aten::_local_scalar_dense",
               "aten::nonzero", "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")


def print_profile(name: str, fn: Callable[[], object], calls: int = 5) -> dict:
    """Where `fn`'s time goes: wall milliseconds per call (synchronised), then under
    torch.profiler the kernels by device time, the aten ops by host time and the counts of
    HOST_EVENTS per call. Printed; also returned ({"wall_ms", "device_ms", "host_events"}). A
    diagnostic, not a benchmark: nothing is recorded. Without CUDA only the host side is seen."""
    cuda = torch.cuda.is_available()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    wall = (time.perf_counter() - t0) / calls * 1e3
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        sync()
    events = prof.key_averages()
    kernels = sorted((e for e in events if device_time_us(e) > 0), key=device_time_us, reverse=True)
    device_ms = sum(map(device_time_us, kernels)) / calls / 1e3
    print(f"\n### {name}: {wall:.3f} ms per call (wall, synchronised); device busy {device_ms:.3f} ms")
    for e in kernels[:10]:
        print(f"  gpu {device_time_us(e) / calls / 1e3:8.3f} ms x{e.count // calls:<4d} {e.key[:90]}")
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total, reverse=True)
    for e in ops[:12]:
        print(f"  cpu {e.self_cpu_time_total / calls / 1e3:8.3f} ms x{e.count // calls:<4d} {e.key[:90]}")
    host = {}
    for e in events:
        if e.key in HOST_EVENTS:
            host[e.key] = e.count / calls
            print(f"  host {e.key}: {e.count / calls:.1f} per call, {e.self_cpu_time_total / calls / 1e3:.3f} ms")
    return {"wall_ms": wall, "device_ms": device_ms, "host_events": host}


class _RankQueue:
    """The queue a spawned rank sees: what it puts goes tagged with its job and rank, so that
    `spawn_jobs` knows which process has reported (anything else is the queue's own)."""

    def __init__(self, queue, job: int, rank: int):
        self._queue, self._key = queue, (job, rank)

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        self._queue.put((self._key, item), block, timeout)

    def put_nowait(self, item) -> None:
        self._queue.put_nowait((self._key, item))

    def __getattr__(self, name):
        return getattr(self._queue, name)


def _run_rank(target: Callable, queue, job: int, rank: int, world: int, port: int, *args) -> None:
    target(_RankQueue(queue, job, rank), job, rank, world, port, *args)


# A rank's item is in the pipe before its process ends (the queue's feeder thread is joined at
# exit), but the parent may see the exit first: an exited rank is missing its item only once
# this long has passed since its exit was seen.
_REPORT_GRACE_S = 5.0


def spawn_jobs(target: Callable, world: int, args: tuple = (), *, jobs: int = 1, timeout: float = 600) -> list:
    """Run `jobs` independent multi-process jobs of `world` spawned local processes each (every job
    on its own loopback port, e.g. one torch.distributed process group per job) and return what
    the processes put on the queue, in arrival order.

    Process `rank` of job `job` calls target(queue, job, rank, world, port, *args) and must put
    exactly one item on the queue (None when it has nothing to report). A process that exits
    without reporting (with an error, or with code 0 after putting nothing) is a RuntimeError
    naming its job and rank, within seconds, not at the timeout.
    """
    import queue as queue_module

    import torch.multiprocessing as mp

    from .testing import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    ports = [free_port() for _ in range(jobs)]
    procs = [ctx.Process(target=_run_rank, args=(target, queue, j, r, world, ports[j], *args))
             for j in range(jobs) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results, reported, exit_seen, deadline = [], set(), {}, time.monotonic() + timeout
        while len(results) < len(procs):
            try:  # short waits: a process that died without reporting is named at once
                key, item = queue.get(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                results.append(item)
                reported.add(key)
                continue
            except queue_module.Empty:
                pass
            for i, p in enumerate(procs):
                if p.exitcode not in (None, 0):
                    raise RuntimeError(f"spawn_jobs: job {i // world} rank {i % world} exited with code {p.exitcode} "
                                       f"before reporting (its error is above)")
                if p.exitcode == 0 and (i // world, i % world) not in reported:
                    seen = exit_seen.setdefault(i, time.monotonic())
                    if time.monotonic() - seen >= _REPORT_GRACE_S:
                        raise RuntimeError(f"spawn_jobs: job {i // world} rank {i % world} exited with code 0 without "
                                           f"putting its result on the queue (the target must put exactly one item)")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"spawn_jobs: {len(procs) - len(results)} of {len(procs)} processes did not "
                                   f"report within {timeout:g} s")
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return results


def git_commit(cwd: str | Path | None = None) -> str:
    """The checkout's short commit (`-dirty` with uncommitted changes other than benchmark outputs:
    a benchmark that writes its records as it goes does not mark its own later records); GKC_COMMIT
    when set (a copy of the tree without its git history, as on a lent GPU machine); else "unknown"."""
    if os.environ.get("GKC_COMMIT"):
        return os.environ["GKC_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude,glob)**/benchmarks/results/**", ":(top,exclude,glob)**/benchmarks/RESULTS.md"],
                               cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device | str | None = None) -> dict:
    """The conditions every record carries, for `device` (default: the one `bench_args` chose; without
    it, CUDA when present)."""
    if device is None:
        device = _RECORD_DEVICE[0] if _RECORD_DEVICE else ("cuda" if has_cuda() else "cpu")
    dev = torch.device(device)
    return {
        "device": device_name(dev),
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


@dataclasses.dataclass
class BenchRecord:
    """One measured figure set: which benchmark, which provider, which shape, what came out."""

    bench: str
    provider: str
    shape: dict
    figures: dict
    env: dict = dataclasses.field(default_factory=environment)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> BenchRecord:
        return cls(**json.loads(line))


def write_records(path: str | Path, records: list[BenchRecord], *, append: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w") as f:
        for r in records:
            f.write(r.to_json() + "\n")
    return path


def read_records(path: str | Path) -> list[BenchRecord]:
    return [BenchRecord.from_json(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v).replace("|", "\\|").replace("\n", " ")  # a cell of its own in a Markdown row


_CONDITIONS = ("device", "torch", "triton", "python", "commit")  # what a table's records share (dates may differ)


def render_markdown(records: list[BenchRecord], title: str) -> str:
    """Group records by benchmark into Markdown tables, one per set of conditions (device,
    versions, commit), each under its conditions."""
    lines = [f"# {title}", "", "Generated from JSON-lines benchmark records; every table names its conditions.", ""]
    by_bench: dict[str, dict[tuple, list[BenchRecord]]] = {}
    for r in records:
        by_bench.setdefault(r.bench, {}).setdefault(tuple(r.env.get(k) for k in _CONDITIONS), []).append(r)
    for bench, groups in by_bench.items():
        lines += [f"## {bench}", ""]
        for recs in groups.values():
            lines += _table(recs)
    return "\n".join(lines)


def _table(recs: list[BenchRecord]) -> list[str]:
    e = recs[0].env
    dates = sorted({str(r.env.get("date")) for r in recs})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    lines = [
        f"Conditions: device `{e.get('device')}`, torch {e.get('torch')}, triton {e.get('triton')}, "
        f"python {e.get('python')}, commit `{e.get('commit')}`, {when}.",
        "",
    ]
    shape_keys = sorted({k for r in recs for k in r.shape})
    fig_keys = sorted({k for r in recs for k in r.figures})
    header = ["provider"] + shape_keys + fig_keys
    lines.append("| " + " | ".join(_fmt(h) for h in header) + " |")
    lines.append("|" + "---|" * len(header))
    for r in recs:
        row = [r.provider] + [r.shape.get(k, "") for k in shape_keys] + [r.figures.get(k, "") for k in fig_keys]
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    lines.append("")
    return lines


def render_results(jsonl_paths: list[str | Path], md_path: str | Path, title: str) -> Path:
    """Render every record in `jsonl_paths` (those that exist) into `md_path`."""
    records: list[BenchRecord] = []
    for p in jsonl_paths:
        if Path(p).exists():
            records.extend(read_records(p))
    md_path = Path(md_path)
    md_path.write_text(render_markdown(records, title))
    return md_path


def run_benchmarks(folder: str | Path, argv=None) -> int:
    """A package's `benchmarks/run.py`: run every `bench_*.py` in `folder` (each in its own
    interpreter, with the flags given: `--gpu`, `--quick`; `--only X` runs bench_X.py alone;
    `--render` runs none), then render `folder`/RESULTS.md from `folder`/results/*.jsonl.
    Returns 1 if a script failed (the others still run, the figures they wrote are rendered),
    else 0."""
    folder = Path(folder)
    parser = argparse.ArgumentParser(prog=f"{folder.parent.name}/benchmarks/run.py")
    parser.add_argument("--gpu", action="store_true", help="only the GPU benchmarks (on a machine with CUDA)")
    parser.add_argument("--only", default=None, help="only bench_ONLY.py")
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--render", action="store_true", help="run no benchmark: only render RESULTS.md from the records "
                        "(e.g. records brought back from a GPU machine)")
    args = parser.parse_args(argv)
    scripts = [] if args.render else sorted(folder.glob("bench_*.py"))
    if args.only and not args.render:
        scripts = [s for s in scripts if s.stem == f"bench_{args.only}"]
        if not scripts:  # a misspelt name ran nothing and reported success
            parser.error(f"--only {args.only}: no bench_{args.only}.py in {folder}")
    flags = (["--gpu"] if args.gpu else []) + (["--quick"] if args.quick else [])
    failed = []
    for script in scripts:
        print(f"== {script.name} {' '.join(flags)}", flush=True)
        if subprocess.run([sys.executable, str(script), *flags]).returncode != 0:
            failed.append(script.name)
    out = render_results(sorted((folder / "results").glob("*.jsonl")), folder / "RESULTS.md",
                         f"{folder.parent.name} benchmark results")
    print(f"wrote {out}")
    if failed:
        print(f"failed: {failed}")
    return 1 if failed else 0
