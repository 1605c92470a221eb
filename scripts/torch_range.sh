#!/usr/bin/env bash
# The promised range of torch, checked: the wheel built by `make wheel` (dist/fastlm-*.whl, built against the
# development torch with the stable-ABI target 2.10) installs and works under torch 2.10.0, the floor, and under the
# newest torch on the package index (looked up when this runs, not pinned): `import fastlm`, `fastlm info` right
# for that torch, every cpu-backend op forward and backward against torch (scripts/check_install.py). And the sources
# build against 2.10's headers: the C++ (CPU) sources by a real `pip wheel` with FASTLM_BUILD_CUDA=0, the CUDA sources
# by nvcc without linking (scripts/compile_cuda_check.py; torch 2.10 on the index is a CUDA 12.8 build, which
# cpp_extension will not pair with a CUDA 13 nvcc).
#
#   scripts/torch_range.sh            (make torch-range; CI runs it after make test)
#
# Venvs: .venv-torch-floor (made once by scripts/cuda_wheels.sh floor-venv and kept: the +cu12 build and check use it
# too, make cuda-wheels), .venv-torch-newest (re-created each run). PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
WHEEL=$(ls "$REPO"/dist/fastlm-*.whl 2> /dev/null | grep -v +cu12- | head -1)  # the default build (+cu13)
[ -n "$WHEEL" ] || { echo "no dist/fastlm-*.whl: run make wheel first"; exit 2; }
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-$(nproc)}
t0=$(date +%s)

quiet() { grep -v "is ignored" || true; }  # drop pip's warnings about the machine's absent file:// indexes

venv() {  # venv NAME PIP_ARGS...: a fresh venv with those packages (floor: the kept one), and the wheel; prints its python
  local name=$1 dir="$REPO/.venv-torch-$1"; shift
  if [ "$name" = floor ]; then
    dir=$(realpath -m "${FLOOR_VENV:-$dir}")
    FLOOR_VENV=$dir PYTHON=$PYTHON bash "$REPO/scripts/cuda_wheels.sh" floor-venv >&2
  else
    rm -rf "$dir"
    $PYTHON -m venv "$dir"
    "$dir/bin/python" -m pip install -q "$@" numpy setuptools wheel ninja 2>&1 | quiet >&2
  fi
  "$dir/bin/python" -m pip install -q --no-deps --force-reinstall "$WHEEL" 2>&1 | quiet >&2
  echo "$dir/bin/python"
}

echo "== floor: torch 2.10.0 with $(basename "$WHEEL")"
s=$(date +%s)
FLOOR=$(venv floor)
(cd /tmp && "$FLOOR" "$REPO/scripts/check_install.py")
echo "== floor: the C++ sources built against torch 2.10's headers (FASTLM_BUILD_CUDA=0)"
SRC=$(mktemp -d)
cp -r setup.py pyproject.toml MANIFEST.in README.md csrc fastlm kernels "$SRC"/  # setup.py writes into its tree
rm -rf "$SRC"/fastlm/_C*.so "$SRC"/fastlm/_build_info.json
(cd "$SRC" && FASTLM_BUILD_CUDA=0 "$FLOOR" -m pip wheel -q --no-build-isolation --no-deps -w "$SRC/dist" . 2>&1 | quiet)
ls "$SRC"/dist/fastlm-*.whl > /dev/null || { echo "FAILED: the source build against torch 2.10 produced no wheel"; exit 1; }
echo "ok: $(basename "$SRC"/dist/fastlm-*.whl) built against torch 2.10"
echo "== floor: the CUDA sources compiled against torch 2.10's headers"
"$FLOOR" scripts/compile_cuda_check.py 2>&1 | { grep -v "No CUDA runtime is found" || true; }
rm -rf "$SRC"
echo "== floor checks took $(( $(date +%s) - s )) s"

echo "== newest torch on the index"
s=$(date +%s)
# the machine's pip configuration caps torch (at the releases on local disk): the index's newest is asked for without it
NEWEST=$(PIP_CONFIG_FILE=/dev/null venv newest torch)
echo "newest: $("$NEWEST" -c 'import torch; print(torch.__version__)')"
(cd /tmp && "$NEWEST" "$REPO/scripts/check_install.py")
echo "== newest checks took $(( $(date +%s) - s )) s"
rm -rf "$REPO/.venv-torch-newest"
echo "torch range checked in $(( $(date +%s) - t0 )) s"
