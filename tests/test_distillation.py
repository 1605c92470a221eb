"""distillation_loss and linear_distillation_loss on the fused backends against the float64 reference
(fastlm/reference.py, plain log_softmax compositions): loss and the student's gradients, every kind, all dtypes."""

import pytest
import torch
from helpers import DEVICE, ON_GPU, OPCHECK_TESTS, compare_with_reference

import fastlm
import fastlm.functional as F
from fastlm import reference as R

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0)]
KIND_IDS = ["kl", "reverse_kl", "jsd0.5", "jsd0", "jsd1"]


def _targets(shape, V, ignore_frac=0.25, ignore_index=-100):
    t = torch.randint(0, V, shape, device=DEVICE)
    t = t.masked_fill(torch.rand(shape, device=DEVICE) < ignore_frac, ignore_index)
    t.view(-1)[0] = V - 1  # at least one row counts
    return t


def _check(s, t, dtype, **kw):
    """fastlm vs the fp64 reference: the loss and the student's gradient (the teacher is a constant)."""
    compare_with_reference(
        lambda s: F.distillation_loss(s, t.to(s.dtype), **kw),
        lambda s: R.distillation_loss(s, t.to(s.dtype), **kw),
        {"s": s},
        dtype,
    )


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("kind,beta", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kinds_dtypes_temperatures(backend, dtype, kind, beta, temperature):
    N, V = 6, 300
    s = (torch.randn(N, V, device=DEVICE) * 2).to(dtype)
    t = (torch.randn(N, V, device=DEVICE) * 2).to(dtype)
    _check(s, t, dtype, kind=kind, beta=beta, temperature=temperature, target=_targets((N,), V))


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "jsd"])
def test_reductions_ignore_index(backend, kind, reduction):
    """Every reduction with ignored rows (a custom ignore_index): ignored rows give 0 and are not counted."""
    N, V = 9, 77
    s, t = torch.randn(N, V, device=DEVICE) * 3, torch.randn(N, V, device=DEVICE) * 3
    tgt = _targets((N,), V, ignore_frac=0.4, ignore_index=5)
    _check(s, t, torch.float32, kind=kind, beta=0.3, target=tgt, ignore_index=5, reduction=reduction)
    _check(s, t, torch.float32, kind=kind, beta=0.3, reduction=reduction)  # no target: every row counts


@pytest.mark.parametrize("V", [1, 7, 300, 4097, 131075])
def test_vocab_sizes(backend, V):
    """One class, odd widths, past two Triton blocks and CPU chunks (2048 each), an LM vocabulary."""
    N = 3 if V > 10_000 else 5
    s, t = torch.randn(N, V, device=DEVICE) * 2, torch.randn(N, V, device=DEVICE) * 2
    for kind in ("kl", "jsd"):
        _check(s, t, torch.float32, kind=kind, temperature=1.5, target=_targets((N,), V))


def test_leading_dims_and_strided_rows(backend):
    V = 50
    s, t = torch.randn(2, 3, V, device=DEVICE), torch.randn(2, 3, V, device=DEVICE)
    tgt = _targets((2, 3), V)
    for red in ("none", "batchmean"):
        _check(s, t, torch.float32, kind="reverse_kl", target=tgt, reduction=red)
    # rows with a row stride (no copy), student and teacher strided differently
    sb, tb = torch.randn(6, V + 13, device=DEVICE), torch.randn(6, 2 * V, device=DEVICE)
    for kind in ("kl", "jsd"):
        compare_with_reference(
            lambda sb, kind=kind: F.distillation_loss(sb[:, 3 : 3 + V], tb[:, V:], kind=kind),
            lambda sb, kind=kind: R.distillation_loss(sb[:, 3 : 3 + V], tb[:, V:].to(sb.dtype), kind=kind),
            {"sb": sb},
            torch.float32,
        )
    # a transposed (non-viewable) leading layout, and a class stride != 1 (copied)
    st = torch.randn(3, 2, V, device=DEVICE).transpose(0, 1)
    _check(st, torch.randn(2, 3, V, device=DEVICE), torch.float32, kind="jsd", target=tgt)
    sc = torch.randn(V, 4, device=DEVICE).T
    _check(sc, torch.randn(4, V, device=DEVICE), torch.float32, kind="kl")


