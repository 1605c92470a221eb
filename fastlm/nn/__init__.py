"""Drop-in modules: subclasses of the torch.nn classes (same constructor, state_dict keys and isinstance), and the
post-training losses with Liger-Kernel's chunked-loss signatures (fastlm/nn/post_training.py)."""

from fastlm.nn.attention import MultiheadAttention
from fastlm.nn.norms import LayerNorm, RMSNorm
from fastlm.nn.post_training import (
    FusedLinearCPOLoss,
    FusedLinearDPOLoss,
    FusedLinearGRPOLoss,
    FusedLinearKTOLoss,
    FusedLinearORPOLoss,
    FusedLinearSimPOLoss,
)
from fastlm.nn.softmax import CrossEntropyLoss, LogSoftmax, Softmax

__all__ = [
    "CrossEntropyLoss",
    "FusedLinearCPOLoss",
    "FusedLinearDPOLoss",
    "FusedLinearGRPOLoss",
    "FusedLinearKTOLoss",
    "FusedLinearORPOLoss",
    "FusedLinearSimPOLoss",
    "LayerNorm",
    "LogSoftmax",
    "MultiheadAttention",
    "RMSNorm",
    "Softmax",
]
