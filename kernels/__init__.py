"""Triton kernels and their launchers, one module per op family (installed as ``fastlm.kernels``).

``empty`` allocates kernel outputs; with ``FASTLM_POISON=1`` (set by the test suite) it fills them with NaN first,
so an element a kernel forgets to write shows up in the comparison with the reference.
"""

import os

import torch

POISON = os.environ.get("FASTLM_POISON", "0") == "1"


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, NaN-filled when ``FASTLM_POISON=1``."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out
