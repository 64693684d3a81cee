#!/usr/bin/env bash
# One time-boxed run on a lent GPU machine (torch and triton preinstalled, no network, no install
# step): the gpu-marked tests of every package, then the GPU benchmarks, most wanted first, each
# capped so that the whole run ends inside GPU_SESSION_SECONDS (default 540). Everything that
# comes back lands in $OUT:
#   env.txt        the machine, torch/triton versions, the commit
#   gpu_tests.log  pytest -m gpu, package by package
#   bench.log      each benchmark's output and exit status
#   results.tgz    the benchmarks' records (packages/*/benchmarks/results/*_gpu.jsonl); each bench
#                  writes them as it goes, so a capped bench keeps what it measured
# Run it as `GKC_COMMIT=<the commit sent> bash tools/gpu_session.sh`: the tree sent there may come
# without its git history, and the records name their commit.
# Back on the development machine: `tar xzf <files_at>/results.tgz` in the repo root, then
# `python packages/<pkg>/benchmarks/run.py --render` renders that package's RESULTS.md.
# `nox -s gpu` is the untimed version (every test, every benchmark).
# GPU_SESSION_TESTS="<package> ..." and GPU_SESSION_BENCHES="<package>:<bench>:<cap> ..." choose
# what runs (empty: nothing), e.g. the benches a first call had no time for, on the still-warm machine.
# `--profile` runs the diagnostics instead (about 210 s): silvertorch's benchmarks/profile_gpu.py
# (launches, syncs and device time of each search) into profile.log, moeblaze's
# benchmarks/sweep_tiles.py (fwd+bwd per tile setting, per-kernel times) into sweep.log, and
# multibalance's benchmarks/profile_gpu.py (a step, equal weights against MultiBalance) into mb_profile.log.
set -u
case "${1:-}" in  # anything else would run the whole session (minutes of a GPU lease)
  "" | --fetch-deps | --profile) ;;
  -h | --help) sed -n '2,22s/^# \{0,1\}//p' "$0"; exit 0 ;;
  *) echo "gpu_session.sh: unknown argument '$1' (it takes none, --fetch-deps, --profile or --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
# pytest for a machine that lacks it (it is promised torch, triton and numpy only): `bash
# tools/gpu_session.sh --fetch-deps` here unpacks pure-Python wheels into .gpu-deps (git-ignored);
# send it along with run(carry=[".gpu-deps"]) and it is used there when no pytest is installed.
# It also gathers the benchmarks' anchors: wheels into .gpu-deps/anchors, and ScatterMoE's source
# (no wheel) into .gpu-deps/anchors/src, put on PYTHONPATH below.
if [ "${1:-}" = "--fetch-deps" ]; then
  set -e
  wheels=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: --platform any -d "$wheels" \
    pytest pluggy iniconfig packaging exceptiongroup tomli
  rm -rf .gpu-deps && mkdir -p .gpu-deps/anchors
  for wheel in "$wheels"/*.whl; do python3 -m zipfile -e "$wheel" .gpu-deps; done
  echo "unpacked into .gpu-deps: $(ls "$wheels" | tr '\n' ' ')"
  # the benchmarks' anchors that come as wheels, for the GPU machine's CPython 3.12 on x86-64;
  # installed there into a temporary folder, never committed
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu-deps/anchors pyroaring liger-kernel
  # ScatterMoE has no wheel: its python package, exported from the local mirror that the fetch tool
  # leaves under /work/.mirror (source only, git-ignored here, never committed)
  mirror=
  for candidate in /work/.mirror/shawntan+scattermoe*/repo /work/.mirror/shawntan+scattermoe*; do
    git --git-dir="$candidate" rev-parse -q --verify HEAD > /dev/null 2>&1 && { mirror=$candidate; break; }
  done
  if [ -z "$mirror" ]; then
    echo "no ScatterMoE mirror under /work/.mirror/shawntan+scattermoe*: run the fetch tool for github:shawntan/scattermoe first (continuing without it)"
  elif mkdir -p .gpu-deps/anchors/src && git --git-dir="$mirror" archive HEAD scattermoe | tar -x -C .gpu-deps/anchors/src; then
    echo "scattermoe $(git --git-dir="$mirror" rev-parse --short HEAD) from $mirror in .gpu-deps/anchors/src"
  else
    echo "exporting scattermoe from $mirror failed (continuing without it)"
  fi
  echo "anchors in .gpu-deps/anchors: $(ls .gpu-deps/anchors | tr '\n' ' ')"
  exit 0
fi
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
: > "$OUT/gpu_tests.log"
: > "$OUT/bench.log"
: > "$OUT/anchors.log"
BUDGET=${GPU_SESSION_SECONDS:-540}
START=$(date +%s)
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONHASHSEED=0
PYTHONPATH="$(printf '%s:' "$PWD"/packages/*/src)${PYTHONPATH:-}"
if ! python3 -c "import pytest" 2>/dev/null && [ -d .gpu-deps ]; then
  PYTHONPATH="$PYTHONPATH:$PWD/.gpu-deps"  # after the installed packages: only what is missing comes from here
