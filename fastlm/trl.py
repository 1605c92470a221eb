"""TRL trainers with fastlm's fused LM-head losses: drop-in subclasses of TRL's ``DPOTrainer`` and ``GRPOTrainer``.

The recipe (TRL is not a dependency of fastlm: install it yourself; this module imports it)::

    import fastlm
    from fastlm.trl import FastlmDPOTrainer, FastlmGRPOTrainer
    from trl import DPOConfig, GRPOConfig

    trainer = FastlmDPOTrainer(model, ref_model=ref_model, args=DPOConfig(..., loss_type="sigmoid"),
                               train_dataset=dataset, processing_class=tokenizer)
    trainer.train()  # fastlm.backend("triton") / ("cpu") around it picks the kernels; "auto" by default

    trainer = FastlmGRPOTrainer(model, reward_funcs=reward_fn, args=GRPOConfig(..., loss_type="dapo"),
                                train_dataset=prompts, processing_class=tokenizer)

Each subclass overrides only TRL's ``_compute_loss``: the policy (and the reference) run WITHOUT the LM head
(``model(..., fastlm_hidden_states=True)`` returns the backbone's final hidden states: a forward patch in the style
of TRL's own fused head, so a wrapper's forward, e.g. accelerate's autocast, still runs around it), then
``fastlm.functional.linear_dpo_loss`` / ``linear_grpo_loss`` take the hidden states, shifted, and ``lm_head.weight``
(and bias): the ``(tokens, vocab)`` logits are never materialised. Everything else (data preparation, generation,
rewards, advantages, TRL's old and reference per-token log-probabilities for GRPO, precomputed reference
log-probabilities for DPO, the training loop) is TRL's.

DPO: every TRL loss type (``sigmoid``, ``hinge``, ``ipo``, ``exo_pair``, ``nca_pair``, ``robust``, ``bco_pair``,
``sppo_hard``, ``aot``, ``aot_unpaired``, ``apo_zero``, ``apo_down``, ``discopop``, ``sft``, ``sigmoid_norm``), one
at a time or one plus ``"sft"`` (RPO: ``loss_type=["sigmoid", "sft"]``); the reference as a ``ref_model`` (its
hidden states and head through fastlm) or ``precompute_ref_log_probs=True``.
GRPO: ``loss_type`` ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``; token or sequence importance sampling,
``delta``, ``temperature``, ``beta`` (with TRL's reference log-probabilities), ``num_iterations > 1``, gradient
accumulation.

Raises ``NotImplementedError`` (naming the option) for: DPO ``ld_alpha``, ``f_divergence_type`` other than
``reverse_kl``, ``use_weighting``, several loss types other than one plus ``sft``; GRPO ``loss_type`` ``sapo`` /
``vespo`` / ``luspo``, ``top_entropy_quantile < 1``, ``entropy_coef`` / ``use_adaptive_entropy``,
``off_policy_mask_threshold``, ``use_vllm`` with ``vllm_importance_sampling_correction``, ``beta != 0`` with
``use_bias_correction_kl=True`` (TRL's default: set it False; fastlm's KL term has no importance-sampling factor);
DPO ``ipo`` / ``sigmoid_norm`` on a batch with an empty prompt (at ``compute_loss``: TRL's length normaliser counts
the first completion token, which no position predicts; fastlm's counts the predicted tokens);
both: PEFT models, vision-language models and datasets, MoE router aux losses, models whose logits are scaled or
soft-capped (``final_logit_softcapping``, ``logit_scale``, ...).

Metrics: the subclasses log what fastlm's losses return under TRL's names (DPO ``rewards/*``, ``logps/*``,
``logits/*``, and ``num_tokens``; GRPO ``kl``, ``clip_ratio/*`` or ``cispo_clip_ratio``); NOT TRL's ``entropy`` and
DPO's ``mean_token_accuracy`` (they need the logits). With several processes the per-process values are averaged
(TRL weights some by tokens).

Verified (tests/test_trl.py: TRL 1.16, transformers 5.25, one process on CPU, fastlm's ``cpu`` backend, fp32, a tiny
Llama, TRL's default gradient checkpointing): on one batch the subclass's ``compute_loss`` gives TRL's own loss
(relative difference <= 2e-6), every parameter's gradient (<= 1e-6 of its largest entry) and the metrics both log,
for DPO ``sigmoid`` (``ref_model``), ``ipo``, ``["hinge", "sft"]``, ``robust`` with label smoothing, ``sigmoid``
with precomputed reference log-probabilities, and GRPO ``dapo`` (temperature 0.7), ``grpo`` (gradient accumulation
2), ``bnpo`` (``beta = 0.1``), ``dr_grpo`` (sequence-level importance sampling), ``cispo``, off-policy (perturbed
old log-probabilities); ``trainer.train()`` runs two steps of DPO and of GRPO. Not verified: GPUs, bf16 (on CPU
with TRL's default ``bf16=True`` autocast ``train()`` runs, but the values were not compared: fastlm's head runs
outside the autocast, TRL's inside), several processes, DeepSpeed / FSDP, vLLM, ``cast_lm_head_to_fp32``.
"""

