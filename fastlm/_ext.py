"""Loading of the compiled extension ``fastlm._C`` and why it may be missing.

``import fastlm`` never fails because of the extension: when it is absent or cannot load, ``CUDA_UNAVAILABLE``
holds the reason, which the ``cuda`` backend reports when asked for (and ``fastlm info`` prints).
"""

import importlib

import torch

_C = None
LOAD_ERROR: str | None = None

try:
    _C = importlib.import_module("fastlm._C")  # its static initialisers register the torch.ops.fastlm.*_cuda ops
except ImportError as exc:  # not built (pure-Python checkout) or built for another torch / CUDA
    LOAD_ERROR = f"fastlm._C could not be loaded: {exc}"


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot run in this process, or None when they can."""
    if _C is None:
        return LOAD_ERROR + " (build it with `pip install --no-build-isolation -e .` on a CUDA build of torch)"
    if not _C.with_cuda:
        return (
            "fastlm._C was built without CUDA kernels (torch was a CPU build or nvcc was not found at build time; "
            "rebuild with CUDA_HOME set, or FASTLM_BUILD_CUDA=1)"
        )
    if torch.version.cuda is None:
        return f"fastlm._C has CUDA {_C.cuda_version} kernels but this torch ({torch.__version__}) is a CPU build"
    if torch.version.cuda.split(".")[0] != _C.cuda_version.split(".")[0]:
        return (
            f"fastlm._C was built for CUDA {_C.cuda_version} but torch uses CUDA {torch.version.cuda}; "
            "install the fastlm build for your CUDA major"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def build_info() -> dict:
    """What the extension was built with (empty when it is not loaded)."""
    if _C is None:
        return {}
    return {
        "with_cuda": bool(_C.with_cuda),
        "cuda_version": _C.cuda_version,
        "cuda_archs": _C.cuda_archs,
        "torch_build_version": _C.torch_build_version,
    }
