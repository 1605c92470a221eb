"""The CPU C++ softmax and cross-entropy kernels (csrc/cpu/softmax.cpp, csrc/cpu/cross_entropy.cpp) at sizes the
Triton interpreter cannot afford: wide rows, many rows, a non-last dim, attention-sized masked softmax, LM vocabularies;
all three dtypes, output and gradient against the float64 reference; determinism; bad input on the raw ops."""

import pytest
import torch
import torch.nn.functional as TF
from helpers import ON_GPU, compare_with_reference

import fastlm
import fastlm.functional as F
from fastlm import reference

pytestmark = pytest.mark.skipif(ON_GPU, reason="the cpu kernels are tested on CPU tensors (CPU-only CI)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ops = torch.ops.fastlm


@pytest.fixture(autouse=True)
def _cpu():
    with fastlm.backend("cpu"):
        yield


# ---------------------------------------------------------------------------------------------------------------
# Softmax / log-softmax


@pytest.mark.parametrize("N,rows", [(4096, 300), (32768, 100), (50257, 40)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_cpu_softmax_wide(log, dtype, N, rows):
    x = torch.randn(rows, N, dtype=dtype) * 4
    x[0, :7] = float("-inf")  # zero probabilities inside a row
    fn, ref = (F.log_softmax, TF.log_softmax) if log else (F.softmax, TF.softmax)
    if log:  # -inf outputs cannot be compared with a tolerance; keep them out of the log case
        x[0, :7] = -30.0
    compare_with_reference(lambda x: fn(x, -1), lambda x: ref(x, -1), {"x": x}, dtype)


@pytest.mark.parametrize("shape,dim", [((8, 1000, 64), 1), ((3000, 40), 0), ((4, 50, 300, 3), 2), ((2, 257, 1000), 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_cpu_softmax_non_last_dim(log, dtype, shape, dim):
    """The strided layout: inner > 1, lanes blocks with a ragged last block (inner 64, 40, 3, 1000)."""
    x = torch.randn(*shape, dtype=dtype) * 3
    fn, ref = (F.log_softmax, TF.log_softmax) if log else (F.softmax, TF.softmax)
    compare_with_reference(lambda x: fn(x, dim), lambda x: ref(x, dim), {"x": x}, dtype)


def test_cpu_softmax_row_strided_and_scaled_backward():
    """2-D rows with a row stride != width (no copy), and the raw backward with a scale != 1."""
    base = torch.randn(64, 5000)
    x = base[:, 100:4196]
    y = ops.softmax_fwd_cpu(x, 1, False)
    torch.testing.assert_close(y, TF.softmax(x, -1), atol=2e-6, rtol=2e-5)
    dy = torch.randn(64, 5000)[:, :4096]
    for log in (False, True):
        yy = ops.softmax_fwd_cpu(x, 1, log)
        dx = ops.softmax_bwd_cpu(dy, yy, 1, log, 0.37)
        y64 = TF.log_softmax(x.double(), -1) if log else TF.softmax(x.double(), -1)
        d64 = dy.double()
        want = 0.37 * (d64 - y64.exp() * d64.sum(-1, keepdim=True) if log else y64 * (d64 - (y64 * d64).sum(-1, True)))
        torch.testing.assert_close(dx.double(), want, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------------------------
# Scaled-masked softmax

MASKS = {"none": None, "bool_keys": (2, 1, 1, 128), "bool_full": (2, 12, 128, 128), "float_heads": (2, 1, 128, 128)}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_scaled_masked_attention_size(dtype, mask, causal):
    x = torch.randn(2, 12, 128, 128, dtype=dtype) * 3
    m = None
    if mask.startswith("bool"):
        m = torch.rand(MASKS[mask]) > 0.2
    elif mask.startswith("float"):
        m = torch.randn(MASKS[mask]) * 2
        m[..., 60:65] = float("-inf")  # additive -inf too (not on key 0: the reference NaNs the grad of empty rows)
    compare_with_reference(
        lambda x: F.scaled_masked_softmax(x, m, 0.125, causal),
        lambda x: reference.scaled_masked_softmax(x, m, 0.125, causal),
        {"x": x},
        dtype,
    )


@pytest.mark.parametrize("mdtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cpu_masked_other_mask_dtypes_and_strides(mdtype):
    """Additive masks of every float dtype; a mask broadcast along the keys (stride 0 on the last dim) and a
    transposed (non-unit key stride) mask."""
    x = torch.randn(2, 3, 40, 70)
    for m in (
        (torch.randn(2, 3, 40, 70) * 2).to(mdtype),
        (torch.randn(2, 1, 40, 1) * 2).to(mdtype),
        (torch.randn(2, 3, 70, 40) * 2).to(mdtype).transpose(-1, -2),
    ):
        for causal in (False, True):
            got = F.scaled_masked_softmax(x, m, 0.5, causal)
            want = reference.scaled_masked_softmax(x.double(), m, 0.5, causal)
            torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-5)


def test_cpu_masked_rows_fully_masked_by_causal_and_mask():
    """Rows emptied by the mask and by causality (Sq > Sk is fine: query q sees keys <= q) give zeros."""
    x = torch.randn(1, 2, 6, 4)
    m = torch.ones(1, 2, 6, 4, dtype=torch.bool)
    m[0, 0, :, 0] = False  # with causal, query 0 of head 0 sees only key 0: fully masked
    y = ops.masked_softmax_fwd_cpu(x, m, 1.0, True)
    assert torch.equal(y[0, 0, 0], torch.zeros(4))
    torch.testing.assert_close(y.double(), reference.scaled_masked_softmax(x.double(), m, 1.0, True))


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
# Determinism: bitwise equal across calls and thread counts (every row is computed by one thread, fixed order).


def _all_outputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4096, generator=g)
    x3 = torch.randn(6, 500, 70, generator=g)
    s = torch.randn(2, 12, 128, 128, generator=g)
    m = torch.rand(2, 1, 128, 128, generator=g) > 0.2
    t = torch.randint(0, 4096, (300,), generator=g)
    dy = torch.randn(300, 4096, generator=g)
    y = ops.softmax_fwd_cpu(x, 1, False)
    loss, grad = ops.cross_entropy_fwd_cpu(x, t, None, -100, 0.1, 1, True)
    return [
        y,
        ops.softmax_fwd_cpu(x3, 1, True),
        ops.masked_softmax_fwd_cpu(s, m.expand(2, 12, 128, 128), 0.125, True),
        ops.softmax_bwd_cpu(dy, y, 1, False, 1.0),
        loss,
        grad,
        ops.cross_entropy_fwd_cpu(x, t, None, -100, 0.0, 2, False)[0],
    ]


def test_cpu_deterministic_across_calls_and_threads():
    threads = torch.get_num_threads()
    try:
        first = _all_outputs()
        again = _all_outputs()
        torch.set_num_threads(1)
        single = _all_outputs()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, single, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------------------
# Bad input on the raw ops: a RuntimeError naming the argument, never a crash.

_x = torch.randn(4, 10)
_t = torch.tensor([1, 2, 3, 4])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.softmax_fwd_cpu(_x.long(), 1, False), "x must be float32, float16 or bfloat16, got int64"),
        (lambda: ops.softmax_fwd_cpu(_x.double(), 1, False), "x must be .* got float64"),
        (lambda: ops.softmax_fwd_cpu(_x, 2, False), "dim 2 is out of range"),
        (lambda: ops.softmax_fwd_cpu(torch.randn(4, 10, 3)[:, :, 0], 1, False), "unit stride along dim 1"),
        (lambda: ops.softmax_fwd_cpu(torch.randn(4, 10, 3).transpose(0, 1), 0, False), "x must be contiguous"),
        (lambda: ops.softmax_bwd_cpu(_x.half(), _x, 1, False, 1.0), r"dy \(float16\) must have y's dtype"),
        (lambda: ops.softmax_bwd_cpu(torch.randn(4, 11), _x, 1, False, 1.0), "dy must have y's shape"),
        (lambda: ops.masked_softmax_fwd_cpu(_x, None, 1.0, False), "x must be 4-D"),
        (
            lambda: ops.masked_softmax_fwd_cpu(torch.randn(1, 2, 4, 10), torch.ones(1, 2, 4, 9) > 0, 1.0, False),
            "mask must be an expanded view",
        ),
        (
            lambda: ops.masked_softmax_fwd_cpu(torch.randn(1, 2, 4, 10), torch.ones(1, 2, 4, 10).int(), 1.0, False),
            "mask must be bool .* got int32",
        ),
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
