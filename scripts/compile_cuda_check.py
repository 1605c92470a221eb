"""Compile every CUDA source of fastlm (csrc/cuda/*.cu) against the installed torch's headers, for sm_90, as C++17,
without linking: the source check of the CUDA code for a torch whose CUDA major differs from the local nvcc (torch
2.10 on the package index is a CUDA 12.8 build, and torch.utils.cpp_extension refuses to build CUDA sources with a
CUDA 13 nvcc against it). The defines are setup.py's (stable-ABI target torch 2.10); the CPU sources of the same
torch are checked by a real build (``FASTLM_BUILD_CUDA=0 pip wheel --no-build-isolation .``).

    CUDA_HOME=/usr/local/cuda python scripts/compile_cuda_check.py      # from the repository root

Exits non-zero if any file fails, printing nvcc's errors.
"""

import concurrent.futures
import glob
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

import torch
from torch.utils import cpp_extension


def main() -> int:
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    includes = [*cpp_extension.include_paths(device_type="cuda"), sysconfig.get_paths()["include"], "csrc"]
    defines = [
        "-DTORCH_TARGET_VERSION=0x020a000000000000",
        f'-DFASTLM_TORCH_BUILD_VERSION="{torch.__version__.split("+")[0]}"',
        "-DUSE_CUDA",
        "-DFASTLM_WITH_CUDA",
        '-DFASTLM_CUDA_VERSION="check"',
        '-DFASTLM_CUDA_ARCHS="9.0"',
    ]
    flags = [*cpp_extension.COMMON_NVCC_FLAGS, "-std=c++17", "-O3", "--use_fast_math", "-Xcompiler", "-fPIC"]
    flags += ["-gencode=arch=compute_90,code=sm_90", *defines, *(f"-I{i}" for i in includes)]
    sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not sources:
        print("no csrc/cuda/*.cu here: run from the repository root")
        return 2
    print(f"torch {torch.__version__}: compiling {len(sources)} CUDA sources with {nvcc} (C++17, sm_90)")

    def compile_one(src: str):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.time()
            run = subprocess.run(
                [nvcc, *flags, "-c", src, "-o", os.path.join(tmp, "o.o")], capture_output=True, text=True
            )
            return src, run.returncode, time.time() - start, run.stderr

    failed = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for src, rc, took, err in pool.map(compile_one, sources):
            print(f"{'ok    ' if rc == 0 else 'FAILED'} {src} ({took:.0f} s)")
            if rc:
                failed += 1
                print(err[-4000:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
