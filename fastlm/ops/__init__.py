"""Registered ops (``torch.ops.fastlm.*``), their fake impls and autograd, one module per op family."""

from fastlm.ops import attention, cross_entropy, kl_div, linear_cross_entropy, norms, softmax  # noqa: F401  (registers the ops)
