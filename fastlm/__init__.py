"""fastlm: fused Triton and CUDA kernels for Transformers.

import fastlm, fastlm.functional as F
y = F.layer_norm(x, (hidden,), weight, bias)
with fastlm.backend("triton"):
    ...
"""

__version__ = "0.1.0"


def _refuse_source_tree() -> None:
    """Imported from the repository root without an editable install, ``fastlm`` would be the bare source folder:
    no fastlm.kernels (setup.py maps kernels/ there) and no compiled fastlm._C. Say so in one line, as numpy does."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "setup.py")) and importlib.util.find_spec("fastlm.kernels") is None:
        raise ImportError(
            f"fastlm is being imported from its source tree ({root}), not from an installed build: run from another "
            "folder to use the installed wheel (make test installs one), or `make dev` for an editable install"
        )


_refuse_source_tree()

from fastlm import (  # noqa: E402, F401
    extension,  # noqa: F401  (loads fastlm._C when it is there; never raises)
    functional,
    nn,
    ops,
)
from fastlm import hf as _hf  # noqa: E402
from fastlm.dispatch import BackendUnavailableError, backend, current_backend  # noqa: E402
from fastlm.patch import patch, patch_summary, unpatch  # noqa: E402

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
