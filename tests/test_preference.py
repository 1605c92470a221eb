"""F.linear_dpo_loss (fastlm/ops/preference.py) against TRL's DPO formulas written out here as TRL writes them
(trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss), in float64 on the full logits: the loss, the metrics, and
the gradients of hidden, weight and bias, for every loss type, with the reference from a second (hidden, weight),
from precomputed log-probabilities, or none; bad input raises."""

import math

import pytest
import torch
import torch.nn.functional as TF
from helpers import DEVICE, ON_GPU

import fastlm
import fastlm.functional as F
from fastlm.ops.preference import DPO_LOSS_TYPES

BACKENDS = ["triton"] + ([] if ON_GPU else ["cpu"])
P, T, H, V = 3, 6, 16, 70


def _batch(seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(2 * P, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (2 * P, T), generator=g)
    t[:, :2] = -100  # the prompt
    t[1, 4:] = -100  # padding
    t[P + 2, 5] = -100
    rh = torch.randn(2 * P, T, H, generator=g, dtype=torch.float64)
    rw = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    return h, w, b, t, rh, rw


def _logps(h, w, b, t):
    keep = t != -100
    lp = TF.linear(h, w, b).log_softmax(-1).gather(-1, torch.where(keep, t, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, lp, 0.0)


def _trl_dpo(lp, ref_c, ref_r, mask, beta, loss_type, eps, tau=0.05):
    """TRL's per-pair losses, written as TRL writes them."""
    s = lp.sum(1)
    chosen_logps, rejected_logps = s[:P], s[P:]
    chosen_logratios, rejected_logratios = chosen_logps - ref_c, rejected_logps - ref_r
    delta = chosen_logratios - rejected_logratios
    n = mask.sum(1).clamp(min=1)
    if loss_type == "sigmoid":
        return -F_logsig(beta * delta) * (1 - eps) - F_logsig(-beta * delta) * eps
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        return ((chosen_logratios / n[:P] - rejected_logratios / n[P:]) - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        x = beta * delta
        return x.sigmoid() * (F_logsig(x) - math.log(1 - eps)) + (-x).sigmoid() * (F_logsig(-x) - math.log(eps))
    if loss_type == "nca_pair":
        cr, rr = beta * chosen_logratios, beta * rejected_logratios
        return -F_logsig(cr) - 0.5 * F_logsig(-cr) - 0.5 * F_logsig(-rr)
    if loss_type == "robust":
        return (-F_logsig(beta * delta) * (1 - eps) + F_logsig(-beta * delta) * eps) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -F_logsig(beta * chosen_logratios) - F_logsig(-beta * rejected_logratios)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 1 / (2 * beta)) ** 2 + (rejected_logratios + 1 / (2 * beta)) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            d = torch.sort(chosen_logps - rejected_logps)[0] - torch.sort(ref_c - ref_r)[0]
        else:
            d = torch.sort(chosen_logratios)[0] - torch.sort(rejected_logratios)[0]
        return -F_logsig(beta * d) * (1 - eps) - F_logsig(-beta * d) * eps
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * delta))
    if loss_type == "discopop":
        logits = delta * beta
        mix = torch.sigmoid(logits / tau)
        return (1 - mix) * -F_logsig(logits) + mix * torch.exp(-logits)
    if loss_type == "sft":
        return (-(lp[:P].sum()) / mask[:P].sum()).expand(P)
    if loss_type == "sigmoid_norm":
        return -F_logsig(beta * (chosen_logratios / n[:P] - rejected_logratios / n[P:]))
    raise AssertionError(loss_type)


F_logsig = TF.logsigmoid


def _eps(loss_type):
    return {"exo_pair": 0.1, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.1, "sigmoid": 0.1}.get(loss_type, 0.0)


