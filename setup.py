"""Build of fastlm: the Python packages plus one extension, ``fastlm._C``, from ``csrc/``.

``fastlm._C`` is written against the LibTorch stable ABI (``TORCH_TARGET_VERSION`` = torch 2.10) and the
Python limited API (``abi3``, CPython >= 3.10), so one build serves every torch >= 2.10 and every CPython >= 3.10.

Environment switches:
  FASTLM_BUILD_CUDA=0|1   skip / force the CUDA sources (default: when torch is a CUDA build and nvcc is found)
  TORCH_CUDA_ARCH_LIST    archs to compile (default "8.0;9.0+PTX" when no GPU is visible)
  MAX_JOBS                parallel compile jobs (read by torch.utils.cpp_extension / ninja)
  FASTLM_EXT_CACHE=DIR    reuse a fastlm._C compiled earlier from the same inputs (CI's +cu12 build): the key hashes
                          every file under csrc/, this file, the compile flags and archs, the torch version, nvcc's
                          and the host compiler's ``--version``; a miss compiles and stores the result in DIR/<key>/

The wheel's version carries the CUDA major of the torch it was built against (``0.1.0+cu12``, ``0.1.0+cu13``);
cpp_extension refuses an nvcc of another major. ``fastlm/_build_info.json`` records torch's CUDA, nvcc's release,
the archs and the torch build (``fastlm info`` prints them).

Build with ``pip install --no-build-isolation -e .`` (torch must already be installed: we compile against it).
"""

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_TARGET_VERSION = "0x020a000000000000"  # torch 2.10: the oldest torch the stable-ABI build supports


def _want_cuda() -> bool:
    flag = os.environ.get("FASTLM_BUILD_CUDA")
    if flag is not None:
        if flag not in ("0", "1"):
            raise SystemExit(f"FASTLM_BUILD_CUDA must be 0 or 1, got {flag!r}")
        if flag == "1" and (torch.version.cuda is None or cpp_extension.CUDA_HOME is None):
            raise SystemExit(
                "FASTLM_BUILD_CUDA=1 but "
                + ("torch is a CPU-only build" if torch.version.cuda is None else "nvcc was not found (set CUDA_HOME)")
            )
        return flag == "1"
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))) + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    define = [
        f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}",
        f'-DFASTLM_TORCH_BUILD_VERSION="{torch.__version__.split("+")[0]}"',
    ]
    # -fopenmp-simd: `#pragma omp simd` (vectorised reductions in csrc/cpu/) without an OpenMP runtime.
    cxx = ["-O3", "-fopenmp-simd", "-fno-math-errno", *define]
    ext_kwargs = {}
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"  # PTX of the newest: newer GPUs can JIT it
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        cuda_define = [
            "-DUSE_CUDA",  # the aoti shim declares aoti_torch_get_current_cuda_stream only under USE_CUDA
            "-DFASTLM_WITH_CUDA",
            f'-DFASTLM_CUDA_VERSION="{torch.version.cuda}"',
            f'-DFASTLM_CUDA_ARCHS="{archs}"',
        ]
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        cxx += cuda_define
        ext_kwargs["extra_compile_args"] = {
            "cxx": cxx,
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", *define, *cuda_define],
        }
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_kwargs["extra_compile_args"] = {"cxx": cxx}
        ext_cls = cpp_extension.CppExtension
    return ext_cls(
        name="fastlm._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        py_limited_api=True,
        **ext_kwargs,
    )


