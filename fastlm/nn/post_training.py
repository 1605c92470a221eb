"""Drop-in modules for code written against Liger-Kernel's chunked post-training losses
(``liger_kernel.chunked_loss``): the same class roles, constructor keywords, forward argument order and return
structure, over fastlm's fused losses (fastlm/ops/preference.py, fastlm/ops/grpo.py). Switching is an import change:

    from fastlm.nn import FusedLinearDPOLoss     # instead of liger_kernel.chunked_loss.LigerFusedLinearDPOLoss
    loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll, chosen_rw, rejected_rw) = \\
        FusedLinearDPOLoss(beta=0.1)(lm_head.weight, hidden, labels, ref_input=ref_hidden, ref_weight=ref_head)

Shapes as Liger's: ``_input`` ``(2P, T, H)`` (chosen rows, then rejected; KTO / GRPO: ``(B, T, H)``), ``target``
``(2P, T)`` shifted labels with ``ignore_index`` outside the completion, ``lin_weight`` ``(V, H)``.

Differences from Liger (documented, each checked in tests/test_post_training_modules.py):

- ``compiled`` and ``chunk_size`` are accepted and ignored: fastlm chunks over tokens (its own rule), not over
  pairs, and runs its fused kernels instead of torch.compile.
- ``FusedLinearDPOLoss`` with ``use_ref_model=True`` and no ``ref_input``: reference-free (Liger fails); it also
  takes every TRL loss type (Liger: ten of them; ``ipo`` is the length-normalised TRL form).
- ``FusedLinearORPOLoss(compute_nll_loss=False)`` and ``FusedLinearCPOLoss(average_log_prob=True)`` raise
  NotImplementedError (TRL has neither form).
- ``FusedLinearKTOLoss``: ``kl`` is clamped at 0 as TRL's trainer does (Liger subtracts it as given).
- ``FusedLinearGRPOLoss``: the loss types of :data:`fastlm.ops.grpo.GRPO_LOSS_TYPES` (no sapo / vespo / luspo, no
  ``use_bias_correction_kl`` or ``vllm_is_ratio``: NotImplementedError); metrics ``(kl if beta != 0, clip ratio)``,
  the clip ratio the fraction of the masked tokens clipped (sequence level: of the rows, TRL's).
"""

import torch
from torch import Tensor, nn

import fastlm.functional as F
from fastlm.ops.grpo import GRPO_LOSS_TYPES
from fastlm.ops.sharded_params import row_mean


def _logits_mean(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The mean logit over the vocabulary and every position of ``hidden`` (Liger's ``*_logits_mean``), without the
    logits."""
    with torch.no_grad():
        m = hidden.float() @ row_mean(weight)
        return (m + row_mean(bias)) if bias is not None else m


def _pair_outputs(hidden, weight, bias, metrics, nll):
    """Liger's paired return structure: (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
    nll_loss, chosen_rewards, rejected_rewards)."""
    P = hidden.shape[0] // 2
    m = _logits_mean(hidden, weight, bias)
    lp, rw = metrics["rows/logps"], metrics["rows/rewards"]
    return lp[:P], lp[P:], m[:P].mean(), m[P:].mean(), nll, rw[:P], rw[P:]


class FusedLinearDPOLoss(nn.Module):
    """Liger's ``LigerFusedLinearDPOLoss`` over :func:`fastlm.functional.linear_dpo_loss`."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, compute_nll_loss: bool = False,
                 compiled: bool = True, use_ref_model: bool = True, average_log_prob: bool = False, chunk_size: int = 1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, discopop_tau: float = 0.05):  # fmt: skip
        super().__init__()
        self.ignore_index, self.beta, self.alpha, self.compute_nll_loss = ignore_index, beta, alpha, compute_nll_loss
        self.use_ref_model, self.average_log_prob, self.loss_type = use_ref_model, average_log_prob, loss_type
        self.label_smoothing, self.discopop_tau = label_smoothing, discopop_tau

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        ref = dict(ref_hidden=ref_input, ref_weight=ref_weight, ref_bias=ref_bias) if self.use_ref_model else {}
        loss, metrics = F.linear_dpo_loss(
            _input, lin_weight, target, bias=bias, beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, nll_weight=self.alpha if self.compute_nll_loss else 0.0,
            average_log_prob=self.average_log_prob, discopop_tau=self.discopop_tau, ignore_index=self.ignore_index,
            return_rows=True, **ref,
        )  # fmt: skip
        nll = metrics["nll"] if self.compute_nll_loss else torch.zeros_like(metrics["nll"])
        return loss, _pair_outputs(_input, lin_weight, bias, metrics, nll)


