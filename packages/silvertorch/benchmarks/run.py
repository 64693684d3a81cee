"""`python benchmarks/run.py [--gpu] [--quick] [--only X] [--render]`: every bench_*.py here, then RESULTS.md (gpukernels_common.bench.run_benchmarks)."""

import sys
from pathlib import Path

from gpukernels_common.bench import run_benchmarks

if __name__ == "__main__":
    sys.exit(run_benchmarks(Path(__file__).resolve().parent))