@pytest.mark.parametrize("kind,beta", KINDS, ids=KIND_IDS)
def test_masked_vocabulary_gives_no_nan(backend, kind, beta):
    """Columns that are -inf in both models (a padded vocabulary) have zero probability: they add nothing to the
    loss (0 log 0 = 0) and get a zero gradient."""
    N, V, pad = 4, 40, 5
    s, t = torch.randn(N, V + pad, device=DEVICE), torch.randn(N, V + pad, device=DEVICE)
    s[:, V:] = float("-inf")
    t[:, V:] = float("-inf")
    s.requires_grad_()
    loss = F.distillation_loss(s, t, kind=kind, beta=beta, temperature=2.0, reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), s)
    s64 = s.detach()[:, :V].double().requires_grad_()
    ref = R.distillation_loss(s64, t[:, :V].double(), kind=kind, beta=beta, temperature=2.0, reduction="none")
    (g64,) = torch.autograd.grad(ref.sum(), s64)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g[:, :V].double(), g64, atol=1e-6, rtol=1e-5)
    assert torch.equal(g[:, V:], torch.zeros_like(g[:, V:]))


@pytest.mark.parametrize("kind", ["kl", "reverse_kl"])
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_kl_of_rows_that_agree_keeps_fp32_precision(backend, kind, offset):
    """Student close to teacher (the KL is small) and logits far from 0: the kernels sum log-probability differences
    against the rows' maxima, so the loss stays within a few times torch's own fp32 error (summing y - x and
    subtracting lse_t - lse_s lost ~3% at offset 0 and everything at 1000)."""
    s = torch.randn(4, 3000, device=DEVICE) * 2
    t = s + torch.randn(4, 3000, device=DEVICE) * 0.05
    s, t = s + offset, t + offset
    got = F.distillation_loss(s, t, kind=kind, reduction="none")
    want = R.distillation_loss(s.double(), t.double(), kind=kind, reduction="none")
    torch_fp32 = R.distillation_loss(s, t, kind=kind, reduction="none")
    err = ((got.double() - want).abs() / want.abs()).max().item()
    torch_err = ((torch_fp32.double() - want).abs() / want.abs()).max().item()
    assert err <= 4 * torch_err + 1e-4, f"relative error {err:.3g} vs torch's fp32 {torch_err:.3g}"


def test_jsd_end_points_are_the_kls(backend):
    s, t = torch.randn(5, 30, device=DEVICE), torch.randn(5, 30, device=DEVICE)
    assert torch.equal(F.distillation_loss(s, t, kind="jsd", beta=0.0), F.distillation_loss(s, t, kind="kl"))
    assert torch.equal(F.distillation_loss(s, t, kind="jsd", beta=1.0), F.distillation_loss(s, t, kind="reverse_kl"))
    assert float(F.distillation_loss(s, s, kind="jsd", beta=0.5)) == pytest.approx(0.0, abs=1e-6)


def test_all_ignored_and_no_grad(backend):
    s = torch.randn(4, 9, device=DEVICE, requires_grad=True)
    t = torch.randn(4, 9, device=DEVICE)
    tgt = torch.full((4,), -100, device=DEVICE)
    loss = F.distillation_loss(s, t, target=tgt)
    assert loss.isnan()  # 0 / 0, as torch's mean cross-entropy over no row
    (g,) = torch.autograd.grad(F.distillation_loss(s, t, target=tgt, reduction="sum"), s)
    assert torch.equal(g, torch.zeros_like(g))
    with torch.no_grad():
        torch.testing.assert_close(F.distillation_loss(s, t, kind="jsd"), R.distillation_loss(s, t, kind="jsd"))


