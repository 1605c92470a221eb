"""fastlm: fused Triton and CUDA kernels for Transformers.

    import fastlm, fastlm.functional as F
    y = F.layer_norm(x, (hidden,), weight, bias)
    with fastlm.backend("triton"):
        ...
"""

__version__ = "0.1.0"

from fastlm import _ext  # noqa: F401  (loads fastlm._C when it is there; never raises)
from fastlm import functional, nn, ops  # noqa: F401
from fastlm.dispatch import BackendUnavailableError, backend, current_backend

__all__ = ["BackendUnavailableError", "backend", "current_backend", "functional", "nn", "ops", "__version__"]