# every loss type with a reference model; the precomputed and reference-free forms on a few (the loss math is shared)
CASES = [(lt, "model") for lt in DPO_LOSS_TYPES] + [
    (lt, ref) for lt in ("sigmoid", "ipo", "aot", "sft") for ref in ("precomputed", "none")
]


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize(("loss_type", "ref"), CASES)
def test_dpo_matches_trl_formulas(be, loss_type, ref):
    h, w, b, t, rh, rw = _batch()
    beta, eps = 0.5, _eps(loss_type)
    mask = t != -100
    # float64 reference (TRL's formulas on the full logits)
    h64, w64, b64 = (x.clone().requires_grad_() for x in (h, w, b))
    lp64 = _logps(h64, w64, b64, t)
    ref_lp = _logps(rh, rw, None, t).sum(1) if ref == "model" else torch.randn(2 * P, dtype=torch.float64)
    ref_lp = ref_lp if ref != "none" else torch.zeros(2 * P, dtype=torch.float64)
    loss64 = _trl_dpo(lp64, ref_lp[:P], ref_lp[P:], mask, beta, loss_type, eps).mean()
    loss64.backward()
    # fastlm, float32
    hf, wf, bf = (x.float().to(DEVICE).requires_grad_() for x in (h, w, b))
    rhf, rwf = (x.float().to(DEVICE).requires_grad_() for x in (rh, rw))
    kw = dict(bias=bf, beta=beta, loss_type=loss_type, label_smoothing=eps, chunk_size=5)
    if ref == "model":
        kw |= dict(ref_hidden=rhf, ref_weight=rwf)
    elif ref == "precomputed":
        kw |= dict(ref_logps=(ref_lp[:P].float().to(DEVICE), ref_lp[P:].float().to(DEVICE)))
    with fastlm.backend(be):
        loss, metrics = F.linear_dpo_loss(hf, wf, t.to(DEVICE), **kw)
    loss.backward()
    tol = dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(loss.double().cpu(), loss64.detach(), **tol)
    for name, g, g64 in (("hidden", hf.grad, h64.grad), ("weight", wf.grad, w64.grad), ("bias", bf.grad, b64.grad)):
        scale = max(g64.abs().max().item(), 1e-3)
        torch.testing.assert_close(
            g.double().cpu(), g64, rtol=1e-4, atol=2e-5 * scale, msg=lambda m, name=name: f"d{name}: {m}"
        )
    assert rhf.grad is None and rwf.grad is None  # the reference gets no gradient
    # metrics, as TRL logs them
    with torch.no_grad():
        s = lp64.sum(1)
        rc, rr = beta * (s[:P] - ref_lp[:P]), beta * (s[P:] - ref_lp[P:])
        mean_logit = TF.linear(h, w, b).mean(-1)
        expect = {
            "rewards/chosen": rc.mean(),
            "rewards/rejected": rr.mean(),
            "rewards/accuracies": (rc > rr).double().mean(),
            "rewards/margins": (rc - rr).mean(),
            "logps/chosen": s[:P].mean(),
            "logps/rejected": s[P:].mean(),
            "logits/chosen": mean_logit[:P][mask[:P]].mean(),
            "logits/rejected": mean_logit[P:][mask[P:]].mean(),
            "nll": -lp64[:P].sum() / mask[:P].sum(),
        }
    assert set(metrics) == set(expect)
    for k, v in expect.items():
        assert not metrics[k].requires_grad and metrics[k].dtype == torch.float32
        torch.testing.assert_close(metrics[k].double().cpu(), v, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("be", BACKENDS)
def test_average_log_prob_and_nll_weight(be):
    """Per-sequence means (policy and computed reference) and the RPO term."""
    h, w, _, t, rh, rw = _batch(1)
    mask = t != -100
    h64 = h.clone().requires_grad_()
    lp64, rlp = _logps(h64, w, None, t), _logps(rh, rw, None, t)
    n = mask.sum(1).clamp(min=1)
    u = 0.3 * ((lp64.sum(1) / n - rlp.sum(1) / n)[:P] - (lp64.sum(1) / n - rlp.sum(1) / n)[P:])
    loss64 = -TF.logsigmoid(u).mean() + 0.5 * (-lp64[:P].sum() / mask[:P].sum())
    loss64.backward()
    hf = h.float().to(DEVICE).requires_grad_()
    with fastlm.backend(be):
        loss, _ = F.linear_dpo_loss(
            hf, w.float().to(DEVICE), t.to(DEVICE), ref_hidden=rh.float().to(DEVICE), ref_weight=rw.float().to(DEVICE),
            beta=0.3, average_log_prob=True, nll_weight=0.5,
        )  # fmt: skip
    loss.backward()
    torch.testing.assert_close(loss.double().cpu(), loss64.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(hf.grad.double().cpu(), h64.grad, rtol=1e-4, atol=2e-6)


def test_bad_input():
    h, w, _, t, rh, rw = (x.float() if x.is_floating_point() else x for x in _batch())
    with pytest.raises(ValueError, match="odd batch"):
        F.linear_dpo_loss(h[:5], w, t[:5])
    with pytest.raises(ValueError, match="once"):
        F.linear_dpo_loss(h, w, t, ref_hidden=rh, ref_weight=rw, ref_logps=torch.zeros(2 * P))
    with pytest.raises(ValueError, match="loss_type"):
        F.linear_dpo_loss(h, w, t, loss_type="kto")
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing"):
        F.linear_dpo_loss(h, w, t, loss_type="exo_pair")
    with pytest.raises(ValueError, match="ref_logps must hold one"):
        F.linear_dpo_loss(h, w, t, ref_logps=torch.zeros(P))
    with pytest.raises(ValueError, match="ref_hidden must be"):
        F.linear_dpo_loss(h, w, t, ref_hidden=rh[:, :3], ref_weight=rw)
    with pytest.raises(ValueError, match=r"\(B, T, H\)"):
        F.linear_dpo_loss(h[0], w, t[0])
    with pytest.raises(ValueError, match="beta"):
        F.linear_dpo_loss(h, w, t, beta=0.0)


def _grads_close(pairs):
    for name, g, g64 in pairs:
        scale = max(g64.abs().max().item(), 1e-3)
        torch.testing.assert_close(
            g.double().cpu(), g64, rtol=1e-4, atol=2e-5 * scale, msg=lambda m, name=name: f"d{name}: {m}"
        )


def _metrics_close(metrics, expect):
    assert set(metrics) == set(expect), sorted(set(metrics) ^ set(expect))
    for k, v in expect.items():
        assert not metrics[k].requires_grad and metrics[k].dtype == torch.float32
        torch.testing.assert_close(
            metrics[k].double().cpu(), v.double(), rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}"
        )


def _log1mexp(x):  # TRL's (trl/experimental/orpo/orpo_trainer.py)
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("nll_prompt", [False, True])
def test_orpo_matches_trl_formulas(be, nll_prompt):
    h, w, b, t, _, _ = _batch(2)
    beta = 0.2
    mask = t != -100
    nll_t = torch.randint(0, V, (P, T)) if nll_prompt else None  # e.g. prompt + completion labels
    h64, w64, b64 = (x.clone().requires_grad_() for x in (h, w, b))
    lp = _logps(h64, w64, b64, t)
    avg = lp.sum(1) / mask.sum(1)
    chosen, rejected = avg[:P], avg[P:]
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = TF.logsigmoid(log_odds)
    nll = -_logps(h64[:P], w64, b64, nll_t).mean() if nll_prompt else -lp[:P].sum() / mask[:P].sum()
    loss64 = nll - beta * ratio.mean()
    loss64.backward()
    hf, wf, bf = (x.float().to(DEVICE).requires_grad_() for x in (h, w, b))
    with fastlm.backend(be):
        loss, metrics = F.linear_orpo_loss(
            hf, wf, t.to(DEVICE), bias=bf, beta=beta, chunk_size=5,
            nll_target=nll_t.to(DEVICE) if nll_prompt else None,
        )  # fmt: skip
    loss.backward()
    torch.testing.assert_close(loss.double().cpu(), loss64.detach(), rtol=2e-5, atol=2e-5)
    _grads_close((("hidden", hf.grad, h64.grad), ("weight", wf.grad, w64.grad), ("bias", bf.grad, b64.grad)))
    with torch.no_grad():
        logits = TF.linear(h, w, b)
        _metrics_close(metrics, {
            "rewards/chosen": (beta * chosen).mean(), "rewards/rejected": (beta * rejected).mean(),
            "rewards/accuracies": (chosen > rejected).double().mean(),
            "rewards/margins": (beta * (chosen - rejected)).mean(),
            "logps/chosen": chosen.mean(), "logps/rejected": rejected.mean(),
            "logits/chosen": logits[:P].mean(), "logits/rejected": logits[P:].mean(),
            "nll_loss": nll, "log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean(),
        })  # fmt: skip


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
def test_cpo_matches_trl_formulas(be, loss_type):
    h, w, b, t, _, _ = _batch(3)
    beta, eps, gamma, alpha = 0.3, 0.1 if loss_type in ("sigmoid", "simpo") else 0.0, 0.5, 0.7
    mask = t != -100
    h64, w64, b64 = (x.clone().requires_grad_() for x in (h, w, b))
    lp = _logps(h64, w64, b64, t)
    x = lp.sum(1) / mask.sum(1) if loss_type in ("ipo", "simpo") else lp.sum(1)
    chosen, rejected = x[:P], x[P:]
    logits = chosen - rejected
    if loss_type == "simpo":  # TRL's cpo_loss
        logits = logits - gamma / beta
        losses = -TF.logsigmoid(beta * logits) * (1 - eps) - TF.logsigmoid(-beta * logits) * eps
    elif loss_type == "sigmoid":
        losses = -TF.logsigmoid(beta * logits) * (1 - eps) - TF.logsigmoid(-beta * logits) * eps
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    nll = -lp[:P].sum() / mask[:P].sum()
    loss64 = losses.mean() + alpha * nll
    loss64.backward()
    hf, wf, bf = (x.float().to(DEVICE).requires_grad_() for x in (h, w, b))
    with fastlm.backend(be):
        loss, metrics = F.linear_cpo_loss(
            hf, wf, t.to(DEVICE), bias=bf, beta=beta, loss_type=loss_type, label_smoothing=eps, simpo_gamma=gamma,
            cpo_alpha=alpha, chunk_size=4,
        )  # fmt: skip
    loss.backward()
    torch.testing.assert_close(loss.double().cpu(), loss64.detach(), rtol=2e-5, atol=2e-5)
    _grads_close((("hidden", hf.grad, h64.grad), ("weight", wf.grad, w64.grad), ("bias", bf.grad, b64.grad)))
    with torch.no_grad():
        full = TF.linear(h, w, b)
        _metrics_close(metrics, {
            "rewards/chosen": (beta * chosen).mean(), "rewards/rejected": (beta * rejected).mean(),
            "rewards/accuracies": (chosen > rejected).double().mean(),
            "rewards/margins": (beta * (chosen - rejected)).mean(),
            "logps/chosen": chosen.mean(), "logps/rejected": rejected.mean(),
            "logits/chosen": full[:P].mean(), "logits/rejected": full[P:].mean(), "nll_loss": nll,
        })  # fmt: skip


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_trl_formulas(be, loss_type):
    h, w, b, t, rh, rw = _batch(4)
    B = 2 * P
    pref = torch.tensor([True, False, True, True, False, False])
    beta, kl, wd, wu = 0.4, 0.3, 1.3, 0.8
    mask = t != -100
    h64, w64, b64 = (x.clone().requires_grad_() for x in (h, w, b))
    s = _logps(h64, w64, b64, t).sum(1)
    r = _logps(rh, rw, None, t).sum(1)
    rho = s - r
    if loss_type == "kto":  # TRL's _compute_loss
        chosen_losses = 1 - TF.sigmoid(beta * (rho[pref] - kl))
        rejected_losses = 1 - TF.sigmoid(beta * (kl - rho[~pref]))
    else:
        chosen_losses = 1 - TF.sigmoid(beta * rho[pref])
        rejected_losses = TF.sigmoid(beta * rho[~pref])
    loss64 = torch.cat([wd * chosen_losses, wu * rejected_losses]).mean()
    loss64.backward()
    hf, wf, bf = (x.float().to(DEVICE).requires_grad_() for x in (h, w, b))
    with fastlm.backend(be):
        loss, metrics = F.linear_kto_loss(
            hf, wf, t.to(DEVICE), preference=pref.to(DEVICE), kl=kl, bias=bf, ref_hidden=rh.float().to(DEVICE),
            ref_weight=rw.float().to(DEVICE), beta=beta, loss_type=loss_type, desirable_weight=wd,
            undesirable_weight=wu, chunk_size=5,
        )  # fmt: skip
    loss.backward()
    torch.testing.assert_close(loss.double().cpu(), loss64.detach(), rtol=2e-5, atol=2e-5)
    _grads_close((("hidden", hf.grad, h64.grad), ("weight", wf.grad, w64.grad), ("bias", bf.grad, b64.grad)))
    with torch.no_grad():
        ml = TF.linear(h, w, b).mean(-1)
        expect = {"kl": torch.tensor(kl if loss_type == "kto" else 0.0)}
        for key, rows in (("chosen", pref), ("rejected", ~pref)):
            expect[f"rewards/{key}"] = (beta * rho[rows]).mean()
            expect[f"logps/{key}"] = s[rows].mean()
            expect[f"logits/{key}"] = ml[rows][mask[rows]].mean()
        expect["rewards/margins"] = expect["rewards/chosen"] - expect["rewards/rejected"]
        _metrics_close(metrics, expect)
    assert B == pref.numel()


def test_kto_one_class_batch_gives_nan_metrics_and_bad_input():
    h, w, _, t, _, _ = (x.float() if x.is_floating_point() else x for x in _batch(5))
    loss, metrics = F.linear_kto_loss(h, w, t, preference=torch.ones(2 * P, dtype=torch.bool))
    assert torch.isfinite(loss) and metrics["rewards/rejected"].isnan() and metrics["rewards/chosen"].isfinite()
    with pytest.raises(ValueError, match="preference must be"):
        F.linear_kto_loss(h, w, t, preference=torch.ones(2 * P))
    with pytest.raises(ValueError, match="loss_type"):
        F.linear_kto_loss(h, w, t, preference=torch.ones(2 * P, dtype=torch.bool), loss_type="sigmoid")
    with pytest.raises(ValueError, match="loss_type"):
        F.linear_cpo_loss(h, w, t, loss_type="kto")
    with pytest.raises(ValueError, match="nll_target must be"):
        F.linear_orpo_loss(h, w, t, nll_target=t)
    with pytest.raises(ValueError, match="odd batch"):
        F.linear_orpo_loss(h[:5], w, t[:5])


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_length_normalised_types_with_average_log_prob(loss_type):
    """With average_log_prob the per-sequence values are means already: ipo / sigmoid_norm use them as they are
    (TRL <= 0.28's averaged ipo), not divided by the length a second time."""
    h, w, _, t, rh, rw = _batch(6)
    mask = t != -100
    n = mask.sum(1)
    beta = 0.3
    lp, rlp = _logps(h, w, None, t), _logps(rh, rw, None, t)
    rho = lp.sum(1) / n - rlp.sum(1) / n
    d = rho[:P] - rho[P:]
    want = ((d - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -TF.logsigmoid(beta * d)).mean()
    with fastlm.backend("cpu" if not ON_GPU else "triton"):
        loss, _ = F.linear_dpo_loss(
            h.float().to(DEVICE), w.float().to(DEVICE), t.to(DEVICE), ref_hidden=rh.float().to(DEVICE),
            ref_weight=rw.float().to(DEVICE), beta=beta, loss_type=loss_type, average_log_prob=True,
        )  # fmt: skip
    torch.testing.assert_close(loss.double().cpu(), want, rtol=2e-5, atol=2e-5)


def test_reference_on_the_policy_head_keeps_its_bias():
    """ref_weight None: the policy's head, bias included (a PEFT adapter switched off)."""
    h, w, b, t, rh, _ = _batch(7)
    with torch.no_grad():
        r = _logps(rh, w, b, t).sum(1)
    hf, wf, bf = h.float(), w.float(), b.float()
    got, _ = F.linear_dpo_loss(hf, wf, t, bias=bf, ref_hidden=rh.float())
    want, _ = F.linear_dpo_loss(hf, wf, t, bias=bf, ref_logps=r.float())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cpo_without_nll_logs_zero():
    h, w, _, t, _, _ = (x.float() if x.is_floating_point() else x for x in _batch(8))
    loss, metrics = F.linear_cpo_loss(h, w, t, cpo_alpha=0.0)
    assert metrics["nll_loss"] == 0 and torch.isfinite(loss)
