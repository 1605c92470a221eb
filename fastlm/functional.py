"""The public functional API: the names, signatures and semantics of ``torch.nn.functional``, on fastlm's kernels.

Each function picks its backend with :func:`fastlm.backend` (see ``fastlm/dispatch.py``).
"""

from fastlm.ops.attention import scaled_dot_product_attention, varlen_attention
from fastlm.ops.cross_entropy import cross_entropy
from fastlm.ops.distillation import distillation_loss
from fastlm.ops.gated_mlp import geglu, swiglu
from fastlm.ops.grpo import linear_grpo_loss
from fastlm.ops.kl_div import kl_div
from fastlm.ops.kvcache import attention_with_kvcache
from fastlm.ops.linear_cross_entropy import linear_cross_entropy
from fastlm.ops.linear_distillation import linear_distillation_loss
from fastlm.ops.linear_logprobs import linear_logprobs
from fastlm.ops.norms import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from fastlm.ops.preference import linear_cpo_loss, linear_dpo_loss, linear_kto_loss, linear_orpo_loss
from fastlm.ops.rope import apply_rotary_pos_emb
from fastlm.ops.softmax import log_softmax, scaled_masked_softmax, softmax

__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "apply_rotary_pos_emb",
    "attention_with_kvcache",
    "cross_entropy",
    "distillation_loss",
    "geglu",
    "kl_div",
    "layer_norm",
    "linear_cross_entropy",
    "linear_cpo_loss",
    "linear_distillation_loss",
    "linear_dpo_loss",
    "linear_grpo_loss",
    "linear_kto_loss",
    "linear_logprobs",
    "linear_orpo_loss",
    "log_softmax",
    "rms_norm",
    "scaled_dot_product_attention",
    "scaled_masked_softmax",
    "softmax",
    "swiglu",
    "varlen_attention",
]
