"""Drop-in modules: subclasses of the torch.nn classes (same constructor, state_dict keys and isinstance)."""

from fastlm.nn.attention import MultiheadAttention
from fastlm.nn.norms import LayerNorm, RMSNorm
from fastlm.nn.softmax import CrossEntropyLoss, LogSoftmax, Softmax

__all__ = ["CrossEntropyLoss", "LayerNorm", "LogSoftmax", "MultiheadAttention", "RMSNorm", "Softmax"]