class FusedLinearORPOLoss(nn.Module):
    """Liger's ``LigerFusedLinearORPOLoss`` over :func:`fastlm.functional.linear_orpo_loss`; returns (loss,
    (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards,
    rejected_rewards, log_odds_ratio, log_odds_chosen))."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compute_nll_loss: bool = True,
                 compiled: bool = True, chunk_size: int = 1):  # fmt: skip
        super().__init__()
        if not compute_nll_loss:
            raise NotImplementedError("FusedLinearORPOLoss(compute_nll_loss=False): fastlm's ORPO always has the NLL "
                                      "term (TRL's ORPO)")  # fmt: skip
        self.ignore_index, self.beta = ignore_index, beta

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        loss, metrics = F.linear_orpo_loss(_input, lin_weight, target, bias=bias, beta=self.beta, nll_target=nll_target,
                                           ignore_index=self.ignore_index, return_rows=True)  # fmt: skip
        out = _pair_outputs(_input, lin_weight, bias, metrics, metrics["nll_loss"])
        return loss, (*out, metrics["log_odds_ratio"], metrics["log_odds_chosen"])


class FusedLinearCPOLoss(nn.Module):
    """Liger's ``LigerFusedLinearCPOLoss`` (sigmoid loss on summed log-probabilities) over
    :func:`fastlm.functional.linear_cpo_loss`."""

    _loss_type = "sigmoid"

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
                 compute_nll_loss: bool = True, compiled: bool = True, average_log_prob: bool = False,
                 chunk_size: int = 1, gamma: float = 0.5):  # fmt: skip
        super().__init__()
        if average_log_prob and self._loss_type == "sigmoid":
            raise NotImplementedError("FusedLinearCPOLoss(average_log_prob=True): fastlm's CPO sums the log-"
                                      "probabilities (TRL's); FusedLinearSimPOLoss averages them")  # fmt: skip
        self.ignore_index, self.beta, self.alpha, self.label_smoothing = ignore_index, beta, alpha, label_smoothing
        self.compute_nll_loss, self.gamma = compute_nll_loss, gamma

    def forward(self, lin_weight, _input, target, bias=None):
        loss, metrics = F.linear_cpo_loss(
            _input, lin_weight, target, bias=bias, beta=self.beta, loss_type=self._loss_type,
            label_smoothing=self.label_smoothing, simpo_gamma=self.gamma,
            cpo_alpha=self.alpha if self.compute_nll_loss else 0.0, ignore_index=self.ignore_index, return_rows=True,
        )  # fmt: skip
        return loss, _pair_outputs(_input, lin_weight, bias, metrics, metrics["nll_loss"])


class FusedLinearSimPOLoss(FusedLinearCPOLoss):
    """Liger's ``LigerFusedLinearSimPOLoss`` (``-logsigmoid(beta (mean_c - mean_r) - gamma)``) over
    :func:`fastlm.functional.linear_cpo_loss` with ``loss_type="simpo"``."""

    _loss_type = "simpo"

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
                 compute_nll_loss: bool = True, compiled: bool = True, gamma: float = 0.5,
                 chunk_size: int = 1):  # fmt: skip
        super().__init__(ignore_index, beta, alpha, label_smoothing, compute_nll_loss, compiled, False, chunk_size,
                         gamma)  # fmt: skip


class FusedLinearKTOLoss(nn.Module):
    """Liger's ``LigerFusedLinearKTOLoss`` over :func:`fastlm.functional.linear_kto_loss`; returns (loss,
    (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum, chosen_rewards_sum,
    rejected_rewards_sum)), the logits sums over every position and the vocabulary of the class's rows."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compiled: bool = True, use_ref_model: bool = False,
                 average_log_prob: bool = False, chunk_size: int = 1):  # fmt: skip
        super().__init__()
        if average_log_prob:
            raise NotImplementedError("FusedLinearKTOLoss(average_log_prob=True): fastlm's KTO sums the log-"
                                      "probabilities (TRL's)")  # fmt: skip
        self.ignore_index, self.beta, self.use_ref_model = ignore_index, beta, use_ref_model

    def forward(self, _input, lin_weight, target, bias=None, preference_labels=None, ref_input=None, ref_weight=None,
                ref_bias=None, kl=None):  # fmt: skip
        if preference_labels is None:
            raise ValueError("FusedLinearKTOLoss: preference_labels ((B,) bool) is required")
        ref = dict(ref_hidden=ref_input, ref_weight=ref_weight, ref_bias=ref_bias) if self.use_ref_model else {}
        loss, metrics = F.linear_kto_loss(
            _input, lin_weight, target, preference=preference_labels.bool(), kl=kl, bias=bias, beta=self.beta,
            ignore_index=self.ignore_index, return_rows=True, **ref,
        )  # fmt: skip
        pref = preference_labels.bool()
        lp, rw = metrics["rows/logps"], metrics["rows/rewards"]
        row_logits = _logits_mean(_input, lin_weight, bias).sum(-1) * lin_weight.shape[0]  # over positions and vocab
        return loss, (lp[pref].sum(), lp[~pref].sum(), row_logits[pref].sum(), row_logits[~pref].sum(),
                      rw[pref].sum(), rw[~pref].sum())  # fmt: skip


