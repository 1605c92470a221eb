"""kl_div on the fused backends against torch.nn.functional.kl_div (float64 oracle): loss, d input and d target."""

import warnings

import pytest
import torch
import torch.nn.functional as TF
from helpers import DEVICE, ON_GPU, OPCHECK_TESTS, at_thread_counts, compare_with_reference

import fastlm
import fastlm.functional as F

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["none", "sum", "mean", "batchmean"]
pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")


def _pair(shape, log_target, dtype=torch.float32):
    """Fresh log-probabilities (input) and probabilities or log-probabilities (target) over the last dim."""
    logits = torch.randn(shape, device=DEVICE) * 2
    x = torch.log_softmax(logits, -1) if logits.dim() else -logits.abs()
    t_logits = torch.randn(shape, device=DEVICE)
    t = torch.log_softmax(t_logits, -1) if t_logits.dim() else -t_logits.abs()
    return x.to(dtype), (t if log_target else t.exp()).to(dtype)


def _both(reduction, log_target):
    kw = dict(reduction=reduction, log_target=log_target)
    return (lambda x, t: F.kl_div(x, t, **kw)), (lambda x, t: TF.kl_div(x, t, **kw))


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kl_div(backend, dtype, reduction, log_target):
    x, t = _pair((7, 33), log_target, dtype)
    compare_with_reference(*_both(reduction, log_target), {"x": x, "t": t}, dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(), (5,), (3, 4, 5), (2, 3, 4, 5), (3, 2731)], ids=str)  # 8193: 5 programs
def test_kl_div_shapes(backend, shape, reduction):
    """0-d to 4-D and odd sizes (batchmean divides by input.size(0); a 0-d input: the sum, as torch)."""
    for log_target in (False, True):
        x, t = _pair(shape, log_target)
        compare_with_reference(*_both(reduction, log_target), {"x": x, "t": t}, torch.float32)


