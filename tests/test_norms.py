"""LayerNorm / RMSNorm (+ residual) on the fused backends: outputs and every gradient against a float64 reference,
random shapes (hypothesis), the registered ops (opcheck, torch.compile), the drop-in modules, and bad input. The cpu
backend at large sizes and its raw ops: test_cpu_norms.py."""

import pytest
import torch
import torch.nn.functional as TF
from helpers import DEVICE, ON_GPU, OPCHECK_TESTS, assert_close_ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlm
import fastlm.functional as F
from fastlm import nn as fnn
from fastlm import reference
from fastlm.dispatch import BackendUnavailableError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]
# Row widths: 1, primes, non-powers of two, and both sides of every block-size class boundary of the kernels
# (single-pass forward <= 16384, single-pass backward <= 8192, 4096-wide chunks beyond), up to the maximum.
WIDTHS = [1, 7, 127, 128, 129, 768, 1000, 4096, 4097, 8192, 8193, 16384, 16385, 65536]


def _rows_for(n: int) -> int:
    return max(2, min(37, (300_000 if ON_GPU else 150_000) // n))  # keep the interpreter's work small on CPU


def _call(kind, x, r, shape, w, b, eps):
    if kind == "layer_norm":
        return (F.layer_norm(x, shape, w, b, eps),)
    if kind == "rms_norm":
        return (F.rms_norm(x, shape, w, eps),)
    if kind == "add_layer_norm":
        return F.add_layer_norm(x, r, shape, w, b, eps)
    return F.add_rms_norm(x, r, shape, w, eps)


def _ref(kind, x, r, shape, w, b, eps):
    """The same computation in plain torch (float64 inputs give the oracle)."""
    if kind == "layer_norm":
        return (TF.layer_norm(x, shape, w, b, eps),)
    if kind == "rms_norm":
        return (TF.rms_norm(x, shape, w, eps),)
    if kind == "add_layer_norm":
        return reference.add_layer_norm(x, r, shape, w, b, eps)
    return reference.add_rms_norm(x, r, shape, w, eps)


def check_norm(
    kind,
    shape,
    n_dims=1,
    dtype=torch.float32,
    *,
    w_dtype=None,
    has_w=True,
    has_b=True,
    eps=1e-5,
    view=lambda t: t,
    base_shape=None,
    device=DEVICE,
):
    """Run ``kind`` on fresh random inputs and compare the outputs and the gradients of x, residual, weight and
    bias with the float64 reference and with torch's own result in ``dtype``.

    ``view`` maps a leaf of ``base_shape`` to the (possibly strided) input of ``shape``.
    """
    device = torch.device(device)
    nshape = tuple(shape[-n_dims:])
    w_dtype = w_dtype or dtype
    rms = "rms" in kind
    add = kind.startswith("add")
    if rms and eps == 1e-5:
        eps = None  # exercise torch's default
    base_shape = base_shape or shape
    leaves = {"x": (torch.randn(base_shape, device=device) * 2 + 0.5).to(dtype)}
    if add:
        leaves["residual"] = torch.randn(base_shape, device=device).to(dtype)
    if has_w:
        leaves["weight"] = (torch.randn(nshape, device=device) * 0.5 + 1).to(w_dtype)
    if has_b and not rms:
        leaves["bias"] = (torch.randn(nshape, device=device) * 0.5).to(w_dtype)

    eps_ref = torch.finfo(dtype).eps if eps is None else eps  # what eps=None means for the input's dtype

    def run(fn, ls, eps):
        ls = {k: v.detach().clone().requires_grad_() for k, v in ls.items()}
        outs = fn(
            kind, view(ls["x"]), view(ls["residual"]) if add else None, nshape, ls.get("weight"), ls.get("bias"), eps
        )
        return ls, outs

    ls, outs = run(_call, leaves, eps)
    assert all(o.dtype == dtype for o in outs), [o.dtype for o in outs]
    grads_out = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, list(ls.values()), grads_out)

    ls64, outs64 = run(_ref, {k: v.double() for k, v in leaves.items()}, eps_ref)
    grads64 = torch.autograd.grad(outs64, list(ls64.values()), [g.double() for g in grads_out])

    torch_outs = None
    if dtype != torch.float32:
        _, torch_outs = run(_ref, leaves, eps)

    names = ["out", "h"][: len(outs)]
    for i, name in enumerate(names):
        assert_close_ref(outs[i], outs64[i], dtype, name, torch_outs[i] if torch_outs else None)
    for i, key in enumerate(ls):
        tol_dtype = dtype if key in ("x", "residual") else (w_dtype if w_dtype != torch.float32 else dtype)
        assert_close_ref(grads[i].to(grads64[i].dtype), grads64[i], tol_dtype, f"d{key}")


@pytest.mark.parametrize("N", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_widths_dtypes(backend, kind, dtype, N):
    check_norm(kind, (_rows_for(N), N), dtype=dtype)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("has_w,has_b", [(False, False), (True, False), (False, True)])
def test_affine_optional(backend, kind, has_w, has_b):
    check_norm(kind, (9, 300), has_w=has_w, has_b=has_b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("N", [1000, 20000])
def test_mixed_fp32_weight(backend, kind, dtype, N):
    """Low-precision input with float32 weight and bias, as in torch's mixed-precision training."""
    check_norm(kind, (5, N), dtype=dtype, w_dtype=torch.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_leading_dims_and_multidim_normalized_shape(backend, kind):
    check_norm(kind, (2, 3, 4, 6), n_dims=2)
    check_norm(kind, (2, 3, 5, 257), n_dims=1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("N", [300, 20000])
def test_strided_rows_no_copy(backend, kind, N):
    """Rows with a stride (a slice of a wider tensor): the kernel reads them in place."""
    check_norm(kind, (6, N), base_shape=(6, 2 * N + 3), view=lambda t: t[:, :N])


@pytest.mark.parametrize("kind", KINDS)
def test_noncontiguous_inputs(backend, kind):
    """A transposed leading layout (rows not mergeable) and a non-unit last stride: copied once, still right."""
    check_norm(kind, (5, 4, 96), base_shape=(4, 5, 96), view=lambda t: t.transpose(0, 1))
    check_norm(kind, (7, 100), base_shape=(7, 200), view=lambda t: t[:, ::2])


def test_strided_rows_are_not_copied(backend, monkeypatch):
    """The row-strided input reaches the op as a view of the caller's storage (no hidden .contiguous())."""
    from fastlm.ops import norms as ops_norms

    seen = {}
    real = ops_norms.NORM_FWD[backend]

    def spy(x, *args):
        seen["ptr"], seen["stride"] = x.data_ptr(), x.stride()
        return real(x, *args)

    monkeypatch.setitem(ops_norms.NORM_FWD, backend, spy)
    base = torch.randn(8, 512, device=DEVICE)
    F.layer_norm(base[:, :300], (300,))
    assert seen == {"ptr": base.data_ptr(), "stride": (512, 1)}


@pytest.mark.parametrize("kind", KINDS)
def test_zero_rows(backend, kind):
    check_norm(kind, (0, 64))
    check_norm(kind, (3, 0, 64))


def test_expanded_grad(backend):
    """A zero-strided incoming gradient (from .sum()) is handled."""
    x = torch.randn(4, 33, device=DEVICE, requires_grad=True)
    w = torch.randn(33, device=DEVICE, requires_grad=True)
    b = torch.randn(33, device=DEVICE, requires_grad=True)
    # sum() of a LayerNorm output has zero gradient for x up to rounding; weight it to get a non-trivial dx
    (F.layer_norm(x, (33,), w, b) * torch.arange(33, device=DEVICE)).sum().backward()
    ours = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    (TF.layer_norm(x, (33,), w, b) * torch.arange(33, device=DEVICE)).sum().backward()
    for a, t in zip(ours, (x, w, b), strict=True):
        torch.testing.assert_close(a, t.grad, atol=1e-4, rtol=1e-4)
    F.rms_norm(x, (33,), w).sum().backward()  # a pure expand(): the op gets a (0, 0)-strided dy


@pytest.mark.parametrize("kind", ["add_layer_norm", "rms_norm"])
@pytest.mark.parametrize("N", [1000, 20000])
def test_backward_deterministic(backend, kind, N):
    """Two backward passes on the same inputs are bitwise equal (no atomics in the dW/dB reduction)."""
    M = 64 if N < 10000 else 9
    x = torch.randn(M, N, device=DEVICE, requires_grad=True)
    r = torch.randn(M, N, device=DEVICE, requires_grad=True)
    w = torch.randn(N, device=DEVICE, requires_grad=True)
    b = torch.randn(N, device=DEVICE, requires_grad=True)
    dy = torch.randn(M, N, device=DEVICE)

    def grads():
        if kind == "add_layer_norm":
            y, h = F.add_layer_norm(x, r, (N,), w, b)
            return torch.autograd.grad((y, h), (x, r, w, b), (dy, dy))
        return torch.autograd.grad(F.rms_norm(x, (N,), w), (x, w), dy)

    first, second = grads(), grads()
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c)


# The Triton interpreter truncates float32 -> bfloat16 instead of rounding to nearest even (GPUs round), so the
# bitwise check of bfloat16 runs only on a GPU.
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)], ids=str
)
@pytest.mark.parametrize("N", [200, 20000])
def test_add_norm_h_is_the_rounded_sum(backend, dtype, N):
    """h is exactly input + residual in the input dtype (the new residual stream)."""
    x = torch.randn(5, N, device=DEVICE, dtype=dtype)
    r = torch.randn(5, N, device=DEVICE, dtype=dtype)
    _, h = F.add_rms_norm(x, r, (N,), torch.ones(N, device=DEVICE, dtype=dtype))
    assert torch.equal(h, x + r)


def test_large_offset_is_stable(backend):
    """A mean much larger than the spread: the variance must not cancel (no E[x^2] - E[x]^2)."""
    x = torch.randn(4, 4096, device=DEVICE) + 1000.0
    check = F.layer_norm(x, (4096,))
    ref = TF.layer_norm(x.double(), (4096,)).float()
    torch.testing.assert_close(check, ref, atol=2e-3, rtol=0)


def test_outlier_first_element_is_stable(backend):
    """A first element far from the rest (the cpu kernel shifts the moments by it, and must notice when that
    shift would cancel), and a constant row (variance exactly 0)."""
    x = torch.randn(4, 4096, device=DEVICE)
    x[:, 0] = 1e4
    x[3] = 7.0
    check = F.layer_norm(x, (4096,))
    ref = TF.layer_norm(x.double(), (4096,)).float()
    torch.testing.assert_close(check, ref, atol=2e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_bias_without_weight_keeps_the_bias_dtype(backend, dtype):
    """LayerNorm with a float32 bias and no weight on low-precision input: db arrives in the bias dtype."""
    x = torch.randn(6, 40, device=DEVICE, dtype=dtype, requires_grad=True)
    b = torch.randn(40, device=DEVICE, requires_grad=True)
    F.layer_norm(x, (40,), None, b).float().square().sum().backward()
    assert b.grad.dtype == torch.float32 and x.grad.dtype == dtype
    xr = x.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_()
    TF.layer_norm(xr, (40,), None, br).square().sum().backward()
    torch.testing.assert_close(b.grad.double(), br.grad, atol=0.05 * br.grad.abs().max().item(), rtol=0.05)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 3000),
    kind=st.sampled_from(KINDS),
    has_w=st.booleans(),
    has_b=st.booleans(),
)
def test_random_shapes(m, n, kind, has_w, has_b):
    with fastlm.backend("triton"):
        check_norm(kind, (m, n), has_w=has_w, has_b=has_b)


# ---------------------------------------------------------------------------------------------------------------
# Registered ops, modules, bad input

# On CPU the Triton ops run under the interpreter, where opcheck's aot_dispatch_dynamic test fails for trivially
# correct ops (its fake-tensor pass touches data the interpreter needs); the GPU run does the full opcheck.


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
