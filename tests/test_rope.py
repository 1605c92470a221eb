"""Rotary position embedding (fastlm.functional.apply_rotary_pos_emb) on the fused backends against Hugging Face's
own functions in float64 (Llama, Phi-3's partial rotary, Cohere's interleaved pairs) or fastlm.reference: outputs
and both gradients, every dtype, GQA, odd sizes, layouts, strided views without copies, broadcast tables, in place,
bad input, opcheck and torch.compile. The cpu backend at model sizes: test_cpu_rope.py."""

import pytest
import torch
from helpers import DEVICE, ON_GPU, OPCHECK_TESTS, compare_with_reference
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.cohere import modeling_cohere
from transformers.models.llama import modeling_llama
from transformers.models.phi3 import modeling_phi3

import fastlm
import fastlm.functional as F
from fastlm import reference
from fastlm.dispatch import BackendUnavailableError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _heads(B, S, H, D, layout, dtype=torch.float32):
    """(B, H, S, D) as HF makes it (a transposed view of a (B, S, H, D) projection), or (B, S, H, D)."""
    x = torch.randn(B, S, H, D, device=DEVICE, dtype=dtype)
    return x.transpose(1, 2) if layout == "bhsd" else x


def _tables(shape, dtype=torch.float32, interleaved=False):
    """Per-element tables (random, not only cos^2 + sin^2 = 1: the kernels must use every entry), Cohere-style
    repeat-interleaved or Llama-style halves concatenated when asked (shape[-1] even)."""
    rot = shape[-1]
    base = torch.randn(*shape[:-1], rot, device=DEVICE, dtype=dtype)
    if interleaved is None:
        return base
    half = torch.randn(*shape[:-1], rot // 2, device=DEVICE, dtype=dtype) * 3
    return half.repeat_interleave(2, dim=-1) if interleaved else torch.cat((half, half), dim=-1)


def _check(q, k, cos, sin, unsqueeze_dim, hf, dtype, interleaved=False):
    """fastlm against ``hf`` (a function of (q, k, cos, sin, unsqueeze_dim)) in float64: the concatenated outputs
    and dq, dk (cos / sin are not differentiated: the fused kernels refuse trainable tables)."""

    def ours(q, k, cos, sin):
        qo, ko = F.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim, interleaved=interleaved)
        assert qo.dtype == ko.dtype == torch.promote_types(q.dtype, cos.dtype)
        return torch.cat((qo.flatten(), ko.flatten()))

    def ref(q, k, cos, sin):
        qo, ko = hf(q, k, cos, sin, unsqueeze_dim)
        return torch.cat((qo.flatten(), ko.flatten()))

    compare_with_reference(ours, ref, {"q": q, "k": k, "cos": cos, "sin": sin}, dtype, differentiable=["q", "k"])


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_hf_llama(backend, dtype, layout):
    """HF's Llama function itself, in both layouts, tables of q's dtype (as HF's rotary module returns them)."""
    B, S, Hq, Hk, D = 2, 5, 4, 2, 16
    q, k = _heads(B, S, Hq, D, layout, dtype), _heads(B, S, Hk, D, layout, dtype)
    cos, sin = _tables((B, S, D), dtype, False), _tables((B, S, D), dtype, None)
    _check(q, k, cos, sin, 1 if layout == "bhsd" else 2, modeling_llama.apply_rotary_pos_emb, dtype)


