import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import check_boundaries  # noqa: E402


def test_repository_has_no_violations():
    assert check_boundaries.violations(ROOT) == []


@pytest.mark.parametrize(
    "source",
    [
        "import silvertorch\n",
        "from silvertorch.bloom import BloomIndex\n",
        "def f():\n    import silvertorch.ivf as x\n",
        "import importlib\nm = importlib.import_module('silvertorch.cli')\n",
        "m = __import__('silvertorch')\n",
        "import pytest\nst = pytest.importorskip('silvertorch.bloom')\n",
    ],
)
def test_violation_is_caught(tmp_path, source):
    fake = tmp_path / "packages" / "moeblaze" / "src" / "moeblaze"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text(source)
    (fake / "ok.py").write_text("import torch\nimport gpukernels_common\nimport moeblaze.dispatch\n")
    found = check_boundaries.violations(tmp_path)
    assert len(found) == 1 and "moeblaze imports silvertorch" in found[0], found
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "check_boundaries.py"), str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1 and "1 violation" in proc.stdout


def test_common_may_not_import_a_package(tmp_path):
    common = tmp_path / "packages" / "gpukernels-common" / "src" / "gpukernels_common"
    common.mkdir(parents=True)
    (common / "x.py").write_text("from freescale import partition\n")
    assert len(check_boundaries.violations(tmp_path)) == 1


def test_clean_tree_passes(tmp_path):
    pkg = tmp_path / "packages" / "freescale" / "src" / "freescale"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("from freescale import b\nfrom . import c\n")
    assert check_boundaries.violations(tmp_path) == []