@pytest.mark.parametrize("reduction", ["none", "batchmean", "mean"])
def test_kl_div_broadcast_and_strided(backend, reduction):
    """torch broadcasts input against target (either way): the broadcast operand's gradient is summed back."""
    x, t = _pair((3, 5), False)
    for a, b in ((x, t[0]), (x[0], t)):
        compare_with_reference(*_both(reduction, False), {"x": a, "t": b}, torch.float32)
    xs, ts = _pair((6, 40), True)
    compare_with_reference(
        lambda x, t: F.kl_div(x[:, ::3], t.t()[::3].t(), reduction=reduction, log_target=True),
        lambda x, t: TF.kl_div(x[:, ::3], t.t()[::3].t(), reduction=reduction, log_target=True),
        {"x": xs, "t": ts},
        torch.float32,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kl_div_zero_target(backend, dtype):
    """A probability of exactly 0 contributes 0 (not NaN) to the loss; its own gradient is NaN as torch's (xlogy's
    derivative), every other gradient matches; t = 0 against x = -inf is NaN in both."""
    x, t = _pair((4, 50), False, dtype)
    t[:, ::3] = 0
    for reduction in ("none", "sum"):
        xo, to = x.clone().requires_grad_(), t.clone().requires_grad_()
        xr, tr = x.double().requires_grad_(), t.double().requires_grad_()
        out, ref = F.kl_div(xo, to, reduction=reduction), TF.kl_div(xr, tr, reduction=reduction)
        assert not out.isnan().any()
        torch.testing.assert_close(out.double(), ref, atol=1e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2)
        g = torch.ones_like(out)
        gx, gt = torch.autograd.grad(out, (xo, to), g)
        gxr, gtr = torch.autograd.grad(ref, (xr, tr), g.double())
        torch.testing.assert_close(gx.double(), gxr)
        assert torch.equal(gt.isnan(), gtr.isnan()) and gt[:, ::3].isnan().all()
        keep = ~gtr.isnan()
        torch.testing.assert_close(gt.double()[keep], gtr[keep], atol=2e-2, rtol=1e-2)
    x2 = x.clone()
    x2[0, 0] = float("-inf")
    torch.testing.assert_close(
        F.kl_div(x2, t, reduction="none").double(), TF.kl_div(x2.double(), t.double(), reduction="none"),
        equal_nan=True, atol=1e-2, rtol=1e-2,
    )  # fmt: skip


def test_kl_div_one_side_grad_and_no_grad(backend):
    x, t = _pair((5, 30), False)
    for x_req, t_req in ((True, False), (False, True)):
        xl, tl = x.clone().requires_grad_(x_req), t.clone().requires_grad_(t_req)
        (g,) = torch.autograd.grad(F.kl_div(xl, tl, reduction="batchmean") * 3, xl if x_req else tl)
        xr, tr = x.double().requires_grad_(x_req), t.double().requires_grad_(t_req)
        (gr,) = torch.autograd.grad(TF.kl_div(xr, tr, reduction="batchmean") * 3, xr if x_req else tr)
        torch.testing.assert_close(g.double(), gr, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(F.kl_div(x, t, reduction="sum"), TF.kl_div(x, t, reduction="sum"))


def test_kl_div_mean_warns_and_legacy_arguments(backend):
    x, t = _pair((4, 9), False)
    with pytest.warns(UserWarning, match="'batchmean' divides only by the batch size"):
        F.kl_div(x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        F.kl_div(x, t, reduction="batchmean")
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        torch.testing.assert_close(F.kl_div(x, t, size_average=False), TF.kl_div(x, t, reduction="sum"))


def test_kl_div_other_dtypes_run_torch():
    x, t = _pair((4, 9), False, torch.float64)
    torch.testing.assert_close(F.kl_div(x, t, reduction="sum"), TF.kl_div(x, t, reduction="sum"))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: F.kl_div(torch.ones(3, 4, dtype=torch.int32), torch.rand(3, 4)), TypeError, "input must be"),
        (lambda: F.kl_div(torch.randn(3, 4), torch.rand(3, 4).half()), TypeError, "target must have input's dtype"),
        (lambda: F.kl_div(torch.randn(3, 4), [0.5] * 4), TypeError, "target must be a Tensor"),
        (lambda: F.kl_div(torch.randn(3, 4), torch.rand(3, 5)), ValueError, "must be broadcastable"),
        (lambda: F.kl_div(torch.randn(3, 4), torch.rand(3, 4, device="meta")), ValueError, "target is on meta"),
        (lambda: F.kl_div(torch.randn(3, 4), torch.rand(3, 4), reduction="avg"), ValueError, "reduction must be"),
    ],
)
def test_kl_div_bad_input(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_kl_div_opcheck(backend):
    op = getattr(torch.ops.fastlm, f"kl_div_fwd_{backend}")
    x, t = _pair((6, 30), False)
    x.requires_grad_(), t.requires_grad_()
    for log_target in (False, True):
        for reduction, divisor in ((0, 1), (1, 6)):
            torch.library.opcheck(op, (x, t, log_target, reduction, divisor, True, True), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(op, (x.detach(), t.detach(), False, 1, 1, False, False), test_utils=OPCHECK_TESTS)


def test_kl_div_compile_fullgraph(backend):
    def f(x, t):
        return F.kl_div(x, t, reduction="batchmean") + F.kl_div(x, t, reduction="none", log_target=False).sum()

    x, t = _pair((8, 50), False)
    x.requires_grad_(), t.requires_grad_()
    got = torch.compile(f, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")(x, t)
    want = f(x, t)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (x, t)), torch.autograd.grad(want, (x, t)), strict=True):
        torch.testing.assert_close(a, b)


def test_kl_div_dynamic_shapes_compile_once(backend):
    """The reduction's divisor reaches the op as an int (a symbolic size under dynamic=True), not as a float
    1 / batch that Dynamo would guard on: three batch sizes, one compiled graph."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    f = torch.compile(lambda x, t: F.kl_div(x, t, reduction="batchmean"), backend=counter, dynamic=True)
    for n in (4, 6, 9):
        x, t = _pair((n, 20), False)
        torch.testing.assert_close(f(x, t), TF.kl_div(x, t, reduction="batchmean"))
    assert counter.frame_count == 1


def test_kl_div_autocast_gives_fp32_loss(backend):
    """Under autocast the loss is float32, as torch's kl_div (on autocast's fp32 list): a GradScaler's scaled fp16
    loss must not overflow."""
    x, t = _pair((4, 30), False, torch.bfloat16)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got = F.kl_div(x, t, reduction="batchmean")
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got, TF.kl_div(x.double(), t.double(), reduction="batchmean").float(), atol=2e-2, rtol=2e-2
    )


@pytest.mark.skipif(ON_GPU, reason="the cpu kernels are tested on CPU tensors")
def test_kl_div_cpu_deterministic_across_threads():
    """Fixed 4096-element blocks, summed in order: the same bits whatever the thread count."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 1000, generator=g).log_softmax(-1)
    t = torch.rand(300, 1000, generator=g)
    a, b = at_thread_counts(lambda: torch.ops.fastlm.kl_div_fwd_cpu(x, t, False, 1, 300, True, True), (2, 1))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    with fastlm.backend("cpu"):
        assert torch.equal(F.kl_div(x, t, reduction="sum"), F.kl_div(x, t, reduction="sum"))
