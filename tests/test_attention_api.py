"""The public attention API on every backend (issue 18): torch's broadcasting of leading dims, the gradient of an
additive mask, and the score modifiers (window, softcap, sinks, ALiBi) through ``F.scaled_dot_product_attention`` and
``F.varlen_attention``, each against the float64 reference (``fastlm.reference``, an explicit bias/mask computation)
with FlashAttention's 2x rule in 16-bit types; plus the keywords' bad inputs.

The kernels' own edge cases (window edges, tile skipping, launch configs) are in test_attention_variants.py (Triton),
test_cpu_attention.py (cpu) and test_kvcache.py (decoding).
"""

import pytest
import torch
import torch.nn.functional as TF
from helpers import DEVICE, ON_GPU, compare_with_reference

import fastlm
import fastlm.functional as F
from fastlm import reference

DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.float16, torch.bfloat16)]
B, H, HKV, SQ, SK, D = 2, 4, 2, 9, 13, 16


def _skip(backend, dtype):
    if backend == "cuda":
        pytest.skip("the CUDA C++ attention has none of the modifiers (tested below: it raises)")
    if dtype == torch.bfloat16 and backend == "triton" and not ON_GPU:
        pytest.skip("the Triton interpreter's bf16 dots are wrong (Triton 3.8 bug): bf16 triton runs on a GPU only")


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# torch's broadcasting of the leading dims


BROADCASTS = {
    "3d-query-4d-kv": ((H, SQ, D), (B, H, SK, D), False),
    "batch-1-kv": ((B, H, SQ, D), (1, H, SK, D), False),
    "batch-1-query": ((1, H, SQ, D), (B, H, SK, D), False),
    "one-kv-head": ((B, H, SQ, D), (B, 1, SK, D), False),
    "one-query-head": ((B, 1, SQ, D), (B, HKV, SK, D), False),
    "5d-gqa": ((3, B, H, SQ, D), (B, HKV, SK, D), True),
    "2d": ((SQ, D), (SK, D), False),
}


@pytest.mark.parametrize("case", list(BROADCASTS))
def test_leading_dims_broadcast_as_torch(backend, case):
    _skip(backend, torch.float32)
    q_shape, kv_shape, gqa = BROADCASTS[case]
    inputs = dict(q=_rand(*q_shape), k=_rand(*kv_shape), v=_rand(*kv_shape))
    out = compare_with_reference(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa),
        lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, enable_gqa=gqa),
        inputs,
        torch.float32,
    )
    want = TF.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], enable_gqa=gqa)
    assert out.shape == want.shape


def test_broadcast_batch_is_not_copied():
    """A broadcast batch dim reaches the op as a stride-0 view (no copy of K/V per batch element)."""
    from fastlm.ops.attention_args import broadcast_qkv

    q, k = _rand(4, H, SQ, D), _rand(1, H, SK, D)
    _, k4, v4, lead, heads, out_shape = broadcast_qkv(q, k, k, False)
    assert k4.stride(0) == 0 and k4.data_ptr() == k.data_ptr() and lead == (4,) and out_shape == (4, H, SQ, D)


# ---------------------------------------------------------------------------------------------------------------
# the gradient of an additive mask, over its broadcast dims


MASK_SHAPES = {
    "full": (B, H, SQ, SK),
    "per-batch": (B, 1, SQ, SK),
    "per-head-key": (1, H, 1, SK),
    "shared": (SQ, SK),
    "key-only": (SK,),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(MASK_SHAPES))
def test_additive_mask_gradient(backend, dtype, shape):
    _skip(backend, dtype)
    mask = _rand(*MASK_SHAPES[shape]) * 2
    mask[..., 3] = float("-inf")  # a masked key: no gradient there (p = 0)
    inputs = dict(q=_rand(B, H, SQ, D, dtype=dtype), k=_rand(B, HKV, SK, D, dtype=dtype))
    inputs.update(v=_rand(B, HKV, SK, D, dtype=dtype), m=mask.to(dtype))

    def fn(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True, enable_gqa=True)

    def ref(q, k, v, m):
        return reference.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True, enable_gqa=True)

    compare_with_reference(fn, lambda **kw: ref(**kw), inputs, dtype)


# ---------------------------------------------------------------------------------------------------------------
# the modifiers, alone and combined


def _slopes(n):
    return torch.exp2(-8.0 * torch.arange(1, n + 1, device=DEVICE) / n)


MODIFIERS = {
    "window": dict(window=(3, 2)),
    "window-causal": dict(window=(4, None), is_causal=True),
    "window-left-only": dict(window=(2, None)),
    "softcap": dict(softcap=2.5),
    "sinks": dict(sinks=True),
    "alibi": dict(alibi_slopes=True),
    "alibi-per-batch": dict(alibi_slopes="batch"),
    "all-causal-masked": dict(window=(5, 0), is_causal=True, softcap=3.0, sinks=True, alibi_slopes=True, mask=True),
}


