#!/usr/bin/env bash
# The two CUDA builds of the wheel, +cu13 (the default: the development torch and /usr/local/cuda) and +cu12 (a CUDA 12
# torch at the stable-ABI floor, 2.10.0+cu128, and a CUDA 12 nvcc), with no GPU and no system CUDA 12 toolkit.
#
#   scripts/cuda_wheels.sh toolkit12          a CUDA 12 toolkit (CUDA_HOME layout) in $CUDA12_HOME, once (cached)
#   scripts/cuda_wheels.sh floor-venv         the floor venv $FLOOR_VENV: torch 2.10.0 (+cu128) and the build tools
#   scripts/cuda_wheels.sh verify12           the dist/ +cu12 wheel: _build_info.json says CUDA 12 (nvcc and torch),
#                                             cuobjdump --list-elf finds sm_80 and sm_90 cubins in its fastlm._C
#   scripts/cuda_wheels.sh check              item 2 of the wheels issue: each wheel in dist/ beside a torch of its
#                                             CUDA major (+cu12: the floor venv; +cu13: $VENV, default .venv) passes
#                                             scripts/check_install.py --expect-cuda-match
#
# The CUDA 12 toolkit. The package index's CUDA 12 compiler wheels (nvidia-cuda-nvcc-cu12, every 12.x release) hold
# only ptxas, libnvvm and the crt headers: no nvcc driver, no cicc, no cudafe++, no fatbinary. Those four come from
# Debian's nvidia-cuda-toolkit (non-free, trixie: CUDA 12.4.131; the newest CUDA 12 there), fetched with
# `apt-get download` through a private apt configuration (the machine's sources are not touched, nothing is installed
# system-wide) and unpacked with dpkg-deb; the headers and libcudart come from the index's wheels of the same CUDA
# release (nvidia-cuda-nvcc-cu12 12.4.131, nvidia-cuda-runtime-cu12 12.4.127, nvidia-cuda-cccl-cu12 12.4.127.post1).
# Result, in $CUDA12_HOME (default ~/.cache/fastlm/cuda-12.4, 150 MB, kept between runs; ~15 s to make):
# bin/{nvcc,cudafe++,fatbinary,ptxas,nvlink,cuobjdump}, nvvm/bin/cicc, nvvm/libdevice, include/, lib64/libcudart.so.
# Host compiler: nvcc 12.4 accepts gcc <= 13 (this machine: gcc 12), no -allow-unsupported-compiler.
# A machine with its own CUDA 12 toolkit (a cluster's `module load cuda/12.x`) skips all this: CUDA12_HOME=$CUDA_HOME.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
CUDA12_HOME=$(realpath -m "${CUDA12_HOME:-$HOME/.cache/fastlm/cuda-12.4}")
FLOOR_VENV=$(realpath -m "${FLOOR_VENV:-$REPO/.venv-torch-floor}")
DEBIAN_SUITE=trixie
NVCC12=12.4.131     # nvidia-cuda-nvcc-cu12 (crt headers) = Debian's nvidia-cuda-toolkit upstream version
RUNTIME12=12.4.127  # nvidia-cuda-runtime-cu12 of the same CUDA 12.4.1 release
CCCL12=12.4.127.post1  # nvidia-cuda-cccl-cu12 (12.4.127 itself is yanked: "broken release")

quiet() { grep -v "is ignored" || true; }  # drop pip's warnings about the machine's absent file:// indexes

