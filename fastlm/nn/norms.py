"""``fastlm.nn.LayerNorm`` and ``fastlm.nn.RMSNorm``: torch's modules with fastlm's fused forward and backward."""

import torch
from torch import Tensor

from fastlm.ops import norms


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for :class:`torch.nn.LayerNorm` (same constructor, parameters and state_dict keys).

    Input ``(*, *normalized_shape)``, output the same shape and dtype.
    """

    def forward(self, input: Tensor) -> Tensor:
        return norms.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in for :class:`torch.nn.RMSNorm` (same constructor, parameters and state_dict keys).

    Input ``(*, *normalized_shape)``, output the same shape and dtype; ``eps=None`` means
    ``torch.finfo(input.dtype).eps`` as in torch.
    """

    def forward(self, input: Tensor) -> Tensor:
        return norms.rms_norm(input, self.normalized_shape, self.weight, self.eps)
