"""Norms: registered ops (opcheck, torch.compile), drop-in modules, and bad input."""

import pytest
import torch
import torch.nn.functional as TF
from helpers import DEVICE, ON_GPU

import fastlm
import fastlm.functional as F
from fastlm import nn as fnn
from fastlm.dispatch import BackendUnavailableError

# On CPU the Triton ops run under the interpreter, where opcheck's aot_dispatch_dynamic test fails for trivially
# correct ops (see DESIGN.md); the GPU run does the full opcheck.
OPCHECK_TESTS = None if ON_GPU else ("test_schema", "test_autograd_registration", "test_faketensor")


def _fwd_args(M, N, rms, residual, weight, bias, dtype=torch.float32):
    x = torch.randn(M, N, device=DEVICE, dtype=dtype)
    r = torch.randn(M, N, device=DEVICE, dtype=dtype) if residual else None
    w = torch.randn(N, device=DEVICE) if weight else None
    b = torch.randn(N, device=DEVICE) if bias and not rms else None
    return x, r, w, b


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck(backend, rms, residual, affine, dtype):
    """Schema, autograd registration and fake impls of both ops, in every input dtype: the fakes' output dtypes must
    be the kernels' (16-bit input without a weight gives an empty float32 dw, not one in the input's dtype)."""
    fwd = getattr(torch.ops.fastlm, f"norm_fwd_{backend}")
    bwd = getattr(torch.ops.fastlm, f"norm_bwd_{backend}")
    x, r, w, b = _fwd_args(6, 300, rms, residual, affine, affine, dtype)
    x.requires_grad_()
    if w is not None:
        w.requires_grad_()
    torch.library.opcheck(fwd, (x, r, w, b, 1e-5, rms), test_utils=OPCHECK_TESTS)
    y, h, mean, rstd = fwd(x.detach(), r, w, b, 1e-5, rms)
    dy = torch.randn_like(y)
    dh = torch.randn_like(y) if residual else None
    xin = h if residual else x.detach()
    w_d = w.detach() if w is not None else None
    torch.library.opcheck(bwd, (dy, xin, w_d, mean, rstd, dh, rms, b is not None), test_utils=OPCHECK_TESTS)


