"""Flash attention against a float64 reference with FlashAttention's oracle: the fused kernel's error must be at most
twice PyTorch's own error in the same dtype (plus a rounding floor), for the output and dQ, dK, dV.

On CPU the Triton kernels run through the interpreter at small sizes; its bf16 dots are wrong (a known Triton 3.8
interpreter bug), so bf16 runs on the triton backend only on a GPU (the cpu backend's C++ kernel takes it natively).
The CPU C++ kernel also gets tests of its own at sizes the interpreter cannot afford (end of file).
"""

import math

import pytest
import torch
import torch.nn.functional as TF
from helpers import DEVICE, ON_GPU, OPCHECK_TESTS

import fastlm
import fastlm.functional as F
from fastlm import reference

DTYPES = [pytest.param(d, id=str(d)) for d in (torch.float32, torch.float16, torch.bfloat16)]


def _skip_interpreted_bf16(backend, dtype):
    if dtype == torch.bfloat16 and backend == "triton" and not ON_GPU:
        pytest.skip("the Triton interpreter's bf16 dots are wrong (Triton 3.8 bug): bf16 triton runs on a GPU only")


def _fold_causal(mask, Sq, Sk, device):
    tri = torch.ones(Sq, Sk, dtype=torch.bool, device=device).tril()
    if mask is None:
        return tri
    if mask.dtype == torch.bool:
        return mask & tri
    return mask.masked_fill(~tri, float("-inf"))


def check_attention(B, H, Hkv, Sq, Sk, D, dtype, causal=False, mask=None, layout=None):
    """Output and dQ, dK, dV against the float64 reference with the 2x oracle."""
    shape_q, shape_kv = (B, H, Sq, D), (B, Hkv, Sk, D)
    if layout == "bshd":  # HF's (B, S, H, D) storage seen through a transpose: strided, unit last stride
        mk = lambda s: torch.randn(s[0], s[2], s[1], s[3], device=DEVICE).to(dtype).transpose(1, 2)  # noqa: E731
    else:
        mk = lambda s: torch.randn(s, device=DEVICE).to(dtype)  # noqa: E731
    q, k, v = mk(shape_q), mk(shape_kv), mk(shape_kv)
    gqa = H != Hkv
    full_mask = _fold_causal(mask, Sq, Sk, DEVICE) if causal else mask  # the reference gets one mask
    if full_mask is not None and full_mask.dtype != torch.bool:
        full_mask = full_mask.to(dtype)
    empty = None
    if full_mask is not None:
        allowed = full_mask if full_mask.dtype == torch.bool else full_mask > float("-inf")
        empty = ~allowed.expand(B, H, Sq, Sk).any(-1, keepdim=True)  # rows with no key: zeros (torch: NaN)

    def run(cast, fn):
        leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return leaves, out

    ours_leaves, out = run(
        lambda t: t,
        lambda q, k, v: F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask if mask is None or mask.dtype == torch.bool else mask.to(dtype),
            is_causal=causal,
            enable_gqa=gqa,
        ),
    )
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, ours_leaves, dout)

    ref_mask = full_mask
    if empty is not None:  # give fully masked rows some keys (no NaN), then zero their output: no gradient flows
        ref_mask = full_mask.masked_fill(empty, True if full_mask.dtype == torch.bool else 0.0)

    def ref_fn(q, k, v):
        m = ref_mask if ref_mask is None or ref_mask.dtype == torch.bool else ref_mask.to(q.dtype)
        o = TF.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=gqa)
        return o.masked_fill(empty, 0.0) if empty is not None else o

    ref_leaves, ref = run(lambda t: t.double(), ref_fn)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    lp_leaves, lp = run(lambda t: t, ref_fn)
    lp_grads = torch.autograd.grad(lp, lp_leaves, dout)
    pairs = [("out", out, ref, lp), *zip(("dq", "dk", "dv"), grads, ref_grads, lp_grads, strict=True)]
    for name, a, r, t in pairs:
        assert a.shape == r.shape and not a.isnan().any(), f"{name}: shape or NaN"
        t = t.nan_to_num(0.0)
        err = (a.double() - r).abs().max().item()
        torch_err = (t.double() - r).abs().max().item()
        floor = 2 * torch.finfo(dtype).eps * max(r.abs().max().item(), 1.0) + (1e-5 if dtype == torch.float32 else 0)
        assert err <= 2 * torch_err + floor, f"{name}: error {err:.3g} > 2 x torch's {torch_err:.3g} + {floor:.2g}"
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Sk", [(1, 40), (37, 53), (64, 64), (50, 20)])
def test_shapes(backend, dtype, causal, Sq, Sk):
    _skip_interpreted_bf16(backend, dtype)
    check_attention(2, 2, 2, Sq, Sk, 64, dtype, causal)


