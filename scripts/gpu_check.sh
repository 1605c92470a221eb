#!/usr/bin/env bash
# The one device command: build fastlm against this machine's torch, run the test suite on the GPU, run the quick
# benchmark suite (which measures the copy-bandwidth and bf16-matmul ceilings in the same run), and write at most
# 8 files into the output folder given as the first argument. Each step logs to its own file; a failing step does
# not stop the others; the script exits non-zero at the end if any step failed. Budget: <= 9 minutes on an H200
# (run it with a 540 s limit).
#
#   scripts/gpu_check.sh OUT_DIR [--wheel PATH]     (--wheel: install that wheel instead of building)
#
# The test step runs the whole suite: on a GPU every kernel test runs on CUDA tensors (Triton compiled, not
# interpreted) and the tests marked `gpu` (the CUDA C++ backend, bitwise bf16 checks) are no longer skipped.
# The tests marked `configs` (every attention launch config and the autotuner: one compile each, ~1-2 s apiece) run
# last, in their own step, so that a slow compile cannot eat the main test step.
# Step limits (s): env 20, build 120, tests 150, bench 150, configs 80 -> at most 520 s. Files in OUT_DIR (8):
# 1-env.log 2-build.log 3-tests.log 4-bench.log 5-configs.log bench.json bench.md summary.txt (plots stay in a
# temporary folder).
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [--wheel PATH]}
shift
WHEEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheel) WHEEL=$2; shift 2 ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
[ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda
failed=()
t0=$(date +%s)

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, remember failures
  local name=$1 limit=$2; shift 2
  local s=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $(( $(date +%s) - s )) s" | tee -a "$OUT/$name.log"
  [ $rc -eq 0 ] || failed+=("$name(rc=$rc)")
}

step 1-env 20 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); print(\"triton\", triton.__version__)'; nvcc --version"
if [ -n "$WHEEL" ]; then
  step 2-build 120 $PY -m pip install --no-deps --force-reinstall "$WHEEL"
else
  step 2-build 120 $PY -m pip install --no-build-isolation --no-deps --force-reinstall .
fi
# from outside the source tree, so that the installed build is what gets imported
REPO=$(pwd)
PYTEST="$PY -m pytest -q --maxfail=30 -p no:cacheprovider --rootdir=$REPO -c $REPO/pyproject.toml -o addopts=-ra"
step 3-tests 150 bash -c "cd /tmp && $PYTEST $REPO/tests -m 'not configs'"
BENCH_TMP=$(mktemp -d)
step 4-bench 150 bash -c "cd /tmp && $PY -m fastlm bench --quick --no-static --out $BENCH_TMP && cp $BENCH_TMP/bench.json $BENCH_TMP/bench.md $OUT/"
step 5-configs 80 bash -c "cd /tmp && $PYTEST $REPO/tests -m configs"

echo "total $(( $(date +%s) - t0 )) s; failed steps: ${failed[*]:-none}" | tee "$OUT/summary.txt"
[ ${#failed[@]} -eq 0 ]
