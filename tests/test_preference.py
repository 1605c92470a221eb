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
    with pytest.raises(ValueError, match=r"\(2P, T, H\)"):
        F.linear_dpo_loss(h[0], w, t[0])
    with pytest.raises(ValueError, match="beta"):
        F.linear_dpo_loss(h, w, t, beta=0.0)
