"""Fail when one of the four packages imports another (they may only share gpukernels_common).

Usage: python tools/check_boundaries.py [ROOT]   (ROOT defaults to the repository root)
Scans every .py file under packages/<pkg>/ (sources, tests, benchmarks) with `ast`, so
imports inside functions and `importlib.import_module("...")`, `__import__("...")` and
`pytest.importorskip("...")` string literals count too (a test that imports another package
only when it is installed still depends on it).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("silvertorch", "moeblaze", "freescale", "multibalance")
SHARED = "gpukernels_common"


def _imported_roots(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module.split(".")[0]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__", "importorskip")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value.split(".")[0]


def violations(root: Path) -> list[str]:
    found = []
    for pkg in PACKAGES:
        pkg_dir = root / "packages" / pkg
        if not pkg_dir.is_dir():
            continue
        for path in sorted(pkg_dir.rglob("*.py")):
            try:
                tree = ast.parse(path.read_text(), filename=str(path))
            except SyntaxError as err:
                found.append(f"{path}: cannot parse: {err}")
                continue
            for lineno, name in _imported_roots(tree):
                if name in PACKAGES and name != pkg:
                    found.append(f"{path.relative_to(root)}:{lineno}: {pkg} imports {name}; share code through {SHARED}")
        # gpukernels-common must not depend on any of the four either.
    common = root / "packages" / "gpukernels-common"
    for path in sorted(common.rglob("*.py")) if common.is_dir() else []:
        for lineno, name in _imported_roots(ast.parse(path.read_text())):
            if name in PACKAGES:
                found.append(f"{path.relative_to(root)}:{lineno}: gpukernels-common imports {name}")
    return found


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent
    bad = violations(root)
    for line in bad:
        print(line)
    print(f"import boundaries: {len(bad)} violation(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
