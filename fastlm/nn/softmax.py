"""``fastlm.nn.Softmax``, ``LogSoftmax`` and ``CrossEntropyLoss``: torch's modules on fastlm's fused kernels."""

import torch
import torch.nn.functional as TF
from torch import Tensor

from fastlm.ops import cross_entropy, softmax


def _dim(module_dim: int | None, name: str, input: Tensor) -> int:
    # torch's legacy implicit dim for dim=None (deprecated there too)
    return module_dim if module_dim is not None else TF._get_softmax_dim(name, input.dim(), 3)


class Softmax(torch.nn.Softmax):
    """Drop-in for :class:`torch.nn.Softmax`: any shape, softmax along ``dim``."""

    def forward(self, input: Tensor) -> Tensor:
        return softmax.softmax(input, _dim(self.dim, "softmax", input))


class LogSoftmax(torch.nn.LogSoftmax):
    """Drop-in for :class:`torch.nn.LogSoftmax`: any shape, log-softmax along ``dim``."""

    def forward(self, input: Tensor) -> Tensor:
        return softmax.log_softmax(input, _dim(self.dim, "log_softmax", input))


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for :class:`torch.nn.CrossEntropyLoss`: input ``(N, C)``, ``(C,)`` or ``(N, C, d...)``; target
    class indices ``(N,)`` / ``()`` / ``(N, d...)`` or class probabilities of input's shape (as
    fastlm.functional.cross_entropy)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy.cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
