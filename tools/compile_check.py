"""Compile every Triton kernel the tests launch, for a GPU target, on a machine without a GPU.

    python tools/compile_check.py                         # all packages, sm_90
    python tools/compile_check.py moeblaze --arch 80 90
    python tools/compile_check.py --log launches.jsonl    # reuse a recorded log
    python tools/compile_check.py silvertorch -- -n 2 -k bloom   # after --: pytest arguments

Step 1 runs the packages' tests through the interpreter with `launch_recorder` (one JSON line
per distinct specialisation) under `GKC_GPU_LAUNCH_SHAPES=1`, so the kernels are launched with
the tile sizes and operand dtypes a GPU run takes; the interpreter computes wrong numbers with
some of them (16-bit `tl.dot`), so test failures are expected there and ignored. A
specialisation with float16 tensors is also compiled with bfloat16 ones: the interpreter tests
use fp16 where GPU runs use bf16. Step 2, in a fresh process without TRITON_INTERPRET, hands each
specialisation to `JITFunction.warmup` behind a compile-only driver: Triton lowers it to PTX
and its bundled ptxas assembles the cubin, so unsupported ops, layout or dtype errors and
shared-memory overflows show up before a GPU session is spent on them. `cuobjdump` reports
registers and local memory (spills) per kernel. Nothing runs on a GPU: a kernel that compiles
can still compute wrong numbers; the `gpu`-marked tests are for that.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["silvertorch", "moeblaze", "freescale", "multibalance"]


def with_kernels(packages: list[str]) -> list[str]:
    """The packages whose sources define a Triton kernel: the others' tests launch none of their
    own, and recording them would only spend CI minutes (freescale has none today)."""
    return [p for p in packages
            if any("@triton.jit" in f.read_text() for f in (ROOT / "packages" / p / "src").rglob("*.py"))]
# largest dynamic shared memory per block (bytes): sm_80 A100, sm_90 H100/H200
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


# Tests the record step leaves out: each records no specialisation that the tests left in miss. Their
# kernels run in worker processes the recorder never sees (DDP, a served model, a packaged model
# run by torch alone), or in-process at shapes and flags that cheaper tests launch too. Checked by
# recording every test with the test that launched each specialisation (a pytest plugin around
# `launch_recorder._record`): the set is the same with and without them, 281 recorded on Triton
# 3.9. A prefix (no [params]) leaves out every parametrisation.
NOT_RECORDED = [
    "packages/silvertorch/tests/test_cli_server.py::test_package_command",
    "packages/silvertorch/tests/test_cli_server.py::test_real_server_batches_concurrent_requests_and_rejects_bad_ones",
    "packages/silvertorch/tests/test_cli_server.py::test_server_a_bad_request_fails_alone_in_its_batch",
    "packages/silvertorch/tests/test_ivf_index.py::test_fresh_items_are_merged_tagged_filtered_saved_and_compacted[IVFIndex]",
    "packages/silvertorch/tests/test_ivf_index.py::test_indexes_and_filters_made_under_inference_mode",
    "packages/silvertorch/tests/test_retrieval_model.py::test_aoti_package_runs_without_silvertorch",
    "packages/silvertorch/tests/test_retrieval_model.py::test_adaptive_model_exports_and_round_trips",
    "packages/silvertorch/tests/test_retrieval_model.py::test_adaptive_probing_equals_fixed_when_the_first_clusters_suffice",
    "packages/silvertorch/tests/test_retrieval_model.py::test_bloom_false_positives_removed_by_exact_verification",
    "packages/silvertorch/tests/test_retrieval_model.py::test_compile_full_graph",
    "packages/silvertorch/tests/test_retrieval_model.py::test_custom_ops_pass_opcheck",
    "packages/silvertorch/tests/test_retrieval_model.py::test_exact_verification_replaces_false_positives_with_the_next_true_matches[widened pools]",
    "packages/silvertorch/tests/test_retrieval_model.py::test_export_round_trip",
    "packages/silvertorch/tests/test_retrieval_model.py::test_probed_cluster_bits_equal_bloom_index",
    "packages/silvertorch/tests/test_retrieval_model.py::test_top_n_matches_plain_pipeline",
    "packages/moeblaze/tests/test_parallel.py::test_expert_parallel_equals_single_process[all_on_rank0]",
    "packages/multibalance/tests/test_ddp.py",
    "packages/multibalance/tests/test_ddp_baselines.py",
]


def record(packages: list[str], log: Path, pytest_args: list[str]) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "GKC_GPU_LAUNCH_SHAPES": "1", "GKC_LAUNCH_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tools"), os.environ.get("PYTHONPATH", "")])}
    for p in packages:
        skip = [arg for t in NOT_RECORDED if t.startswith(f"packages/{p}/")
                for arg in (("--deselect", t) if "::" in t else ("--ignore", str(ROOT / t)))]
        cmd = [sys.executable, "-m", "pytest", str(ROOT / "packages" / p / "tests"), "-q", "-p", "launch_recorder",
               "-p", "no:cacheprovider", "--import-mode=importlib", *skip, *pytest_args]
        print("record:", " ".join(cmd[2:]), flush=True)
        rc = subprocess.call(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        if rc not in (0, 1):  # 1: some tests failed, expected with GPU shapes in the interpreter
            raise SystemExit(f"pytest could not run the {p} tests (exit {rc})")


class CompileOnlyDriver:
    """Stands in for the CUDA driver: names a target, never touches a device."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _decode(value, torch, tl):
    if isinstance(value, dict) and "tensor" in value:
        dtype = getattr(torch, value["tensor"])
        base = torch.empty(64, dtype=dtype)
        return base if value["aligned"] else base[1:]
    if isinstance(value, dict) and "int" in value:
        return value["int"]
    if isinstance(value, dict) and "tl_dtype" in value:
        return getattr(tl, value["tl_dtype"])
    return value


