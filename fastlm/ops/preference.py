"""Preference-optimisation losses on the LM head, chunked over tokens: the logits are never materialised.

Each loss is two passes (token-chunked, as ``linear_logprobs``): the per-token log-probabilities of the completion
tokens under the policy (and the reference, under ``no_grad``) from ``linear_logprobs``, reduced to per-sequence
sums; then the loss of TRL's trainer in O(batch) torch ops on those sums; the backward of ``linear_logprobs``
recomputes each chunk's logits with the per-token gradients the loss gives. Losses that couple rows (``aot``'s sort
over the batch, ``sft``'s token mean) are exact here, unlike chunk-over-pairs implementations.

Batch layout (TRL's and Liger-Kernel's): ``2P`` rows, the ``P`` chosen completions first, then the ``P`` rejected
ones in the same order; ``target`` holds the completion's next tokens (shifted, as ``linear_logprobs``) and
``ignore_index`` everywhere else (prompt, padding).

Every loss takes ``return_rows``: then its metrics also hold per-row detached fp32 tensors, ``rows/logps`` (the
per-sequence log-probabilities as the loss used them: sums, or means where the loss averages) and ``rows/rewards``
(beta times the log-ratio, or times the log-probability without a reference): what fastlm.nn's Liger-compatible
modules return.

Packed (padding-free) batches: every loss takes ``cu_seqlens`` (``(B + 1,)`` offsets) or ``position_ids`` (``(1,
N)``, restarting at 0 at each sequence, TRL's padding-free collator) with ``hidden`` ``(1, N, H)`` and ``target``
``(1, N)``: the ``B`` sequences in the batch order (paired losses: the chosen sequences first, then the rejected
ones), ``ref_hidden`` packed alike; the matmuls run on the ``N`` tokens only (fastlm/ops/packed.py).
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as TF
from torch import Tensor

from fastlm.ops.linear_logprobs import linear_logprobs, logprob_loss
from fastlm.ops.packed import RowLayout, row_layout
from fastlm.ops.sharded_params import row_mean

# TRL DPOTrainer's loss types (trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss)
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)


def _sp(x: Tensor) -> Tensor:
    """softplus(x) = -logsigmoid(-x)."""
    return TF.softplus(x)


class _Batch(NamedTuple):
    x: Tensor  # (N, H) the policy's hidden states, flat
    t: Tensor  # (N,) the targets, flat
    layout: RowLayout
    mask: Tensor  # (B, T) the completion tokens (False at ignored and padding positions)
    P: int  # pairs (paired losses), else rows


def _batch(name, hidden, target, cu_seqlens, position_ids, ignore_index, paired=True) -> _Batch:
    x, t, layout = row_layout(name, hidden, target, cu_seqlens, position_ids)
    if paired and layout.B % 2:
        raise ValueError(f"{name}: the batch must hold chosen then rejected rows (2P rows), got an odd batch of "
                         f"{layout.B}")  # fmt: skip
    mask = layout.pad(t, ignore_index) != ignore_index
    return _Batch(x, t, layout, mask, layout.B // 2 if paired else layout.B)


def _mean_logits(b: _Batch, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(B, T) the mean over the vocabulary of each position's logits (0 at padding), without the logits: ``hidden @
    weight.mean(0) + bias.mean()``; detached fp32."""
    with torch.no_grad():
        m = b.x.float() @ row_mean(weight)
        return b.layout.pad(m + row_mean(bias) if bias is not None else m, 0.0)


