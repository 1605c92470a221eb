"""LayerNorm / RMSNorm on the cpu backend (csrc/cpu/norms.cpp) at sizes the Triton interpreter cannot afford, its
determinism across thread counts, and the raw ops' input checks. CPU tensors: these run on every machine."""

import pytest
import torch
from helpers import at_thread_counts
from test_norms import DTYPES, KINDS, _call, check_norm

import fastlm


def _poison_heap(nbytes: int, copies: int = 4) -> None:
    """Free a few NaN-filled blocks of ``nbytes`` so that the kernel's next outputs (uninitialised new_empty memory,
    not poisoned like the Triton ones) most likely reuse them: an element the kernel fails to write stays NaN."""
    blocks = [torch.full((max(nbytes, 4) // 4,), float("nan")) for _ in range(copies)]
    del blocks


@pytest.mark.parametrize("M,N", [(1024, 768), (512, 4096), (97, 5000), (8, 65536)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_large(kind, dtype, M, N):
    _poison_heap(M * N * 4)
    with fastlm.backend("cpu"):
        check_norm(kind, (M, N), dtype=dtype, device="cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_large_mixed_fp32_weight(kind, dtype):
    with fastlm.backend("cpu"):
        check_norm(kind, (512, 4096), dtype=dtype, w_dtype=torch.float32, device="cpu")
        check_norm(kind, (300, 1000), dtype=dtype, w_dtype=torch.float32, device="cpu", has_b=False)


@pytest.mark.parametrize("kind", KINDS)
def test_cpu_large_strided_rows(kind):
    with fastlm.backend("cpu"):
        check_norm(kind, (700, 768), base_shape=(700, 1000), view=lambda t: t[:, 100:868], device="cpu")


@pytest.mark.parametrize("N", [1, 7, 768, 4097])
@pytest.mark.parametrize("M", [1, 2, 3, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_few_rows(kind, dtype, M, N):
    """Row counts below the parallel grain (one chunk, one dW/dB block), with and without weight and bias: every
    output and gradient against the float64 reference."""
    with fastlm.backend("cpu"):
        check_norm(kind, (M, N), dtype=dtype, device="cpu")
        check_norm(kind, (M, N), dtype=dtype, device="cpu", has_w=False)
        if "rms" not in kind:
            check_norm(kind, (M, N), dtype=dtype, device="cpu", has_b=False)
            check_norm(kind, (M, N), dtype=dtype, device="cpu", has_w=False, has_b=False)


def _cpu_grads(kind, x, r, w, b, dy):
    """Every output and gradient of one forward + backward on the cpu backend."""
    x, r, w, b = (t.detach().clone().requires_grad_() for t in (x, r, w, b))
    leaves = [x] + ([r] if kind.startswith("add") else []) + [w] + ([] if "rms" in kind else [b])
    with fastlm.backend("cpu"):
        outs = _call(kind, x, r, (x.shape[-1],), w, b, 1e-5)
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, leaves, [dy] * len(outs)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["add_layer_norm", "rms_norm", "layer_norm"])
@pytest.mark.parametrize("M,N", [(1000, 768), (37, 5000), (3, 4096)], ids=lambda v: str(v))
def test_cpu_deterministic_across_runs_and_thread_counts(kind, dtype, M, N):
    """Bitwise equal outputs and gradients (dW/dB included) on a second run and under 1, 2 or 3 threads: the dW/dB
    partial sums are over row blocks fixed by (M, N), reduced in block order."""
    x, r, dy = (torch.randn(M, N).to(dtype) for _ in range(3))
    w, b = torch.randn(N).to(dtype), torch.randn(N).to(dtype)
    first, again, one, three = at_thread_counts(lambda: _cpu_grads(kind, x, r, w, b, dy), (2, 2, 1, 3))
    for other in (again, one, three):
        for a, c in zip(first, other, strict=True):
            assert torch.equal(a, c)


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
    assert (
        dx.dtype == torch.bfloat16
        and dw.shape == (0,)
        and dw.dtype == torch.float32
        and db.dtype == torch.float32
        and db.shape == (8,)
    )
    _, _, _, rstd = _FWD(xb, None, None, None, 1e-5, True)
    dx, dw, db = _BWD(xb, xb, None, torch.empty(0), rstd, None, True, True)
    assert dw.shape == db.shape == (0,)
