"""SwiGLU / GeGLU on the fused backends: the output and both gradients against a float64 reference in every dtype,
odd widths, leading dims, strided views read in place (the halves of a merged projection), the merged gate_up form,
one input requiring grad, the registered ops (opcheck, torch.compile) and bad input. The cpu backend at large sizes
and its raw ops: test_cpu_gated_mlp.py."""

import pytest
import torch
from helpers import DEVICE, ON_GPU, compare_with_reference

import fastlm
import fastlm.functional as F
from fastlm import reference
from fastlm.dispatch import BackendUnavailableError
from fastlm.ops import gated_mlp as ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# kind -> (fastlm's function, the reference), both (gate, up=None)
KINDS = {
    "swiglu": (F.swiglu, reference.swiglu),
    "geglu_tanh": (
        lambda gate, up=None: F.geglu(gate, up, "tanh"),
        lambda gate, up=None: reference.geglu(gate, up, "tanh"),
    ),
    "geglu_none": (
        lambda gate, up=None: F.geglu(gate, up, approximate="none"),
        lambda gate, up=None: reference.geglu(gate, up, "none"),
    ),
}
# Row widths: 1, a prime, a non-power of two inside one column block, and past the widest block (1024).
WIDTHS = [1, 7, 300, 1500]


def _randn(*shape, dtype=torch.float32, scale=2.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)  # gates over the activations' curved range


def check(kind, inputs: dict, dtype, fn=None, ref=None):
    """fastlm's ``kind`` (or ``fn``) against the float64 reference: output and every gradient, 2x rule in 16-bit."""
    ours, theirs = KINDS[kind]
    return compare_with_reference(fn or ours, ref or theirs, inputs, dtype)