import functools
import types

import torch
import trl
from accelerate.utils import is_peft_model
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import nanmax, nanmin

from fastlm import functional as F
from fastlm.ops.grpo import GRPO_LOSS_TYPES
from fastlm.ops.preference import DPO_LOSS_TYPES

__all__ = ["FastlmDPOTrainer", "FastlmGRPOTrainer"]

_DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "logits/chosen", "logits/rejected")  # fmt: skip
_DPO_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
_SMOOTHED = ("exo_pair", "robust", "aot", "aot_unpaired")  # the DPO loss types TRL 1.x applies label_smoothing to
_LOGIT_SCALES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def _unsupported(trainer: str, option: str, why: str = "") -> NotImplementedError:
    return NotImplementedError(f"{trainer} (fastlm.trl) does not support {option}{': ' + why if why else ''}; use "
                               f"TRL's own trainer for it")  # fmt: skip


def _check_model(name: str, model, vision: bool, aux_loss: bool) -> None:
    if is_peft_model(model):
        raise _unsupported(name, "PEFT models", "not verified (the reference would be the adapter switched off)")
    if vision:
        raise _unsupported(name, "vision-language models and datasets")
    if aux_loss:
        raise _unsupported(name, "the MoE router aux loss (router_aux_loss_coef != 0)")
    config = model.config.get_text_config()
    for key in _LOGIT_SCALES:
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise _unsupported(name, f"a model whose logits are scaled or soft-capped ({key}={getattr(config, key)})")
    if model.get_output_embeddings() is None:
        raise _unsupported(name, f"a model without an LM head ({type(model).__name__})")


def _add_hidden_states_forward(model) -> None:
    """``model(..., fastlm_hidden_states=True)`` returns the backbone's final hidden states ``(B, L, H)`` without the
    LM head; without it, the forward as it was (TRL's fused head included, so TRL's own paths are unchanged)."""
    if getattr(model, "_fastlm_hidden_states", False):
        return
    previous = model.forward

    @functools.wraps(type(model).forward)  # generate validates its kwargs against the signature
    def forward(self, *args, fastlm_hidden_states=False, **kwargs):
        if not fastlm_hidden_states:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        return self.base_model(*args, **kwargs).last_hidden_state

    model.forward = types.MethodType(forward, model)
    model._fastlm_hidden_states = True