@pytest.mark.parametrize("D", [16, 32, 64, 80, 96, 128, 160, 192, 256])
def test_head_dims(backend, D):
    check_attention(1, 2, 2, 33, 45, D, torch.float16, causal=D % 32 == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_odd_long_shapes(backend, causal):
    check_attention(1, 1, 1, 113, 203, 32, torch.float16, causal)
    if ON_GPU:
        check_attention(2, 4, 4, 1023, 1024, 128, torch.bfloat16, causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H,Hkv", [(4, 2), (6, 1)])
def test_gqa(backend, H, Hkv, causal):
    check_attention(2, H, Hkv, 29, 41, 32, torch.float16, causal)


MASKS = {
    "bool_full": lambda B, H, Sq, Sk: torch.rand(B, H, Sq, Sk, device=DEVICE) > 0.3,
    "bool_padding": lambda B, H, Sq, Sk: (
        torch.arange(Sk, device=DEVICE) < torch.tensor([Sk, Sk // 2], device=DEVICE)[:, None]
    ).view(B, 1, 1, Sk),
    "float_heads": lambda B, H, Sq, Sk: torch.randn(B, 1, Sq, Sk, device=DEVICE),
    "float_2d_inf": lambda B, H, Sq, Sk: torch.randn(Sq, Sk, device=DEVICE).masked_fill(
        torch.rand(Sq, Sk, device=DEVICE) < 0.3, float("-inf")
    ),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", list(MASKS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_masks(backend, dtype, kind, causal):
    _skip_interpreted_bf16(backend, dtype)
    B, H, Sq, Sk = 2, 2, 37, 70
    check_attention(B, H, H, Sq, Sk, 32, dtype, causal, mask=MASKS[kind](B, H, Sq, Sk))


def test_masks_with_gqa_and_strided_layout(backend):
    B, H, Sq, Sk = 2, 4, 21, 50
    check_attention(B, H, 2, Sq, Sk, 64, torch.float16, False, mask=MASKS["bool_padding"](B, H, Sq, Sk), layout="bshd")
    check_attention(B, H, 1, Sq, Sk, 64, torch.float16, True, layout="bshd")


def test_fully_masked_rows_and_tiles(backend):
    """Whole rows masked -> zero output and zero gradients (torch gives NaN); whole 16x16+ tiles masked -> skipped
    and still right."""
    B, H, Sq, Sk = 1, 2, 40, 64
    mask = torch.ones(B, H, Sq, Sk, dtype=torch.bool, device=DEVICE)
    mask[0, 1, 5] = False
    mask[0, 0, :, 16:48] = False
    out = check_attention(B, H, H, Sq, Sk, 32, torch.float32, mask=mask)
    assert torch.equal(out[0, 1, 5], torch.zeros_like(out[0, 1, 5]))


def test_lse(backend):
    q, k, v = (torch.randn(2, 3, 17, 32, device=DEVICE) for _ in range(3))
    _, lse = F.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(32)
    s = s.masked_fill(~torch.ones(17, 17, dtype=torch.bool, device=DEVICE).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)


def test_deterministic_backward(backend):
    q, k, v = (torch.randn(2, 4, 45, 64, device=DEVICE, requires_grad=True) for _ in range(3))
    kv = [t[:, :2].detach().requires_grad_() for t in (k, v)]
    do = torch.randn(2, 4, 45, 64, device=DEVICE)

    def grads():
        o = F.scaled_dot_product_attention(q, *kv, is_causal=True, enable_gqa=True)
        return torch.autograd.grad(o, (q, *kv), do)

    for a, b in zip(grads(), grads(), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Dropout: the mask is implicit, so recover it with V = identity and check everything against it


def _dropout_mask(q, k, p, seed):
    """(P * Z) rows recovered by running with V = I (D == Sk): the dropped, rescaled probabilities."""
    B, H, Sq, D = q.shape
    eye = torch.eye(D, device=q.device, dtype=q.dtype).expand(B, k.shape[1], D, D).contiguous()
    torch.manual_seed(seed)
    return F.scaled_dot_product_attention(q, k, eye, dropout_p=p)


def test_dropout_statistics_and_consistency(backend):
    B, H, S, D, p = 2, 2, 32, 32, 0.25
    q, k, v = (torch.randn(B, H, S, D, device=DEVICE) for _ in range(3))
    pz = _dropout_mask(q, k, p, seed=7)  # (B, H, Sq, Sk) = P * Z
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1)
    z = pz / probs
    kept = (z > 0.5).double().mean().item()
    assert abs(kept - (1 - p)) < 0.03, f"keep rate {kept:.3f} vs {1 - p}"
    torch.testing.assert_close(z[z > 0.5], torch.full_like(z[z > 0.5], 1 / (1 - p)), atol=1e-3, rtol=1e-3)
    # same seed -> same output; the output and gradients equal the explicit computation with this Z
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(7)
    out = F.scaled_dot_product_attention(*leaves, dropout_p=p)
    torch.manual_seed(7)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, dropout_p=p))
    zmask = (z > 0.5).double() / (1 - p)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    qd, kd, vd = ref_leaves
    ref = (torch.softmax(qd @ kd.transpose(-1, -2) / math.sqrt(D), -1) * zmask) @ vd
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    do = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, ref_leaves, do.double()), strict=True
    ):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# varlen


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen(backend, dtype, causal):
    _skip_interpreted_bf16(backend, dtype)
    lq, lk = [5, 17, 1, 30], [7, 3, 20, 30]
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)  # noqa
    q = torch.randn(sum(lq), 4, 64, device=DEVICE).to(dtype)
    k, v = (torch.randn(sum(lk), 2, 64, device=DEVICE).to(dtype) for _ in range(2))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = F.varlen_attention(*leaves, cu(lq), cu(lk), max(lq), max(lk), is_causal=causal)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference.varlen_attention(*ref_leaves, cu(lq), cu(lk), is_causal=causal)
    lp_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    lp = reference.varlen_attention(*lp_leaves, cu(lq), cu(lk), is_causal=causal)
    do = torch.randn_like(out)
    pairs = [("out", out, ref, lp)] + list(
        zip(
            ("dq", "dk", "dv"),
            torch.autograd.grad(out, leaves, do),
            torch.autograd.grad(ref, ref_leaves, do.double()),
            torch.autograd.grad(lp, lp_leaves, do),
            strict=True,
        )
    )
    for name, a, r, t in pairs:
        err, terr = (a.double() - r).abs().max().item(), (t.double() - r).abs().max().item()
        floor = 2 * torch.finfo(dtype).eps * max(r.abs().max().item(), 1.0) + 1e-5
        assert err <= 2 * terr + floor, f"{name}: {err:.3g} vs torch {terr:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# ops, compile, bad input


