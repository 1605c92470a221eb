#!/usr/bin/env bash
# The one device command: build fastlm against this machine's torch (or install a carried wheel when that fails),
# run the test suite on the GPU, the quick benchmark suite (which measures the copy-bandwidth and bf16-matmul
# ceilings in the same run, and times Liger-Kernel beside fastlm when its wheel is carried), the every-config
# attention tests, and compute-sanitizer (memcheck, racecheck) over the CUDA C++ kernels; write at most 8 files into
# OUT_DIR. A failing or timed-out step does not stop the others; results are copied whatever the exit codes.
#
#   scripts/gpu_check.sh OUT_DIR [--wheel PATH] [--peer-wheel PATH]... [--dry-run]
#
#   --wheel PATH       a fastlm wheel built elsewhere (README, "GPU check"): installed if the source build fails
#   --peer-wheel PATH  a pure-Python wheel to make importable for the bench (Liger-Kernel: `pip download --no-deps
#                      liger-kernel`); installed with --no-deps into a private folder on PYTHONPATH
#   --dry-run          every step on a CPU machine (CI's twin of the device, `make twin`): the build, the tests
#                      through the Triton interpreter (the whole suite, test_static.py and every config test
#                      included, as the device does not), the quick bench on CPU (cut at 300 s), the sanitizer
#                      workload without the sanitizer, and the same result files
#
# Files in OUT_DIR (8): 1-setup.log (nvidia-smi, versions, build) 2-tests.log 3-bench.log 4-configs.log
# 5-sanitizer.log bench.json bench.md summary.txt. The pytest logs are verbose (one line per test) with -rfE
# summaries; summary.txt names every failing test, every step's exit code and time.
#
# Budget on the H200 (16 cores): step limits sum to 540 s, and the script stops starting steps at 575 s (each
# step is cut to the time left); run it with a 590 s limit. The limits come from the compile
# census (tests/compile_census.py + scripts/compile_census.py: the distinct Triton compiles each step triggers) times
# the per-compile time measured for sm_90 on the 2-core development machine (README, "Development"):
#   setup 80     the source build for sm_90 (MAX_JOBS = cores; the slowest .cu file takes ~25 s); a wheel: seconds
#   tests 180    ~1020 compiles, ~820 compile-seconds (norms/softmax ~0.6 s, attention ~1.5 s each) over 16 xdist
#                workers ~50-80 s, plus each worker's start (~15 s) and the tests themselves
#   bench 150    the quick grid, families in order (model, norms, softmax, ce, attention, decode, rope, gated_mlp, kl_div,
#                distill): each written when done, so an interrupt keeps the finished ones (the model-level table
#                first: it is the headline); torch.compile baselines dominate
#   configs 60   ~180 compiles (~1.5 s each: every attention launch config) over 16 workers ~17 s, plus start-up
#   sanitizer 70 memcheck 42 s, racecheck 28 s over the small workload of scripts/sanitize_cuda.py
# A step that runs out of time is interrupted with SIGINT (pytest then prints its summary and the bench writes what
# it has), killed 10 s later if still running.
set -uo pipefail

