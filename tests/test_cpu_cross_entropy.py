"""The CPU C++ cross-entropy kernel (csrc/cpu/cross_entropy.cpp) at LM vocabularies: every option, the spatial
(N, C, d) form, all three dtypes against the float64 reference; the backward's unit-gradient shortcut; determinism;
bad input on the raw op. The linear cross-entropy's chunked cpu path (its row kernel cross_entropy_rows_cpu, which
writes the gradient over the chunk's logits): chunk boundaries, every option and dtype, its memory bound."""

import pytest
import torch
import torch.nn.functional as TF
from helpers import ON_GPU, at_thread_counts, compare_with_reference, largest_cpu_allocation

import fastlm
import fastlm.functional as F
from fastlm import reference as R
from fastlm.ops import linear_cross_entropy as lce

pytestmark = pytest.mark.skipif(ON_GPU, reason="the cpu kernels are tested on CPU tensors (CPU-only CI)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ops = torch.ops.fastlm


@pytest.fixture(autouse=True)
def _cpu():
    with fastlm.backend("cpu"):
        yield


# ---------------------------------------------------------------------------------------------------------------
# Cross-entropy


def _targets(n, C, ignore_frac=0.2, ignore_index=-100):
    t = torch.randint(0, C, (n,))
    t = t.masked_fill(torch.rand(n) < ignore_frac, ignore_index)
    t[0] = C - 1
    return t


@pytest.mark.parametrize("C,N", [(32768, 200), (50257, 64)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_cross_entropy_vocab(dtype, C, N):
    x = torch.randn(N, C, dtype=dtype) * 3
    t = _targets(N, C)
    compare_with_reference(lambda x: F.cross_entropy(x, t), lambda x: TF.cross_entropy(x, t), {"x": x}, dtype)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_cross_entropy_options(dtype, reduction, weighted, smoothing):
    N, C = 300, 32768
    x = torch.randn(N, C, dtype=dtype) * 2
    t = _targets(N, C, ignore_index=5)
    w = torch.rand(C) + 0.5 if weighted else None
    kw = dict(reduction=reduction, label_smoothing=smoothing, ignore_index=5)
    compare_with_reference(
        lambda x: F.cross_entropy(x, t, w, **kw),
        lambda x: TF.cross_entropy(x, t, w.to(x.dtype) if w is not None else None, **kw),
        {"x": x},
        dtype,
    )


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_cross_entropy_spatial(dtype, smoothing):
    """(N, C, D) logits, the strided layout: D = 300 (a ragged last lane block), weights and ignore_index."""
    x = torch.randn(3, 1000, 300, dtype=dtype) * 2
    t = torch.randint(0, 1000, (3, 300)).masked_fill(torch.rand(3, 300) < 0.2, -100)
    w = torch.rand(1000) + 0.5
    kw = dict(label_smoothing=smoothing)
    compare_with_reference(
        lambda x: F.cross_entropy(x, t, w, **kw), lambda x: TF.cross_entropy(x, t, w.to(x.dtype), **kw), {"x": x}, dtype
    )


def test_cpu_cross_entropy_leading_chunk_all_minus_inf():
    """The statistics run online over 2048-logit chunks: a first chunk of -inf only (e.g. masked-out vocabulary)
    must not turn exp(-inf - max) into NaN (it did: exp(-inf + inf))."""
    x = torch.randn(2, 4096)
    x[:, :2048] = float("-inf")
    t = torch.tensor([3000, 4000])
    xr = x.clone().requires_grad_()
    ref = TF.cross_entropy(xr, t)
    ref.backward()
    xo = x.clone().requires_grad_()
    out = F.cross_entropy(xo, t)
    out.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(xo.grad, xr.grad)


def test_cpu_cross_entropy_out_of_range_target():
    x = torch.randn(4, 10, requires_grad=True)
    for bad in (10, -1):
        t = torch.tensor([1, bad, 2, -100])
        with pytest.raises(ValueError, match="outside"):
            F.cross_entropy(x, t)
        with pytest.raises(RuntimeError, match=r"target\[1\] = .* out of range"):
            ops.cross_entropy_fwd_cpu(x.detach(), t, None, -100, 0.0, 0, True)
        # Under torch.compile the Python check is skipped (data-dependent): the kernel still raises.
        f = torch.compile(lambda x, t: F.cross_entropy(x, t), fullgraph=True, backend="aot_eager")
        with pytest.raises(Exception, match="out of range"):
            f(x, t)


@pytest.mark.parametrize("loss", ["cross_entropy", "linear_cross_entropy", "kl_div", "distillation_loss"])
def test_cpu_saved_gradient_is_never_shared(loss):
    """The first backward of a mean loss takes the forward's gradient without a copy; a second one through the
    retained graph gets a copy: two autograd.grad calls never return one storage, and a gradient changed in place in
    between (a clipped .grad) raises autograd's in-place error rather than giving a silently wrong result."""
    x = torch.randn(8, 50).log_softmax(-1).requires_grad_()  # a leaf (log-probabilities for kl_div)
    t = _targets(8, 50)
    w = torch.randn(50, 50, requires_grad=True)
    other = torch.randn(8, 50).softmax(-1)
    fn = {
        "cross_entropy": lambda: F.cross_entropy(x, t),
        "linear_cross_entropy": lambda: F.linear_cross_entropy(x, w, t, chunk_size=3),
        "kl_div": lambda: F.kl_div(x, other, reduction="batchmean"),
        "distillation_loss": lambda: F.distillation_loss(x, other.log(), kind="jsd"),
    }[loss]
    out = fn()
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    (g2,) = torch.autograd.grad(out, x, retain_graph=True)
    assert g1.data_ptr() != g2.data_ptr(), "two backward calls returned one storage"
    torch.testing.assert_close(g1, g2)
    with torch.no_grad():
        g1.mul_(0.5)  # what clipping a .grad does to the tensor the first backward took
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, x)


def test_cpu_cross_entropy_backward_unit_shortcut():
    """An incoming gradient of 1 hands the forward's gradient on without the multiply: x.grad must still be right,
    a retained graph must give it again (not a mutated or aliased tensor), other incoming gradients still scale."""
    x = torch.randn(8, 50, requires_grad=True)
    t = _targets(8, 50)
    x_ref = x.detach().clone().requires_grad_()
    TF.cross_entropy(x_ref, t, label_smoothing=0.1).backward()
    loss = F.cross_entropy(x, t, label_smoothing=0.1)
    loss.backward(retain_graph=True)
    g1 = x.grad.clone()
    torch.testing.assert_close(g1, x_ref.grad)
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * g1)
    (g3,) = torch.autograd.grad(F.cross_entropy(x, t, label_smoothing=0.1) * 3, x)
    torch.testing.assert_close(g3, 3 * g1)


# ---------------------------------------------------------------------------------------------------------------
# Class-probability (soft) targets: an LM vocabulary (many 2048-logit chunks) and the strided (N, C, D) layout


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_soft_cross_entropy_vocab(dtype):
    x = (torch.randn(64, 32000) * 3).to(dtype)
    t = torch.softmax(torch.randn(64, 32000) * 2, 1).to(dtype)
    w = torch.rand(32000) + 0.5
    compare_with_reference(
        lambda x, t: F.cross_entropy(x, t, w, label_smoothing=0.1),
        lambda x, t: TF.cross_entropy(x, t, w.to(x.dtype), label_smoothing=0.1),
        {"x": x, "t": t},
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_soft_cross_entropy_spatial(dtype):
    """(N, C, D) with D = 300: a ragged last lane block; unnormalised targets, both gradients, reduction none."""
    x = (torch.randn(2, 500, 300) * 2).to(dtype)
    t = torch.rand(2, 500, 300).to(dtype)
    compare_with_reference(
        lambda x, t: F.cross_entropy(x, t, reduction="none", label_smoothing=0.05),
        lambda x, t: TF.cross_entropy(x, t, reduction="none", label_smoothing=0.05),
        {"x": x, "t": t},
        dtype,
    )


def test_cpu_soft_deterministic_across_threads():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(300, 4096, generator=g), torch.rand(300, 4096, generator=g)
    a, b = at_thread_counts(lambda: ops.soft_cross_entropy_fwd_cpu(x, t, None, 0.1, 1, True, True), (2, 1))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: ops.soft_cross_entropy_fwd_cpu(_x, _x.half(), None, 0.0, 1, True, False),
            "target must have input's dtype",
        ),
        (lambda: ops.soft_cross_entropy_fwd_cpu(_x, _x[:3], None, 0.0, 1, True, False), "must have input's shape"),
        (lambda: ops.soft_cross_entropy_fwd_cpu(_x, _x.t().contiguous().t(), None, 0.0, 1, True, False), "unit stride"),
        (lambda: ops.soft_cross_entropy_fwd_cpu(_x, _x, torch.ones(9), 0.0, 1, True, False), "weight must be 1-D"),
        (lambda: ops.soft_cross_entropy_fwd_cpu(_x, _x, None, 0.0, 3, True, False), "reduction must be"),
    ],
)
def test_cpu_soft_bad_input_raw_op(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------------
# Determinism: bitwise equal across calls and thread counts (every row is computed by one thread, fixed order).


def _all_outputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4096, generator=g)
    t = torch.randint(0, 4096, (300,), generator=g)
    loss, grad = ops.cross_entropy_fwd_cpu(x, t, None, -100, 0.1, 1, True)
    return [loss, grad, ops.cross_entropy_fwd_cpu(x, t, None, -100, 0.0, 2, False)[0]]


