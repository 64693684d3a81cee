"""The README's quick start really runs and prints one line per package."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "quickstart.py")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for package in ("moeblaze", "silvertorch", "freescale", "multibalance"):
        assert any(line.startswith(package) for line in lines), proc.stdout
    assert " 0 lost" in proc.stdout