usage() { echo "usage: scripts/gpu_check.sh OUT_DIR [--wheel PATH] [--peer-wheel PATH]... [--dry-run]"; exit 2; }
[ $# -ge 1 ] || usage
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)  # absolute before any cd
shift
WHEEL="" DRY=0 PEERS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheel) [ $# -ge 2 ] || usage; WHEEL=$(realpath "$2"); shift 2 ;;
    --peer-wheel) [ $# -ge 2 ] || usage; PEERS+=("$(realpath "$2")"); shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "unknown argument $1"; usage ;;
  esac
done
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
NPROC=$(nproc 2>/dev/null || echo 2)
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$NPROC} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
[ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda
WORK=$(mktemp -d)  # bench output, peer wheels: outside OUT_DIR (8 files at most come back)
rm -f "$OUT"/*.log "$OUT"/bench.json "$OUT"/bench.md "$OUT"/summary.txt

if [ "$DRY" = 1 ]; then
  # CPU: the interpreter runs the kernels; slower than the device, so larger limits (this checks the script, not
  # the device's budget). The whole suite runs, split over the two test steps.
  export TRITON_INTERPRET=1
  # The bench is cut at 300 s (the model-level and overhead families and more: every family's code also runs in
  # the test step, benchmarks/): an interrupt that leaves a written report passes, as it checks the path the device
  # relies on when its bench step runs out of time.
  L_SETUP=900 L_TESTS=1500 L_BENCH=300 L_CONFIGS=900 L_SAN=300 PER_TEST=600 TOTAL=5400
  TEST_SELECT=(-m "not configs" "$REPO/benchmarks" --benchmark-disable)  # with tests/: the README's whole suite
else
  L_SETUP=80 L_TESTS=180 L_BENCH=150 L_CONFIGS=60 L_SAN=70 PER_TEST=90 TOTAL=575
  TEST_SELECT=(-m "not configs" --ignore "$REPO/tests/test_static.py")  # ~3 min of sm_90 compiles: CI runs it
fi
CONFIG_SELECT=(-m configs)
# GPU_CHECK_LIMITS="setup tests bench configs sanitizer" (seconds) overrides the step limits (not the selection)
if [ -n "${GPU_CHECK_LIMITS:-}" ]; then
  read -r L_SETUP L_TESTS L_BENCH L_CONFIGS L_SAN <<< "$GPU_CHECK_LIMITS"
fi

SUMMARY=() FAILED_STEPS=()
t0=$(date +%s)
DEADLINE=$(( t0 + TOTAL ))  # every step is cut to the time left before it, so that summary.txt is always written

step() {  # step NAME LIMIT DIR COMMAND...: in DIR, time-limited (SIGINT to the command's process group, KILL 10 s
          # later), logged to OUT/NAME.log; its time and exit code go to the summary
  local name=$1 limit=$2 dir=$3; shift 3
  local s rc
  s=$(date +%s)
  local left=$(( DEADLINE - s - 15 ))  # 15 s: the kill grace and the summary
  if [ "$left" -lt 5 ]; then
    echo "== $name: not run (the script's $TOTAL s are spent)" | tee -a "$OUT/$name.log"
    SUMMARY+=("$name: NOT RUN (no time left)")
    FAILED_STEPS+=("$name")
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  (cd "$dir" && timeout -s INT -k 10 "$limit" "$@") >> "$OUT/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - s ))
  local what="exit $rc"
  [ $rc -eq 124 ] && what="TIMED OUT after ${limit}s (interrupted)"
  [ $rc -eq 137 ] && what="KILLED after ${limit}s + 10s"
  echo "== $name: $what in ${took} s" | tee -a "$OUT/$name.log"
  SUMMARY+=("$name: $what in ${took} s")
  [ $rc -eq 0 ] || FAILED_STEPS+=("$name")
  return $rc
}

# -- 1. setup: the machine, then fastlm built against its torch (or the carried wheel) -----------------------------
{
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  cores: $NPROC  dry-run: $DRY"
  command -v nvidia-smi > /dev/null && nvidia-smi || echo "nvidia-smi: not found"
  $PY -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); print("triton", triton.__version__)'
  command -v nvcc > /dev/null && nvcc --version | tail -2 || echo "nvcc: not found"
  $PY -c 'import xdist, pytest_timeout' 2>&1 && echo "pytest-xdist and pytest-timeout: present"
} > "$OUT/1-setup.log" 2>&1
BUILD_NOTE="built from source against this machine's torch"
if ! step 1-setup "$L_SETUP" "$REPO" $PY -m pip install -v --no-build-isolation --no-deps --force-reinstall .; then
  if [ -n "$WHEEL" ]; then
    echo "== the source build failed: installing the carried wheel $WHEEL" | tee -a "$OUT/1-setup.log"
    if step 1-setup 60 "$WORK" $PY -m pip install --no-deps --force-reinstall "$WHEEL"; then
      BUILD_NOTE="SOURCE BUILD FAILED (see 1-setup.log); installed the carried wheel $(basename "$WHEEL")"
    else
      BUILD_NOTE="SOURCE BUILD FAILED and the carried wheel did not install"
    fi
  else
    BUILD_NOTE="SOURCE BUILD FAILED and no --wheel was given"
  fi
fi
if [ ${#PEERS[@]} -gt 0 ]; then
  $PY -m pip install -q --no-deps --no-index --target "$WORK/peers" "${PEERS[@]}" >> "$OUT/1-setup.log" 2>&1 \
    && export PYTHONPATH="$WORK/peers${PYTHONPATH:+:$PYTHONPATH}"
fi
(cd "$WORK" && $PY -m fastlm info) >> "$OUT/1-setup.log" 2>&1
PEER_NOTE=$(cd "$WORK" && $PY -c 'import importlib.util as u; print("Liger-Kernel importable" if u.find_spec("liger_kernel") else "Liger-Kernel not importable (no --peer-wheel): no Liger baselines")')

# -- the pytest steps: from outside the source tree (the installed build is what gets imported) -------------------
XDIST=()
$PY -c 'import xdist' 2> /dev/null && XDIST=(-n "$NPROC")
TIMEOUT=()
$PY -c 'import pytest_timeout' 2> /dev/null && TIMEOUT=(--timeout "$PER_TEST")
PYTEST=($PY -m pytest -v -rfE -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" "${XDIST[@]}"
        "${TIMEOUT[@]}" "$REPO/tests")

step 2-tests "$L_TESTS" "$WORK" "${PYTEST[@]}" "${TEST_SELECT[@]}"

# -- 3. the quick bench (its reports are written family by family, and on an interrupt) ---------------------------
step 3-bench "$L_BENCH" "$WORK" $PY -m fastlm bench --quick --no-static --out "$WORK/bench"
BENCH_RC=$?
cp "$WORK"/bench/bench.json "$WORK"/bench/bench.md "$OUT"/ 2> /dev/null || echo "no bench report was written" >> "$OUT/3-bench.log"
if [ "$DRY" = 1 ] && [ "$BENCH_RC" = 124 ] && grep -qE '^\| ' "$OUT/bench.md" 2> /dev/null \
   && ! grep '^ERROR ' "$OUT/3-bench.log" | grep -qv '^ERROR interrupted after'; then
  # the dry run's bench ran out of its 300 s with a report written and no error but the interrupt's own line
  # ("ERROR interrupted after N results"): that is a pass (see L_BENCH)
  KEEP=()
  for f in "${FAILED_STEPS[@]}"; do [ "$f" = 3-bench ] || KEEP+=("$f"); done
  FAILED_STEPS=("${KEEP[@]}")
  SUMMARY+=("3-bench: dry run: interrupted at its limit with a report written and no error: counted as passed")
fi

step 4-configs "$L_CONFIGS" "$WORK" "${PYTEST[@]}" "${CONFIG_SELECT[@]}"

# -- 5. compute-sanitizer over the CUDA C++ kernels (memcheck, then racecheck) -------------------------------------
SAN=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer \
      /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2> /dev/null | head -1)
if [ -n "$SAN" ] && [ "$DRY" = 0 ]; then
  # no caching allocator under memcheck: a small tensor then gets its own allocation, so an out-of-bounds access
  # leaves valid memory instead of landing in a neighbour inside a pooled block
  step 5-sanitizer $(( L_SAN * 3 / 5 )) "$WORK" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck \
    --error-exitcode 3 $PY "$REPO/scripts/sanitize_cuda.py"
  step 5-sanitizer $(( L_SAN * 2 / 5 )) "$WORK" "$SAN" --tool racecheck --error-exitcode 3 $PY "$REPO/scripts/sanitize_cuda.py"
else
  echo "compute-sanitizer: not run ($([ -z "$SAN" ] && echo "not found" || echo "dry run, no GPU")): the workload runs without it" \
    >> "$OUT/5-sanitizer.log"
  step 5-sanitizer "$L_SAN" "$WORK" $PY "$REPO/scripts/sanitize_cuda.py"
fi

# -- summary -------------------------------------------------------------------------------------------------------
{
  echo "gpu_check $( [ "$DRY" = 1 ] && echo "--dry-run (CPU)" || echo "on the GPU" ): total $(( $(date +%s) - t0 )) s"
  echo "software: $($PY -c 'import sys, torch, triton; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}")' 2>&1 | tail -1)"
  echo "build: $BUILD_NOTE"
  echo "peers: $PEER_NOTE"
  echo "steps:"
  for line in "${SUMMARY[@]}"; do [ -n "$line" ] && echo "  $line"; done
  for log in 2-tests 4-configs; do
    [ -f "$OUT/$log.log" ] || continue
    echo "$log: $(grep -E '^=+ .*(passed|failed|error|no tests ran).* in [0-9.]+s' "$OUT/$log.log" | tail -1 | tr -d '=' | xargs)"
    grep -E '^(FAILED|ERROR) ' "$OUT/$log.log" | sed 's/^/  /' | sort -u
    grep -q "KeyboardInterrupt" "$OUT/$log.log" && echo "  (interrupted at its time limit: the tests after the last one logged did not run)"
  done
  echo "bench: $(grep -cE '^\| ' "$OUT/bench.md" 2> /dev/null || echo 0) table rows; errors: $(grep -c '^ERROR ' "$OUT/3-bench.log" 2> /dev/null)"
  grep -E '^ERROR ' "$OUT/3-bench.log" 2> /dev/null | sed 's/^/  /'
  if grep -q "ERROR SUMMARY" "$OUT/5-sanitizer.log"; then
    echo "sanitizer: $(grep -E 'ERROR SUMMARY' "$OUT/5-sanitizer.log" | tr '\n' ' ')"
  else
    echo "sanitizer: $(grep -m1 '^compute-sanitizer' "$OUT/5-sanitizer.log")"
  fi
  grep -E '^FAILED ' "$OUT/5-sanitizer.log" | sed 's/^/  /'
  echo "failed steps: ${FAILED_STEPS[*]:-none}"
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
rm -rf "$WORK"
[ ${#FAILED_STEPS[@]} -eq 0 ]