def test_torch_compile_fullgraph(backend):
    """A module of fastlm norms compiles with fullgraph=True (no graph break) and matches eager, grads included."""
    model = torch.nn.Sequential(
        fnn.LayerNorm(64), torch.nn.Linear(64, 64), fnn.RMSNorm(64), torch.nn.GELU(), fnn.LayerNorm(64, bias=False)
    ).to(DEVICE)
    x = torch.randn(4, 7, 64, device=DEVICE, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    y_ref = model(x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, x.grad, atol=1e-4, rtol=1e-4)


def test_torch_compile_inductor_add_norm():
    """The fused residual op under inductor: the custom op stays opaque inside the compiled graph."""
    with fastlm.backend("triton"):

        def f(x, r, w):
            y, h = F.add_rms_norm(x, r, (32,), w)
            return y * 2, h

        x, r, w = torch.randn(3, 32, device=DEVICE), torch.randn(3, 32, device=DEVICE), torch.randn(32, device=DEVICE)
        got = torch.compile(f, fullgraph=True)(x, r, w)
        want = f(x, r, w)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Modules


@pytest.mark.parametrize(
    "cls,torch_cls,kwargs",
    [
        (fnn.LayerNorm, torch.nn.LayerNorm, {}),
        (fnn.LayerNorm, torch.nn.LayerNorm, {"bias": False}),
        (fnn.LayerNorm, torch.nn.LayerNorm, {"elementwise_affine": False}),
        (fnn.RMSNorm, torch.nn.RMSNorm, {}),
        (fnn.RMSNorm, torch.nn.RMSNorm, {"eps": 1e-6}),
    ],
)
def test_module_drop_in(backend, cls, torch_cls, kwargs):
    ref = torch_cls((5, 48), **kwargs).to(DEVICE)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    ours = cls((5, 48), **kwargs).to(DEVICE)
    assert isinstance(ours, torch_cls)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 48, device=DEVICE)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    with fastlm.backend("torch"):  # the torch backend is torch's own op: identical
        assert torch.equal(ours(x), ref(x))


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: F.layer_norm(torch.ones(4, 8, dtype=torch.int32, device=DEVICE), (8,)), TypeError, "input must be"),
        (lambda: F.rms_norm(_x(4, 8).to(torch.float8_e4m3fn), (8,)), TypeError, "input must be"),
        (lambda: F.layer_norm(_x(4, 8), (8,), _x(7)), ValueError, "weight must have shape"),
        (lambda: F.layer_norm(_x(4, 8), (8,), None, _x(8, 1)), ValueError, "bias must have shape"),
        (lambda: F.layer_norm(_x(4, 8), (8,), _x(8).to("meta")), ValueError, "weight is on meta"),
        (lambda: F.rms_norm(_x(4, 8, dtype=torch.float16), (8,), _x(8, dtype=torch.bfloat16)), TypeError, "weight"),
        (lambda: F.layer_norm(_x(2, 65537), (65537,)), ValueError, "65536"),
        (lambda: F.layer_norm(_x(4, 8), (9,)), ValueError, "normalized_shape"),
        (lambda: F.layer_norm(_x(8), (2, 8)), ValueError, "normalized_shape"),
        (lambda: F.add_layer_norm(_x(4, 8), _x(4, 9), (8,)), ValueError, "residual must have"),
        (lambda: F.add_rms_norm(_x(4, 8), _x(4, 8, dtype=torch.float16), (8,)), TypeError, "residual must have"),
        (lambda: F.add_rms_norm(_x(4, 8), _x(4, 8).to("meta"), (8,)), ValueError, "residual is on meta"),
    ],
)
def test_bad_input(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_float64_goes_to_torch_under_auto_but_not_under_a_named_backend(backend):
    x = torch.randn(3, 8, device=DEVICE, dtype=torch.float64)
    with pytest.raises(TypeError, match="input must be"):
        F.layer_norm(x, (8,))
    with fastlm.backend("auto"):
        torch.testing.assert_close(F.layer_norm(x, (8,)), TF.layer_norm(x, (8,)))


def test_cuda_backend_on_cpu_tensor_raises():
    with fastlm.backend("cuda"), pytest.raises(BackendUnavailableError, match="cuda"):
        F.layer_norm(torch.randn(2, 8), (8,))


# ---------------------------------------------------------------------------------------------------------------
# Bad input on the raw CPU ops: the C++ checks name the argument (RuntimeError), never a crash.


def _cpu(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


_FWD = torch.ops.fastlm.norm_fwd_cpu
_BWD = torch.ops.fastlm.norm_bwd_cpu


@pytest.mark.parametrize(
    "args,match",
    [
        ((_cpu(4, 8, dtype=torch.float64), None, None, None), "x must be float32, float16 or bfloat16, got float64"),
        ((torch.ones(4, 8, dtype=torch.int32), None, None, None), "x must be float32, float16 or bfloat16, got int32"),
        ((_cpu(8), None, None, None), "x must be 2-D"),
        ((_cpu(2, 4, 8), None, None, None), "x must be 2-D"),
        ((_cpu(2, 65537), None, None, None), "N = 65537 must be in \\[1, 65536\\]"),
        ((_cpu(4, 0), None, None, None), "N = 0"),
        ((_cpu(4, 16)[:, ::2], None, None, None), "x must have unit stride along the last dimension"),
        ((_cpu(4, 8), _cpu(4, 9), None, None), "residual must have the shape of x"),
        ((_cpu(4, 8), _cpu(4, 8, dtype=torch.float16), None, None), "residual must have x's dtype"),
        ((_cpu(4, 8), _cpu(4, 16)[:, ::2], None, None), "residual must have unit stride"),
        ((_cpu(4, 8), None, _cpu(7), None), "weight must be 1-D of size N = 8"),
        ((_cpu(4, 8), None, _cpu(8, 1), None), "weight must be 1-D"),
        ((_cpu(4, 8), None, _cpu(16)[::2], None), "weight must be contiguous"),
        ((_cpu(4, 8, dtype=torch.float16), None, _cpu(8, dtype=torch.bfloat16), None), "weight must have x's dtype"),
        ((_cpu(4, 8), None, None, _cpu(9)), "bias must be 1-D of size N = 8"),
        ((_cpu(4, 8, dtype=torch.bfloat16), None, _cpu(8), _cpu(8, dtype=torch.bfloat16)), "must have the same dtype"),
    ],
)
def test_cpu_op_bad_input_fwd(args, match):
    with pytest.raises(RuntimeError, match=match):
        _FWD(*args, 1e-5, False)


def _bwd_args(M=4, N=8, **over):
    a = {"dy": _cpu(M, N), "x": _cpu(M, N), "weight": _cpu(N), "mean": _cpu(M), "rstd": _cpu(M), "dh": None}
    a.update(over)
    return a


@pytest.mark.parametrize(
    "over,match",
    [
        ({"dy": _cpu(4, 9)}, "dy must have the shape of x"),
        ({"dy": _cpu(4, 8, dtype=torch.float16)}, "dy must have x's dtype"),
        ({"dy": _cpu(4, 16)[:, ::2]}, "dy must have unit stride"),
        ({"x": _cpu(4, 8, dtype=torch.float64)}, "x must be float32"),
        ({"dh": _cpu(3, 8)}, "dh must have the shape of x"),
        ({"weight": _cpu(9)}, "weight must be 1-D of size N = 8"),
        ({"mean": _cpu(3)}, "mean must be 1-D of size M = 4"),
        ({"rstd": _cpu(4, dtype=torch.float16)}, "rstd must be float32, got float16"),
        ({"rstd": _cpu(8)[::2]}, "rstd must be contiguous"),
    ],
)
def test_cpu_op_bad_input_bwd(over, match):
    a = _bwd_args(**over)
    with pytest.raises(RuntimeError, match=match):
        _BWD(a["dy"], a["x"], a["weight"], a["mean"], a["rstd"], a["dh"], False, True)


def test_cpu_op_zero_rows_and_no_grads_wanted():
    """M == 0 gives empty outputs and zero dW/dB; dW/dB are (0,) when not wanted, db float32 without a weight."""
    x = _cpu(0, 8)
    y, h, mean, rstd = _FWD(x, _cpu(0, 8), _cpu(8), _cpu(8), 1e-5, False)
    assert y.shape == h.shape == (0, 8) and mean.shape == rstd.shape == (0,)
    dx, dw, db = _BWD(x, x, _cpu(8), mean, rstd, x, False, True)
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8)) and torch.equal(db, torch.zeros(8))
    xb = _cpu(5, 8, dtype=torch.bfloat16)
    _, _, mean, rstd = _FWD(xb, None, None, None, 1e-5, False)
    dx, dw, db = _BWD(xb, xb, None, mean, rstd, None, False, True)
    assert dx.dtype == torch.bfloat16 and dw.shape == (0,) and db.dtype == torch.float32 and db.shape == (8,)
    _, _, _, rstd = _FWD(xb, None, None, None, 1e-5, True)
    dx, dw, db = _BWD(xb, xb, None, torch.empty(0), rstd, None, True, True)
    assert dw.shape == db.shape == (0,)