def _nvcc_version() -> str:
    """nvcc's release and build (``12.4.131``) from ``CUDA_HOME/bin/nvcc --version``; "" when there is none."""
    if cpp_extension.CUDA_HOME is None:
        return ""
    try:
        out = subprocess.run(
            [os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True, text=True
        ).stdout
    except OSError:
        return ""
    m = re.search(r"V(\d+\.\d+\.\d+)", out) or re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else ""


class _BuildExtension(cpp_extension.BuildExtension):
    """cpp_extension's build, plus the whole-extension cache of ``FASTLM_EXT_CACHE`` (see the module docstring)."""

    def _cache_key(self, ext) -> str:
        h = hashlib.sha256()
        for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)) + [__file__]:
            if os.path.isfile(path):
                h.update(os.path.relpath(path, ROOT).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read())
        tools = [torch.__version__, str(torch.version.cuda), sys.version.split()[0]]
        for cmd in ([os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")] if WITH_CUDA else []) + [
            os.environ.get("CXX", "c++")
        ]:
            tools.append(subprocess.run([cmd, "--version"], capture_output=True, text=True).stdout)
        flags = [ext.sources, ext.include_dirs, ext.extra_compile_args, ext.extra_link_args, ext.libraries]
        flags = json.dumps([tools, flags, os.environ.get("TORCH_CUDA_ARCH_LIST", "")], default=str)
        # the same key from any clone or copy, and from any venv of the same torch
        flags = flags.replace(ROOT, "<source tree>").replace(os.path.dirname(torch.__file__), "<torch>")
        h.update(flags.encode())
        return h.hexdigest()[:24]

    @staticmethod
    def _log(cache: str, line: str) -> None:
        """Print ``line`` and append it to ``cache``/log (pip -q hides a build's output; the Makefile shows it)."""
        print(line, flush=True)
        with open(os.path.join(cache, "log"), "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def build_extension(self, ext) -> None:
        cache = os.environ.get("FASTLM_EXT_CACHE")
        if not cache:
            return super().build_extension(ext)
        target = self.get_ext_fullpath(ext.name)
        entry = os.path.join(cache, self._cache_key(ext))
        cached = os.path.join(entry, os.path.basename(target))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.makedirs(cache, exist_ok=True)
        if os.path.isfile(cached):
            shutil.copy2(cached, target)
            os.utime(entry)
            self._log(cache, f"fastlm._C: unchanged inputs, reused from the build cache {entry}")
            return None
        start = time.time()
        super().build_extension(ext)
        os.makedirs(entry + ".tmp", exist_ok=True)
        shutil.copy2(target, os.path.join(entry + ".tmp", os.path.basename(target)))
        shutil.rmtree(entry, ignore_errors=True)
        os.rename(entry + ".tmp", entry)
        self._log(cache, f"fastlm._C: compiled in {time.time() - start:.0f} s, stored in the build cache {entry}")
        entries = [p for p in glob.glob(os.path.join(cache, "*")) if os.path.isdir(p)]
        old = sorted(entries, key=os.path.getmtime)[:-4]  # keep the newest four
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return None


def _version(with_cuda: bool) -> str:
    with open(os.path.join(ROOT, "fastlm", "__init__.py")) as f:
        base = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
    return f"{base}+cu{torch.version.cuda.split('.')[0]}" if with_cuda else base


EXTENSION = _extension()
WITH_CUDA = "-DFASTLM_WITH_CUDA" in EXTENSION.extra_compile_args["cxx"]

# What this build was made for, readable even when fastlm._C cannot load (the import guard reports it).
with open(os.path.join(ROOT, "fastlm", "_build_info.json"), "w") as f:
    json.dump(
        {
            "with_cuda": WITH_CUDA,
            "cuda_version": torch.version.cuda if WITH_CUDA else "",
            "nvcc_version": _nvcc_version() if WITH_CUDA else "",
            "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if WITH_CUDA else "",
            "torch_build_version": torch.__version__.split("+")[0],
            "torch_build": torch.__version__,
            "min_torch": "2.10",
        },
        f,
    )

setup(
    version=_version(WITH_CUDA),
    package_data={"fastlm": ["_build_info.json"]},
    packages=[
        "fastlm",
        "fastlm.ops",
        "fastlm.nn",
        "fastlm.bench",
        "fastlm.models",
        "fastlm.kernels",
        "fastlm.kernels.attention",
    ],
    package_dir={"fastlm": "fastlm", "fastlm.kernels": "kernels"},
    ext_modules=[EXTENSION],
    cmdclass={"build_ext": _BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
