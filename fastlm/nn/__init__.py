"""Drop-in modules: subclasses of the torch.nn classes (same constructor, state_dict keys and isinstance)."""

from fastlm.nn.norms import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