def test_opcheck(backend):
    op = getattr(torch.ops.fastlm, f"distillation_fwd_{backend}")
    s = torch.randn(6, 30, device=DEVICE, requires_grad=True)
    t = torch.randn(6, 30, device=DEVICE)
    tgt = _targets((6,), 30)
    for kind, red in ((0, 0), (1, 1), (2, 2)):
        torch.library.opcheck(op, (s, t, tgt, kind, 0.4, 2.0, -100, red, True), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(op, (s, t, None, 2, 0.5, 1.0, -100, 1, False), test_utils=OPCHECK_TESTS)


def test_compile_fullgraph(backend):
    def f(s, t, tgt):
        return F.distillation_loss(s, t, kind="jsd", target=tgt) + F.distillation_loss(s, t, reduction="none").sum()

    s = torch.randn(8, 50, device=DEVICE, requires_grad=True)
    t = torch.randn(8, 50, device=DEVICE)
    tgt = _targets((8,), 50)
    got = torch.compile(f, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")(s, t, tgt)
    want = f(s, t, tgt)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0])


def _bad_inputs():
    s, t = torch.randn(3, 4, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    return [
        (lambda: F.distillation_loss(s, t[:, :3]), ValueError, "same shape"),
        (lambda: F.distillation_loss(s, t[:2]), ValueError, "same shape"),
        (lambda: F.distillation_loss(s, t.half()), TypeError, "teacher_logits must have student_logits' dtype"),
        (lambda: F.distillation_loss(s.int(), t.int()), TypeError, "student_logits must be"),
        (lambda: F.distillation_loss(s, t.to("meta")), ValueError, "teacher_logits is on meta"),
        (lambda: F.distillation_loss(s, t, kind="kld"), ValueError, "kind must be one of"),
        (lambda: F.distillation_loss(s, t, reduction="mean"), ValueError, "use 'batchmean'"),
        (lambda: F.distillation_loss(s, t, reduction="avg"), ValueError, "reduction must be one of"),
        (lambda: F.distillation_loss(s, t, beta=1.5), ValueError, "beta must be in"),
        (lambda: F.distillation_loss(s, t, temperature=0.0), ValueError, "temperature must be positive"),
        (lambda: F.distillation_loss(s, t.requires_grad_()), ValueError, "detach the teacher"),
        (lambda: F.distillation_loss(s, t, target=torch.zeros(4, dtype=torch.long)), ValueError, "target must have"),
        (lambda: F.distillation_loss(s, t, target=torch.zeros(3)), TypeError, "target must hold class indices"),
        (lambda: F.distillation_loss(s, t, target=_targets((3,), 4).to("meta")), ValueError, "target is on meta"),
        (lambda: F.distillation_loss([1.0], t), TypeError, "student_logits must be a Tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_input(backend, case):
    call, exc, match = _bad_inputs()[case]
    with pytest.raises(exc, match=match):
        call()


def test_raw_op_checks():
    """The ops refuse what the public function never passes (a JSD beta at its end points, a class stride)."""
    s, t = torch.randn(3, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE)
    backends = ["triton"] + ([] if ON_GPU else ["cpu"])
    for b in backends:
        op = getattr(torch.ops.fastlm, f"distillation_fwd_{b}")
        with pytest.raises((RuntimeError, ValueError), match="beta"):
            op(s, t, None, 2, 0.0, 1.0, -100, 1, True)
        with pytest.raises((RuntimeError, ValueError), match="unit stride"):
            op(torch.randn(8, 3, device=DEVICE).T, t, None, 0, 0.5, 1.0, -100, 1, True)


def test_fp64_runs_the_reference_under_auto():
    s, t = torch.randn(4, 10, dtype=torch.float64, device=DEVICE), torch.randn(4, 10, dtype=torch.float64)
    t = t.to(DEVICE)
    with fastlm.backend("auto"):
        torch.testing.assert_close(F.distillation_loss(s, t, kind="jsd"), R.distillation_loss(s, t, kind="jsd"))
        with pytest.raises(ValueError, match="detach the teacher"):
            F.distillation_loss(s, t.requires_grad_())


# ---------------------------------------------------------------------------------------------------------------
# linear_distillation_loss

LD_BACKENDS = ["triton"] + ([] if ON_GPU else ["cpu"])


def _linear_inputs(dtype, B=2, S=13, Hs=16, Ht=24, V=300):
    x = torch.randn(B, S, Hs, device=DEVICE).to(dtype)
    w = (torch.randn(V, Hs, device=DEVICE) * 0.3).to(dtype)
    xt = torch.randn(B, S, Ht, device=DEVICE).to(dtype)
    wt = (torch.randn(V, Ht, device=DEVICE) * 0.3).to(dtype)
    return x, w, xt, wt, _targets((B, S), V)


@pytest.mark.parametrize("ld_backend", LD_BACKENDS)
@pytest.mark.parametrize(
    "chunk,kind,temperature,hard_weight",
    [(None, "kl", 1.0, 0.0), (7, "jsd", 2.0, 0.3), (16, "reverse_kl", 1.0, 1.0), (5, "kl", 2.5, 0.5)],
)
def test_linear_distillation(ld_backend, chunk, kind, temperature, hard_weight):
    """Against the unfused fp64 composition (both models' logits, distillation + cross-entropy): the loss and the
    gradients of student_hidden and student_weight; chunks that do not divide the 26 tokens, one chunk."""
    with fastlm.backend(ld_backend):
        x, w, xt, wt, tgt = _linear_inputs(torch.float32)
        kw = dict(target=tgt, kind=kind, beta=0.3, temperature=temperature, hard_weight=hard_weight)
        compare_with_reference(
            lambda x, w: F.linear_distillation_loss(x, w, xt.to(x.dtype), wt.to(x.dtype), chunk_size=chunk, **kw),
            lambda x, w: R.linear_distillation_loss(x, w, xt.to(x.dtype), wt.to(x.dtype), **kw),
            {"x": x, "w": w},
            torch.float32,
        )


@pytest.mark.parametrize("ld_backend", LD_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_distillation_low_precision(ld_backend, dtype):
    with fastlm.backend(ld_backend):
        x, w, xt, wt, tgt = _linear_inputs(dtype)
        kw = dict(target=tgt, kind="jsd", temperature=2.0, hard_weight=0.25)
        compare_with_reference(
            lambda x, w: F.linear_distillation_loss(x, w, xt.to(x.dtype), wt.to(x.dtype), chunk_size=8, **kw),
            lambda x, w: R.linear_distillation_loss(x, w, xt.to(x.dtype), wt.to(x.dtype), **kw),
            {"x": x, "w": w},
            dtype,
        )


@pytest.mark.parametrize("ld_backend", LD_BACKENDS)
def test_linear_distillation_no_target_no_grad_and_bad_input(ld_backend):
    with fastlm.backend(ld_backend):
        x, w, xt, wt, tgt = _linear_inputs(torch.float32, B=1, S=10, V=40)
        with torch.no_grad():
            torch.testing.assert_close(
                F.linear_distillation_loss(x, w, xt, wt, kind="reverse_kl", chunk_size=3),
                R.linear_distillation_loss(x, w, xt, wt, kind="reverse_kl"),
            )
        bad = [
            (lambda: F.linear_distillation_loss(x, w[:, :5], xt, wt), ValueError, "must share Hs"),
            (lambda: F.linear_distillation_loss(x, w, xt, wt[:, :5]), ValueError, "must share Ht"),
            (lambda: F.linear_distillation_loss(x, w, xt, wt[:30]), ValueError, "same vocabulary"),
            (lambda: F.linear_distillation_loss(x, w, xt[:, :4], wt), ValueError, "leading dims"),
            (lambda: F.linear_distillation_loss(x, w.double(), xt, wt), TypeError, "student_weight must match"),
            (lambda: F.linear_distillation_loss(x, w, xt, wt.requires_grad_()), ValueError, "detach the teacher"),
            (lambda: F.linear_distillation_loss(x, w, xt, wt.detach(), hard_weight=0.5), ValueError, "needs target"),
            (lambda: F.linear_distillation_loss(x, w, xt, wt.detach(), hard_weight=2.0), ValueError, "hard_weight"),
            (lambda: F.linear_distillation_loss(x, w, xt, wt.detach(), kind="x"), ValueError, "kind must be"),
            (lambda: F.linear_distillation_loss(x, w, xt, wt.detach(), target=tgt[:, :3]), ValueError, "target must"),
        ]
        for call, exc, match in bad:
            with pytest.raises(exc, match=match):
                call()
    with fastlm.backend("cuda"), pytest.raises(fastlm.BackendUnavailableError, match="linear_distill"):
        F.linear_distillation_loss(x, w, xt, wt.detach())


@pytest.mark.parametrize("ld_backend", LD_BACKENDS)
def test_linear_distillation_compile_fullgraph(ld_backend):
    x, w, xt, wt, tgt = _linear_inputs(torch.float32, S=6, V=50)
    x.requires_grad_()

    def f(x):
        return F.linear_distillation_loss(x, w, xt, wt, target=tgt, kind="jsd", hard_weight=0.2, chunk_size=5)

    with fastlm.backend(ld_backend):
        got = torch.compile(f, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")(x)
        want = f(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


@pytest.mark.parametrize("ld_backend", LD_BACKENDS)
def test_linear_losses_under_autocast(ld_backend):
    """Under autocast with fp32 weights (mixed-precision training), both LM-head losses run their matmuls in the
    autocast dtype as F.linear would, return a float32 loss and fp32 gradients for the fp32 leaves."""
    x, w, xt, wt, tgt = _linear_inputs(torch.float32, B=1, S=10, V=40)
    x.requires_grad_(), w.requires_grad_()
    with fastlm.backend(ld_backend), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss_d = F.linear_distillation_loss(x, w, xt, wt, target=tgt, hard_weight=0.3, chunk_size=4)
        loss_ce = F.linear_cross_entropy(x, w, tgt)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):  # the unfused composition under the same autocast
        want_d = R.linear_distillation_loss(x, w, xt, wt, target=tgt, hard_weight=0.3)
        logits = torch.nn.functional.linear(x, w).float().reshape(-1, w.shape[0])
        want_ce = torch.nn.functional.cross_entropy(logits, tgt.reshape(-1))
    for got, want in ((loss_d, want_d), (loss_ce, want_ce)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.float(), atol=3e-2, rtol=3e-2)
        gx, gw = torch.autograd.grad(got, (x, w))
        wx, ww = torch.autograd.grad(want, (x, w))
        assert gx.dtype == gw.dtype == torch.float32
        torch.testing.assert_close(gx, wx, atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(gw, ww, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(ON_GPU, reason="the CPU peak-memory measurement (on a GPU the allocator's peak is read)")
def test_cpu_peak_memory_child_from_the_source_tree(monkeypatch):
    """`make bench` runs from the repository root: the peak-memory child must import the installed fastlm, not the
    source tree its cwd would put first on sys.path; and the fused linear loss peaks below the unfused path."""
    import os

    from fastlm.bench import core
    from fastlm.bench import distillation as family

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
    case = core.Case(
        "linear_distillation_loss", "256x8000x64x64", torch.float32, "fwd+bwd", 1.0, "TFLOP/s", (256, 8000, 64, 64)
    )
    fused = core.subprocess_peak_rss_mb(family.__name__, case, "fastlm-cpu")
    unfused = core.subprocess_peak_rss_mb(family.__name__, case, "torch-eager")
    assert 0 < fused < 0.5 * unfused, (fused, unfused)


@pytest.mark.parametrize("ld_backend", LD_BACKENDS)
def test_linear_distillation_frozen_student_head(ld_backend):
    """A frozen student head (LoRA, frozen tied embeddings): the hidden states' gradient only, as the unfused path."""
    x, w, xt, wt, tgt = _linear_inputs(torch.float32, B=1, S=10, V=40)
    x.requires_grad_()
    with fastlm.backend(ld_backend):
        (gx,) = torch.autograd.grad(F.linear_distillation_loss(x, w, xt, wt, target=tgt, hard_weight=0.5), (x,))
    (want,) = torch.autograd.grad(R.linear_distillation_loss(x, w, xt, wt, target=tgt, hard_weight=0.5), (x,))
    torch.testing.assert_close(gx, want, atol=1e-5, rtol=1e-4)
    assert w.grad is None