@pytest.mark.parametrize("Hq,Hk", [(4, 2), (1, 1), (3, 1), (2, 5)])
def test_gqa_and_odd_sizes(backend, Hq, Hk):
    """q and k with different head counts in one launch, odd batch and sequence."""
    B, S, D = 3, 7, 8
    q, k = _heads(B, S, Hq, D, "bhsd"), _heads(B, S, Hk, D, "bhsd")
    _check(q, k, _tables((B, S, D)), _tables((B, S, D)), 1, modeling_llama.apply_rotary_pos_emb, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_partial_rotary_matches_phi3(backend, layout, dtype):
    """rot < head_dim: the first rot dims rotate, the others pass through (Phi-3's function)."""
    B, S, Hq, Hk, D, rot = 2, 3, 3, 1, 40, 8  # pass-through of 32 dims
    q, k = _heads(B, S, Hq, D, layout, dtype), _heads(B, S, Hk, D, layout, dtype)
    cos, sin = _tables((B, S, rot), dtype), _tables((B, S, rot), dtype)
    _check(q, k, cos, sin, 1 if layout == "bhsd" else 2, modeling_phi3.apply_rotary_pos_emb, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_interleaved_matches_cohere(backend, dtype):
    """GPT-J / Cohere pairs (2j, 2j + 1), against Cohere's function (float64 in, so its cast back is exact)."""
    B, S, Hq, Hk, D = 2, 4, 2, 2, 16
    q, k = _heads(B, S, Hq, D, "bhsd", dtype), _heads(B, S, Hk, D, "bhsd", dtype)
    cos, sin = _tables((B, S, D), dtype, True), _tables((B, S, D), dtype, None)
    _check(q, k, cos, sin, 1, modeling_cohere.apply_rotary_pos_emb, dtype, interleaved=True)


def test_interleaved_partial(backend):
    B, S, Hq, Hk, D, rot = 1, 5, 2, 1, 24, 12
    q, k = _heads(B, S, Hq, D, "bshd"), _heads(B, S, Hk, D, "bshd")

    def ref(q, k, cos, sin, u):
        return reference.apply_rotary_pos_emb(q, k, cos, sin, u, interleaved=True)

    _check(q, k, _tables((B, S, rot)), _tables((B, S, rot)), 2, ref, torch.float32, interleaved=True)


def test_reference_is_hf():
    """fastlm.reference (the torch backend) against HF's three functions, in float64."""
    q, k = _heads(2, 3, 2, 16, "bhsd").double(), _heads(2, 3, 1, 16, "bhsd").double()
    for hf, shape, inter in (
        (modeling_llama.apply_rotary_pos_emb, (2, 3, 16), False),
        (modeling_phi3.apply_rotary_pos_emb, (2, 3, 6), False),
        (modeling_cohere.apply_rotary_pos_emb, (2, 3, 16), True),
    ):
        cos, sin = _tables(shape).double(), _tables(shape).double()
        got = reference.apply_rotary_pos_emb(q, k, cos, sin, 1, inter)
        torch.testing.assert_close(got, hf(q, k, cos, sin, 1), rtol=0, atol=0)


@pytest.mark.parametrize(
    "layout,table,unsqueeze_dim",
    [
        ("bhsd", (1, 6, 8), 1),  # HF's rotary module without per-batch positions
        ("bhsd", (6, 8), 0),  # (S, rot) unsqueezed to (1, S, rot): broadcasts over batch and heads
        ("bshd", (6, 8), 1),  # (S, 1, rot) against (B, S, H, D)
        ("bshd", (2, 6, 8), -2),
        ("bhsd", (2, 6, 8), -3),
        ("bhsd", (2, 1, 8), 1),  # one position for all (decoding step)
        ("bshd", (8,), 0),  # one row for every token
    ],
)
def test_table_broadcast(backend, layout, table, unsqueeze_dim):
    B, S, Hq, Hk, D = 2, 6, 2, 1, 8
    q, k = _heads(B, S, Hq, D, layout), _heads(B, S, Hk, D, layout)
    _check(q, k, _tables(table), _tables(table), unsqueeze_dim, modeling_llama.apply_rotary_pos_emb, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_tables_promote_like_hf(backend, dtype):
    """16-bit q with float32 tables: HF's formula promotes to float32, and so do we (gradients in q's dtype)."""
    B, S, H, D = 2, 3, 2, 8
    q, k = _heads(B, S, H, D, "bhsd", dtype), _heads(B, S, H, D, "bhsd", dtype)
    cos, sin = _tables((B, S, D)), _tables((B, S, D))
    want = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    q.requires_grad_()
    got = F.apply_rotary_pos_emb(q, k, cos, sin)
    assert got[0].dtype == want[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    (dq,) = torch.autograd.grad(got[0].sum() + got[1].sum(), q)
    assert dq.dtype == dtype


class _Ops(TorchDispatchMode):
    """The aten / fastlm ops a call dispatches (top level only: a custom op's insides are not seen)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("source", ["transposed", "qkv_slice"])
def test_strided_views_read_without_copy(backend, source):
    """HF's transposed (B, H, S, D) views and slices of a fused qkv projection are read in place (no copy op is
    dispatched) and the outputs keep the inputs' dim order."""
    B, S, Hq, Hk, D = 2, 5, 4, 2, 8
    if source == "transposed":
        q, k = _heads(B, S, Hq, D, "bhsd"), _heads(B, S, Hk, D, "bhsd")
    else:
        qkv = torch.randn(B, S, (Hq + 2 * Hk) * D, device=DEVICE)
        q = qkv[..., : Hq * D].view(B, S, Hq, D).transpose(1, 2)
        k = qkv[..., Hq * D : (Hq + Hk) * D].view(B, S, Hk, D).transpose(1, 2)
    cos, sin = _tables((B, S, D)), _tables((B, S, D))
    with _Ops() as ops:
        qo, ko = F.apply_rotary_pos_emb(q, k, cos, sin)
    copies = [n for n in ops.names if any(w in n for w in ("copy", "clone", "contiguous", "_to_copy"))]
    assert not copies, ops.names
    assert any(f"rope_fwd_{backend}" in n for n in ops.names), ops.names
    for out, x in ((qo, q), (ko, k)):
        assert sorted(range(3), key=lambda d: -out.stride(d)) == sorted(range(3), key=lambda d: -x.stride(d))
        assert out.stride(-1) == 1
    if source == "transposed":
        assert qo.stride() == q.stride() and ko.stride() == k.stride()
    want = modeling_llama.apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double())
    torch.testing.assert_close(qo.double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ko.double(), want[1], rtol=1e-5, atol=1e-5)


def test_strided_last_dim_is_copied(backend):
    """A strided last dim (the one case that needs a copy) still gives HF's result."""
    B, S, H, D = 1, 4, 2, 8
    q = torch.randn(B, H, S, 2 * D, device=DEVICE)[..., ::2]
    k = torch.randn(B, H, S, 2 * D, device=DEVICE)[..., 1::2]
    cos, sin = _tables((B, S, 2 * D))[..., ::2], _tables((B, S, D))
    got = F.apply_rotary_pos_emb(q, k, cos, sin)
    want = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interleaved,rot", [(False, 16), (False, 6), (True, 16)])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_inplace(backend, layout, interleaved, rot):
    """inplace=True writes into q and k (same objects, same memory; pass-through dims untouched) and autograd gives
    the out-of-place gradients (q and k are marked dirty)."""
    B, S, Hq, Hk, D = 2, 3, 4, 2, 16
    u = 1 if layout == "bhsd" else 2
    q0, k0 = _heads(B, S, Hq, D, layout), _heads(B, S, Hk, D, layout)
    cos, sin = _tables((B, S, rot)), _tables((B, S, rot))
    want = reference.apply_rotary_pos_emb(q0.double(), k0.double(), cos.double(), sin.double(), u, interleaved)
    a, b = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    q, k = a * 1, b * 1  # non-leaf, as HF's projections
    if layout == "bhsd":  # HF's views: autograd must rebase the projection's history through them
        a, b = q0.transpose(1, 2).clone().requires_grad_(), k0.transpose(1, 2).clone().requires_grad_()
        q, k = (a * 1).transpose(1, 2), (b * 1).transpose(1, 2)
        assert q._is_view() and k._is_view()
    ptrs = (q.data_ptr(), k.data_ptr())
    qo, ko = F.apply_rotary_pos_emb(q, k, cos, sin, u, interleaved=interleaved, inplace=True)
    assert qo is q and ko is k and (q.data_ptr(), k.data_ptr()) == ptrs
    torch.testing.assert_close(q.double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.double(), want[1], rtol=1e-5, atol=1e-5)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    da, db = torch.autograd.grad((q, k), (a, b), (gq, gk))
    if layout == "bhsd":
        da, db = da.transpose(1, 2), db.transpose(1, 2)
    a64, b64 = q0.double().requires_grad_(), k0.double().requires_grad_()
    r = reference.apply_rotary_pos_emb(a64, b64, cos.double(), sin.double(), u, interleaved)
    wa, wb = torch.autograd.grad(r, (a64, b64), (gq.double(), gk.double()))
    torch.testing.assert_close(da.double(), wa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db.double(), wb, rtol=1e-5, atol=1e-5)


def test_inplace_16bit_with_fp32_tables(backend):
    """In place keeps q's dtype (the result is written into q), computed in float32."""
    q, k = _heads(1, 3, 2, 8, "bhsd", torch.bfloat16), _heads(1, 3, 1, 8, "bhsd", torch.bfloat16)
    cos, sin = _tables((1, 3, 8)), _tables((1, 3, 8))
    want = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    F.apply_rotary_pos_emb(q, k, cos, sin, inplace=True)
    assert q.dtype == torch.bfloat16
    torch.testing.assert_close(q, want[0].to(torch.bfloat16), rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(k, want[1].to(torch.bfloat16), rtol=1.6e-2, atol=1.6e-2)


def test_inplace_on_leaf_raises_as_torch(backend):
    """An in-place op on a leaf that requires grad raises before anything is written, as on the torch backend
    (torch's own copy_); allowed under no_grad, as torch's in-place ops are."""
    q = torch.randn(1, 2, 3, 8, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 1, 3, 8, device=DEVICE)
    before = q.detach().clone()
    cos, sin = _tables((1, 3, 8)), _tables((1, 3, 8))
    for name in (backend, "torch"):
        with fastlm.backend(name), pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            F.apply_rotary_pos_emb(q, k, cos, sin, inplace=True)
        assert torch.equal(q.detach(), before)
    leaf = torch.randn(1, 3, 2, 8, device=DEVICE, requires_grad=True)  # a view of it: HF's transposed layout
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="view of a leaf Variable that requires grad"):
        F.apply_rotary_pos_emb(leaf.transpose(1, 2), k, cos, sin, inplace=True)
    assert torch.equal(leaf.detach(), before)  # refused before the kernel wrote
    with torch.no_grad():
        F.apply_rotary_pos_emb(q, k, cos, sin, inplace=True)
    assert not torch.equal(q.detach(), before)


def test_one_input_requires_grad(backend):
    """Only q (or only k) requires grad: the other gets none, the gradient is right."""
    q, k = _heads(2, 3, 2, 8, "bhsd"), _heads(2, 3, 1, 8, "bhsd")
    cos, sin = _tables((2, 3, 8)), _tables((2, 3, 8))
    for which in ("q", "k"):
        a = (q if which == "q" else k).detach().clone().requires_grad_()
        args = (a, k) if which == "q" else (q, a)
        out = F.apply_rotary_pos_emb(*args, cos, sin)
        g = torch.randn_like(out[0] if which == "q" else out[1])
        (got,) = torch.autograd.grad(out[0 if which == "q" else 1], a, g)
        a64 = a.detach().double().requires_grad_()
        args64 = (a64, k.double()) if which == "q" else (q.double(), a64)
        r = modeling_llama.apply_rotary_pos_emb(*args64, cos.double(), sin.double())
        (want,) = torch.autograd.grad(r[0 if which == "q" else 1], a64, g.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_trainable_tables_raise(backend):
    q, k = _heads(1, 3, 2, 8, "bhsd"), _heads(1, 3, 1, 8, "bhsd")
    cos, sin = _tables((1, 3, 8)).requires_grad_(), _tables((1, 3, 8))
    with pytest.raises(ValueError, match="gives the tables no gradient"):
        F.apply_rotary_pos_emb(q, k, cos, sin)
    with torch.no_grad():
        F.apply_rotary_pos_emb(q, k, cos, sin)  # nothing to drop without grad
    with fastlm.backend("torch"):  # the torch path differentiates the tables
        (dc,) = torch.autograd.grad(F.apply_rotary_pos_emb(q, k, cos, sin)[0].sum(), cos)
    assert dc.abs().sum() > 0


def test_float64_goes_to_torch_under_auto():
    q, k = _heads(1, 3, 2, 8, "bhsd").double(), _heads(1, 3, 1, 8, "bhsd").double()
    cos, sin = _tables((1, 3, 8)).double(), _tables((1, 3, 8)).double()
    got = F.apply_rotary_pos_emb(q, k, cos, sin)
    want = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with fastlm.backend("triton"), pytest.raises(TypeError, match="q must be"):
        F.apply_rotary_pos_emb(q, k, cos, sin)


def test_empty(backend):
    q, k = torch.randn(0, 2, 3, 8, device=DEVICE), torch.randn(0, 1, 3, 8, device=DEVICE)
    cos, sin = _tables((1, 3, 8)), _tables((1, 3, 8))
    qo, ko = F.apply_rotary_pos_emb(q, k, cos, sin)
    assert qo.shape == q.shape and ko.shape == k.shape


def _args(**over):
    a = dict(
        q=torch.randn(2, 4, 3, 8, device=DEVICE),
        k=torch.randn(2, 2, 3, 8, device=DEVICE),
        cos=torch.randn(2, 3, 8, device=DEVICE),
        sin=torch.randn(2, 3, 8, device=DEVICE),
    )
    a.update(over)
    return a


@pytest.mark.parametrize(
    "over,unsqueeze_dim,exc,match",
    [
        (dict(q=torch.randn(2, 4, 8)), 1, ValueError, "q must be 4-D"),
        (dict(k=torch.randn(2, 2, 3, 8, 1)), 1, ValueError, "k must be 4-D"),
        (dict(k=torch.randn(3, 2, 3, 8)), 1, ValueError, "same batch and seq"),
        (dict(k=torch.randn(2, 2, 5, 8)), 1, ValueError, "same batch and seq"),
        (dict(q=torch.randn(2, 4, 3, 7), k=torch.randn(2, 2, 3, 7)), 1, ValueError, "head_dim .* must be even"),
        (dict(k=torch.randn(2, 2, 3, 6)), 1, ValueError, "k must have q's head_dim"),
        (dict(cos=torch.randn(2, 3, 5), sin=torch.randn(2, 3, 5)), 1, ValueError, "rotary dim"),
        (dict(cos=torch.randn(2, 3, 10), sin=torch.randn(2, 3, 10)), 1, ValueError, "rotary dim"),
        (dict(sin=torch.randn(2, 3, 6)), 1, ValueError, "same shape"),
        (dict(cos=torch.randn(4, 3, 8), sin=torch.randn(4, 3, 8)), 1, ValueError, "do not broadcast"),
        (dict(cos=torch.randn(2, 5, 8), sin=torch.randn(2, 5, 8)), 1, ValueError, "do not broadcast"),
        (dict(cos=torch.randn(1, 2, 3, 8), sin=torch.randn(1, 2, 3, 8)), 1, ValueError, "tables"),
        ({}, 4, ValueError, "unsqueeze_dim must be"),
        ({}, 1.0, ValueError, "unsqueeze_dim must be"),
        ({}, 0, ValueError, "must be q's head dim"),
        ({}, 3, ValueError, "must be q's head dim"),
        (dict(q=torch.randint(0, 5, (2, 4, 3, 8))), 1, TypeError, "q must be"),
        (dict(k=torch.randn(2, 2, 3, 8, dtype=torch.float16)), 1, TypeError, "k must have q's dtype"),
        (
            dict(cos=torch.randn(2, 3, 8, dtype=torch.float16), sin=torch.randn(2, 3, 8, dtype=torch.float16)),
            1,
            TypeError,
            "cos and sin must both have",
        ),
        (dict(cos=torch.randn(2, 3, 8).to("meta")), 1, ValueError, "cos is on meta"),
        (dict(q=[[1.0]]), 1, TypeError, "q must be a Tensor"),
    ],
)
def test_bad_input(backend, over, unsqueeze_dim, exc, match):
    movable = {n: t for n, t in over.items() if isinstance(t, torch.Tensor) and t.device.type != "meta"}
    a = _args(**{**over, **{n: t.to(DEVICE) for n, t in movable.items()}})
    with pytest.raises(exc, match=match):
        F.apply_rotary_pos_emb(a["q"], a["k"], a["cos"], a["sin"], unsqueeze_dim)


def test_inplace_bad_input(backend):
    a = _args()
    with pytest.raises(ValueError, match="expanded"):
        F.apply_rotary_pos_emb(a["q"][:, :1].expand(2, 4, 3, 8), a["k"], a["cos"], a["sin"], inplace=True)
    with pytest.raises(ValueError, match="unit last stride"):
        q = torch.randn(2, 4, 3, 16, device=DEVICE)[..., ::2]
        F.apply_rotary_pos_emb(q, a["k"], a["cos"], a["sin"], inplace=True)


def test_inplace_on_shared_memory(backend):
    """q and k views of one tensor (a merged qkv projection's heads; or the very same tensor): each element is
    rotated once, as the torch backend does it."""
    a = _args()
    for q_heads, k_heads in ((slice(0, 2), slice(2, 4)), (slice(0, 3), slice(1, 4)), (slice(0, 4), slice(0, 4))):
        qk = torch.randn(2, 4, 3, 8, device=DEVICE)
        want_q, want_k = (t.clone() for t in (qk[:, q_heads], qk[:, k_heads]))
        with fastlm.backend("torch"):
            want_q, want_k = F.apply_rotary_pos_emb(want_q, want_k, a["cos"], a["sin"])
        q, k = F.apply_rotary_pos_emb(qk[:, q_heads], qk[:, k_heads], a["cos"], a["sin"], inplace=True)
        torch.testing.assert_close(k, want_k)
        if q_heads.stop <= k_heads.start:  # disjoint: q keeps its own result
            torch.testing.assert_close(q, want_q)


def test_cuda_backend_says_unsupported():
    with fastlm.backend("cuda"), pytest.raises(BackendUnavailableError):
        F.apply_rotary_pos_emb(**_args())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(backend, dtype):
    fwd = getattr(torch.ops.fastlm, f"rope_fwd_{backend}")
    inplace = getattr(torch.ops.fastlm, f"rope_inplace_{backend}")
    q = _heads(2, 3, 4, 8, "bhsd", dtype).requires_grad_()
    k = _heads(2, 3, 2, 8, "bhsd", dtype).requires_grad_()
    cos, sin = _tables((1, 3, 6), dtype), _tables((1, 3, 6), dtype)  # partial: pass-through dims copied
    torch.library.opcheck(fwd, (q, k, cos, sin, 1, False, False), test_utils=OPCHECK_TESTS)
    qs, ks = q.detach().transpose(1, 2).requires_grad_(), k.detach().transpose(1, 2).requires_grad_()
    torch.library.opcheck(fwd, (qs, ks, cos, sin, 2, False, False), test_utils=OPCHECK_TESTS)  # (B, S, H, D)
    torch.library.opcheck(fwd, (q, k, cos.float(), sin.float(), 1, True, True), test_utils=OPCHECK_TESTS)
    qi, ki = q.detach().clone(), k.detach().clone()
    torch.library.opcheck(inplace, (qi, ki, cos, sin, 1, False), test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("inplace", [False, True])
def test_compile_fullgraph(backend, inplace):
    B, S, Hq, Hk, D = 2, 3, 4, 2, 8

    def f(x, wq, wk, cos, sin):
        q = (x @ wq).view(B, S, Hq, D).transpose(1, 2)
        k = (x @ wk).view(B, S, Hk, D).transpose(1, 2)
        qo, ko = F.apply_rotary_pos_emb(q, k, cos, sin, inplace=inplace)
        return (qo * qo).sum() + (ko * ko.detach()).sum() + qo.sum()

    x = torch.randn(B, S, 16, device=DEVICE, requires_grad=True)
    wq = torch.randn(16, Hq * D, device=DEVICE, requires_grad=True)
    wk = torch.randn(16, Hk * D, device=DEVICE, requires_grad=True)
    cos, sin = _tables((B, S, D)), _tables((B, S, D))
    got = torch.compile(f, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")(x, wq, wk, cos, sin)
    want = f(x, wq, wk, cos, sin)
    torch.testing.assert_close(got, want)
    g = torch.autograd.grad(got, (x, wq, wk))
    w = torch.autograd.grad(want, (x, wq, wk))
    with fastlm.backend("torch"):
        r = torch.autograd.grad(f(x, wq, wk, cos, sin), (x, wq, wk))
    for a, b, c in zip(g, w, r, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
