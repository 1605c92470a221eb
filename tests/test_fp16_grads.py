"""fp16 + GradScaler (issue 26): every loss that writes its gradient in the forward keeps a GradScaler's scale ahead of
any rounding to fp16. The fraction of zero gradient entries (the loss scaled by 65536 by hand, as GradScaler does,
then unscaled) equals torch's unfused path's within 1 percentage point, and the mean relative error per entry
against float64 is no worse than torch's (fastlm/bench/fp16_grads.py has the measurement; the benchmark runs it at
N = 4096 x V = 2000 and V = 128256). Peaked logits (std 3), where fastlm's former 1/N-scaled fp16 gradients were
half zeros at these shapes. Then the new fp16 code paths case by case against float64, every gradient: class
weights (a smaller power-of-two prescale), (N, C, D) input, label smoothing, ignored rows, a bias, every reduction,
per-row incoming gradients, the target's gradient."""

import copy

import pytest
import torch
import torch.nn.functional as TF
from helpers import DEVICE, ON_GPU

import fastlm
import fastlm.functional as F
from fastlm import reference
from fastlm.bench import fp16_grads

pytestmark = pytest.mark.skipif(
    ON_GPU, reason="CPU tensors: the cpu backend and Triton through its interpreter (not written for the GPU run)"
)

BACKENDS = ["cpu", "triton"]
SHAPES = {"cpu": (1024, 512, 32), "triton": (256, 256, 16)}  # N x V (x H); Triton runs interpreted here


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", fp16_grads.LOSSES)
def test_zero_fraction_matches_torch(loss, backend):
    n, v, h = SHAPES[backend]
    (ref, ours), (err_ref, err_ours) = fp16_grads.zero_fractions(loss, n, v, h, std=3.0, backend=backend)
    assert abs(ours - ref) <= 0.01, f"zero gradients: fastlm {ours:.3%}, torch {ref:.3%}"
    assert err_ours <= 1.1 * err_ref + 1e-6, f"mean relative error: fastlm {err_ours:.3e}, torch {err_ref:.3e}"


def test_former_behaviour_would_fail():
    """The measurement discriminates: the 1/N-scaled fp16 gradient (fastlm before issue 26) is mostly zeros here."""
    n, v, _ = SHAPES["cpu"]
    assert fp16_grads.old_fraction(n, v, 3.0) > 0.3


S = 65536.0  # the GradScaler's initial factor


def _check(fused, unfused, inputs: dict, grads: tuple, backend: str, dloss=None):
    """``fused(**fp16 inputs)`` under fp16 autocast and ``unfused(**fp32 casts)`` (torch's path: its fp16 leaves get
    fp16 gradients) against ``unfused(**fp64 casts)``: the loss and the gradients of ``grads`` after a backward of
    ``scale * dloss`` (per row / element for reduction "none"), unscaled. ``scale`` starts at 65536 and is halved
    while torch's gradients overflow, as a GradScaler would. fastlm's max error at most twice torch's plus one fp16
    step at the gradient's largest magnitude (one more rounding: the stored gradient's)."""

    def run(mode, scale):
        x = {}
        for k, t in inputs.items():
            t = t.to(DEVICE)
            if t.is_floating_point():
                t = t.half() if mode != "fp64" else t.half().double()
            x[k] = t.requires_grad_(k in grads)
        up = (lambda t: t.double()) if mode == "fp64" else (lambda t: t.float())
        with fastlm.backend(backend), torch.autocast(DEVICE.type, dtype=torch.float16, enabled=mode == "fused"):
            if mode == "fused":
                out = fused(**x)
            else:
                out = unfused(**{k: up(t) if t.is_floating_point() else t for k, t in x.items()})
        g = torch.ones_like(out) if dloss is None else dloss.to(out)
        (out * scale).backward(g)
        return out.double(), [x[k].grad.double() / scale for k in grads]

    scale = S
    while any(torch.isinf(gr).any() for gr in run("torch", scale)[1]) and scale > 1024:
        scale /= 2  # GradScaler's back-off
    ref_loss, ref = run("fp64", scale)
    _, torch_grads = run("torch", scale)
    loss, got = run("fused", scale)
    torch.testing.assert_close(loss, ref_loss, atol=2e-3, rtol=2e-3)
    for name, g, t, r in zip(grads, got, torch_grads, ref, strict=True):
        keep = torch.isfinite(r)  # kl_div's target gradient is NaN where the target is 0 (torch's too)
        assert torch.equal(torch.isfinite(g), keep), f"{name}: non-finite entries differ from float64's"
        err, err_torch = (g - r)[keep].abs().max(), (t - r)[keep].abs().max()
        step = 2.0 ** (torch.floor(torch.log2(r[keep].abs().max())) - 10)  # fp16's spacing there
        assert err <= 2 * err_torch + step, f"{name}: max error {err:.3e}, torch's {err_torch:.3e}, step {step:.1e}"