toolkit12() {
  if [ -x "$CUDA12_HOME/bin/nvcc" ]; then  # ours (moved in only when complete) or the site's toolkit
    echo "CUDA 12 toolkit: $CUDA12_HOME ($("$CUDA12_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*'))"
    return
  fi
  local s tmp dest apt
  s=$(date +%s)
  tmp=$(mktemp -d)
  dest="$CUDA12_HOME.partial.$$"
  trap "rm -rf '$tmp' '$dest'" EXIT  # nothing half-made is left behind when a step fails
  echo "== bootstrapping a CUDA 12 toolkit into $CUDA12_HOME (Debian $DEBIAN_SUITE nvidia-cuda-toolkit + index wheels)"
  mkdir -p "$tmp"/apt/lists/partial "$tmp"/apt/cache/archives/partial "$tmp/deb" "$tmp/whl"
  echo "deb http://deb.debian.org/debian $DEBIAN_SUITE non-free" > "$tmp/apt/sources.list"
  apt=(-o Dir::Etc::SourceList="$tmp/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
       -o Dir::State::Lists="$tmp/apt/lists" -o Dir::Cache="$tmp/apt/cache" -o APT::Sandbox::User=root)
  apt-get -qq "${apt[@]}" update
  (cd "$tmp/deb" && apt-get -qq "${apt[@]}" download nvidia-cuda-toolkit)
  dpkg-deb -x "$tmp"/deb/nvidia-cuda-toolkit_*.deb "$tmp/deb/x"
  "$PYTHON" -m pip download -q --no-deps -d "$tmp/whl" "nvidia-cuda-nvcc-cu12==$NVCC12" \
    "nvidia-cuda-runtime-cu12==$RUNTIME12" "nvidia-cuda-cccl-cu12==$CCCL12" 2>&1 | quiet
  for w in "$tmp"/whl/*.whl; do "$PYTHON" -m zipfile -e "$w" "$tmp/whl/x"; done
  local x=$tmp/deb/x/usr nv=$tmp/whl/x/nvidia
  rm -rf "$dest"
  mkdir -p "$dest"/bin/crt "$dest"/nvvm/bin "$dest"/nvvm/libdevice "$dest"/include "$dest"/lib64
  cp "$x"/lib/nvidia-cuda-toolkit/bin/nvcc "$x"/bin/{cudafe++,fatbinary,ptxas,nvlink,bin2c,cuobjdump} "$dest/bin/"
  cp "$x"/lib/nvidia-cuda-toolkit/bin/crt/*.stub "$dest/bin/crt/"
  cp "$x"/lib/nvidia-cuda-toolkit/bin/cicc "$dest/nvvm/bin/"
  cp "$x"/lib/nvidia-cuda-toolkit/libdevice/libdevice.10.bc "$dest/nvvm/libdevice/"
  cp -r "$nv"/cuda_runtime/include/. "$nv"/cuda_cccl/include/. "$nv"/cuda_nvcc/include/. "$dest/include/"
  find "$dest/include" -name __init__.py -delete
  cp "$nv"/cuda_runtime/lib/libcudart.so.12 "$dest/lib64/"
  ln -s libcudart.so.12 "$dest/lib64/libcudart.so"
  chmod +x "$dest"/bin/* "$dest"/nvvm/bin/* 2> /dev/null || true
  cat > "$dest/bin/nvcc.profile" << 'EOF'
TOP                = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
LD_LIBRARY_PATH   += $(TOP)/lib64:
PATH              += $(TOP)/nvvm/bin:$(_HERE_):
INCLUDES          +=  "-I$(TOP)/include" $(_SPACE_)
LIBRARIES          =+ $(_SPACE_) "-L$(TOP)/lib64"
CUDAFE_FLAGS      +=
PTXAS_FLAGS       +=
EOF
  local version
  version=$("$dest/bin/nvcc" --version | grep -o 'release [0-9.]*')
  [[ "$version" == "release 12."* ]] || { echo "FAILED: the assembled nvcc says '$version', not CUDA 12"; exit 1; }
  printf 'int main() { return 0; }\n__global__ void k(float* x) { x[threadIdx.x] = 1.f; }\n' > "$tmp/t.cu"
  "$dest/bin/nvcc" -arch=sm_90 -c "$tmp/t.cu" -o "$tmp/t.o" \
    || { echo "FAILED: the assembled CUDA 12 nvcc cannot compile a kernel"; exit 1; }
  echo "nvcc $version; Debian $(dpkg-deb -f "$tmp"/deb/nvidia-cuda-toolkit_*.deb Version); index wheels" \
    "nvidia-cuda-nvcc-cu12 $NVCC12, nvidia-cuda-runtime-cu12 $RUNTIME12, nvidia-cuda-cccl-cu12 $CCCL12" \
    > "$dest/.fastlm-toolkit"
  rm -rf "$CUDA12_HOME"
  mkdir -p "$(dirname "$CUDA12_HOME")"
  mv "$dest" "$CUDA12_HOME"
  rm -rf "$tmp"
  trap - EXIT
  echo "CUDA 12 toolkit ($version) in $CUDA12_HOME in $(( $(date +%s) - s )) s, $(du -sh "$CUDA12_HOME" | cut -f1)"
}

floor_venv() {  # torch at the floor of the stable-ABI range; on the index it is the CUDA 12.8 build
  [ -f "$FLOOR_VENV/.fastlm-floor-deps" ] && return
  local s
  s=$(date +%s)
  rm -rf "$FLOOR_VENV"
  $PYTHON -m venv "$FLOOR_VENV"
  "$FLOOR_VENV/bin/python" -m pip install -q torch==2.10.0 numpy setuptools wheel ninja 2>&1 | quiet
  "$FLOOR_VENV/bin/python" -c "import torch; assert torch.version.cuda and torch.version.cuda.startswith('12.'), \
    f'torch {torch.__version__} is not a CUDA 12 build'"
  touch "$FLOOR_VENV/.fastlm-floor-deps"
  echo "floor venv ($("$FLOOR_VENV/bin/python" -c 'import torch; print(torch.__version__)')) in" \
    "$(( $(date +%s) - s )) s"
}

wheel_of() {  # wheel_of 12|13: the one dist/ wheel of that CUDA major
  local w
  w=$(ls "$REPO"/dist/fastlm-*+cu"$1"-cp310-abi3-*.whl 2> /dev/null || true)
  [ "$(echo "$w" | grep -c .)" = 1 ] \
    || { echo "expected one dist/fastlm-*+cu$1-*.whl, found: '${w:-none}'" >&2; exit 2; }
  echo "$w"
}

check_one() {  # check_one MAJOR PYTHON: that wheel installed into that venv, checked from outside the source tree
  local wheel py s
  wheel=$(wheel_of "$1")
  py=$2
  s=$(date +%s)
  echo "== +cu$1: $(basename "$wheel") beside torch $("$py" -c 'import torch; print(torch.__version__)')"
  "$py" -m pip install -q --no-deps --force-reinstall "$wheel" 2>&1 | quiet
  (cd /tmp && "$py" -c 'import json, fastlm, os; print("_build_info.json:", json.load(open(os.path.join(
    os.path.dirname(fastlm.__file__), "_build_info.json"))))')
  (cd /tmp && "$py" "$REPO/scripts/check_install.py" --expect-cuda-match)
  echo "== +cu$1 checked in $(( $(date +%s) - s )) s"
}

check() {
  floor_venv
  check_one 12 "$FLOOR_VENV/bin/python"
  local venv
  venv=$(realpath -m "${VENV:-$REPO/.venv}")
  [ -x "$venv/bin/python" ] || { echo "no $venv: run make test (or make install) first"; exit 2; }
  check_one 13 "$venv/bin/python"
  echo "both wheels checked: +cu12 beside torch 2.10.0+cu128, +cu13 beside the development torch"
}

count_archs() { grep -o 'sm_[0-9a-z]*' | sort | uniq -c | tr -s ' \n' ' '; }  # " 5 sm_80 5 sm_90"

verify12() {  # the +cu12 wheel made by a CUDA 12 nvcc against a CUDA 12 torch, with sm_80 and sm_90 cubins
  local wheel tmp elf
  wheel=$(wheel_of 12)
  tmp=$(mktemp -d)
  "$PYTHON" -m zipfile -e "$wheel" "$tmp"
  echo "$(basename "$wheel"): $(du -h "$wheel" | cut -f1); _build_info.json: $(cat "$tmp/fastlm/_build_info.json")"
  "$PYTHON" - "$tmp/fastlm/_build_info.json" << 'EOF'
import json, sys
info = json.load(open(sys.argv[1]))
assert info["with_cuda"], "the +cu12 wheel has no CUDA kernels"
assert info["nvcc_version"].startswith("12."), f"not built by a CUDA 12 nvcc: {info['nvcc_version']!r}"
assert info["cuda_version"].startswith("12."), f"not built against a CUDA 12 torch: {info['cuda_version']!r}"
EOF
  elf=$("$CUDA12_HOME/bin/cuobjdump" --list-elf "$tmp"/fastlm/_C*.so)
  echo "cuobjdump --list-elf: $(echo "$elf" | grep -c .) cubins:$(echo "$elf" | count_archs)"
  for arch in sm_80 sm_90; do
    echo "$elf" | grep -q "\.$arch\." || { echo "FAILED: no $arch cubin in $(basename "$wheel")"; exit 1; }
  done
  echo "cuobjdump --list-ptx:$("$CUDA12_HOME/bin/cuobjdump" --list-ptx "$tmp"/fastlm/_C*.so | count_archs)"
  rm -rf "$tmp"
}

case "${1:-}" in
  toolkit12) toolkit12 ;;
  floor-venv) floor_venv ;;
  check) check ;;
  verify12) verify12 ;;
  *) echo "usage: scripts/cuda_wheels.sh toolkit12|floor-venv|verify12|check"; exit 2 ;;
esac
