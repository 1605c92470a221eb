"""fastlm.nn's Liger-compatible post-training modules (fastlm/nn/post_training.py) against Liger-Kernel's own
chunked losses on the same batch (skipped with a reason where liger_kernel is not importable): the loss, every
returned output, and the gradients of the input, the weight and the bias; the documented differences raise."""

import importlib.util

import pytest
import torch
from helpers import DEVICE, ON_GPU

import fastlm
import fastlm.nn as fnn

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
needs_liger = pytest.mark.skipif(not HAS_LIGER, reason="liger_kernel is not installed (pip install liger-kernel)")
BACKEND = "triton" if ON_GPU else "cpu"
P, T, H, V = 2, 6, 16, 64


def _batch(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, T, H, generator=g).to(DEVICE)
    w = (torch.randn(V, H, generator=g) * 0.3).to(DEVICE)
    b = torch.randn(V, generator=g).to(DEVICE)
    t = torch.randint(0, V, (rows, T), generator=g).to(DEVICE)
    t[:, :2] = -100
    t[1, 5:] = -100
    rx = torch.randn(rows, T, H, generator=g).to(DEVICE)
    rw = (torch.randn(V, H, generator=g) * 0.3).to(DEVICE)
    return x, w, b, t, rx, rw


def _call(module, args_of, x, w, b):
    """(loss, outputs, grads of x, w, b) of ``module(*args_of(x, w, b))`` on fresh leaves."""
    x, w, b = (v.detach().clone().requires_grad_() for v in (x, w, b))
    loss, outs = module(*args_of(x, w, b))
    loss.backward()
    return loss.detach(), [o.detach() for o in outs], (x.grad, w.grad, b.grad)


def _compare(ours, theirs, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(ours[0], theirs[0], rtol=rtol, atol=atol, msg="loss")
    assert len(ours[1]) == len(theirs[1])
    for i, (a, b) in enumerate(zip(ours[1], theirs[1], strict=True)):
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol, msg=f"output {i}")
    for a, b, name in zip(ours[2], theirs[2], ("input", "weight", "bias"), strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)
    assert ours[2][0].abs().sum() > 0


@needs_liger
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("DPO", {}),
        ("DPO", {"loss_type": "hinge", "compute_nll_loss": True, "alpha": 0.5}),
        ("DPO", {"use_ref_model": False, "loss_type": "apo_zero"}),
        ("ORPO", {}),
        ("CPO", {"label_smoothing": 0.1}),
        ("SimPO", {"gamma": 0.3}),
        ("KTO", {"use_ref_model": True}),
        ("KTO", {}),
    ],
)
def test_preference_modules_match_liger(name, kwargs):
    import liger_kernel.chunked_loss as lk

    ours_cls, theirs_cls = getattr(fnn, f"FusedLinear{name}Loss"), getattr(lk, f"LigerFusedLinear{name}Loss")
    ours_m, theirs_m = ours_cls(beta=0.2, **kwargs), theirs_cls(beta=0.2, compiled=False, **kwargs)
    x, w, b, t, rx, rw = _batch(2 * P)
    if name == "KTO":
        pref = torch.tensor([True, False, True, False], device=DEVICE)
        kl = torch.tensor(0.05, device=DEVICE)

        def args_of(x, w, b):
            return (x, w, t, b, pref, rx, rw, None, kl)
    elif name == "DPO":

        def args_of(x, w, b):
            return (w, x, t, b, rx, rw, None)
    else:

        def args_of(x, w, b):
            return (w, x, t, b)

    with fastlm.backend(BACKEND):
        ours = _call(ours_m, args_of, x, w, b)
    _compare(ours, _call(theirs_m, args_of, x, w, b))


@needs_liger
@pytest.mark.parametrize("kwargs", [{}, {"beta": 0.0}, {"loss_type": "grpo", "importance_sampling_level": "sequence"}])
def test_grpo_module_matches_liger(kwargs):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    x, w, b, t, rx, rw = _batch(4)
    mask = t != -100
    ids = t.clamp(min=0)
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(4, generator=g).to(DEVICE)
    old = (-torch.rand(4, T, generator=g) * 5).to(DEVICE)
    ref = (-torch.rand(4, T, generator=g) * 5).to(DEVICE)

    def args_of(x, w, b):
        return (x, w, ids, mask, adv, b, ref, old)

    with fastlm.backend(BACKEND):
        ours = _call(fnn.FusedLinearGRPOLoss(**kwargs), args_of, x, w, b)
    _compare(ours, _call(LigerFusedLinearGRPOLoss(compiled=False, **kwargs), args_of, x, w, b))


def test_documented_differences_raise():
    with pytest.raises(NotImplementedError, match="compute_nll_loss"):
        fnn.FusedLinearORPOLoss(compute_nll_loss=False)
    with pytest.raises(NotImplementedError, match="average_log_prob"):
        fnn.FusedLinearCPOLoss(average_log_prob=True)
    with pytest.raises(NotImplementedError, match="average_log_prob"):
        fnn.FusedLinearKTOLoss(average_log_prob=True)
    with pytest.raises(NotImplementedError, match="sapo"):
        fnn.FusedLinearGRPOLoss(loss_type="sapo")
    x, w, b, t, _, _ = _batch(4)
    with pytest.raises(ValueError, match="preference_labels"):
        fnn.FusedLinearKTOLoss()(x, w, t)
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        fnn.FusedLinearGRPOLoss(beta=0.1)(x, w, t.clamp(min=0), t != -100, torch.ones(4, device=DEVICE))
