"""Loading of the compiled extension ``fastlm._C`` and why it may be missing.

``import fastlm`` never fails because of the extension: ``lib`` is the loaded module, or None with ``LOAD_ERROR``
holding the reason, which the ``cuda`` and ``cpu`` backends report when asked for (and ``fastlm info`` prints).
"""

import importlib
import json
import os
import re

import torch

lib = None  # the loaded fastlm._C (None: see LOAD_ERROR)
LOAD_ERROR: str | None = None


def _build_info_file() -> dict:
    """What the installed build was made for (written by setup.py), readable even when fastlm._C cannot load."""
    try:
        with open(os.path.join(os.path.dirname(__file__), "_build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _torch_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


BUILT = _build_info_file()
_min = tuple(int(x) for x in BUILT.get("min_torch", "2.10").split("."))
if _torch_version() < _min:
    LOAD_ERROR = (
        f"fastlm._C needs torch >= {BUILT.get('min_torch', '2.10')} (it targets that stable ABI), this is torch "
        f"{torch.__version__}; upgrade torch"
    )
else:
    try:
        lib = importlib.import_module("fastlm._C")  # its static initialisers register the torch.ops.fastlm.* ops
    except ImportError as exc:  # not built (pure-Python checkout), or built for another CUDA / a CUDA torch
        LOAD_ERROR = f"fastlm._C could not be loaded: {exc}"
        if BUILT.get("with_cuda") and torch.version.cuda is None:
            LOAD_ERROR += (
                f" -- this fastlm was built with CUDA {BUILT['cuda_version']} kernels (torch "
                f"{BUILT['torch_build_version']}), but this torch ({torch.__version__}) is a CPU build: install a "
                "CUDA build of torch, or build fastlm here (FASTLM_BUILD_CUDA=0 for a CPU-only build)"
            )
        elif BUILT.get("with_cuda") and torch.version.cuda.split(".")[0] != BUILT["cuda_version"].split(".")[0]:
            LOAD_ERROR += (
                f" -- built for CUDA {BUILT['cuda_version']}, running torch with CUDA {torch.version.cuda}: install "
                f"the fastlm wheel for CUDA {torch.version.cuda.split('.')[0]}"
            )


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot run in this process, or None when they can."""
    if lib is None:
        if not BUILT:
            return LOAD_ERROR + " (build it with `pip install --no-build-isolation -e .` on a CUDA build of torch)"
        return LOAD_ERROR
    if not lib.with_cuda:
        return (
            "fastlm._C was built without CUDA kernels (torch was a CPU build or nvcc was not found at build time; "
            "rebuild with CUDA_HOME set, or FASTLM_BUILD_CUDA=1)"
        )
    if torch.version.cuda is None:
        return f"fastlm._C has CUDA {lib.cuda_version} kernels but this torch ({torch.__version__}) is a CPU build"
    if torch.version.cuda.split(".")[0] != lib.cuda_version.split(".")[0]:
        return (
            f"fastlm._C was built for CUDA {lib.cuda_version} but torch uses CUDA {torch.version.cuda}; "
            "install the fastlm build for your CUDA major"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def build_info() -> dict:
    """What the extension was built with (empty when it is not loaded): torch's CUDA (``cuda_version``, whose
    major names the wheel: ``+cu12`` / ``+cu13``), the archs, the torch release; from ``_build_info.json`` also the
    nvcc release that compiled the kernels (``nvcc_version``, "" when unknown) and the full torch build
    (``torch_build``, e.g. ``2.10.0+cu128``)."""
    if lib is None:
        return {}
    return {
        "with_cuda": bool(lib.with_cuda),
        "cuda_version": lib.cuda_version,
        "cuda_archs": lib.cuda_archs,
        "torch_build_version": lib.torch_build_version,
        "nvcc_version": BUILT.get("nvcc_version", "") if lib.with_cuda else "",
        "torch_build": BUILT.get("torch_build", lib.torch_build_version),
    }