def _reference(
    name, b: _Batch, ref_hidden, ref_weight, ref_bias, ref_logps, weight, bias, ignore_index, average, chunk_size
) -> Tensor | None:
    """The reference's per-sequence log-probabilities (B,) fp32, detached, or None (reference-free)."""
    if ref_logps is not None and ref_hidden is not None:
        raise ValueError(f"{name}: pass the reference once: ref_logps (precomputed) or ref_hidden (and ref_weight)")
    n = b.layout.B
    if ref_logps is not None:
        if isinstance(ref_logps, (tuple, list)):
            if len(ref_logps) != 2:
                raise ValueError(f"{name}: ref_logps as a pair must be (chosen, rejected), got {len(ref_logps)} items")
            ref_logps = torch.cat([torch.as_tensor(r) for r in ref_logps])
        if ref_logps.shape != (n,):
            raise ValueError(
                f"{name}: ref_logps must hold one log-probability per row, shape ({n},) (or a (chosen, rejected) pair "
                f"of ({n // 2},)), got {list(ref_logps.shape)}"
            )
        return ref_logps.detach().to(torch.promote_types(ref_logps.dtype, torch.float32))
    if ref_hidden is None:
        if ref_weight is not None or ref_bias is not None:
            raise ValueError(f"{name}: ref_weight / ref_bias given without ref_hidden")
        return None
    want = (b.layout.B, b.layout.T) if not b.layout.packed else (b.x.shape[0],)
    if (
        ref_hidden.dim() < 2
        or ref_hidden.shape[:-1].numel() != b.x.shape[0]
        or (not b.layout.packed and ref_hidden.shape[:-1] != want)
    ):
        raise ValueError(f"{name}: ref_hidden must be ({', '.join(map(str, want))}, H_ref) like hidden, got "
                         f"{list(ref_hidden.shape)}")  # fmt: skip
    if ref_weight is None:  # the policy's head (e.g. a PEFT adapter switched off): its bias too, unless given
        ref_weight, ref_bias = weight, (bias if ref_bias is None else ref_bias)
    with torch.no_grad():
        lp = linear_logprobs(
            ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight.detach(), b.t,
            bias=ref_bias.detach() if ref_bias is not None else None, ignore_index=ignore_index, chunk_size=chunk_size,
        )  # fmt: skip
    return _sequence(b.layout.pad(lp, 0.0), b.mask, average)


def _sequence(lp: Tensor, mask: Tensor, average: bool) -> Tensor:
    """Per-row sums of the completion tokens' log-probabilities (means with ``average``: 0 for an empty row)."""
    s = lp.sum(-1)
    return s / mask.sum(-1).clamp(min=1) if average else s


