"""Cross-entropy and linear cross-entropy on the fused backends against torch (float64 oracle)."""

import pytest
import torch
import torch.nn.functional as TF
from helpers import DEVICE, ON_GPU, OPCHECK_TESTS, compare_with_reference

import fastlm
import fastlm.functional as F
from fastlm import nn as fnn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
VOCABS = [1, 7, 1000, 8192, 8193, 40000, 262144]


def _targets(shape, C, ignore_frac=0.2, ignore_index=-100):
    t = torch.randint(0, C, shape, device=DEVICE)
    return t.masked_fill(torch.rand(shape, device=DEVICE) < ignore_frac, ignore_index)


@pytest.mark.parametrize("C", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vocab_sizes(backend, dtype, C):
    N = max(2, min(16, (400_000 if ON_GPU else 60_000) // C))
    x = torch.randn(N, C, device=DEVICE, dtype=dtype) * 2
    t = _targets((N,), C)
    t[0] = C - 1  # at least one row counts (all ignored is its own test: the mean is then 0/0 = NaN, as torch)
    compare_with_reference(lambda x: F.cross_entropy(x, t), lambda x: TF.cross_entropy(x, t), {"x": x}, dtype)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_reductions_weights_smoothing(backend, reduction, weighted, smoothing):
    """Every reduction with and without class weights and label smoothing, gradients included (Liger once shipped
    wrong gradients for reduction="none": the random incoming gradient below would catch that)."""
    N, C = 37, 300
    x = torch.randn(N, C, device=DEVICE)
    t = _targets((N,), C)
    w = torch.rand(C, device=DEVICE) + 0.5 if weighted else None
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    compare_with_reference(
        lambda x: F.cross_entropy(x, t, w, **kw),
        lambda x: TF.cross_entropy(x, t, w.to(x.dtype) if w is not None else None, **kw),
        {"x": x},
        torch.float32,
    )


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_spatial_targets_and_custom_ignore_index(backend, reduction):
    x = torch.randn(3, 11, 4, 5, device=DEVICE)
    t = _targets((3, 4, 5), 11, ignore_index=7)
    kw = dict(reduction=reduction, ignore_index=7, label_smoothing=0.05)
    compare_with_reference(
        lambda x: F.cross_entropy(x, t, **kw), lambda x: TF.cross_entropy(x, t, **kw), {"x": x}, torch.float32
    )


def test_unbatched_and_strided(backend):
    x = torch.randn(50, device=DEVICE)
    t = torch.tensor(3, device=DEVICE)
    compare_with_reference(lambda x: F.cross_entropy(x, t), lambda x: TF.cross_entropy(x, t), {"x": x}, torch.float32)
    base = torch.randn(6, 90, device=DEVICE)
    t2 = _targets((6,), 40)
    compare_with_reference(
        lambda b: F.cross_entropy(b[:, :40], t2), lambda b: TF.cross_entropy(b[:, :40], t2), {"b": base}, torch.float32
    )


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored_matches_torch(backend, reduction, weighted):
    """Every target ignored: mean is 0/0 = NaN (as torch), the gradient is zero."""
    x = torch.randn(5, 9, device=DEVICE, requires_grad=True)
    t = torch.full((5,), -100, device=DEVICE)
    w = torch.rand(9, device=DEVICE) if weighted else None
    loss = F.cross_entropy(x, t, w, reduction=reduction)
    ref = TF.cross_entropy(x, t, w, reduction=reduction)
    torch.testing.assert_close(loss, ref, equal_nan=True)
    (g,) = torch.autograd.grad(loss.sum(), x)
    (gr,) = torch.autograd.grad(ref.sum(), x)
    assert torch.equal(g, gr) and torch.equal(g, torch.zeros_like(g))


def test_extreme_logits(backend):
    x = torch.randn(6, 500, device=DEVICE) * 1e4
    x[1, 3] = float("-inf")
    t = torch.randint(0, 500, (6,), device=DEVICE)
    t[1] = 4
    torch.testing.assert_close(
        F.cross_entropy(x, t, reduction="none"), TF.cross_entropy(x, t, reduction="none"), rtol=1e-5, atol=1e-2
    )


def test_out_of_range_target_raises_on_cpu():
    x = torch.randn(4, 10)
    with fastlm.backend("triton"):
        for bad in (10, -1):
            t = torch.tensor([1, bad, 2, -100])
            with pytest.raises(ValueError, match="outside"):
                F.cross_entropy(x, t)


@pytest.mark.gpu
def test_out_of_range_target_gives_nan_on_gpu():
    x = torch.randn(4, 10, device="cuda")
    t = torch.tensor([1, 12, 2, -100], device="cuda")
    with fastlm.backend("triton"):
        loss = F.cross_entropy(x, t, reduction="none")
    assert loss[1].isnan() and not loss[[0, 2, 3]].isnan().any()


def test_module(backend):
    w = torch.rand(20, device=DEVICE)
    ours = fnn.CrossEntropyLoss(weight=w, ignore_index=3, label_smoothing=0.1)
    ref = torch.nn.CrossEntropyLoss(weight=w, ignore_index=3, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss) and ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(8, 20, device=DEVICE)
    t = torch.randint(0, 20, (8,), device=DEVICE)
    torch.testing.assert_close(ours(x, t), ref(x, t))


def test_opcheck(backend):
    op = getattr(torch.ops.fastlm, f"cross_entropy_fwd_{backend}")
    x = torch.randn(6, 30, device=DEVICE, requires_grad=True)
    t = _targets((6,), 30)
    w = torch.rand(30, device=DEVICE)
    for red in (0, 1, 2):
        torch.library.opcheck(op, (x, t, w, -100, 0.1, red, True), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(
        op,
        (torch.randn(3, 30, 4, device=DEVICE), _targets((12,), 30), None, -100, 0.0, 1, False),
        test_utils=OPCHECK_TESTS,
    )


def test_compile_fullgraph(backend):
    def f(x, t):
        return F.cross_entropy(x, t, label_smoothing=0.1) + F.cross_entropy(x, t, reduction="none").sum()

    x = torch.randn(8, 50, device=DEVICE, requires_grad=True)
    t = _targets((8,), 50)
    got = torch.compile(f, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")(x, t)
    want = f(x, t)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (
            lambda: F.cross_entropy(torch.ones(3, 4, dtype=torch.int32, device=DEVICE), _targets((3,), 4)),
            TypeError,
            "input must be",
        ),
        (
            lambda: F.cross_entropy(torch.randn(3, 4, device=DEVICE).to(torch.float8_e4m3fn), _targets((3,), 4)),
            TypeError,
            "input must be",
        ),
        (
            lambda: F.cross_entropy(torch.randn(3, 4, device=DEVICE), torch.rand(3, device=DEVICE)),
            ValueError,
            r"class-probability target must have input's shape \[3, 4\]",
        ),
        (
            lambda: F.cross_entropy(torch.randn(3, 4, device=DEVICE), torch.rand(3, 4, device=DEVICE).half()),
            TypeError,
            "class-probability target must have input's dtype",
        ),
        (
            lambda: F.cross_entropy(torch.randn(3, 4, device=DEVICE), torch.rand(3, 4, device="meta")),
            ValueError,
            "target is on meta",
        ),
        (
            lambda: F.cross_entropy(torch.randn(3, 4, device=DEVICE), torch.rand(3, 4, device=DEVICE), ignore_index=1),
            ValueError,
            "ignore_index is not supported for class-probability targets",
        ),
        (
            lambda: F.cross_entropy(torch.randn(3, 4, device=DEVICE), torch.rand(3, 4, device=DEVICE), reduction="x"),
            ValueError,
            "reduction must be",
        ),
        (
            lambda: F.cross_entropy(torch.randn(3, 4, device=DEVICE), _targets((4,), 4)),
            ValueError,
            "target must have shape",
        ),
        (
            lambda: F.cross_entropy(torch.randn(3, 4, device=DEVICE), _targets((3,), 4), torch.rand(5, device=DEVICE)),
            ValueError,
            "weight must have shape",
        ),
        (
            lambda: F.cross_entropy(torch.randn(3, 4, device=DEVICE), _targets((3,), 4).to("meta")),
            ValueError,
            "target is on meta",
        ),
        (
            lambda: F.cross_entropy(torch.randn(3, 4, device=DEVICE), _targets((3,), 4), reduction="avg"),
            ValueError,
            "reduction must be",
        ),
        (
            lambda: F.cross_entropy(torch.randn(3, 4, device=DEVICE), _targets((3,), 4), label_smoothing=1.5),
            ValueError,
            "label_smoothing",
        ),
    ],
)
def test_bad_input(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------------
# Class-probability (soft) targets: loss, d input and d target against torch's probability path in float64


def _probs(shape, dim=1, normalised=True):
    t = torch.rand(shape, device=DEVICE)
    return t / t.sum(dim, keepdim=True) if normalised else t * 2  # torch does not require rows that sum to 1


@pytest.mark.parametrize("C", [1, 7, 9000])  # 9000: more than one 8192-wide chunk (Triton) / 2048 (cpu)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_soft_targets(backend, dtype, C):
    N = max(2, min(12, 20_000 // C))
    x = (torch.randn(N, C, device=DEVICE) * 2).to(dtype)
    t = _probs((N, C)).to(dtype)
    compare_with_reference(
        lambda x, t: F.cross_entropy(x, t), lambda x, t: TF.cross_entropy(x, t), {"x": x, "t": t}, dtype
    )


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_soft_reductions_weights_smoothing(backend, reduction, weighted, smoothing):
    """torch's mean for probability targets divides by the number of rows, not by a sum of weights; targets that
    do not sum to 1 are taken as they are."""
    N, C = 37, 300
    x = torch.randn(N, C, device=DEVICE)
    t = _probs((N, C), normalised=not weighted)
    w = torch.rand(C, device=DEVICE) + 0.5 if weighted else None
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    compare_with_reference(
        lambda x, t: F.cross_entropy(x, t, w, **kw),
        lambda x, t: TF.cross_entropy(x, t, w.to(x.dtype) if w is not None else None, **kw),
        {"x": x, "t": t},
        torch.float32,
    )


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_soft_spatial_unbatched_strided(backend, reduction):
    kw = dict(reduction=reduction, label_smoothing=0.1)
    w = torch.rand(11, device=DEVICE) + 0.5
    cases = [
        (torch.randn(3, 11, 4, 5, device=DEVICE), _probs((3, 11, 4, 5))),  # (N, C, d1, d2)
        (torch.randn(50, device=DEVICE), _probs((50,), dim=0)),  # (C,)
    ]
    for x, t in cases:
        ww = w if x.dim() > 1 else None
        compare_with_reference(
            lambda x, t, ww=ww: F.cross_entropy(x, t, ww, **kw),
            lambda x, t, ww=ww: TF.cross_entropy(x, t, ww.to(x.dtype) if ww is not None else None, **kw),
            {"x": x, "t": t},
            torch.float32,
        )
    # strided rows of both input and target, and a target whose classes are not contiguous (copied)
    base, tbase = torch.randn(6, 90, device=DEVICE), _probs((40, 6)).t()
    compare_with_reference(
        lambda b, t: F.cross_entropy(b[:, :40], t, **kw),
        lambda b, t: TF.cross_entropy(b[:, :40], t, **kw),
        {"b": base, "t": tbase},
        torch.float32,
    )


def test_soft_only_one_side_requires_grad(backend):
    x = torch.randn(5, 30, device=DEVICE)
    t = _probs((5, 30))
    for x_req, t_req in ((True, False), (False, True)):
        xl, tl = x.clone().requires_grad_(x_req), t.clone().requires_grad_(t_req)
        loss = F.cross_entropy(xl, tl, label_smoothing=0.1)
        (g,) = torch.autograd.grad(loss * 3, xl if x_req else tl)
        xr, tr = x.double().requires_grad_(x_req), t.double().requires_grad_(t_req)
        (gr,) = torch.autograd.grad(TF.cross_entropy(xr, tr, label_smoothing=0.1) * 3, xr if x_req else tr)
        torch.testing.assert_close(g.double(), gr, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(F.cross_entropy(x, t, reduction="sum"), TF.cross_entropy(x, t, reduction="sum"))


@pytest.mark.parametrize("spatial", [False, True])
def test_soft_large_logits_keep_fp32_precision(backend, spatial):
    """Logits far from 0 (a shift of 1000): the loss is formed relative to the row max, so it keeps fp32 precision
    (summing w t' x and subtracting it from sw * lse lost ~1e-4 at this shift)."""
    shape = (4, 300, 3) if spatial else (6, 300)
    x = torch.randn(shape, device=DEVICE) * 3 + 1000
    t = _probs(shape)
    got = F.cross_entropy(x, t, reduction="none", label_smoothing=0.1)
    want = TF.cross_entropy(x.double(), t.double(), reduction="none", label_smoothing=0.1)
    torch_err = (TF.cross_entropy(x, t, reduction="none", label_smoothing=0.1).double() - want).abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert err <= 2 * torch_err + 1e-5, f"error {err:.3g} vs torch's {torch_err:.3g}"


def test_soft_module_and_linear_ce_stays_index_only(backend):
    w = torch.rand(20, device=DEVICE)
    x = torch.randn(8, 20, device=DEVICE)
    t = _probs((8, 20))
    ours = fnn.CrossEntropyLoss(weight=w, label_smoothing=0.1)
    torch.testing.assert_close(ours(x, t), torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)(x, t))
    if backend in LCE_BACKENDS:
        with pytest.raises(TypeError, match="target must hold class indices"):
            F.linear_cross_entropy(torch.randn(8, 4, device=DEVICE), torch.randn(20, 4, device=DEVICE), t[:, 0])


def test_soft_opcheck(backend):
    if backend == "cuda":
        pytest.skip("the CUDA C++ kernels have no soft-target cross-entropy (dispatch.LACKS)")
    op = getattr(torch.ops.fastlm, f"soft_cross_entropy_fwd_{backend}")
    x = torch.randn(6, 30, device=DEVICE, requires_grad=True)
    t = _probs((6, 30)).requires_grad_()
    w = torch.rand(30, device=DEVICE)
    for red in (0, 1, 2):
        torch.library.opcheck(op, (x, t, w, 0.1, red, True, True), test_utils=OPCHECK_TESTS)
    x3, t3 = torch.randn(3, 30, 4, device=DEVICE), _probs((3, 30, 4))
    torch.library.opcheck(op, (x3, t3, None, 0.0, 1, False, False), test_utils=OPCHECK_TESTS)


def test_soft_compile_fullgraph(backend):
    def f(x, t):
        return F.cross_entropy(x, t, label_smoothing=0.1) + F.cross_entropy(x, t, reduction="none").sum()

    x = torch.randn(8, 50, device=DEVICE, requires_grad=True)
    t = _probs((8, 50)).requires_grad_()
    got = torch.compile(f, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")(x, t)
    want = f(x, t)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (x, t)), torch.autograd.grad(want, (x, t)), strict=True):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------------
# linear_cross_entropy


def _lce_ref(x, w, t, b=None, weight=None, **kw):
    logits = TF.linear(x, w, b)
    loss = TF.cross_entropy(logits.reshape(-1, w.shape[0]), t.reshape(-1), weight, **kw)
    return loss.reshape(t.shape) if kw.get("reduction") == "none" else loss


# The backends with a linear cross-entropy: Triton, and the CPU kernel on CPU tensors ("cuda" has none: it raises
# UnsupportedCaseError, test_backend.py).
LCE_BACKENDS = ["triton"] + ([] if ON_GPU else ["cpu"])


@pytest.mark.parametrize("lce_backend", LCE_BACKENDS)
@pytest.mark.parametrize("chunk", [None, 16, 7])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy(reduction, bias, chunk, lce_backend):
    """Against linear + cross_entropy: loss and the gradients of input, linear_weight and linear_bias; several
    chunks (a ragged last one with chunk 7) and a single chunk."""
    with fastlm.backend(lce_backend):
        B, S, H, V = 2, 25, 32, 300
        x = torch.randn(B, S, H, device=DEVICE)
        w = torch.randn(V, H, device=DEVICE) * 0.2
        b = torch.randn(V, device=DEVICE) if bias else None
        t = _targets((B, S), V)
        cw = torch.rand(V, device=DEVICE) + 0.5
        kw = dict(reduction=reduction, label_smoothing=0.1, ignore_index=-100)
        inputs = {"x": x, "w": w} | ({"b": b} if bias else {})
        compare_with_reference(
            lambda x, w, b=None: F.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, chunk_size=chunk, **kw),
            lambda x, w, b=None: _lce_ref(x, w, t, b, cw.to(x.dtype), **kw),
            inputs,
            torch.float32,
        )


@pytest.mark.parametrize("lce_backend", LCE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16], ids=str)
def test_linear_cross_entropy_low_precision(dtype, lce_backend):
    # fp16 only on CPU: the matmuls run in torch, the cross-entropy in the (fp16-exact) interpreter or the CPU kernel
    with fastlm.backend(lce_backend):
        x = torch.randn(40, 64, device=DEVICE, dtype=dtype)
        w = (torch.randn(500, 64, device=DEVICE) * 0.1).to(dtype)
        t = _targets((40,), 500)
        compare_with_reference(
            lambda x, w: F.linear_cross_entropy(x, w, t, chunk_size=16),
            lambda x, w: _lce_ref(x, w, t),
            {"x": x, "w": w},
            dtype,
        )


@pytest.mark.skipif(ON_GPU, reason="the cpu backend runs on CPU tensors")
def test_linear_cross_entropy_cpu_fp16_mean_over_many_tokens():
    """The mean's denominator stays fp32: in fp16, 70000 tokens are inf and every gradient became 0."""
    with fastlm.backend("cpu"):
        x = torch.randn(70000, 4, dtype=torch.float16, requires_grad=True)
        w = (torch.randn(8, 4) * 0.5).to(torch.float16).requires_grad_()
        t = torch.randint(0, 8, (70000,))
        F.linear_cross_entropy(x, w, t).backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    _lce_ref(x64, w64, t).backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-4, rtol=2e-2)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-6, rtol=2e-2)


@pytest.mark.parametrize("lce_backend", LCE_BACKENDS)
def test_linear_cross_entropy_no_grad_and_bad_input(lce_backend):
    with fastlm.backend(lce_backend):
        x = torch.randn(10, 8, device=DEVICE)
        w = torch.randn(30, 8, device=DEVICE)
        t = torch.randint(0, 30, (10,), device=DEVICE)
        with torch.no_grad():
            torch.testing.assert_close(F.linear_cross_entropy(x, w, t), _lce_ref(x, w, t))
        with pytest.raises(ValueError, match="share H"):
            F.linear_cross_entropy(x, torch.randn(30, 9, device=DEVICE), t)
        with pytest.raises(TypeError, match="linear_weight must match"):
            F.linear_cross_entropy(x, w.double(), t)
        with pytest.raises(ValueError, match="target must have shape"):
            F.linear_cross_entropy(x, w, t[:5])
    with fastlm.backend("cuda"), pytest.raises(fastlm.BackendUnavailableError, match="linear_ce"):
        F.linear_cross_entropy(x, w, t)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_fp16_gradient_under_a_grad_scaler_scale(backend, op, reduction):
    """fp16 autocast + (loss * 65536).backward(), as torch.amp.GradScaler does by default: the loss is float32 (as
    torch's under autocast), and the incoming gradient 65536 (inf in fp16) must not be cast to fp16 before it
    multiplies the (small) saved gradient."""
    if op == "linear_cross_entropy" and backend not in LCE_BACKENDS:
        pytest.skip(f"no linear cross-entropy on the {backend} backend")
    scale = 65536.0
    # small inputs, so that the true scaled gradients fit fp16 (a real overflow is GradScaler's to handle)
    x = (torch.randn(24, 32, device=DEVICE) * 0.05).to(torch.float16)
    w = (torch.randn(100, 32, device=DEVICE) * 0.05).to(torch.float16)
    t = _targets((24,), 100)
    if op == "cross_entropy":
        fn = lambda x: F.cross_entropy(x, t, reduction=reduction)  # noqa: E731
        ref_fn, inputs = (lambda x: TF.cross_entropy(x, t, reduction=reduction)), [x @ w.T]
    else:
        fn = lambda x, w: F.linear_cross_entropy(x, w, t, reduction=reduction, chunk_size=8)  # noqa: E731
        ref_fn, inputs = (lambda x, w: _lce_ref(x, w, t, reduction=reduction)), [x, w]
    leaves = [a.clone().requires_grad_() for a in inputs]
    with torch.autocast(DEVICE.type, dtype=torch.float16):  # as torch does there, the loss comes out in fp32
        loss = fn(*leaves)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss * scale, leaves, torch.ones_like(loss))
    ref_leaves = [a.double().requires_grad_() for a in inputs]
    ref_grads = torch.autograd.grad(ref_fn(*ref_leaves) * scale, ref_leaves, torch.ones_like(loss, dtype=torch.double))
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float16 and torch.isfinite(g).all(), "inf/NaN gradient under the scale"
        torch.testing.assert_close(g.double(), r, atol=2e-3 * r.abs().max().item(), rtol=1e-2)


def test_trainable_class_weights_raise(backend):
    """The fused kernels give the class weights no gradient: a weight that requires grad raises instead of losing
    its gradient silently (index and probability targets, and the linear cross-entropy)."""
    x = torch.randn(4, 7, device=DEVICE, requires_grad=True)
    w = torch.rand(7, device=DEVICE, requires_grad=True)
    for target in (torch.randint(0, 7, (4,), device=DEVICE), torch.rand(4, 7, device=DEVICE).softmax(-1)):
        with pytest.raises(ValueError, match="no gradient"):
            F.cross_entropy(x, target, weight=w)
    with pytest.raises(ValueError, match="no gradient"):
        F.linear_cross_entropy(
            x, torch.randn(5, 7, device=DEVICE), torch.randint(0, 5, (4,), device=DEVICE), weight=w[:5]
        )
    with torch.no_grad():
        F.cross_entropy(x, torch.randint(0, 7, (4,), device=DEVICE), weight=w)  # no gradient asked for: fine