def test_opcheck(backend):
    op = getattr(torch.ops.fastlm, f"attention_fwd_{backend}")
    q, k, v = (torch.randn(1, 2, 20, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = (torch.rand(1, 1, 20, 20, device=DEVICE) > 0.2).expand(1, 2, 20, 20)
    rng = torch.zeros(1, dtype=torch.int64)
    args = (q, k, v, mask, None, None, 20, 20, 0.2, True, 0.0, rng, -1, -1, 0.0, None, None)
    torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)


def test_compile_fullgraph(backend):
    def f(q, k, v, m):
        return (
            F.scaled_dot_product_attention(q, k, v, attn_mask=m).sum()
            + F.scaled_dot_product_attention(q, k, v, is_causal=True).square().sum()
        )

    q, k, v = (torch.randn(1, 2, 24, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    m = torch.rand(24, 24, device=DEVICE) > 0.2
    got = torch.compile(f, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")(q, k, v, m)
    want = f(q, k, v, m)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v)), torch.autograd.grad(want, (q, k, v)), strict=True):
        torch.testing.assert_close(a, b)


def _t(*s, dtype=torch.float32):
    return torch.randn(*s, device=DEVICE).to(dtype)


def _cu(*vals):
    return torch.tensor(vals, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (
            lambda: F.scaled_dot_product_attention(_t(1, 2, 4, 32), _t(1, 2, 4, 16), _t(1, 2, 4, 16)),
            ValueError,
            "head dim",
        ),
        (
            lambda: F.scaled_dot_product_attention(_t(1, 2, 4, 300), _t(1, 2, 4, 300), _t(1, 2, 4, 300)),
            ValueError,
            r"head dim must be in \[1, 256\]",
        ),
        (
            lambda: F.scaled_dot_product_attention(_t(2, 2, 4, 32), _t(3, 2, 4, 32), _t(3, 2, 4, 32)),
            ValueError,
            "do not broadcast",
        ),
        (
            lambda: F.scaled_dot_product_attention(
                _t(1, 2, 4, 32), _t(1, 2, 4, 32, dtype=torch.float16), _t(1, 2, 4, 32)
            ),
            TypeError,
            "share a dtype",
        ),
        (
            lambda: F.scaled_dot_product_attention(_t(1, 3, 4, 32), _t(1, 2, 4, 32), _t(1, 2, 4, 32), enable_gqa=True),
            ValueError,
            "multiple",
        ),
        (
            lambda: F.scaled_dot_product_attention(_t(1, 4, 4, 32), _t(1, 2, 4, 32), _t(1, 2, 4, 32)),
            ValueError,
            "enable_gqa",
        ),
        (
            lambda: F.scaled_dot_product_attention(
                _t(1, 2, 4, 32), _t(1, 2, 5, 32), _t(1, 2, 5, 32), attn_mask=_t(4, 4) > 0
            ),
            ValueError,
            "not broadcastable",
        ),
        (
            lambda: F.scaled_dot_product_attention(
                _t(1, 2, 4, 32),
                _t(1, 2, 4, 32),
                _t(1, 2, 4, 32),
                attn_mask=torch.ones(4, 4, dtype=torch.int64, device=DEVICE),
            ),
            TypeError,
            "attn_mask must be bool",
        ),
        (
            lambda: F.scaled_dot_product_attention(*(torch.ones(1, 2, 4, 32, dtype=torch.int32, device=DEVICE),) * 3),
            TypeError,
            "query must be",
        ),
        (
            lambda: F.varlen_attention(_t(6, 2, 32), _t(6, 2, 32), _t(6, 2, 32), _cu(0, 6).long(), _cu(0, 6), 6, 6),
            TypeError,
            "int32",
        ),
        (
            lambda: F.varlen_attention(
                _t(6, 2, 32), _t(6, 2, 32), _t(6, 2, 32), _cu(0, 4, 2, 6), _cu(0, 2, 4, 6), 6, 6
            ),
            ValueError,
            "non-decreasing",
        ),
        (
            lambda: F.varlen_attention(_t(6, 2, 32), _t(6, 2, 32), _t(6, 2, 32), _cu(0, 6), _cu(0, 6), 3, 6),
            ValueError,
            "max_seqlen",
        ),
        (
            lambda: F.varlen_attention(_t(6, 2, 32), _t(6, 2, 32), _t(6, 2, 32), _cu(0, 5), _cu(0, 6), 6, 6),
            ValueError,
            "end at 6",
        ),
    ],
)
def test_bad_input(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_torch_backend_matches_torch():
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    with fastlm.backend("torch"):
        assert torch.equal(
            F.scaled_dot_product_attention(q, k, v, is_causal=True),
            TF.scaled_dot_product_attention(q, k, v, is_causal=True),
        )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kw,case",
    [
        (dict(dropout_p=0.1), "dropout"),
        (dict(attn_mask=True), "attn_mask"),
        (dict(D=80), "head dim 80"),
        (dict(dtype=torch.float32), "dtype"),
    ],
)
def test_cuda_backend_unsupported_cases_raise(kw, case):
    from fastlm.dispatch import UnsupportedCaseError

    D, dtype = kw.pop("D", 64), kw.pop("dtype", torch.float16)
    q, k, v = (torch.randn(1, 2, 32, D, device="cuda", dtype=dtype) for _ in range(3))
    if kw.pop("attn_mask", False):
        kw["attn_mask"] = torch.ones(32, 32, dtype=torch.bool, device="cuda")
    with fastlm.backend("cuda"), pytest.raises(UnsupportedCaseError, match=case):
        F.scaled_dot_product_attention(q, k, v, **kw)