def test_cpu_deterministic_across_calls_and_threads():
    threads = torch.get_num_threads()
    first, again, single = at_thread_counts(_all_outputs, (threads, threads, 1))
    for a, b, c in zip(first, again, single, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------------------
# Bad input on the raw ops: a RuntimeError naming the argument, never a crash.

_x = torch.randn(4, 10)
_t = torch.tensor([1, 2, 3, 4])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.cross_entropy_fwd_cpu(_x.long(), _t, None, -100, 0.0, 1, True), "input must be float32"),
        (lambda: ops.cross_entropy_fwd_cpu(_x, _t.int(), None, -100, 0.0, 1, True), "target must be int64, got int32"),
        (lambda: ops.cross_entropy_fwd_cpu(_x, _t[:3], None, -100, 0.0, 1, True), "target must be 1-D of size"),
        (lambda: ops.cross_entropy_fwd_cpu(_x, _t, torch.ones(9), -100, 0.0, 1, True), "weight must be 1-D of size"),
        (
            lambda: ops.cross_entropy_fwd_cpu(_x, _t, torch.ones(10).double(), -100, 0.0, 1, True),
            "weight must be float32",
        ),
        (lambda: ops.cross_entropy_fwd_cpu(_x, _t, None, -100, 0.0, 3, True), "reduction must be"),
        (lambda: ops.cross_entropy_fwd_cpu(_x.t(), _t[:2].repeat(5), None, -100, 0.0, 1, True), "unit stride"),
        (lambda: ops.cross_entropy_fwd_cpu(torch.randn(4), _t, None, -100, 0.0, 1, True), "input must be \\(N, C\\)"),
        (
            lambda: ops.cross_entropy_fwd_cpu(_x, torch.tensor([1, 2, 10, 4]), None, -100, 0.0, 1, True),
            r"target\[2\] = 10 is out of range",
        ),
    ],
)
def test_cpu_bad_input_raw_ops(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------------
# Linear cross-entropy: the chunked cpu path


@pytest.mark.parametrize("options", ["plain", "bias+weights+smoothing"])
@pytest.mark.parametrize("chunk", [1, 7, 25, None])  # one token per chunk, a ragged last chunk, one chunk, the rule
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_linear_cross_entropy_chunks(dtype, reduction, chunk, options):
    """The loss and every gradient (input, linear_weight, linear_bias) against the float64 reference, a custom
    ignore_index among the targets; 25 tokens in (5, 5)."""
    V, H = 300, 32
    x = torch.randn(5, 5, H).to(dtype)
    w = (torch.randn(V, H) * 0.2).to(dtype)
    t = _targets(25, V, ignore_index=7).view(5, 5)
    kw = dict(reduction=reduction, ignore_index=7)
    inputs = {"x": x, "w": w}
    if options != "plain":
        kw |= dict(weight=torch.rand(V) + 0.5, label_smoothing=0.1)
        inputs["b"] = torch.randn(V).to(dtype)
    compare_with_reference(
        lambda x, w, b=None: F.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=chunk, **kw),
        lambda x, w, b=None: R.linear_cross_entropy(x, w, t, linear_bias=b, **kw),
        inputs,
        dtype,
    )


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cpu_linear_cross_entropy_never_allocates_the_logits(reduction):
    """Forward + backward allocate at most one (chunk, V) buffer: never the (T, V) logits (the unfused path
    allocates several)."""
    T, V, H = 300, 2000, 16
    x = torch.randn(T, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    t = torch.randint(0, V, (T,))
    chunk = lce.chunk_size_for(T, V, H, "cpu")

    def step():
        loss = F.linear_cross_entropy(x, w, t, reduction=reduction)
        torch.autograd.grad(loss, (x, w), torch.ones_like(loss))

    largest = largest_cpu_allocation(step)
    assert largest <= max(chunk * V * 4, V * H * 4), (largest, chunk)
    assert largest < T * V * 4
    with fastlm.backend("torch"):
        assert largest_cpu_allocation(step) >= T * V * 4  # the measurement sees the unfused path's logits


@pytest.mark.parametrize("T,V,H", [(256, 8192, 256), (2048, 32000, 512), (100000, 32000, 512), (100, 128256, 4096)])
def test_cpu_linear_cross_entropy_chunk_rule(T, V, H):
    """The cpu rule (chunk_size_for's table): equal chunks, at least three (a chunk is at most a third of the full
    logits) once there are enough tokens, at most CPU_CHUNK_BYTES of fp32 logits unless CPU_MIN_ROWS rows need
    more."""
    rows = lce.chunk_size_for(T, V, H, "cpu")
    chunks = -(-T // rows)
    assert chunks >= 3 or rows == min(T, lce.CPU_MIN_ROWS)
    assert rows * V * 4 <= lce.CPU_CHUNK_BYTES or rows == lce.CPU_MIN_ROWS
    assert T - (chunks - 1) * rows > rows - chunks  # no small ragged last chunk


def test_cpu_linear_cross_entropy_backward_unit_shortcut():
    """loss.backward() hands the saved gradients on without a copy: gradients accumulated over two backward calls of
    one retained graph must double (no aliasing of the saved tensors), and a scaled loss must scale them."""
    x = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(100, 16, requires_grad=True)
    t = _targets(40, 100)
    loss = F.linear_cross_entropy(x, w, t, chunk_size=16)
    loss.backward(retain_graph=True)
    gx, gw = x.grad.clone(), w.grad.clone()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    R.linear_cross_entropy(x64, w64, t).backward()
    torch.testing.assert_close(gx.double(), x64.grad)
    torch.testing.assert_close(gw.double(), w64.grad)
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * gx)
    torch.testing.assert_close(w.grad, 2 * gw)
    g3 = torch.autograd.grad(F.linear_cross_entropy(x, w, t, chunk_size=16) * 3, (x, w))
    torch.testing.assert_close(g3[0], 3 * gx)
    torch.testing.assert_close(g3[1], 3 * gw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_cross_entropy_rows_op(dtype):
    """The row kernel: the gradient written over the logits equals the one written into a separate buffer and
    cross_entropy_fwd_cpu's, times the batch scale or per-row scales; the losses are its per-row losses."""
    x = (torch.randn(37, 3000) * 2).to(dtype)
    t = _targets(37, 3000)
    w = torch.rand(3000) + 0.5
    losses, grad = ops.cross_entropy_fwd_cpu(x, t, w, -100, 0.1, 0, True)
    for scale in (None, torch.tensor([0.25]), torch.rand(37)):
        want = grad if scale is None else (grad.float() * scale.view(-1, 1) if scale.numel() > 1 else grad * scale)
        sep = torch.empty_like(x)
        got = ops.cross_entropy_rows_cpu(x, t, w, scale, -100, 0.1, sep)
        torch.testing.assert_close(got, losses, rtol=0, atol=0)
        torch.testing.assert_close(sep, want.to(dtype))
        inplace = x.clone()
        ops.cross_entropy_rows_cpu(inplace, t, w, scale, -100, 0.1, inplace)
        assert torch.equal(inplace, sep)
    assert torch.equal(ops.cross_entropy_rows_cpu(x, t, w, None, -100, 0.1, None), losses)
    torch.library.opcheck(ops.cross_entropy_rows_cpu, (x, t, w, torch.rand(37), -100, 0.1, torch.empty_like(x)))


_g = torch.empty(4, 10)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.cross_entropy_rows_cpu(_x, _t, None, torch.ones(3), -100, 0.0, _g), "grad_scale must be"),
        (lambda: ops.cross_entropy_rows_cpu(_x, _t, None, torch.ones(1).double(), -100, 0.0, _g), "grad_scale must"),
        (lambda: ops.cross_entropy_rows_cpu(_x, _t, None, None, -100, 0.0, _g.half()), "grad must have input's"),
        (lambda: ops.cross_entropy_rows_cpu(_x, _t, None, None, -100, 0.0, _g[:3]), "grad must have input's"),
        (lambda: ops.cross_entropy_rows_cpu(_x, _t, None, None, -100, 0.0, _g.t().contiguous().t()), "unit stride"),
        (lambda: ops.cross_entropy_rows_cpu(_x[:, None], _t, None, None, -100, 0.0, None), r"input must be \(N, C\)"),
        (lambda: ops.cross_entropy_rows_cpu(_x, _t + 10, None, None, -100, 0.0, None), "out of range"),
    ],
)
def test_cpu_cross_entropy_rows_bad_input(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()
