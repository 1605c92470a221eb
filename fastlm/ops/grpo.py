"""The GRPO family of policy-gradient losses (TRL's ``GRPOTrainer``) on the LM head, chunked over tokens: the
per-token log-probabilities of the sampled completion from ``linear_logprobs`` (the logits never materialised),
then TRL's per-token loss and its normalisation in O(tokens) torch ops; the backward of ``linear_logprobs``
recomputes each chunk's logits with the per-token gradients. Normalisers over the whole batch (bnpo, dapo's token
count) are exact, whatever the chunking."""

import torch
from torch import Tensor

from fastlm.ops.linear_logprobs import logprob_loss
from fastlm.ops.packed import row_layout

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    return (x * m).sum() / m.sum().clamp(min=1)


def linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    loss_mask: Tensor,
    advantages: Tensor,
    *,
    bias: Tensor | None = None,
    old_logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    temperature: float = 1.0,
    max_completion_length: int | None = None,
    num_items_in_batch: int | Tensor | None = None,
    num_processes: int = 1,
    grad_accum_steps: int = 1,
    chunk_size: int | None = None,
    cu_seqlens: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO and its variants on the LM head: ``(loss, metrics)``, TRL's ``GRPOTrainer._compute_loss``.

    Args:
        hidden: ``(B, T, H)`` the policy's hidden states at the completion's positions (shifted: position t predicts
            ``completion_ids[:, t]``); weight ``(V, H)``, bias ``(V,)`` or None: its LM head.
        completion_ids: ``(B, T)`` the sampled tokens; loss_mask: ``(B, T)`` bool or 0/1 (TRL's completion mask,
            times its tool mask): the tokens that count.
        advantages: ``(B,)`` (or ``(B, T)``) advantages.
        old_logps: ``(B, T)`` log-probabilities of the sampling policy (None: the current policy's, detached, so
            the ratio is 1 and the gradient the plain policy gradient). ref_logps: ``(B, T)`` the reference's, for
            the ``beta`` KL term (k3 estimator ``exp(ref - lp) - (ref - lp) - 1``); needed when ``beta != 0``.
        epsilon_low / epsilon_high: the clipping band ``[1 - epsilon_low, 1 + epsilon_high]`` (cispo:
            ``epsilon_high`` is the ratio's absolute cap, e.g. 5.0). delta: two-sided clipping's upper bound of the
            ratio (None: off).
        loss_type: ``grpo`` (per-sequence means, averaged), ``bnpo`` (the micro-batch's token mean), ``dr_grpo``
            (sum over ``B * max_completion_length``: required), ``dapo`` and ``cispo`` (sum over
            ``num_items_in_batch / num_processes``: the token count of the whole generation batch over all
            processes, TRL's normaliser for gradient accumulation; None: this call's tokens). grpo, bnpo and dr_grpo
            are divided by ``grad_accum_steps`` as TRL does in training.
        importance_sampling_level: ``token`` (a ratio per token) or ``sequence`` (GSPO: ``exp`` of the sequence's
            mean log-ratio).
        temperature: divides the logits (the sampling temperature).
        cu_seqlens / position_ids: a packed (padding-free) batch: ``hidden`` ``(1, N, H)``, ``completion_ids``,
            ``loss_mask``, ``old_logps``, ``ref_logps`` ``(1, N)`` holding ``B`` sequences (``cu_seqlens`` ``(B + 1,)``
            offsets, or ``position_ids`` restarting at 0 at each sequence); ``advantages`` ``(B,)`` or ``(1, N)``;
            the matmuls run on the N tokens only; grpo's per-sequence means and dr_grpo's ``B`` count sequences.

    Returns:
        The scalar loss (float32) and a dict of detached fp32 metrics, TRL's: ``kl`` (beta != 0: the masked mean of
        k3), and ``clip_ratio/low_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_mean``, ``clip_ratio/high_max``,
        ``clip_ratio/region_mean`` (cispo: ``cispo_clip_ratio``); over this call's tokens (TRL gathers them over
        processes; a row without tokens is left out of ``low_min`` / ``high_max``, NaN when every row is). Old and
        reference log-probabilities outside ``loss_mask`` are not read (padding may hold -inf). Not supported (TRL
        has them): entropy masking and the entropy metric, off-policy masks, vLLM importance-sampling corrections,
        sapo / vespo / luspo.
    """
    name = "linear_grpo_loss"
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"{name}: loss_type must be one of {', '.join(GRPO_LOSS_TYPES)}; got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"{name}: importance_sampling_level must be 'token' or 'sequence', got "
                         f"{importance_sampling_level!r}")  # fmt: skip
    x, ids, layout = row_layout(name, hidden, completion_ids, cu_seqlens, position_ids)
    if loss_mask.shape != completion_ids.shape:
        raise ValueError(f"{name}: loss_mask must have completion_ids' shape {list(completion_ids.shape)}, got "
                         f"{list(loss_mask.shape)}")  # fmt: skip
    B, T = layout.B, layout.T
    mask_flat = loss_mask.reshape(-1).bool()
    target = ids.masked_fill(~mask_flat, -100)
    if layout.packed:  # the per-token inputs onto the (B, T) grid of the sequences
        flat = ids.shape[0]

        def grid(arg, val, per_row_ok=False):
            if val is None or (per_row_ok and val.shape == (B,)):
                return val
            if val.numel() != flat or val.shape[-1] != flat:
                raise ValueError(f"{name}: packed {arg} must be (1, {flat}) like completion_ids, got {list(val.shape)}")
            return layout.pad(val.reshape(flat), 0.0)

        old_logps, ref_logps = grid("old_logps", old_logps), grid("ref_logps", ref_logps)
        advantages = grid("advantages", advantages, per_row_ok=True)
    m = layout.pad(mask_flat, False)
    if advantages.shape not in ((B,), (B, T)):
        raise ValueError(f"{name}: advantages must be ({B},) or ({B}, {T}), got {list(advantages.shape)}")
    if importance_sampling_level == "sequence" and advantages.dim() != 1:
        raise ValueError(f"{name}: sequence-level importance sampling takes ({B},) advantages, one per sequence")
    for arg, val in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if val is not None and val.shape != (B, T):
            raise ValueError(f"{name}: {arg} must be ({B}, {T}), got {list(val.shape)}")
    if loss_type == "dr_grpo" and not (isinstance(max_completion_length, int) and max_completion_length > 0):
        raise ValueError(
            f"{name}: dr_grpo needs max_completion_length (TRL's config value), got {max_completion_length}"
        )
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"{name}: beta = {beta} needs ref_logps (the reference's per-token log-probabilities)")
    mf = m.float()
    adv_all = (advantages if advantages.dim() == 2 else advantages.unsqueeze(1)).float()
    if loss_type == "grpo":  # each row's tokens mean, averaged over rows: a token's weight
        denom = mf.sum(-1, keepdim=True).clamp(min=1.0) * B * grad_accum_steps
    elif loss_type == "bnpo":
        denom = mf.sum().clamp(min=1.0) * grad_accum_steps
    elif loss_type == "dr_grpo":
        denom = torch.tensor(float(B * max_completion_length * grad_accum_steps), device=mf.device)
    else:
        items = mf.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=torch.float32,
                                                                            device=mf.device)  # fmt: skip
        denom = items.clamp(min=1.0) / num_processes
    token_weight = mf / denom  # (B, T): the loss is sum(per_token * token_weight), separable over rows

    def terms(lp: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(per-token loss, ratio, per-token KL or None) of the rows ``rows``."""
        mr = m[rows]
        old = lp.detach() if old_logps is None else old_logps[rows].to(lp.dtype).detach()
        # 0 outside the mask before any exp: old / ref log-probabilities there may be anything (-inf padding), and
        # inf * 0 would be NaN in the masked sums
        log_ratio = torch.where(mr, lp - old, 0.0)
        if importance_sampling_level == "sequence":
            mfr = mr.to(lp.dtype)
            log_ratio = ((log_ratio * mfr).sum(-1) / mfr.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (rows, 1)
        ratio = torch.exp(log_ratio)
        adv = adv_all[rows].to(lp.dtype)
        if loss_type == "cispo":
            per_token = -torch.clamp(ratio, max=epsilon_high).detach() * adv * lp
        else:
            clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
            r1 = torch.clamp(ratio, max=delta) if delta is not None else ratio
            per_token = -torch.min(r1 * adv, clipped * adv)
        per_token_kl = None
        if beta != 0.0:
            d = torch.where(mr, ref_logps[rows].to(lp.dtype).detach() - lp, 0.0)
            per_token_kl = torch.exp(d) - d - 1
            per_token = per_token + beta * per_token_kl
        return per_token, ratio, per_token_kl

    def row_loss(lp: Tensor, rows: Tensor) -> Tensor:
        return (terms(lp, rows)[0] * token_weight[rows].to(lp.dtype)).sum()

    loss, lp = logprob_loss(x, weight, target, row_loss, layout=layout, bias=bias, temperature=temperature,
                            chunk_size=chunk_size)  # fmt: skip
    mf = mf.to(lp.dtype)
    _, ratio, per_token_kl = terms(lp, torch.arange(B, device=lp.device))
    adv = adv_all.to(lp.dtype)
    with torch.no_grad():
        metrics = {}
        if per_token_kl is not None:
            metrics["kl"] = _masked_mean(per_token_kl, mf).float()
        # TRL's: per token, over the masked tokens; per sequence, one value per row over all B rows
        seq = importance_sampling_level == "sequence"
        per = torch.ones_like(mf[:, :1]) if seq else mf
        r = ratio
        if loss_type == "cispo":
            clip = ((r > epsilon_high) & (adv > 0)).to(lp.dtype).expand_as(per)
            metrics["cispo_clip_ratio"] = _masked_mean(clip, per).float()
        else:
            low = ((r < 1 - epsilon_low) & (adv < 0)).to(lp.dtype).expand_as(per)
            high = ((r > 1 + epsilon_high) & (adv > 0)).to(lp.dtype).expand_as(per)
            region = torch.maximum(low, high)
            rows = per.sum(-1)
            inf = torch.full_like(rows, float("inf"))
            low_row = torch.where(rows > 0, (low * per).sum(-1) / rows.clamp(min=1), inf)  # empty rows: skipped
            high_row = torch.where(rows > 0, (high * per).sum(-1) / rows.clamp(min=1), -inf)
            nan = torch.full_like(rows[0], float("nan"))
            metrics["clip_ratio/low_mean"] = _masked_mean(low, per).float()
            metrics["clip_ratio/low_min"] = torch.where(low_row.min().isinf(), nan, low_row.min()).float()
            metrics["clip_ratio/high_mean"] = _masked_mean(high, per).float()
            metrics["clip_ratio/high_max"] = torch.where(high_row.max().isinf(), nan, high_row.max()).float()
            metrics["clip_ratio/region_mean"] = _masked_mean(region, per).float()
    return loss, metrics