def _head(accelerator, model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = accelerator.unwrap_model(model).get_output_embeddings()
    return head.weight, head.bias


def _dpo_plan(args) -> tuple[str, float, float]:
    """(fastlm loss type, its weight, the nll weight) for TRL's ``loss_type`` / ``loss_weights``; raises the rest."""
    name = "FastlmDPOTrainer"
    if args.ld_alpha is not None:
        raise _unsupported(name, f"ld_alpha={args.ld_alpha} (LD-DPO)")
    if args.f_divergence_type != "reverse_kl":
        raise _unsupported(name, f"f_divergence_type={args.f_divergence_type!r} (only 'reverse_kl')")
    if args.use_weighting:
        raise _unsupported(name, "use_weighting=True (WPO)")
    loss_types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    weights = list(args.loss_weights or [1.0] * len(loss_types))
    for t in loss_types:
        if t not in DPO_LOSS_TYPES:
            raise _unsupported(name, f"loss_type={t!r}")
    if len(loss_types) == 1:
        return loss_types[0], weights[0], 0.0
    if len(loss_types) == 2 and "sft" in loss_types and loss_types[0] != loss_types[1]:
        i = loss_types.index("sft")
        if weights[1 - i] != 0:
            return loss_types[1 - i], weights[1 - i], weights[i] / weights[1 - i]
    raise _unsupported(name, f"loss_type={loss_types} with loss_weights={weights} (one loss type, or one plus 'sft' "
                             "with a nonzero weight)")  # fmt: skip


class FastlmDPOTrainer(trl.DPOTrainer):
    """TRL's ``DPOTrainer`` with the loss (and the reference's log-probabilities) from
    :func:`fastlm.functional.linear_dpo_loss`; see the module docstring for what is supported."""

    def __init__(self, model, ref_model=None, args=None, *pargs, **kwargs):
        if args is not None:
            _dpo_plan(args)  # fail before TRL's set-up (and a precomputation) for what is not supported
        super().__init__(model, ref_model, args, *pargs, **kwargs)
        self._fastlm_plan = _dpo_plan(self.args)
        _check_model("FastlmDPOTrainer", self.model, self._is_vision_dataset or self._is_vlm, self.aux_loss_enabled)
        _add_hidden_states_forward(self.model)
        if self.ref_model is not None:
            _add_hidden_states_forward(self.accelerator.unwrap_model(self.ref_model))

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        loss_type, loss_weight, nll_weight = self._fastlm_plan
        model_kwargs = {k: v for k, v in inputs.items() if k not in _DPO_NON_MODEL_KEYS}
        completion_mask = inputs["completion_mask"]
        target = inputs["input_ids"].masked_fill(completion_mask == 0, -100)[:, 1:]  # shifted: t predicts t + 1
        if loss_type in ("ipo", "sigmoid_norm") and bool(completion_mask[:, 0].any()):
            raise _unsupported("FastlmDPOTrainer", f"loss_type={loss_type!r} with an empty prompt", "TRL's length "
                               "normaliser counts the first completion token, which no position predicts; fastlm's "
                               "does not")  # fmt: skip
        hidden = model(**model_kwargs, fastlm_hidden_states=True)[:, :-1]
        weight, bias = _head(self.accelerator, model)
        if self.precompute_ref_logps:
            ref = {"ref_logps": torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(hidden.device)}
        else:
            # accelerate wraps the prepared reference's forward in its autocast: the hidden-states path is outside it
            no_ckpt = disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)
            with torch.no_grad(), no_ckpt, self.accelerator.autocast():
                ref_hidden = self.ref_model(**model_kwargs, fastlm_hidden_states=True)[:, :-1]
            ref_weight, ref_bias = _head(self.accelerator, self.ref_model)
            ref = {"ref_hidden": ref_hidden, "ref_weight": ref_weight, "ref_bias": ref_bias}
        loss, metrics = F.linear_dpo_loss(
            hidden, weight, target, bias=bias, **ref, beta=self.beta, loss_type=loss_type, nll_weight=nll_weight,
            label_smoothing=self.label_smoothing if loss_type in _SMOOTHED else 0.0,
            discopop_tau=self.args.discopop_tau,
        )  # fmt: skip
        loss = loss * loss_weight

        if mode == "train":
            n = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += n // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        for key in _DPO_METRICS:
            self._metrics[mode][key].append(
                self.accelerator.gather(metrics[key].to(hidden.device).reshape(1)).mean().item()
            )
        if return_outputs:  # TRL's deprecated path for compute_metrics: the logits by a second forward
            with torch.no_grad():
                return loss, model(**model_kwargs)
        return loss