fi
for wheel in .gpu-deps/anchors/*.whl; do  # one by one: a wheel for another Python costs only itself
  [ -f "$wheel" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-session-anchors "$wheel" >> "$OUT/anchors.log" 2>&1
done
[ -d /tmp/gpu-session-anchors ] && PYTHONPATH="$PYTHONPATH:/tmp/gpu-session-anchors"
[ -d .gpu-deps/anchors/src ] && PYTHONPATH="$PYTHONPATH:$PWD/.gpu-deps/anchors/src"  # source-only anchors (ScatterMoE)
export PYTHONPATH

left() { echo $((BUDGET - ($(date +%s) - START))); }


{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  git log -1 --format='commit %H %s' 2>/dev/null || echo "commit: not a git checkout (GKC_COMMIT=${GKC_COMMIT:-unset})"
} > "$OUT/env.txt" 2>&1

if [ "${1:-}" = "--profile" ]; then  # each script from its own folder: they import their sibling benches
  (cd packages/silvertorch/benchmarks && timeout 70 python3 profile_gpu.py > "$OUT/profile.log" 2>&1; echo "rc=$?" >> "$OUT/profile.log")
  (cd packages/moeblaze/benchmarks && timeout 160 python3 sweep_tiles.py --seconds 120 > "$OUT/sweep.log" 2>&1; echo "rc=$?" >> "$OUT/sweep.log")
  (cd packages/multibalance/benchmarks && timeout 60 python3 profile_gpu.py > "$OUT/mb_profile.log" 2>&1; echo "rc=$?" >> "$OUT/mb_profile.log")
  grep -E "TFLOP|Error|rc=|stopped" "$OUT/sweep.log" | cut -c1-260
  grep -E "^###|host (cudaStreamSynchronize|cudaLaunchKernel)|rc=" "$OUT/profile.log" "$OUT/mb_profile.log"
  exit 0
fi

# 1. The GPU suite: compiled kernels in 16-bit and fp32 against the references. The markers' plugin
# is named unless an installed gpukernels-common already registers it.
PLUGIN=(-p gpukernels_common.testing.plugin)
python3 -c "import importlib.metadata as m, sys; sys.exit(not any(e.value.startswith('gpukernels_common.testing') for e in m.entry_points(group='pytest11')))" 2>/dev/null && PLUGIN=()
# the tests' time there is mostly Triton compiling on the CPU: four workers compile side by side
WORKERS=()
python3 -c "import xdist" 2>/dev/null && WORKERS=(-n 4)
for package in ${GPU_SESSION_TESTS-gpukernels-common silvertorch moeblaze freescale multibalance}; do
  limit=$(( $(left) < 120 ? $(left) : 120 ))
  if ((limit < 10)); then
    echo "== $package: skipped, ${limit}s left" >> "$OUT/gpu_tests.log"
    continue
  fi
  echo "== $package (limit ${limit}s)" >> "$OUT/gpu_tests.log"
  timeout "$limit" python3 -m pytest "packages/$package/tests" -m gpu -ra -q --import-mode=importlib \
    --continue-on-collection-errors "${PLUGIN[@]}" "${WORKERS[@]}" -p no:cacheprovider \
    >> "$OUT/gpu_tests.log" 2>&1
  echo "rc=$?" >> "$OUT/gpu_tests.log"
done

# 2. The GPU benchmarks, most wanted first: <package> <bench> <cap in seconds>.
bench() {
  local limit=$(( $(left) < $3 ? $(left) : $3 ))
  if ((limit < 30)); then
    echo "== $1/bench_$2: skipped, ${limit}s left" >> "$OUT/bench.log"
    return
  fi
  echo "== $1/bench_$2 --gpu (limit ${limit}s)" >> "$OUT/bench.log"
  timeout "$limit" python3 "packages/$1/benchmarks/bench_$2.py" --gpu >> "$OUT/bench.log" 2>&1
  echo "rc=$?" >> "$OUT/bench.log"
}
# GPU_SESSION_BENCHES="<package>:<bench>:<cap> ..." runs others (a second call on a warm machine).
for spec in ${GPU_SESSION_BENCHES-silvertorch:ivf:100 moeblaze:speed:120 silvertorch:bloom:100 silvertorch:topk:45 multibalance:overhead:140 silvertorch:model:180}; do
  IFS=: read -r package name cap <<< "$spec"
  bench "$package" "$name" "$cap"
done

tar czf "$OUT/results.tgz" $(ls packages/*/benchmarks/results/*_gpu.jsonl 2>/dev/null) 2>> "$OUT/bench.log"
echo "done in $(( $(date +%s) - START ))s" >> "$OUT/bench.log"
# what the call's reply shows: the tests' outcome and each bench's end
grep -E "^== |^rc=|passed|failed|skipped|error|^FAILED|^SKIPPED" "$OUT/gpu_tests.log" | tail -60
grep -E "^== |^rc=|^done|Error|error" "$OUT/bench.log" | tail -40
