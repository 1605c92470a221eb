"""The public functional API: the names, signatures and semantics of ``torch.nn.functional``, on fastlm's kernels.

Each function picks its backend with :func:`fastlm.backend` (see ``fastlm/dispatch.py``).
"""

from fastlm.ops.norms import add_layer_norm, add_rms_norm, layer_norm, rms_norm

__all__ = ["add_layer_norm", "add_rms_norm", "layer_norm", "rms_norm"]