class FusedLinearGRPOLoss(nn.Module):
    """Liger's ``LigerFusedLinearGRPOLoss`` over :func:`fastlm.functional.linear_grpo_loss`; returns (loss, (kl,
    clip_ratio)) (kl only when ``beta != 0``)."""

    def __init__(self, beta: float = 0.04, compiled: bool = True, use_ref_model: bool = True, chunk_size: int = 1,
                 epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_type: str = "dapo",
                 max_completion_length: int | None = None, importance_sampling_level: str = "token",
                 sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05, temperature: float = 1.0,
                 delta: float | None = None, use_bias_correction_kl: bool = False, vespo_k_pos: float = 2.0,
                 vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0):  # fmt: skip
        super().__init__()
        if loss_type not in GRPO_LOSS_TYPES:
            raise NotImplementedError(f"FusedLinearGRPOLoss: loss_type {loss_type!r} is not in fastlm (it has "
                                      f"{', '.join(GRPO_LOSS_TYPES)})")  # fmt: skip
        if use_bias_correction_kl:
            raise NotImplementedError("FusedLinearGRPOLoss(use_bias_correction_kl=True) is not in fastlm")
        self.beta, self.use_ref_model, self.epsilon_low, self.epsilon_high = (
            beta,
            use_ref_model,
            epsilon_low,
            epsilon_high,
        )
        self.loss_type, self.max_completion_length = loss_type, max_completion_length
        self.importance_sampling_level, self.temperature, self.delta = importance_sampling_level, temperature, delta

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
                vllm_is_ratio=None, num_items_in_batch=None):  # fmt: skip
        if vllm_is_ratio is not None:
            raise NotImplementedError("FusedLinearGRPOLoss: vllm_is_ratio is not in fastlm")
        beta = self.beta if self.use_ref_model else 0.0
        if beta != 0.0 and ref_per_token_logps is None:
            if ref_input is None:
                raise ValueError("FusedLinearGRPOLoss: beta != 0 needs ref_per_token_logps or ref_input")
            with torch.no_grad():
                ref_per_token_logps = F.linear_logprobs(
                    ref_input, lin_weight if ref_weight is None else ref_weight, selected_token_ids,
                    bias=bias if ref_weight is None else ref_bias, temperature=self.temperature,
                )  # fmt: skip
        loss, metrics = F.linear_grpo_loss(
            _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=bias,
            old_logps=old_per_token_logps, ref_logps=ref_per_token_logps, beta=beta, epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high, delta=self.delta, loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level, temperature=self.temperature,
            max_completion_length=self.max_completion_length, num_items_in_batch=num_items_in_batch,
        )  # fmt: skip
        clip = metrics["cispo_clip_ratio"] if self.loss_type == "cispo" else metrics["clip_ratio/region_mean"]
        return loss, ((metrics["kl"], clip) if beta != 0.0 else (clip,))
