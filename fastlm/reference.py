"""Plain-PyTorch references: the ``torch`` backend, the oracle of the tests and the eager baseline of the benchmarks.

Called with float64 tensors they are the tests' high-precision reference.
"""

from collections.abc import Sequence

import torch.nn.functional as TF
from torch import Tensor


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Unfused ``h = input + residual; (layer_norm(h), h)``."""
    h = input + residual
    return TF.layer_norm(h, normalized_shape, weight, bias, eps), h


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Unfused ``h = input + residual; (rms_norm(h), h)``."""
    h = input + residual
    return TF.rms_norm(h, normalized_shape, weight, eps), h
