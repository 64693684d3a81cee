import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import release  # noqa: E402


@pytest.fixture
def tree(tmp_path):
    for dist, mod in release.DISTS.items():
        src = tmp_path / "packages" / dist / "src" / mod
        src.mkdir(parents=True)
        shutil.copy(ROOT / "packages" / dist / "src" / mod / "__about__.py", src / "__about__.py")
        shutil.copy(ROOT / "packages" / dist / "CHANGELOG.md", tmp_path / "packages" / dist / "CHANGELOG.md")
    return tmp_path


def _version(tree, dist):
    ns = {}
    exec((tree / "packages" / dist / "src" / release.DISTS[dist] / "__about__.py").read_text(), ns)
    return ns["__version__"]


def test_bump_one_package_only(tree):
    before = {d: _version(tree, d) for d in release.DISTS}
    new = release.release("moeblaze", "minor", root=tree)
    major, minor, _ = (int(x) for x in before["moeblaze"].split("."))
    assert new == f"{major}.{minor + 1}.0" == _version(tree, "moeblaze")
    assert all(_version(tree, d) == before[d] for d in release.DISTS if d != "moeblaze")
    assert f"## {new}" in (tree / "packages" / "moeblaze" / "CHANGELOG.md").read_text()


def test_release_takes_the_unreleased_entries(tree):
    """The new version's heading went above "## Unreleased": its entries stayed unreleased."""
    changelog = tree / "packages" / "freescale" / "CHANGELOG.md"
    changelog.write_text("# Changelog\n\n## Unreleased\n- a fix\n\n## 0.1.0\n- first\n")
    new = release.release("freescale", "1.2.3", root=tree)
    assert changelog.read_text() == f"# Changelog\n\n## Unreleased\n\n## {new}\n- a fix\n\n## 0.1.0\n- first\n"


def test_bad_part_is_rejected(tree):
    with pytest.raises(ValueError, match="major, minor, patch"):
        release.release("freescale", "huge", root=tree)
    with pytest.raises(ValueError, match="unknown distribution"):
        release.release("nope", "minor", root=tree)
