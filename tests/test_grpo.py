"""F.linear_grpo_loss (fastlm/ops/grpo.py) against TRL's GRPOTrainer._compute_loss written out here as TRL writes it,
in float64 on the full logits: the loss, the gradients of hidden, weight and bias and the clip metrics, for every
loss type, token- and sequence-level importance sampling, the KL term and two-sided clipping; dapo's normaliser
over gradient-accumulation micro-batches (num_items_in_batch); bad input raises."""

import pytest
import torch
import torch.nn.functional as TF
from helpers import DEVICE, ON_GPU

import fastlm
import fastlm.functional as F
from fastlm.ops.grpo import GRPO_LOSS_TYPES

BACKENDS = ["triton"] + ([] if ON_GPU else ["cpu"])
B, T, H, V = 4, 6, 16, 60


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    mask[3, 5] = False
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2], dtype=torch.float64)
    with torch.no_grad():
        lp = _logps(h, w, b, ids, 1.0)
    old = lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios spread across the clip band
    ref = lp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return h, w, b, ids, mask, adv, old, ref


def _logps(h, w, b, ids, temperature):
    return (TF.linear(h, w, b) / temperature).log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _trl(per_token_logps, mask, adv, old, ref, beta, el, eh, delta, loss_type, level, max_len, items, ga):
    """TRL's GRPOTrainer._compute_loss (loss and clip metrics), float64."""
    mask = mask.double()
    old_per_token_logps = per_token_logps.detach() if old is None else old
    log_ratio = per_token_logps - old_per_token_logps
    if level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=eh).detach()
        per_token_loss = -clamped_ratios * adv.unsqueeze(1) * per_token_logps
    else:
        coef_2 = torch.clamp(coef_1, 1 - el, 1 + eh)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * adv.unsqueeze(1), coef_2 * adv.unsqueeze(1))
    if beta != 0.0:
        per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / ga
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / ga
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len) / ga
    else:
        loss = (per_token_loss * mask).sum() / (items if items is not None else mask.sum())
    metrics = {}
    with torch.no_grad():
        if beta != 0.0:
            metrics["kl"] = (per_token_kl * mask).sum() / mask.sum()
        c = torch.exp(log_importance_weights)
        if loss_type == "cispo":
            hit = ((c > eh) & (adv.unsqueeze(1) > 0)).double()
            metrics["cispo_clip_ratio"] = (hit * mask).sum() / mask.sum() if level == "token" else hit.mean()
        else:
            low = ((c < 1 - el) & (adv.unsqueeze(1) < 0)).double()
            high = ((c > 1 + eh) & (adv.unsqueeze(1) > 0)).double()
            region = ((low + high) > 0).double()
            if level == "token":  # TRL: nanmin / nanmax of the per-row means (an empty row is 0 / 0)
                low_row, high_row = (low * mask).sum(-1) / mask.sum(-1), (high * mask).sum(-1) / mask.sum(-1)
                metrics["clip_ratio/low_mean"] = (low * mask).sum() / mask.sum()
                metrics["clip_ratio/low_min"] = low_row[~low_row.isnan()].min()
                metrics["clip_ratio/high_mean"] = (high * mask).sum() / mask.sum()
                metrics["clip_ratio/high_max"] = high_row[~high_row.isnan()].max()
                metrics["clip_ratio/region_mean"] = (region * mask).sum() / mask.sum()
            else:  # one value per sequence
                metrics["clip_ratio/low_mean"] = low.mean()
                metrics["clip_ratio/low_min"] = low.min()
                metrics["clip_ratio/high_mean"] = high.mean()
                metrics["clip_ratio/high_max"] = high.max()
                metrics["clip_ratio/region_mean"] = region.mean()
    return loss, metrics


