"""Softmax, log-softmax and the scaled-masked softmax on the fused backends against float64 references."""

import pytest
import torch
import torch.nn.functional as TF
from helpers import DEVICE, ON_GPU, OPCHECK_TESTS, compare_with_reference

import fastlm
import fastlm.functional as F
from fastlm import nn as fnn
from fastlm import reference
from fastlm.dispatch import BackendUnavailableError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 1, primes, non-powers of two, both sides of the single-pass limit (16384) and the split path up to 262144
WIDTHS = [1, 7, 128, 1000, 4096, 16384, 16385, 40000, 262144]


def _rows(n: int) -> int:
    return max(2, min(24, (400_000 if ON_GPU else 100_000) // n))


@pytest.mark.parametrize("N", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_widths_dtypes(backend, log, dtype, N):
    x = torch.randn(_rows(N), N, device=DEVICE, dtype=dtype) * 3
    fn, ref = (F.log_softmax, TF.log_softmax) if log else (F.softmax, TF.softmax)
    compare_with_reference(lambda x: fn(x, -1), lambda x: ref(x, -1), {"x": x}, dtype)


@pytest.mark.parametrize("dim", [0, 1, 2, 3, -1, -2])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_any_dim(backend, log, dim):
    x = torch.randn(4, 7, 5, 3, device=DEVICE)
    fn, ref = (F.log_softmax, TF.log_softmax) if log else (F.softmax, TF.softmax)
    compare_with_reference(lambda x: fn(x, dim), lambda x: ref(x, dim), {"x": x}, torch.float32)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_strided_inputs(backend, log):
    fn, ref = (F.log_softmax, TF.log_softmax) if log else (F.softmax, TF.softmax)
    base = torch.randn(6, 700, device=DEVICE)
    compare_with_reference(lambda b: fn(b[:, :300], -1), lambda b: ref(b[:, :300], -1), {"b": base}, torch.float32)
    compare_with_reference(lambda b: fn(b.t(), 0), lambda b: ref(b.t(), 0), {"b": base}, torch.float32)
    compare_with_reference(lambda b: fn(b[:, ::3], 1), lambda b: ref(b[:, ::3], 1), {"b": base}, torch.float32)


def test_dtype_argument(backend):
    x = torch.randn(3, 50, device=DEVICE, dtype=torch.float16)
    y = F.softmax(x, -1, dtype=torch.float32)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, TF.softmax(x, -1, dtype=torch.float32))


@pytest.mark.parametrize("N", [100, 30000])
def test_properties(backend, N):
    """Rows sum to 1, shift invariance, very large logits stay finite."""
    x = torch.randn(5, N, device=DEVICE)
    y = F.softmax(x, -1)
    torch.testing.assert_close(y.sum(-1), torch.ones(5, device=DEVICE), atol=1e-5, rtol=0)
    torch.testing.assert_close(F.softmax(x + 1000.0, -1), y, atol=1e-6, rtol=1e-4)
    big = x * 1e4
    torch.testing.assert_close(F.softmax(big, -1), TF.softmax(big, -1), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(F.log_softmax(big, -1), TF.log_softmax(big, -1), atol=1e-2, rtol=1e-5)


@pytest.mark.parametrize("N", [64, 30000])
def test_infinities_match_torch(backend, N):
    x = torch.randn(4, N, device=DEVICE)
    x[0, 3] = float("-inf")  # a zero probability
    x[1, :] = float("-inf")  # a row of -inf: NaN in torch, NaN here
    x[2, 5] = float("inf")  # +inf: NaN in torch (inf - inf)
    x[3, 7] = float("inf")
    x[3, 8] = float("-inf")
    for fn, ref in ((F.softmax, TF.softmax), (F.log_softmax, TF.log_softmax)):
        torch.testing.assert_close(fn(x, -1), ref(x, -1), equal_nan=True)


def test_zero_size(backend):
    for shape in [(0, 5), (3, 0, 5)]:
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        y = F.softmax(x, -1)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape


# ---------------------------------------------------------------------------------------------------------------
# Scaled-masked softmax

MASK_SHAPES = {"full": (2, 3, 9, 21), "heads": (2, 1, 9, 21), "2d": (9, 21), "keys": (2, 1, 1, 21)}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "mask_kind,mask_shape", [("none", "full")] + [(k, s) for k in ("bool", "float") for s in MASK_SHAPES]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scaled_masked(backend, dtype, mask_shape, mask_kind, causal):
    x = torch.randn(2, 3, 9, 21, device=DEVICE, dtype=dtype)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(MASK_SHAPES[mask_shape], device=DEVICE) > 0.3
    elif mask_kind == "float":
        mask = torch.randn(MASK_SHAPES[mask_shape], device=DEVICE) * 2
    compare_with_reference(
        lambda x: F.scaled_masked_softmax(x, mask, 0.37, causal),
        lambda x: reference.scaled_masked_softmax(x, mask, 0.37, causal),
        {"x": x},
        dtype,
    )


@pytest.mark.parametrize("Sk", [1, 300, 20000])
def test_scaled_masked_wide_and_3d(backend, Sk):
    """Sk beyond the single-pass limit (no length limit), a 3-D (B*H, Sq, Sk) input, Sq != Sk."""
    x = torch.randn(2, 3, Sk, device=DEVICE)
    mask = torch.rand(2, 1, Sk, device=DEVICE) > 0.5
    for causal in (False, True):
        compare_with_reference(
            lambda x, c=causal: F.scaled_masked_softmax(x, mask, 2.0, c),
            lambda x, c=causal: reference.scaled_masked_softmax(x, mask, 2.0, c),
            {"x": x},
            torch.float32,
        )


@pytest.mark.parametrize("Sk", [40, 20000])
def test_fully_masked_rows_give_zeros(backend, Sk):
    x = torch.randn(1, 2, 3, Sk, device=DEVICE, requires_grad=True)
    mask = torch.ones(1, 2, 3, Sk, dtype=torch.bool, device=DEVICE)
    mask[0, 1, 2] = False
    y = F.scaled_masked_softmax(x, mask)
    assert torch.equal(y[0, 1, 2], torch.zeros(Sk, device=DEVICE))
    assert not y.isnan().any()
    y.backward(torch.randn_like(y))
    assert torch.equal(x.grad[0, 1, 2], torch.zeros(Sk, device=DEVICE))
    assert not x.grad.isnan().any()


# ---------------------------------------------------------------------------------------------------------------
# Ops, compile, modules, bad input


def test_opcheck(backend):
    x = torch.randn(5, 33, device=DEVICE, requires_grad=True)
    fwd = getattr(torch.ops.fastlm, f"softmax_fwd_{backend}")
    torch.library.opcheck(fwd, (x, 1, False), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(
        fwd, (torch.randn(4, 6, 5, device=DEVICE, requires_grad=True), 1, True), test_utils=OPCHECK_TESTS
    )
    x4 = torch.randn(2, 3, 4, 33, device=DEVICE, requires_grad=True)
    m4 = (torch.rand(2, 1, 4, 33, device=DEVICE) > 0.5).expand(2, 3, 4, 33)
    masked = getattr(torch.ops.fastlm, f"masked_softmax_fwd_{backend}")
    torch.library.opcheck(masked, (x4, m4, 0.5, True), test_utils=OPCHECK_TESTS)
    y = fwd(x.detach(), 1, False)
    bwd = getattr(torch.ops.fastlm, f"softmax_bwd_{backend}")
    torch.library.opcheck(bwd, (torch.randn_like(y), y, 1, False, 1.0), test_utils=OPCHECK_TESTS)


def test_compile_fullgraph(backend):
    def f(x, mask):
        return F.softmax(x, -1) * 2 + F.scaled_masked_softmax(x, mask, 0.5, True) + F.log_softmax(x, 1)

    x = torch.randn(2, 3, 8, 16, device=DEVICE, requires_grad=True)
    mask = torch.rand(8, 16, device=DEVICE) > 0.2
    got = torch.compile(f, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")(x, mask)
    want = f(x, mask)
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(got.square().sum(), x)
    (g2,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("cls,torch_cls", [(fnn.Softmax, torch.nn.Softmax), (fnn.LogSoftmax, torch.nn.LogSoftmax)])
def test_modules(backend, cls, torch_cls):
    ours, ref = cls(dim=1), torch_cls(dim=1)
    assert isinstance(ours, torch_cls)
    x = torch.randn(3, 10, 4, device=DEVICE)
    torch.testing.assert_close(ours(x), ref(x))


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: F.softmax(torch.ones(3, 4, dtype=torch.int64, device=DEVICE), -1), TypeError, "input must be"),
        (lambda: F.log_softmax(_x(3, 4).to(torch.float8_e5m2), -1), TypeError, "input must be"),
        (lambda: F.softmax(_x(3, 4), 2), IndexError, "range"),
        (lambda: F.scaled_masked_softmax(_x(2, 3, 4), _x(5, 4) > 0), ValueError, "not broadcastable"),
        (
            lambda: F.scaled_masked_softmax(_x(3, 4), torch.ones(3, 4, dtype=torch.int32, device=DEVICE)),
            TypeError,
            "mask must be bool",
        ),
        (lambda: F.scaled_masked_softmax(_x(3, 4), (_x(3, 4) > 0).to("meta")), ValueError, "mask is on meta"),
        (lambda: F.scaled_masked_softmax(_x(3, 4), _x(2, 3, 4)), ValueError, "broadcast input"),
        (lambda: F.scaled_masked_softmax(_x(4)), ValueError, "at least 2 dims"),
        (lambda: F.scaled_masked_softmax(_x(3, 4), _x(3, 4).requires_grad_()), ValueError, "no gradient"),
    ],
)
def test_bad_input(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_cuda_backend_on_cpu_raises():
    with fastlm.backend("cuda"), pytest.raises(BackendUnavailableError):
        F.softmax(torch.randn(2, 3), -1)
