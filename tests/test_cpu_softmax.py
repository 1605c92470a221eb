"""The CPU C++ softmax kernels (csrc/cpu/softmax.cpp) at sizes the Triton interpreter cannot afford: wide rows, many
rows, a non-last dim, attention-sized masked softmax; all three dtypes, output and gradient against the float64
reference; determinism; bad input on the raw ops."""

import pytest
import torch
import torch.nn.functional as TF
from helpers import ON_GPU, at_thread_counts, compare_with_reference

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


@pytest.mark.parametrize("N", [1, 2, 3, 7, 256, 257, 4097])
@pytest.mark.parametrize("rows", [1, 2, 3, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_cpu_softmax_few_rows_odd_widths(log, dtype, rows, N):
    """Row counts below the parallel grain and widths with an odd last element (16-bit rows go as 32-bit pairs plus
    the odd one): output and gradient against the float64 reference."""
    x = torch.randn(rows, N, dtype=dtype) * 3
    fn, ref = (F.log_softmax, TF.log_softmax) if log else (F.softmax, TF.softmax)
    compare_with_reference(lambda x: fn(x, -1), lambda x: ref(x, -1), {"x": x}, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_cpu_softmax_rows_not_4_byte_aligned(log, dtype):
    """16-bit rows that start at odd element offsets (odd row stride, odd storage offset): the pair loads of 32-bit
    words are unaligned; forward and raw backward against float64."""
    x = (torch.randn(9, 1001) * 3).to(dtype)[:, 1:]  # row r starts at element 1001 r + 1
    y = ops.softmax_fwd_cpu(x, 1, log)
    y64 = TF.log_softmax(x.double(), -1) if log else TF.softmax(x.double(), -1)
    tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(y.double(), y64, atol=tol, rtol=tol)
    yv = torch.empty(9, 1001, dtype=dtype)[:, 1:]
    yv.copy_(y)
    dy = (torch.randn(9, 1003)).to(dtype)[:, 3:]
    dx = ops.softmax_bwd_cpu(dy, yv, 1, log, 0.5)
    p64, d64 = yv.double(), dy.double()
    want = 0.5 * (d64 - p64.exp() * d64.sum(-1, True) if log else p64 * (d64 - (p64 * d64).sum(-1, True)))
    torch.testing.assert_close(dx.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_softmax_nan_and_extremes(dtype):
    """A NaN at an even or an odd position makes its row NaN (torch semantics) in the forward and in the backward
    (a NaN in dy, or a NaN scale); the largest finite inputs and -inf keep exact results; nothing rounds to inf."""
    big = torch.finfo(dtype).max
    x = torch.randn(4, 9).to(dtype)
    x[0, 2], x[1, 5] = float("nan"), float("nan")
    x[2, :] = big
    x[2, 4] = float("-inf")
    x[3, :] = -big
    for log in (False, True):
        y = ops.softmax_fwd_cpu(x, 1, log)
        want = (TF.log_softmax if log else TF.softmax)(x.double(), -1)
        assert torch.isnan(y[:2]).all()
        torch.testing.assert_close(y[2:].double(), want[2:], atol=1e-2, rtol=1e-2)
        if not log:
            assert y[2, 4] == 0 and torch.isfinite(y[2:]).all()
    p = TF.softmax(torch.randn(3, 10), -1).to(dtype)
    dy = torch.randn(3, 10).to(dtype)
    dy[0, 4], dy[1, 7] = float("nan"), float("nan")
    for log in (False, True):
        dx = ops.softmax_bwd_cpu(dy, p.log() if log else p, 1, log, 1.0)
        assert torch.isnan(dx[:2]).all() and torch.isfinite(dx[2]).all()
        assert torch.isnan(ops.softmax_bwd_cpu(dy[2:], p[2:], 1, log, float("nan"))).all()


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
# Determinism: bitwise equal across calls and thread counts (every row is computed by one thread, fixed order).


def _all_outputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4096, generator=g)
    x3 = torch.randn(6, 500, 70, generator=g)
    s = torch.randn(2, 12, 128, 128, generator=g)
    m = torch.rand(2, 1, 128, 128, generator=g) > 0.2
    dy = torch.randn(300, 4096, generator=g)
    y = ops.softmax_fwd_cpu(x, 1, False)
    return [
        y,
        ops.softmax_fwd_cpu(x3, 1, True),
        ops.masked_softmax_fwd_cpu(s, m.expand(2, 12, 128, 128), 0.125, True),
        ops.softmax_bwd_cpu(dy, y, 1, False, 1.0),
    ]


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
    ],
)
def test_cpu_bad_input_raw_ops(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()
