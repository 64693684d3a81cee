"""Run every bench_*.py beside this file, then render RESULTS.md from results/*.jsonl.

    python benchmarks/run.py            # CPU figures
    python benchmarks/run.py --gpu      # only the GPU benchmarks (on a machine with CUDA)
    python benchmarks/run.py --only X   # only bench_X.py
Each bench script writes its records with gpukernels_common.bench.write_records into
results/<name>.jsonl and accepts the same flags.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from gpukernels_common.bench import render_results

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--only", default=None)
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    args = parser.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem == f"bench_{args.only}"]
    failed = []
    for script in scripts:
        flags = (["--gpu"] if args.gpu else []) + (["--quick"] if args.quick else [])
        print(f"== {script.name} {' '.join(flags)}", flush=True)
        if subprocess.run([sys.executable, str(script), *flags]).returncode != 0:
            failed.append(script.name)
    package = HERE.parent.name
    out = render_results(sorted((HERE / "results").glob("*.jsonl")), HERE / "RESULTS.md", f"{package} benchmark results")
    print(f"wrote {out}")
    if failed:
        print(f"failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