class FastlmGRPOTrainer(trl.GRPOTrainer):
    """TRL's ``GRPOTrainer`` with the loss from :func:`fastlm.functional.linear_grpo_loss`; see the module
    docstring for what is supported."""

    def __init__(self, model, reward_funcs=None, args=None, *pargs, **kwargs):
        if args is not None:
            self._fastlm_check_args(args)
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        self._fastlm_check_args(self.args)
        _check_model("FastlmGRPOTrainer", self.model, self._is_vlm, self.aux_loss_enabled)
        _add_hidden_states_forward(self.model)

    @staticmethod
    def _fastlm_check_args(args) -> None:
        name = "FastlmGRPOTrainer"
        if args.loss_type not in GRPO_LOSS_TYPES:
            raise _unsupported(name, f"loss_type={args.loss_type!r} (fastlm has {', '.join(GRPO_LOSS_TYPES)})")
        if args.top_entropy_quantile < 1.0:
            raise _unsupported(name, f"top_entropy_quantile={args.top_entropy_quantile} (needs the entropy)")
        if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
            raise _unsupported(name, "the entropy bonus (entropy_coef / use_adaptive_entropy)")
        if args.off_policy_mask_threshold is not None:
            raise _unsupported(name, f"off_policy_mask_threshold={args.off_policy_mask_threshold}")
        if args.use_vllm and args.vllm_importance_sampling_correction:
            raise _unsupported(name, "vllm_importance_sampling_correction=True (set it False, or use_vllm=False)")
        if args.beta != 0.0 and args.use_bias_correction_kl:
            raise _unsupported(name, "use_bias_correction_kl=True with beta != 0 (set use_bias_correction_kl=False)")

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        model_inputs = {
            "input_ids": torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            "attention_mask": torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
        }
        if inputs.get("token_type_ids") is not None:
            model_inputs["token_type_ids"] = inputs["token_type_ids"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        with self.accelerator.autocast():
            hidden = model(**model_inputs, fastlm_hidden_states=True)
        hidden = hidden[:, :-1][:, -completion_ids.size(1) :]  # position t predicts completion_ids[:, t]
        weight, bias = _head(self.accelerator, model)
        if self.args.cast_lm_head_to_fp32:
            hidden = hidden.float()
        gas = self.current_gradient_accumulation_steps if mode == "train" else 1
        items = None
        if self.loss_type in ("dapo", "cispo"):  # TRL's normaliser: the generation batch's tokens, per window
            items = inputs["num_items_in_batch"].clamp(min=1.0)
            if mode == "train":
                items = items * gas / self.args.steps_per_generation
        loss, metrics = F.linear_grpo_loss(
            hidden, weight, completion_ids, mask, inputs["advantages"], bias=bias,
            old_logps=inputs.get("old_per_token_logps"),
            ref_logps=inputs["ref_per_token_logps"] if self.beta != 0.0 else None, beta=self.beta,
            epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, delta=self.args.delta,
            loss_type=self.loss_type, importance_sampling_level=self.importance_sampling_level,
            temperature=self.temperature, max_completion_length=self.max_completion_length,
            num_items_in_batch=items, num_processes=self.accelerator.num_processes,
            grad_accum_steps=gas,
        )  # fmt: skip
        for key, value in metrics.items():
            gathered = self.accelerator.gather(value.to(hidden.device).reshape(1))
            reduce = nanmin if key.endswith("_min") else nanmax if key.endswith("_max") else torch.nanmean
            self._metrics[mode][key].append(reduce(gathered).item())
        return loss