CASES = [
    (lt, level, beta, delta, with_old)
    for lt in GRPO_LOSS_TYPES
    for level, beta, delta, with_old in (("token", 0.0, None, True), ("sequence", 0.04, None, True))
] + [("dapo", "token", 0.04, 1.5, True), ("grpo", "token", 0.0, None, False), ("cispo", "token", 0.0, None, False)]


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize(("loss_type", "level", "beta", "delta", "with_old"), CASES)
def test_grpo_matches_trl(be, loss_type, level, beta, delta, with_old):
    h, w, b, ids, mask, adv, old, ref = _batch()
    el, eh = (0.2, 0.28) if loss_type != "cispo" else (0.2, 1.3)
    temperature, max_len, items, ga = 0.8, 8, 30, 2
    h64, w64, b64 = (x.clone().requires_grad_() for x in (h, w, b))
    lp = _logps(h64, w64, b64, ids, temperature) * mask  # 0 where masked, as fastlm (TRL masks them out later)
    loss64, m64 = _trl(lp, mask, adv, old if with_old else None, ref, beta, el, eh, delta, loss_type, level, max_len,
                       items, ga)  # fmt: skip
    loss64.backward()
    hf, wf, bf = (x.float().to(DEVICE).requires_grad_() for x in (h, w, b))
    kw = dict(
        bias=bf, old_logps=old.float().to(DEVICE) if with_old else None, ref_logps=ref.float().to(DEVICE), beta=beta,
        epsilon_low=el, epsilon_high=eh, delta=delta, loss_type=loss_type, importance_sampling_level=level,
        temperature=temperature, max_completion_length=max_len, num_items_in_batch=items, grad_accum_steps=ga,
        chunk_size=5,
    )  # fmt: skip
    with fastlm.backend(be):
        loss, metrics = F.linear_grpo_loss(hf, wf, ids.to(DEVICE), mask.to(DEVICE), adv.float().to(DEVICE), **kw)
    loss.backward()
    torch.testing.assert_close(loss.double().cpu(), loss64.detach(), rtol=2e-5, atol=2e-6)
    for name, g, g64 in (("hidden", hf.grad, h64.grad), ("weight", wf.grad, w64.grad), ("bias", bf.grad, b64.grad)):
        scale = max(g64.abs().max().item(), 1e-3)
        torch.testing.assert_close(
            g.double().cpu(), g64, rtol=1e-4, atol=2e-5 * scale, msg=lambda m, name=name: f"d{name}: {m}"
        )
    assert set(metrics) == set(m64), sorted(set(metrics) ^ set(m64))
    for k, v in m64.items():
        assert metrics[k].dtype == torch.float32 and not metrics[k].requires_grad
        torch.testing.assert_close(metrics[k].double().cpu(), v, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    if loss_type != "cispo" and with_old:
        assert m64["clip_ratio/region_mean"] > 0  # the case really clips


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_empty_row_and_padding_that_holds_minus_inf(be, level):
    """A row without loss tokens (TRL's masked truncated completion) and -inf old / reference log-probabilities on
    padding: a finite loss equal to TRL's on the same inputs with finite padding, TRL's metrics."""
    h, w, b, ids, mask, adv, old, ref = _batch(2)
    mask[2] = False
    h64 = h.clone().requires_grad_()
    lp = _logps(h64, w, b, ids, 1.0) * mask
    loss64, m64 = _trl(lp, mask, adv, old, ref, 0.04, 0.2, 0.2, None, "bnpo", level, T, None, 1)
    loss64.backward()
    hf = h.float().to(DEVICE).requires_grad_()
    pad = torch.tensor(float("-inf"), dtype=torch.float64)
    old_inf, ref_inf = torch.where(mask, old, pad), torch.where(mask, ref, pad)
    with fastlm.backend(be):
        loss, metrics = F.linear_grpo_loss(
            hf, w.float().to(DEVICE), ids.to(DEVICE), mask.to(DEVICE), adv.float().to(DEVICE),
            bias=b.float().to(DEVICE), old_logps=old_inf.float().to(DEVICE), ref_logps=ref_inf.float().to(DEVICE),
            beta=0.04, loss_type="bnpo", importance_sampling_level=level,
        )  # fmt: skip
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hf.grad).all()
    torch.testing.assert_close(loss.double().cpu(), loss64.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(hf.grad.double().cpu(), h64.grad, rtol=1e-4, atol=1e-6)
    for k, v in m64.items():
        torch.testing.assert_close(metrics[k].double().cpu(), v, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("be", BACKENDS)
def test_dapo_gradient_accumulation(be):
    """Two micro-batches with num_items_in_batch = the whole batch's tokens: the summed losses and gradients equal one
    call on the whole batch (TRL's normaliser for gradient accumulation)."""
    h, w, _, ids, mask, adv, old, _ = (x.float() if x.is_floating_point() else x for x in _batch(1))
    h, w, ids, mask, adv, old = (x.to(DEVICE) for x in (h, w, ids, mask, adv, old))
    wa, wb = w.clone().requires_grad_(), w.clone().requires_grad_()
    with fastlm.backend(be):
        whole, _ = F.linear_grpo_loss(h, wa, ids, mask, adv, old_logps=old)
        whole.backward()
        n = int(mask.sum())
        total = sum(
            F.linear_grpo_loss(h[s], wb, ids[s], mask[s], adv[s], old_logps=old[s], num_items_in_batch=n)[0]
            for s in (slice(0, 2), slice(2, 4))
        )
        total.backward()
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wb.grad, wa.grad, rtol=1e-4, atol=1e-6)


def test_bad_input():
    h, w, _, ids, mask, adv, old, ref = (x.float() if x.is_floating_point() else x for x in _batch())
    with pytest.raises(ValueError, match="loss_type"):
        F.linear_grpo_loss(h, w, ids, mask, adv, loss_type="ppo")
    with pytest.raises(ValueError, match="needs ref_logps"):
        F.linear_grpo_loss(h, w, ids, mask, adv, beta=0.1)
    with pytest.raises(ValueError, match="advantages must be"):
        F.linear_grpo_loss(h, w, ids, mask, adv[:3])
    with pytest.raises(ValueError, match="old_logps must be"):
        F.linear_grpo_loss(h, w, ids, mask, adv, old_logps=old[:, :3])
    with pytest.raises(ValueError, match="importance_sampling_level"):
        F.linear_grpo_loss(h, w, ids, mask, adv, importance_sampling_level="batch")
    with pytest.raises(ValueError, match="one per sequence"):
        F.linear_grpo_loss(h, w, ids, mask, adv[:, None].expand(B, T), importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="dr_grpo needs max_completion_length"):
        F.linear_grpo_loss(h, w, ids, mask, adv, loss_type="dr_grpo")
    with pytest.raises(ValueError, match=r"\(B, T, H\)"):
        F.linear_grpo_loss(h[0], w, ids[0], mask[0], adv)