def _resource_usage(cubin: bytes) -> dict:
    """Registers and local memory (spills) from the bundled cuobjdump (empty when it is missing)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for key in ("REG", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m:
            usage[key.lower()] = int(m.group(1))
    return usage


def _kernel(module: str, qualname: str):
    """The JITFunction, found by module and qualified name (kernels live at module level)."""
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _short(exc: BaseException) -> str:
    """The innermost compilation error's source line and the root cause's message."""
    chain = []
    while exc is not None and len(chain) < 20:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    where = ""
    for e in chain:
        lines = [x for x in str(e).splitlines() if x.strip()]
        caret = next((i for i, x in enumerate(lines) if x.strip() == "^"), None)
        if caret:
            where = lines[caret - 1].strip()
    root = chain[-1]
    lines = [x for x in str(root).splitlines() if x.strip()]
    message = f"{type(root).__name__}: {lines[-1].strip() if lines else ''}"
    return f"{where} | {message}" if where and where not in message else message


def _entries(log: Path) -> list[dict]:
    recorded = list(dict.fromkeys(log.read_text().splitlines()))  # dedupe across pytest workers, keep order
    twins = [x.replace('"float16"', '"bfloat16"') for x in recorded]
    return [json.loads(x) for x in dict.fromkeys(recorded + twins)]


def _label(e: dict) -> str:
    consts = {k: v for k, v in e["args"].items() if not isinstance(v, dict)}
    dtypes = sorted({v["tensor"] for v in e["args"].values() if isinstance(v, dict) and "tensor" in v})
    return f"{e['module']}.{e['name']} {consts} tensors {'/'.join(dtypes)}"


def compile_entries(log: Path, arch: int, start: int, stop: int) -> None:
    """The child: compile entries[start:stop] for one target, one JSON line per entry on stdout.

    One target per process: a JITFunction caches the target of its first compilation."""
    import torch
    import triton.language as tl
    from triton.runtime import driver

    driver.set_active(CompileOnlyDriver(arch))
    for i, e in enumerate(_entries(log)[start:stop], start):
        print(json.dumps({"begin": i}), flush=True)  # so the parent can name a kernel that crashes the compiler
        result = {"index": i}
        try:
            fn = _kernel(e["module"], e["name"])
            args = {k: _decode(v, torch, tl) for k, v in e["args"].items()}
            options = {k: _decode(v, torch, tl) for k, v in e["options"].items()}
            kernel = fn.warmup(grid=(1,), **args, **options)
            result.update(shared=kernel.metadata.shared, **_resource_usage(kernel.asm["cubin"]))
        except Exception as exc:  # report every failure
            result["error"] = _short(exc)
        print(json.dumps(result), flush=True)


def _verdict(r: dict, arch: int) -> tuple[str, list[str]]:
    """ok, WARN (spills to local memory) or FAIL (an error, or more shared memory than the target has)."""
    problems = []
    limit = MAX_SHARED.get(arch)
    if "error" in r:
        problems.append(r["error"])
    elif limit and r["shared"] > limit:
        problems.append(f"shared memory {r['shared']} B > {limit} B")
    if not problems and r.get("local"):
        return "WARN", [f"spills {r['local']} B to local memory"]
    return ("FAIL" if problems else "ok"), problems


def check(log: Path, arches: list[int], jobs: int | None = None) -> int:
    """Compile every entry for every target in `jobs` child processes at a time (default: one per
    CPU), each taking a contiguous slice of the entries; print one line each and a summary."""
    import triton

    entries = _entries(log)
    if not entries:  # a ZeroDivisionError below, where the recording path says this in words
        raise SystemExit(f"{log}: no Triton kernel launch to compile")
    n_recorded = len(dict.fromkeys(log.read_text().splitlines()))
    print(f"triton {triton.__version__}: {len(entries)} specialisations ({n_recorded} recorded in {log}, "
          "the rest their bfloat16 twins)", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JITFunctions, not stand-ins
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="gkc-compile-check-")
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(entries)))
    per_kernel, lock = collections.Counter(), threading.Lock()

    def report(arch: int, entry: dict, status: str, text: str) -> None:
        with lock:
            per_kernel[(arch, entry["name"], status)] += 1
            print(f"{status:4s} sm_{arch} {_label(entry)}{text}", flush=True)

    def compile_slice(arch: int, start: int, stop: int) -> None:
        while start < stop:
            child = subprocess.Popen([sys.executable, __file__, "--compile-only", "--log", str(log), "--arch", str(arch),
                                      "--start", str(start), "--stop", str(stop)], env=env, stdout=subprocess.PIPE, text=True)
            current = None
            for line in child.stdout:
                if not line.startswith("{"):
                    continue
                r = json.loads(line)
                if "begin" in r:
                    current = r["begin"]
                    continue
                status, problems = _verdict(r, arch)
                usage = "" if "error" in r else f": regs {r.get('reg', '?')}, shared {r['shared']} B"
                report(arch, entries[r["index"]], status, f"{usage} {'; '.join(problems)}")
                current = None
            rc = child.wait()
            if current is None:
                if rc != 0:
                    raise RuntimeError(f"the compile process failed (exit {rc}) outside any kernel")
                return
            # the compiler itself crashed on this entry: report it, go on after it
            report(arch, entries[current], "FAIL", f" the compiler process died (exit {rc})")
            start = current + 1

    slices = min(3 * jobs, len(entries))  # more slices than processes: the pool evens out slow kernels
    bounds = [len(entries) * j // slices for j in range(slices + 1)]
    try:
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            for arch in arches:
                for done in [pool.submit(compile_slice, arch, a, b) for a, b in zip(bounds, bounds[1:])]:
                    try:
                        done.result()
                    except RuntimeError as err:
                        raise SystemExit(str(err)) from None
    finally:
        shutil.rmtree(env["TRITON_CACHE_DIR"], ignore_errors=True)
    print("\nsummary (target, kernel, status: specialisations)")
    for (arch, name, status), n in sorted(per_kernel.items()):
        print(f"  sm_{arch} {name.split('.')[-1]:28s} {status:4s} {n}")
    failures = sum(n for (_, _, status), n in per_kernel.items() if status == "FAIL")
    print(f"{failures} failure(s)")
    return failures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packages", nargs="*", metavar="PACKAGE", help=f"some of {PACKAGES} (default: those with Triton kernels)")
    ap.add_argument("--arch", type=int, nargs="+", default=[90], help="CUDA compute capabilities (default 90)")
    ap.add_argument("--log", type=Path, help="compile an existing launch log instead of running the tests")
    ap.add_argument("--keep-log", type=Path, help="where to keep the recorded log")
    ap.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)  # the child's half
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--stop", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--jobs", type=int, default=None, help="compile processes at a time (default: one per CPU)")
    argv = sys.argv[1:]
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []  # after --: extra pytest arguments
    args = ap.parse_args(argv[:len(argv) - len(pytest_args) - (1 if "--" in argv else 0)])
    unknown = set(args.packages) - set(PACKAGES)
    if unknown:
        ap.error(f"unknown packages {sorted(unknown)}; choose from {PACKAGES}")
    if args.compile_only:
        compile_entries(args.log, args.arch[0], args.start, args.stop)
        return
    if args.log is None:
        log = args.keep_log or Path(tempfile.mkdtemp()) / "launches.jsonl"
        log.unlink(missing_ok=True)
        record(args.packages or with_kernels(PACKAGES), log, pytest_args)
        if not log.exists():
            raise SystemExit("no Triton kernel was launched by these tests")
    else:
        log = args.log
    raise SystemExit(1 if check(log, args.arch, args.jobs) else 0)


if __name__ == "__main__":
    main()