def _modifier_inputs(kw: dict, dtype):
    kw = dict(kw)
    extra = {}
    if kw.pop("sinks", None):
        extra["sinks"] = _rand(H)
    slopes = kw.pop("alibi_slopes", None)
    if slopes is not None:
        kw["alibi_slopes"] = _slopes(H) if slopes is True else torch.rand(B, H, device=DEVICE)
    if kw.pop("mask", None):
        extra["m"] = _rand(B, 1, SQ, SK).to(dtype)
    return kw, extra


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(MODIFIERS))
@pytest.mark.parametrize("Sq,Sk", [(SQ, SK), (SK, SQ), (SK, SK)])
def test_modifiers(backend, dtype, name, Sq, Sk):
    _skip(backend, dtype)
    kw, extra = _modifier_inputs(MODIFIERS[name], dtype)
    if "m" in extra:
        extra["m"] = _rand(B, 1, Sq, Sk).to(dtype)
    inputs = dict(q=_rand(B, H, Sq, D, dtype=dtype), k=_rand(B, HKV, Sk, D, dtype=dtype))
    inputs.update(v=_rand(B, HKV, Sk, D, dtype=dtype), **extra)

    def call(fn):
        def f(q, k, v, sinks=None, m=None):
            return fn(q, k, v, attn_mask=m, enable_gqa=True, sinks=sinks, **kw)

        return f

    compare_with_reference(
        call(F.scaled_dot_product_attention), call(reference.scaled_dot_product_attention), inputs, dtype
    )


@pytest.mark.parametrize("name", ["window-causal", "softcap", "sinks", "alibi-per-batch"])
def test_varlen_modifiers(backend, name):
    _skip(backend, torch.float32)
    kw, extra = _modifier_inputs(MODIFIERS[name], torch.float32)
    if "alibi_slopes" in kw and kw["alibi_slopes"].dim() == 2:
        kw["alibi_slopes"] = torch.rand(3, H, device=DEVICE)  # one row per sequence
    cu_q = torch.tensor([0, 5, 5, 14], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 7, 10, 21], dtype=torch.int32, device=DEVICE)
    inputs = dict(q=_rand(14, H, D), k=_rand(21, HKV, D), v=_rand(21, HKV, D), **extra)
    if backend == "cpu":
        with pytest.raises(fastlm.dispatch.UnsupportedCaseError, match="varlen"):
            F.varlen_attention(inputs["q"], inputs["k"], inputs["v"], cu_q, cu_k, 9, 11, **kw)
        return

    def call(fn):
        def f(q, k, v, sinks=None):
            return fn(q, k, v, cu_q, cu_k, 9, 11, sinks=sinks, **kw)

        return f

    def ref(q, k, v, cu_q, cu_k, max_q, max_k, **kws):
        return reference.varlen_attention(q, k, v, cu_q, cu_k, **kws)

    compare_with_reference(call(F.varlen_attention), call(ref), inputs, torch.float32)


def test_sink_gradient_is_the_formula(backend):
    """d sink[h] = -sum_{b,i} exp(sink[h] - lse) * rowsum(dO * O), checked against the float64 autograd of the
    explicit reference (a wrong sign or a missing scale shows)."""
    _skip(backend, torch.float32)
    q, k, v = _rand(B, H, SQ, D), _rand(B, H, SK, D), _rand(B, H, SK, D)
    sinks = (_rand(H) + 1).requires_grad_()
    o = F.scaled_dot_product_attention(q, k, v, sinks=sinks, window=(2, 2))
    do = torch.randn_like(o)
    (ds,) = torch.autograd.grad(o, sinks, do)
    s64 = sinks.detach().double().requires_grad_()
    o64 = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), sinks=s64, window=(2, 2))
    (ds64,) = torch.autograd.grad(o64, s64, do.double())
    torch.testing.assert_close(ds.double(), ds64, atol=1e-5, rtol=1e-4)
    assert ds.abs().max() > 1e-3  # the sinks matter at these sizes


def test_lse_includes_the_sink(backend):
    _skip(backend, torch.float32)
    q, k, v = _rand(B, H, SQ, D), _rand(B, H, SK, D), _rand(B, H, SK, D)
    sinks = _rand(H)
    _, lse = F.scaled_dot_product_attention(q, k, v, sinks=sinks, return_lse=True)
    s = (q.double() @ k.double().transpose(-1, -2)) / D**0.5
    want = torch.logsumexp(torch.cat([s, sinks.double().view(1, H, 1, 1).expand(B, H, SQ, 1)], -1), -1)
    torch.testing.assert_close(lse.double(), want, atol=1e-5, rtol=1e-5)


def test_rows_without_keys_give_zeros_with_and_without_sinks(backend):
    _skip(backend, torch.float32)
    q, k, v = _rand(1, H, 4, D), _rand(1, H, 6, D), _rand(1, H, 6, D)
    mask = torch.ones(4, 6, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    for sinks in (None, _rand(H)):
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, sinks=sinks, softcap=5.0)
        assert torch.equal(o[:, :, 1], torch.zeros_like(o[:, :, 1]))
        assert o.isfinite().all()


