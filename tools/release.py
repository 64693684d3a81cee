"""Bump one package's version and name its CHANGELOG's "## Unreleased" entries with it (or open an entry).

    python tools/release.py silvertorch minor      # 0.1.0 -> 0.2.0
    python tools/release.py moeblaze 0.1.1         # explicit version
Then commit, and tag `<dist>-v<version>` to trigger that package's release workflow.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DISTS = {"gpukernels-common": "gpukernels_common", "silvertorch": "silvertorch", "moeblaze": "moeblaze",
         "freescale": "freescale", "multibalance": "multibalance"}
VERSION_RE = re.compile(r'^__version__ = "(\d+)\.(\d+)\.(\d+)"$', re.M)


def bump(version: tuple[int, int, int], part: str) -> str:
    major, minor, patch = version
    if part == "major":
        return f"{major + 1}.0.0"
    if part == "minor":
        return f"{major}.{minor + 1}.0"
    if part == "patch":
        return f"{major}.{minor}.{patch + 1}"
    if not re.fullmatch(r"\d+\.\d+\.\d+", part):
        raise ValueError(f"part must be major, minor, patch or X.Y.Z, got {part!r}")
    return part


def release(dist: str, part: str, root: Path = ROOT) -> str:
    if dist not in DISTS:
        raise ValueError(f"unknown distribution {dist!r}; expected one of {sorted(DISTS)}")
    about = root / "packages" / dist / "src" / DISTS[dist] / "__about__.py"
    text = about.read_text()
    m = VERSION_RE.search(text)
    if not m:
        raise ValueError(f"{about}: no __version__ = \"X.Y.Z\" line")
    new = bump(tuple(int(x) for x in m.groups()), part)
    about.write_text(VERSION_RE.sub(f'__version__ = "{new}"', text))
    changelog = root / "packages" / dist / "CHANGELOG.md"
    lines = changelog.read_text().splitlines()
    if "## Unreleased" in lines:  # its entries are this version's (a heading above them left them unreleased)
        at = lines.index("## Unreleased")
        lines[at:at + 1] = ["## Unreleased", "", f"## {new}"]
    else:
        head = 1 if lines and lines[0].startswith("# ") else 0
        lines[head:head] = ["", f"## {new}", "- (describe the changes)"]
    changelog.write_text("\n".join(lines) + "\n")
    return new


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dist", choices=sorted(DISTS))
    parser.add_argument("part", help="major, minor, patch or an explicit X.Y.Z")
    args = parser.parse_args(argv)
    new = release(args.dist, args.part)
    print(f"{args.dist} -> {new}; tag it as {args.dist}-v{new}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
