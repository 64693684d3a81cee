"""tools/gpu_session.sh keeps to its time budget: with none left it skips every step, naming each; `--help`
and unknown arguments run nothing."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["gpukernels-common", "silvertorch", "moeblaze", "freescale", "multibalance"]
BENCHES = ["silvertorch/bench_ivf", "moeblaze/bench_speed", "silvertorch/bench_topk", "multibalance/bench_overhead",
           "silvertorch/bench_bloom", "silvertorch/bench_model"]


def test_skips_what_the_budget_leaves_no_time_for(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_SESSION_SECONDS": "0"}
    subprocess.run(["bash", str(ROOT / "tools" / "gpu_session.sh")], env=env, check=True, timeout=120)
    assert "commit" in (tmp_path / "env.txt").read_text()
    tests, benches = (tmp_path / "gpu_tests.log").read_text(), (tmp_path / "bench.log").read_text()
    assert all(f"== {p}: skipped" in tests for p in PACKAGES), tests
    assert all(f"== {b}: skipped" in benches for b in BENCHES), benches
    assert "done in" in benches


def test_help_and_unknown_arguments_run_nothing(tmp_path):
    """`--help` (or a typo) ran the whole session: minutes of a GPU lease, results in $OUT."""
    env = {**os.environ, "OUT": str(tmp_path), "GPU_SESSION_SECONDS": "0"}
    script = str(ROOT / "tools" / "gpu_session.sh")
    shown = subprocess.run(["bash", script, "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "GPU_SESSION_SECONDS" in shown.stdout, shown.stderr
    refused = subprocess.run(["bash", script, "--bogus"], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "unknown argument '--bogus'" in refused.stderr
    assert not list(tmp_path.iterdir())  # no session ran