@pytest.mark.parametrize("I", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_dtypes_widths(backend, kind, dtype, I):
    M = 37 if I < 64 else 5
    check(kind, {"gate": _randn(M, I, dtype=dtype), "up": _randn(M, I, dtype=dtype, scale=1.0)}, dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_leading_dims(backend, kind):
    check(kind, {"gate": _randn(2, 3, 50), "up": _randn(2, 3, 50)}, torch.float32)
    check(kind, {"gate": _randn(2, 1, 3, 9), "up": _randn(2, 1, 3, 9)}, torch.float32)
    check(kind, {"gate": _randn(20), "up": _randn(20)}, torch.float32)  # no leading dims: one row


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_gate_up_form(backend, kind, dtype):
    """One merged [..., 2*I] tensor (first half gate): output [..., I], one [..., 2*I] gradient."""
    gu = _randn(3, 4, 2 * 37, dtype=dtype)
    out = check(kind, {"gate": gu}, dtype)
    assert out.shape == (3, 4, 37)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_chunk_halves(backend, kind, dtype):
    """gate, up = x.chunk(2, -1) of a merged projection: row-strided views, read in place."""
    ours, theirs = KINDS[kind]
    check(
        kind,
        {"x": _randn(2, 5, 2 * 300, dtype=dtype)},
        dtype,
        lambda x: ours(*x.chunk(2, dim=-1)),
        lambda x: theirs(*x.chunk(2, dim=-1)),
    )


@pytest.mark.parametrize(
    "view",
    [
        lambda t: t[:, 3:43],  # rows of one stride: a view
        lambda t: t.view(5, 6, 8)[:, :, ::2],  # a non-unit last stride: copied
        lambda t: t.view(5, 6, 8).transpose(0, 1)[..., :7],  # leading dims that do not merge: copied
    ],
    ids=["row_stride", "last_stride", "transposed"],
)
def test_strided_views(backend, view):
    check(
        "swiglu",
        {"gate": _randn(5, 48), "up": _randn(5, 48)},
        torch.float32,
        lambda gate, up: F.swiglu(view(gate), view(up)),
        lambda gate, up: reference.swiglu(view(gate), view(up)),
    )


def test_views_reach_the_op_without_copies(backend, monkeypatch):
    """The chunk halves of a (B, S, 2I) projection, and the merged tensor itself, reach the op as views of the
    caller's storage (no hidden .contiguous())."""
    seen = []
    real = ops.GATED_MLP_FWD[backend]

    def spy(gate, up, act):
        seen.append((gate.data_ptr(), gate.stride(), None if up is None else (up.data_ptr(), up.stride())))
        return real(gate, up, act)

    monkeypatch.setitem(ops.GATED_MLP_FWD, backend, spy)
    x = torch.randn(2, 3, 2 * 40, device=DEVICE)
    g, u = x.chunk(2, dim=-1)
    F.swiglu(g, u)
    F.geglu(x)
    e = x.element_size()
    assert seen == [(x.data_ptr(), (80, 1), (x.data_ptr() + 40 * e, (80, 1))), (x.data_ptr(), (80, 1), None)]


def test_gate_up_backward_op_writes_one_gradient(backend):
    """The backward op of the merged form returns the (M, 2I) gradient and an empty dup."""
    gu = torch.randn(4, 2 * 9, device=DEVICE)
    dy = torch.randn(4, 9, device=DEVICE)
    dgu, dup = getattr(torch.ops.fastlm, f"gated_mlp_bwd_{backend}")(dy, gu, None, ops.ACT_SILU)
    assert dgu.shape == (4, 18) and dup.shape == (0,)
    g, u = gu.double().chunk(2, -1)
    s = torch.sigmoid(g)
    want = torch.cat([dy * u * s * (1 + g * (1 - s)), dy * g * s], -1)
    torch.testing.assert_close(dgu.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["gate", "up"])
def test_one_input_requires_grad(backend, which):
    g, u = _randn(6, 33), _randn(6, 33)
    leaf = (g if which == "gate" else u).requires_grad_()
    dy = torch.randn(6, 33, device=DEVICE)
    (got,) = torch.autograd.grad(F.swiglu(g, u), leaf, dy)
    (want,) = torch.autograd.grad(reference.swiglu(g, u), leaf, dy)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_zero_size(backend):
    for shape in [(0, 8), (3, 0), (2, 0, 5)]:
        check("swiglu", {"gate": _randn(*shape), "up": _randn(*shape)}, torch.float32)
    check("geglu_tanh", {"gate": _randn(4, 0)}, torch.float32)  # gate_up with I = 0
    assert F.swiglu(_randn(3, 2, 6)).shape == (3, 2, 3)


def test_expanded_grad(backend):
    """A zero-strided incoming gradient (from .sum()) is handled."""
    g = torch.randn(4, 33, device=DEVICE, requires_grad=True)
    gu = torch.randn(4, 66, device=DEVICE, requires_grad=True)
    F.swiglu(g, g * 2).sum().backward()
    F.geglu(gu).sum().backward()
    gr, gur = g.grad.clone(), gu.grad.clone()
    g.grad = gu.grad = None
    reference.swiglu(g, g * 2).sum().backward()
    reference.geglu(gu).sum().backward()
    torch.testing.assert_close(gr, g.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gur, gu.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_large_gates(backend, kind):
    """Saturated activations (|gate| up to 60): no overflow to inf or NaN in act or act'."""
    g = torch.linspace(-60, 60, 241, device=DEVICE).view(1, -1)
    check(kind, {"gate": g, "up": _randn(1, 241)}, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Registered ops

# On CPU the Triton ops run under the interpreter, where opcheck's aot_dispatch_dynamic test fails for trivially
# correct ops; the GPU run (and the cpu backend) do the full opcheck.
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("merged", [False, True], ids=["gate_and_up", "gate_up"])
@pytest.mark.parametrize("act", [ops.ACT_SILU, ops.ACT_GELU_TANH, ops.ACT_GELU_ERF])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(backend, act, merged, dtype):
    # the full default set (aot_dispatch_dynamic included) on a GPU and for the cpu backend's C++ ops
    kw = {} if ON_GPU or backend != "triton" else {"test_utils": OPCHECK_TESTS}
    fwd = getattr(torch.ops.fastlm, f"gated_mlp_fwd_{backend}")
    bwd = getattr(torch.ops.fastlm, f"gated_mlp_bwd_{backend}")
    g = torch.randn(5, 2 * 33 if merged else 33, device=DEVICE, dtype=dtype, requires_grad=True)
    u = None if merged else torch.randn(5, 33, device=DEVICE, dtype=dtype, requires_grad=True)
    torch.library.opcheck(fwd, (g, u, act), **kw)
    dy = torch.randn(5, 33, device=DEVICE, dtype=dtype)
    torch.library.opcheck(bwd, (dy, g.detach(), None if merged else u.detach(), act), **kw)


def test_torch_compile_fullgraph(backend):
    """Both functions and both forms compile with fullgraph=True and match eager, gradients included."""

    def f(x, g, u):
        return F.swiglu(x).sum(-1) + F.geglu(g, u, approximate="none").sum(-1) + F.geglu(g, u).sum(-1)

    x = torch.randn(3, 4, 2 * 24, device=DEVICE, requires_grad=True)
    g = torch.randn(3, 4, 24, device=DEVICE, requires_grad=True)
    u = torch.randn(3, 4, 24, device=DEVICE, requires_grad=True)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")(x, g, u)
    want = f(x, g, u)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grads_got = torch.autograd.grad(got.square().sum(), (x, g, u))
    grads_want = torch.autograd.grad(want.square().sum(), (x, g, u))
    for a, b in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument, before any kernel runs


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: F.swiglu(_randn(4, 8), _randn(4, 9)), ValueError, "up must have gate's shape"),
        (lambda: F.geglu(_randn(4, 8), _randn(8)), ValueError, "up must have gate's shape"),
        (lambda: F.swiglu(_randn(4, 8), _randn(4, 8, dtype=torch.float16)), TypeError, "up must have gate's dtype"),
        (lambda: F.swiglu(_randn(4, 7)), ValueError, "last dim must be even"),
        (lambda: F.geglu(torch.tensor(1.0, device=DEVICE)), ValueError, "last dim must be even"),
        (lambda: F.geglu(_randn(4, 8), _randn(4, 8), approximate="erf"), ValueError, "approximate must be"),
        (lambda: F.swiglu(_randn(4, 8), _randn(4, 8).to("meta")), ValueError, "up is on meta"),
        (lambda: F.swiglu(torch.ones(4, 8, dtype=torch.int32, device=DEVICE)), TypeError, "gate must be"),
        (lambda: F.swiglu(_randn(4, 8, dtype=torch.float64)), TypeError, "gate must be"),
        (lambda: F.swiglu([1.0, 2.0]), TypeError, "gate must be a Tensor"),
        (lambda: F.swiglu(_randn(4, 8), 2.0), TypeError, "up must be a Tensor"),
    ],
)
def test_bad_input(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_float64_goes_to_torch_under_auto():
    g, u = torch.randn(3, 8, dtype=torch.float64, device=DEVICE), torch.randn(3, 8, dtype=torch.float64, device=DEVICE)
    with fastlm.backend("auto"):
        assert torch.equal(F.swiglu(g, u), reference.swiglu(g, u))
        assert torch.equal(F.geglu(g, u, "none"), reference.geglu(g, u, "none"))
    with fastlm.backend("torch"):  # the reference, merged form included (a strided half: last bits may differ)
        torch.testing.assert_close(F.geglu(torch.cat([g, u], -1)), reference.geglu(g, u))


def test_cuda_backend_raises_unsupported():
    with fastlm.backend("cuda"), pytest.raises(BackendUnavailableError, match="gated_mlp"):
        F.swiglu(torch.randn(2, 8), torch.randn(2, 8))
