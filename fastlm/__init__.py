"""fastlm: fused Triton and CUDA kernels for Transformers.

import fastlm, fastlm.functional as F
y = F.layer_norm(x, (hidden,), weight, bias)
with fastlm.backend("triton"):
    ...
"""

__version__ = "0.1.0"

from fastlm import (  # noqa: F401
    _ext,  # noqa: F401  (loads fastlm._C when it is there; never raises)
    functional,
    nn,
    ops,
)
from fastlm import hf as _hf
from fastlm.dispatch import BackendUnavailableError, backend, current_backend
from fastlm.patch import patch, patch_summary, unpatch

_hf.install()  # attn_implementation="fastlm" in transformers, now or once transformers is imported

__all__ = [
    "BackendUnavailableError",
    "backend",
    "current_backend",
    "functional",
    "nn",
    "ops",
    "patch",
    "patch_summary",
    "unpatch",
    "__version__",
]
