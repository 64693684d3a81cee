"""Repository metadata that no other test exercises: each package's optional extras name
distributions its code imports, and the CI workflow runs what `.ci/run` (the README's test
command) runs."""

import re
import shlex
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
# distribution -> import name, where they differ (otherwise the name, lowercased, '-' as '_')
IMPORT_NAMES = {"faiss-cpu": "faiss", "faiss-gpu": "faiss", "pyyaml": "yaml", "scikit-learn": "sklearn"}
# extras of test runners and plugins: pytest uses them from the command line, not by import
RUNNER_EXTRAS = {"test"}


def _import_name(requirement: str) -> str:
    dist = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0).lower()
    return IMPORT_NAMES.get(dist, dist.replace("-", "_").replace(".", "_"))


def _imports(package: str) -> set[str]:
    """Top-level modules imported by the package's code: src, benchmarks, examples and tools
    (its tests do not count: an extra is for users)."""
    found = set()
    for path in (ROOT / "packages" / package).rglob("*.py"):
        if "tests" in path.relative_to(ROOT / "packages" / package).parts:
            continue
        found |= set(re.findall(r"^\s*(?:import|from)\s+([A-Za-z_][A-Za-z0-9_]*)", path.read_text(), re.MULTILINE))
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_every_extra_names_distributions_the_package_imports(package):
    project = tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())["project"]
    imports = _imports(package)
    unused = [f"{package}[{extra}]: {req} (import {_import_name(req)})"
              for extra, reqs in project.get("optional-dependencies", {}).items() if extra not in RUNNER_EXTRAS
              for req in reqs if _import_name(req) not in {*imports, *(p.replace("-", "_") for p in PACKAGES)}]
    assert not unused, f"extras that nothing in packages/{package} imports (remove them, or map the name in IMPORT_NAMES): {unused}"


def test_the_checks_import_names():
    assert _import_name("faiss-cpu>=1.8") == "faiss"
    assert _import_name("torchjd[quadprog_projector]>=0.18") == "torchjd"
    assert _import_name("triton>=3.1; platform_system == 'Linux'") == "triton"
    assert "tqdm" in _imports("silvertorch")  # publish.py's progress bar: found inside a function


def _nox_sessions(text: str) -> set[str]:
    """Sessions named by the `nox -s ...` command lines (a shell line or a workflow's `- run:`;
    not comments or echo text), a parametrized one by its base name."""
    sessions = set()
    for args in re.findall(r"^\s*(?:-\s*run:\s*)?nox -s (.+)$", text, re.MULTILINE):
        for word in shlex.split(args):
            if word.startswith("-"):
                break
            sessions.add(word.split("(")[0])
    return sessions


def test_ci_workflow_runs_what_ci_run_runs():
    ci_run = _nox_sessions((ROOT / ".ci" / "run").read_text())
    workflow = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert ci_run >= {"tests", "compile_check"}
    assert ci_run <= _nox_sessions(workflow), f".ci/run runs {sorted(ci_run)}, ci.yml {sorted(_nox_sessions(workflow))}"
    # `tests` runs per package in the workflow's matrix: every package and the tools
    matrix = re.search(r"package: \[([^\]]*)\][^\n]*\n(?:(?!\n  \S).)*?nox -s \"tests\(", workflow, re.DOTALL)
    assert matrix, "ci.yml: no job runs nox -s \"tests(${{ matrix.package }})\" over a package matrix"
    assert sorted(m.strip() for m in matrix.group(1).split(",")) == sorted(PACKAGES + ["tools"])


SPEED_CPU = "fwd+bwd speed (bf16), CPU sanity only"  # bench_speed.py's benchmark name without --gpu


def _section_ms(results: str, heading: str) -> list[float]:
    """The `ms` column of the tables under `## heading`, up to the next section: a GPU run renders
    its own "fwd+bwd speed (bf16)" section after the CPU one, and a new figure may move the column."""
    section = results.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    ms, column = [], None
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if cells[0] == "provider":
            column = cells.index("ms")
        elif row.startswith("| ") and column is not None:
            ms.append(float(cells[column]))
    return ms


def test_the_speed_range_skips_a_gpu_section_and_finds_the_ms_column():
    # the whole rest of RESULTS.md was read, from a fixed column: after a GPU run (its "## fwd+bwd
    # speed (bf16)" section renders after the CPU one) the test failed with "records 0.41-1220.0 ms"
    results = (ROOT / "packages" / "moeblaze" / "benchmarks" / "RESULTS.md").read_text()
    gpu = ("\n## fwd+bwd speed (bf16)\n\nConditions: device `NVIDIA H200`.\n\n| provider | ms | tflops |\n"
           "|---|---|---|\n| moeblaze | 0.41 | 25.1 |\n")
    assert _section_ms(results + gpu, SPEED_CPU) == _section_ms(results, SPEED_CPU) and min(_section_ms(results, SPEED_CPU)) > 1
    moved = "## x\n\n| provider | gbps | ms | tflops | x_speedup |\n|---|---|---|---|---|\n| a | 9 | 120 | 1 | 2 |\n"
    assert _section_ms(moved, "x") == [120.0]


def test_moeblaze_readme_speed_range_is_what_results_md_records():
    # the README quoted "118-2560 ms"; RESULTS.md's CPU sanity run has 117.8 to 1220 ms
    readme = (ROOT / "packages" / "moeblaze" / "README.md").read_text()
    results = (ROOT / "packages" / "moeblaze" / "benchmarks" / "RESULTS.md").read_text()
    quoted = re.search(r"([0-9.]+)-([0-9.]+) ms per step", readme)
    assert quoted, "moeblaze README: the CPU sanity timing's range is gone; update this test"
    ms = _section_ms(results, SPEED_CPU)
    assert (float(quoted[1]), float(quoted[2])) == (min(ms), max(ms)), f"RESULTS.md records {min(ms)}-{max(ms)} ms"