def _dl(reduction: str, shape, n: int):
    """The incoming gradient (before S): a mean's 1/n for "sum", per-row (or per-element) values about 1/n for
    "none", None (1) for the means. Larger, S times the gradient would overflow fp16 in torch's path too (a
    GradScaler would lower S until it does not)."""
    if reduction == "sum":
        return torch.tensor(1.0 / n)
    if reduction == "none":
        return (torch.rand(shape) + 0.5) / n
    return None


def _probs(shape, std=3.0):
    return torch.softmax(torch.randn(shape) * std, -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_paths(backend, reduction):
    N, C = 40, 300
    x = torch.randn(N, C) * 3
    t = torch.randint(0, C, (N,))
    t[[3, 7]] = -100
    w = torch.rand(C) * 40 + 0.5  # max |w| ~ 40: prescale 2^8
    dl = _dl(reduction, (N,), N)
    kw = dict(reduction=reduction, label_smoothing=0.1)
    for weight in (None, w):
        _check(
            lambda x, t, weight=weight: F.cross_entropy(x, t, weight, **kw),
            lambda x, t, weight=weight: TF.cross_entropy(x, t, None if weight is None else weight.to(x), **kw),
            {"x": x, "t": t},
            ("x",),
            backend,
            dl,
        )
    x3 = torch.randn(6, C, 5) * 3  # (N, C, D)
    t3 = torch.randint(0, C, (6, 5))
    _check(
        lambda x, t: F.cross_entropy(x, t, reduction=reduction),
        lambda x, t: TF.cross_entropy(x, t, reduction=reduction),
        {"x": x3, "t": t3},
        ("x",),
        backend,
        _dl(reduction, (6, 5), 30),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target_grad", [False, True])
def test_soft_cross_entropy_paths(backend, target_grad):
    N, C = 32, 200
    x, p = torch.randn(N, C) * 3, _probs((N, C))
    grads = ("x", "p") if target_grad else ("x",)
    for reduction in ("mean", "none"):
        _check(
            lambda x, p, r=reduction: F.cross_entropy(x, p, reduction=r, label_smoothing=0.05),
            lambda x, p, r=reduction: TF.cross_entropy(x, p, reduction=r, label_smoothing=0.05),
            {"x": x, "p": p},
            grads,
            backend,
            _dl(reduction, (N,), N),
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_paths(backend, log_target):
    N, C = 24, 150
    x = torch.log_softmax(torch.randn(N, C) * 3, -1)
    t = torch.log_softmax(torch.randn(N, C) * 3, -1) if log_target else _probs((N, C))
    for reduction in ("batchmean", "sum", "none"):
        _check(
            lambda x, t, r=reduction: F.kl_div(x, t, reduction=r, log_target=log_target),
            lambda x, t, r=reduction: TF.kl_div(x, t, reduction=r, log_target=log_target),
            {"x": x, "t": t},
            ("x", "t"),
            backend,
            _dl(reduction, (N, C), N),
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "jsd"])
def test_distillation_paths(backend, kind):
    N, V = 24, 180
    s, te = torch.randn(N, V) * 3, torch.randn(N, V) * 3
    target = torch.randint(0, V, (N,))
    target[[2, 5]] = -100
    for reduction in ("batchmean", "sum", "none"):
        kw = dict(kind=kind, beta=0.3, temperature=2.0, target=target, reduction=reduction)
        _check(
            lambda s, te, kw=kw: F.distillation_loss(s, te, **kw),
            lambda s, te, kw=kw: reference.distillation_loss(s, te, **kw),
            {"s": s, "te": te},
            ("s",),
            backend,
            _dl(reduction, (N,), N),
        )


def _linear_ref(x, w, t, b=None, **kw):
    logits = TF.linear(x, w, b)  # fp32 / fp64 casts of fp16 values: the fp16 matmul's operands
    if x.dtype == torch.float32:
        logits = TF.linear(x.half(), w.half(), None if b is None else b.half()).float()  # autocast's fp16 matmul
    return TF.cross_entropy(logits, t, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_paths(backend, reduction):
    """fp16 forms the gradients in the backward (linear_cross_entropy.deferred): every reduction, with a bias,
    label smoothing, ignored rows and chunks."""
    T, H, V = 50, 16, 300
    x, w, b = torch.randn(T, H), torch.randn(V, H) * 0.7, torch.randn(V)
    t = torch.randint(0, V, (T,))
    t[[1, 30]] = -100
    kw = dict(reduction=reduction, label_smoothing=0.1)
    _check(
        lambda x, w, b, t: F.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=16, **kw),
        lambda x, w, b, t: _linear_ref(x, w, t, b, **kw),
        {"x": x, "w": w, "b": b, "t": t},
        ("x", "w", "b"),
        backend,
        _dl(reduction, (T,), T),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_distillation_paths(backend):
    T, H, Ht, V = 40, 16, 24, 200
    x, w = torch.randn(T, H), torch.randn(V, H) * 0.7
    xt, wt = torch.randn(T, Ht), torch.randn(V, Ht) * 0.7
    t = torch.randint(0, V, (T,))
    t[[4, 9]] = -100
    kw = dict(kind="jsd", beta=0.4, temperature=1.5)

    def fused(x, w, xt, wt, t):
        return F.linear_distillation_loss(x, w, xt, wt, target=t, hard_weight=0.3, chunk_size=16, **kw)

    def unfused(x, w, xt, wt, t):
        s = TF.linear(x, w) if x.dtype == torch.float64 else TF.linear(x.half(), w.half()).float()
        te = TF.linear(xt, wt) if x.dtype == torch.float64 else TF.linear(xt.half(), wt.half()).float()
        d = reference.distillation_loss(s, te, target=t, **kw)
        return 0.7 * d + 0.3 * TF.cross_entropy(s, t)

    _check(
        lambda x, w, xt, wt, t: F.linear_distillation_loss(
            x, w, xt, wt, target=t, hard_weight=0.3, chunk_size=16, **kw
        ),
        unfused,
        {"x": x, "w": w, "xt": xt, "wt": wt, "t": t},
        ("x", "w"),
        backend,
    )


def test_hf_causal_lm_loss_fp16_grad_scaler():
    """A patched HF causal LM in fp16 (model.half()): the fused loss is float32, as HF's (which upcasts the logits),
    so a GradScaler's 65536 reaches the gradients finite (an fp16 loss would turn it into inf on the way back), and
    the head's and the last layer's gradients match the unpatched model's within fp16 rounding."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    ref = transformers.LlamaForCausalLM(config).half().train()
    ours = fastlm.patch(copy.deepcopy(ref))
    ids = torch.randint(0, 97, (2, 10))
    grads = {}
    for name, m in (("ref", ref), ("ours", ours)):
        with fastlm.backend("cpu"):
            loss = m(input_ids=ids, labels=ids).loss
        assert loss.dtype == torch.float32, loss.dtype
        (loss * S).backward()
        grads[name] = {n: p.grad.float() / S for n, p in m.named_parameters()}
        assert all(torch.isfinite(g).all() for g in grads[name].values()), name
    for n in ("lm_head.weight", "model.norm.weight"):
        torch.testing.assert_close(grads["ours"][n], grads["ref"][n], atol=2e-3, rtol=2e-2)
