"""Registered ops (``torch.ops.fastlm.*``), their fake impls and autograd, one module per op family."""

from fastlm.ops import norms  # noqa: F401  (registers the norm ops)