def _dpo_losses(loss_type, rho_c, rho_r, S, R, n, P, beta, eps, discopop_tau, average):
    """Per-pair losses (P,) of TRL's loss types on the per-sequence log-ratios rho = S - R (fp32); ``average``: S and
    R are means already (ipo / sigmoid_norm then use them as they are, as TRL <= 0.28's averaged ipo)."""
    u = beta * (rho_c - rho_r)
    if loss_type == "sigmoid":  # eps > 0: conservative DPO (cDPO), as TRL <= 0.28
        return (1 - eps) * _sp(-u) + eps * _sp(u) if eps else _sp(-u)
    if loss_type == "hinge":
        return torch.relu(1 - u)
    if loss_type in ("ipo", "sigmoid_norm"):
        d = rho_c - rho_r if average else rho_c / n[:P].clamp(min=1) - rho_r / n[P:].clamp(min=1)
        return (d - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else _sp(-beta * d)
    if loss_type == "exo_pair":
        return torch.sigmoid(u) * (TF.logsigmoid(u) - math.log1p(-eps)) + torch.sigmoid(-u) * (
            TF.logsigmoid(-u) - math.log(eps)
        )
    if loss_type == "nca_pair":
        a, b = beta * rho_c, beta * rho_r
        return _sp(-a) + 0.5 * _sp(a) + 0.5 * _sp(b)
    if loss_type == "robust":
        return ((1 - eps) * _sp(-u) - eps * _sp(u)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return _sp(-beta * rho_c) + _sp(beta * rho_r)
    if loss_type == "sppo_hard":
        return (rho_c - 1 / (2 * beta)) ** 2 + (rho_r + 1 / (2 * beta)) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            pol, _ = torch.sort(S[:P] - S[P:])
            ref, _ = torch.sort(R[:P] - R[P:])
            d = pol - ref
        else:
            d = torch.sort(rho_c)[0] - torch.sort(rho_r)[0]
        return (1 - eps) * _sp(-beta * d) + eps * _sp(beta * d)
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * rho_c) + torch.sigmoid(beta * rho_r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * rho_c) + 1 - torch.sigmoid(u)
    if loss_type == "discopop":
        logits = u / discopop_tau
        mo = torch.sigmoid(logits)
        # mo * exp(-u) as exp(-u + logsigmoid(u / tau)): TRL's exp(-u) * sigmoid(u / tau) is inf * 0 for u < -88
        return (1 - mo) * _sp(-u) + torch.exp(-u + TF.logsigmoid(logits))
    raise AssertionError(loss_type)


def linear_dpo_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    ref_logps: Tensor | tuple[Tensor, Tensor] | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    nll_weight: float = 0.0,
    average_log_prob: bool = False,
    discopop_tau: float = 0.05,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    cu_seqlens: Tensor | None = None,
    position_ids: Tensor | None = None,
    return_rows: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Direct Preference Optimisation (and TRL's variants) on the LM head: ``(loss, metrics)``.

    Args:
        hidden: ``(2P, T, H)`` the policy's final hidden states, chosen rows first then rejected; weight: ``(V, H)``
            its LM head; bias: ``(V,)`` or None.
        target: ``(2P, T)`` the completions' next tokens (shifted), ``ignore_index`` on prompt and padding.
        ref_hidden / ref_weight / ref_bias: the reference model's hidden states ``(2P, T, H_ref)`` and head
            (``ref_weight`` None: ``weight`` and, unless given, ``bias``: e.g. a PEFT adapter switched off);
            computed without gradients. Or ``ref_logps``: precomputed per-sequence reference log-probabilities,
            ``(2P,)`` or a ``(chosen, rejected)`` pair of ``(P,)``. Neither: reference-free (log-probabilities 0).
        beta: the KL coefficient. loss_type: one of :data:`DPO_LOSS_TYPES`, as TRL's ``DPOTrainer``.
        label_smoothing: eps of ``exo_pair`` (required > 0), ``robust`` (in [0, 0.5)), ``aot`` / ``aot_unpaired``,
            and for ``sigmoid`` conservative DPO (``(1 - eps) softplus(-u) + eps softplus(u)``, TRL <= 0.28; TRL 1.x
            ignores it there).
        nll_weight: adds ``nll_weight * nll`` (RPO), nll the mean negative log-probability of the chosen
            completions' tokens.
        average_log_prob: per-sequence means of the token log-probabilities instead of sums (policy and computed
            reference alike; precomputed ``ref_logps`` are taken as given).
        discopop_tau: the temperature of ``discopop``.

    Returns:
        The scalar loss (float32), the mean over pairs of the per-pair losses; and a dict of detached float32
        scalars as TRL logs them: ``rewards/chosen``, ``rewards/rejected`` (means of beta times the log-ratios),
        ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (means of the per-sequence
        log-probabilities), ``logits/chosen``, ``logits/rejected`` (the mean logit over the vocabulary, averaged
        over the completion tokens: computed as ``hidden @ weight.mean(0) + bias.mean()``, without the logits) and
        ``nll``.

    Gradients reach ``hidden``, ``weight`` and ``bias`` (never the reference). Not supported (TRL has them): the
    f-divergence scores other than reverse KL, ``ld_alpha`` (LD-DPO), ``use_weighting`` (WPO), multiple loss types
    with weights; TRL's ``mean_token_accuracy`` and ``entropy`` metrics. ``return_rows``: see the module's docstring.
    """
    name = "linear_dpo_loss"
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"{name}: loss_type must be one of {', '.join(DPO_LOSS_TYPES)}; got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"{name}: beta must be positive, got {beta}")
    eps = float(label_smoothing)
    if loss_type == "exo_pair" and not 0 < eps < 1:
        raise ValueError(f"{name}: exo_pair needs label_smoothing in (0, 1), got {eps}")
    if loss_type == "robust" and not 0 <= eps < 0.5:
        raise ValueError(f"{name}: robust needs label_smoothing in [0, 0.5), got {eps}")
    if not 0 <= eps < 1:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1), got {eps}")
    bt = _batch(name, hidden, target, cu_seqlens, position_ids, ignore_index)
    P, mask = bt.P, bt.mask
    n = mask.sum(-1)
    n_chosen = n[:P].sum().clamp(min=1)
    R = _reference(name, bt, ref_hidden, ref_weight, ref_bias, ref_logps, weight, bias, ignore_index,
                   average_log_prob, chunk_size)  # fmt: skip
    R = torch.zeros(2 * P, dtype=torch.float32, device=hidden.device) if R is None else R

    def pair_loss(lp: Tensor, rows: Tensor) -> Tensor:  # the pairs of rows[:k] (chosen) and rows[k:] (rejected)
        k = rows.numel() // 2
        S = _sequence(lp, mask[rows], average_log_prob)
        Rr = R[rows].to(S.dtype)
        rho = S - Rr
        nll = -lp[:k].sum() / n_chosen  # these pairs' share of the chosen tokens' mean NLL
        if loss_type == "sft":
            total = P * nll
        else:
            total = _dpo_losses(loss_type, rho[:k], rho[k:], S, Rr, n[rows], k, beta, eps, discopop_tau,
                                average_log_prob).sum()  # fmt: skip
        return total / P + nll_weight * nll if nll_weight else total / P

    loss, lp = logprob_loss(bt.x, weight, bt.t, pair_loss, layout=bt.layout, bias=bias, paired=True,
                            separable=not loss_type.startswith("aot"), ignore_index=ignore_index,
                            chunk_size=chunk_size)  # fmt: skip
    with torch.no_grad():
        S = _sequence(lp, mask, average_log_prob)
        rho = S - R.to(S.dtype)
        metrics = _pair_metrics(_mean_logits(bt, weight, bias), mask, P, beta * rho[:P], beta * rho[P:], S)
        metrics["nll"] = (-lp[:P].sum() / n_chosen).float()
        if return_rows:
            metrics |= {"rows/logps": S.float(), "rows/rewards": (beta * rho).float()}
    return loss, metrics


def _pair_metrics(mean_logit, mask, P, reward_c, reward_r, S) -> dict[str, Tensor]:
    """TRL's DPO metrics (detached fp32): rewards, accuracies, margins, log-probabilities, mean logits."""
    m = mask.to(mean_logit.dtype)
    return {
        "rewards/chosen": reward_c.mean().float(),
        "rewards/rejected": reward_r.mean().float(),
        "rewards/accuracies": (reward_c > reward_r).float().mean(),
        "rewards/margins": (reward_c - reward_r).mean().float(),
        "logps/chosen": S[:P].mean().float(),
        "logps/rejected": S[P:].mean().float(),
        "logits/chosen": (mean_logit[:P] * m[:P]).sum() / m[:P].sum().clamp(min=1),
        "logits/rejected": (mean_logit[P:] * m[P:]).sum() / m[P:].sum().clamp(min=1),
    }


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0 (TRL's log1mexp: log1p(-exp(x)) below -ln 2, log(-expm1(x)) above)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _nll_of(name, bt: _Batch, weight, bias, nll_target, ignore_index, chunk_size) -> Tensor:
    """The mean negative log-probability of the chosen rows' ``nll_target`` tokens ((P, T), or packed the chosen
    sequences' (N_chosen,) tokens: e.g. prompt and completion, as TRL's ORPO), through one more pass over them."""
    P, lay = bt.P, bt.layout
    if lay.packed:
        want = (lay.starts[P] if P < lay.B else bt.x.shape[0],)
        nt = nll_target[0] if nll_target.dim() == 2 and nll_target.shape[0] == 1 else nll_target
    else:
        want, nt = (P, lay.T), nll_target
    if tuple(nt.shape) != want:
        raise ValueError(f"{name}: nll_target must be {want} (the chosen rows' tokens), got {list(nll_target.shape)}")
    n = nt.numel()
    nl = linear_logprobs(bt.x[:n], weight, nt.reshape(n), bias=bias, ignore_index=ignore_index, chunk_size=chunk_size)
    return -nl.sum() / (nt != ignore_index).sum().clamp(min=1)


def _all_logits_mean(bt: _Batch, weight, bias) -> tuple[Tensor, Tensor]:
    """The mean logit over the vocabulary and every position (prompt and padding included; packed: the sequences'
    tokens) of the chosen and the rejected rows (TRL's ORPO / CPO ``logits/*`` metrics), without the logits."""
    m, P = _mean_logits(bt, weight, bias), bt.P
    real = bt.layout.pad(torch.ones(bt.x.shape[0], device=m.device), 0.0)
    return m[:P].sum() / real[:P].sum(), m[P:].sum() / real[P:].sum()


def linear_orpo_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    beta: float = 0.1,
    nll_target: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    cu_seqlens: Tensor | None = None,
    position_ids: Tensor | None = None,
    return_rows: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Odds-Ratio Preference Optimisation (TRL's ``ORPOTrainer``) on the LM head: ``(loss, metrics)``.

    ``loss = nll - beta * mean_pairs(logsigmoid(log_odds))``, ``log_odds = (a - b) - (log(1 - e^a) - log(1 - e^b))``
    with ``a``, ``b`` the chosen and rejected rows' mean token log-probabilities over the completion. Shapes as
    :func:`linear_dpo_loss` (2P rows, chosen first); no reference model. ``nll_target``: ``(P, T)`` labels of the
    NLL term over the chosen rows (TRL: prompt and completion tokens; one more pass over the chosen rows); None: the
    completion tokens (``target``'s, as Liger-Kernel). A row without completion tokens gives NaN (as TRL).

    Metrics (detached fp32, TRL's names): ``rewards/chosen`` / ``rewards/rejected`` (means of beta * a, beta * b),
    ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen`` / ``logps/rejected`` (means of a, b),
    ``logits/chosen`` / ``logits/rejected`` (the mean logit over the vocabulary and all positions), ``nll_loss``,
    ``log_odds_ratio`` (mean logsigmoid(log_odds)), ``log_odds_chosen`` (mean log_odds).
    """
    name = "linear_orpo_loss"
    if not beta > 0:
        raise ValueError(f"{name}: beta must be positive, got {beta}")
    bt = _batch(name, hidden, target, cu_seqlens, position_ids, ignore_index)
    P, mask = bt.P, bt.mask
    n = mask.sum(-1)
    n_chosen = n[:P].sum().clamp(min=1)

    def odds(lp: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        k = rows.numel() // 2
        mean_lp = lp.sum(-1) / n[rows]
        a, b = mean_lp[:k], mean_lp[k:]
        log_odds = (a - b) - (_log1mexp(a) - _log1mexp(b))
        return a, b, log_odds, TF.logsigmoid(log_odds)

    def pair_loss(lp: Tensor, rows: Tensor) -> Tensor:
        k = rows.numel() // 2
        ratio = odds(lp, rows)[3]
        nll = -lp[:k].sum() / n_chosen if nll_target is None else 0.0  # nll_target's NLL: its own pass below
        return nll - beta * ratio.sum() / P

    loss, lp = logprob_loss(bt.x, weight, bt.t, pair_loss, layout=bt.layout, bias=bias, paired=True,
                            ignore_index=ignore_index, chunk_size=chunk_size)  # fmt: skip
    if nll_target is None:
        nll = -lp[:P].sum() / n_chosen
    else:
        nll = _nll_of(name, bt, weight, bias, nll_target, ignore_index, chunk_size)
        loss = loss + nll
    a, b, log_odds, ratio = odds(lp, torch.arange(2 * P, device=lp.device))
    lc, lr = _all_logits_mean(bt, weight, bias)
    d = {
        "rewards/chosen": beta * a, "rewards/rejected": beta * b, "rewards/accuracies": (a > b).float(),
        "rewards/margins": beta * (a - b), "logps/chosen": a, "logps/rejected": b, "logits/chosen": lc,
        "logits/rejected": lr, "nll_loss": nll, "log_odds_ratio": ratio, "log_odds_chosen": log_odds,
    }  # fmt: skip
    metrics = {k: v.detach().float().mean() for k, v in d.items()}
    if return_rows:
        x = torch.cat([a, b]).detach().float()
        metrics |= {"rows/logps": x, "rows/rewards": beta * x}
    return loss, metrics


CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def linear_cpo_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    cu_seqlens: Tensor | None = None,
    position_ids: Tensor | None = None,
    return_rows: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Contrastive Preference Optimisation and SimPO (TRL's ``CPOTrainer``) on the LM head: ``(loss, metrics)``.

    Per pair, with ``x`` the per-sequence log-probability (the sum over the completion for ``sigmoid`` / ``hinge``,
    the mean for ``ipo`` / ``simpo``) and ``u = beta * (x_c - x_r)``: ``sigmoid`` ``(1 - eps) softplus(-u) + eps
    softplus(u)``; ``simpo`` the same with ``u - simpo_gamma``; ``hinge`` ``relu(1 - u)``; ``ipo`` ``(x_c - x_r - 1 /
    (2 beta))^2``. ``loss = mean_pairs + cpo_alpha * nll`` (nll: mean negative log-probability of the chosen
    completions' tokens; ``cpo_alpha=0``: SimPO's plain form). No reference model. Shapes as :func:`linear_dpo_loss`.

    Metrics (detached fp32): ``rewards/chosen`` / ``rewards/rejected`` (means of beta * x), ``rewards/accuracies``,
    ``rewards/margins``, ``logps/chosen`` / ``logps/rejected`` (means of x), ``logits/chosen`` / ``logits/rejected``
    (mean logit over the vocabulary and all positions of ``hidden``), ``nll_loss`` (0 when ``cpo_alpha`` is 0, as
    TRL).
    """
    name = "linear_cpo_loss"
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"{name}: loss_type must be one of {', '.join(CPO_LOSS_TYPES)}; got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"{name}: beta must be positive, got {beta}")
    eps = float(label_smoothing)
    if not 0 <= eps < 1:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1), got {eps}")
    bt = _batch(name, hidden, target, cu_seqlens, position_ids, ignore_index)
    P, mask = bt.P, bt.mask
    n_chosen = mask[:P].sum().clamp(min=1)
    average = loss_type in ("ipo", "simpo")

    def pair_loss(lp: Tensor, rows: Tensor) -> Tensor:
        k = rows.numel() // 2
        x = _sequence(lp, mask[rows], average)
        xc, xr = x[:k], x[k:]
        u = beta * (xc - xr)
        if loss_type in ("sigmoid", "simpo"):
            u = u - simpo_gamma if loss_type == "simpo" else u
            losses = (1 - eps) * _sp(-u) + eps * _sp(u)
        elif loss_type == "hinge":
            losses = torch.relu(1 - u)
        else:
            losses = (xc - xr - 1 / (2 * beta)) ** 2
        total = losses.sum() / P
        return total + cpo_alpha * (-lp[:k].sum() / n_chosen) if cpo_alpha else total

    loss, lp = logprob_loss(bt.x, weight, bt.t, pair_loss, layout=bt.layout, bias=bias, paired=True,
                            ignore_index=ignore_index, chunk_size=chunk_size)  # fmt: skip
    x = _sequence(lp, mask, average)
    xc, xr = x[:P], x[P:]
    # not computed when cpo_alpha is 0: logged as 0 (TRL)
    nll = -lp[:P].sum() / n_chosen if cpo_alpha else torch.zeros((), dtype=lp.dtype, device=lp.device)
    lc, lr = _all_logits_mean(bt, weight, bias)
    d = {
        "rewards/chosen": beta * xc, "rewards/rejected": beta * xr, "rewards/accuracies": (xc > xr).float(),
        "rewards/margins": beta * (xc - xr), "logps/chosen": xc, "logps/rejected": xr, "logits/chosen": lc,
        "logits/rejected": lr, "nll_loss": nll,
    }  # fmt: skip
    metrics = {k: v.detach().float().mean() for k, v in d.items()}
    if return_rows:
        metrics |= {"rows/logps": x.detach().float(), "rows/rewards": beta * x.detach().float()}
    return loss, metrics


KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def linear_kto_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    preference: Tensor,
    kl: Tensor | float | None = None,
    bias: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    ref_logps: Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    cu_seqlens: Tensor | None = None,
    position_ids: Tensor | None = None,
    return_rows: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Kahneman-Tversky Optimisation (TRL's ``KTOTrainer``) on the LM head: ``(loss, metrics)``.

    Unpaired rows: ``hidden`` ``(B, T, H)``, ``target`` ``(B, T)``, ``preference`` ``(B,)`` bool (True: desirable).
    With ``rho = S - R`` (per-sequence sums of the policy's and the reference's completion log-probabilities; the
    reference as :func:`linear_dpo_loss`: a second head, precomputed ``ref_logps`` ``(B,)``, or none) and ``z0 =
    max(kl, 0)`` (TRL's detached KL estimate from the mismatched batch: compute it with ``linear_logprobs``; None:
    0, where TRL computes it): ``kto`` desirable ``1 - sigmoid(beta (rho - z0))``, undesirable ``1 - sigmoid(beta
    (z0 - rho))``; ``apo_zero_unpaired`` ``1 - sigmoid(beta rho)`` and ``sigmoid(beta rho)`` (no KL).
    ``loss = (desirable_weight * sum_desirable + undesirable_weight * sum_undesirable) / B``.

    Metrics (detached fp32, TRL's): ``kl``; ``rewards/chosen`` / ``rewards/rejected`` (means of beta * rho over the
    desirable / undesirable rows), ``logps/chosen`` / ``logps/rejected``, ``logits/chosen`` / ``logits/rejected``
    (the mean logit over the vocabulary, averaged over the completion tokens), ``rewards/margins``; a class the batch
    has no row of gives NaN for its metrics (TRL leaves them out: a host-side branch, which torch.compile cannot
    trace).
    """
    name = "linear_kto_loss"
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"{name}: loss_type must be one of {', '.join(KTO_LOSS_TYPES)}; got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"{name}: beta must be positive, got {beta}")
    bt = _batch(name, hidden, target, cu_seqlens, position_ids, ignore_index, paired=False)
    B, mask = bt.P, bt.mask
    if not isinstance(preference, Tensor) or preference.dtype != torch.bool or preference.shape != (B,):
        raise ValueError(f"{name}: preference must be a ({B},) bool tensor (True: desirable)")
    R = _reference(name, bt, ref_hidden, ref_weight, ref_bias, ref_logps, weight, bias, ignore_index, False, chunk_size)
    R = torch.zeros(B, dtype=torch.float32, device=hidden.device) if R is None else R
    z0 = torch.as_tensor(0.0 if kl is None or loss_type != "kto" else kl, dtype=torch.float32, device=hidden.device)
    z0 = z0.detach().clamp(min=0)  # TRL's estimate is clamped at 0
    w = torch.where(preference, desirable_weight, undesirable_weight).float()

    def row_loss(lp: Tensor, rows: Tensor) -> Tensor:
        rho = lp.sum(-1) - R[rows].to(lp.dtype)
        pref = preference[rows]
        if loss_type == "kto":
            losses = torch.where(pref, 1 - torch.sigmoid(beta * (rho - z0)), 1 - torch.sigmoid(beta * (z0 - rho)))
        else:
            losses = torch.where(pref, 1 - torch.sigmoid(beta * rho), torch.sigmoid(beta * rho))
        return (w[rows].to(losses.dtype) * losses).sum() / max(B, 1)

    loss, lp = logprob_loss(bt.x, weight, bt.t, row_loss, layout=bt.layout, bias=bias, ignore_index=ignore_index,
                            chunk_size=chunk_size)  # fmt: skip
    S = lp.sum(-1)
    rho = S - R.to(S.dtype)
    with torch.no_grad():
        m = _mean_logits(bt, weight, bias)
        metrics = {"kl": z0.float()}
        for key, rows in (("chosen", preference), ("rejected", ~preference)):  # NaN for a class the batch lacks
            r = rows.to(rho.dtype)
            metrics[f"rewards/{key}"] = ((beta * rho * r).sum() / r.sum()).float()
            metrics[f"logps/{key}"] = ((S * r).sum() / r.sum()).float()
            tok = mask & rows[:, None]
            metrics[f"logits/{key}"] = (m * tok).sum() / tok.sum()
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        if return_rows:
            metrics |= {"rows/logps": S.float(), "rows/rewards": (beta * rho).float()}
    return loss, metrics