# ---------------------------------------------------------------------------------------------------------------
# bad input and the CUDA C++ backend


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(window=(-1, 0)), ValueError, "window left size must be an int >= 0 or None"),
        (dict(window=(2, -3)), ValueError, "window right size"),
        (dict(window=4), ValueError, r"window must be None or a \(left, right\) pair"),
        (dict(window=(2, 3), is_causal=True), ValueError, "right size must be 0 or None"),
        (dict(softcap=0.0), ValueError, "softcap must be None or a finite number > 0"),
        (dict(softcap=float("inf")), ValueError, "softcap"),
        (dict(sinks="s3"), ValueError, r"sinks must have shape \(4,\)"),
        (dict(sinks="int"), TypeError, "sinks must be a floating-point Tensor"),
        (dict(alibi_slopes="a3"), ValueError, "alibi_slopes must be"),
        (dict(alibi_slopes="grad"), ValueError, "alibi_slopes requires grad"),
    ],
)
def test_bad_modifiers(backend, kw, exc, match):
    if backend == "cuda":
        pytest.skip("the cuda backend raises UnsupportedCaseError first (test below)")
    values = {
        "s3": _rand(3),
        "int": torch.ones(H, dtype=torch.int64, device=DEVICE),
        "a3": _rand(3),
        "grad": _rand(H).requires_grad_(),
    }
    kw = {key: values.get(val, val) if isinstance(val, str) else val for key, val in kw.items()}
    q, k, v = _rand(1, H, 5, D), _rand(1, H, 5, D), _rand(1, H, 5, D)
    with pytest.raises(exc, match=match):
        F.scaled_dot_product_attention(q, k, v, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kw,case",
    [
        (dict(window=(8, 0)), "a sliding window"),
        (dict(softcap=30.0), "logit soft-capping"),
        (dict(sinks=True), "attention sinks"),
        (dict(alibi_slopes=True), "ALiBi slopes"),
    ],
)
def test_cuda_backend_names_the_modifier_it_lacks(kw, case):
    from fastlm.dispatch import UnsupportedCaseError

    q, k, v = (torch.randn(1, H, 32, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    kw = {key: (_rand(H) if val is True else val) for key, val in kw.items()}
    with fastlm.backend("cuda"), pytest.raises(UnsupportedCaseError, match=case):
        F.scaled_dot_product_attention(q, k, v, **kw)


def test_compile_fullgraph_with_modifiers_and_mask_gradient(backend):
    _skip(backend, torch.float32)

    def f(q, k, v, m, sinks):
        return (
            F.scaled_dot_product_attention(
                q, k, v, attn_mask=m, enable_gqa=True, window=(3, 0), is_causal=True, softcap=4.0, sinks=sinks
            )
            .square()
            .sum()
        )

    q, k, v = _rand(B, H, SQ, D), _rand(B, HKV, SQ, D), _rand(B, HKV, SQ, D)
    m, sinks = _rand(1, 1, SQ, SQ), _rand(H)
    leaves = [t.requires_grad_() for t in (q, k, v, m, sinks)]
    got = torch.compile(f, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")(*leaves)
    want = f(*leaves)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves), strict=True):
        torch.testing.assert_close(a, b)


def test_sink_gradient_is_finite_with_an_infinite_sink_and_empty_rows(backend):
    """A sink of -inf (a head without a sink) and rows that see no key (lse = -inf there): exp(sink - lse) is
    -inf - -inf, so the sink's gradient must treat those rows as contributing nothing, not NaN."""
    _skip(backend, torch.float32)
    q, k, v = _rand(1, 2, 12, D), _rand(1, 2, 8, D), _rand(1, 2, 8, D)
    sinks = torch.tensor([float("-inf"), 0.5], device=DEVICE, requires_grad=True)
    o = F.scaled_dot_product_attention(q, k, v, window=(None, 0), sinks=sinks)
    (ds,) = torch.autograd.grad(o, sinks, torch.randn_like(o))
    assert ds.isfinite().all() and ds[0] == 0, ds


def test_broadcast_mask_gradient_is_refused_in_deterministic_mode():
    """The Triton backward sums a broadcast mask's gradient with atomic adds: torch.use_deterministic_algorithms(True)
    gets an error, as from torch's own nondeterministic ops (a full mask's gradient is plain stores: allowed)."""
    q, k, v = _rand(1, 2, 8, D), _rand(1, 2, 8, D), _rand(1, 2, 8, D)
    shared, full = _rand(8, 8).requires_grad_(), _rand(1, 2, 8, 8).requires_grad_()
    with fastlm.backend("triton"):
        try:
            torch.use_deterministic_algorithms(True)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=full)
            torch.autograd.grad(o.sum(), full)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=shared)
            with pytest.raises(RuntimeError, match="use_deterministic_algorithms"):
                torch.autograd.grad(o.sum(), shared)
        finally:
            torch.use_deterministic_algorithms(False)
