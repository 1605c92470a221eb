"""The CPU C++ attention kernels (csrc/cpu/attention.cpp, attention_bwd.cpp) at realistic sizes: forward (and lse)
and backward (dq, dk, dv, dmask, dsinks) against the float64 reference in all three dtypes (FlashAttention's 2x rule
in 16-bit), head dims, decoding, GQA with strided inputs, masks, fully masked rows and tiles, the score modifiers,
dropout (its keep mask recovered from the kernel, then every output and gradient against the reference with that
mask), thread-count invariance and determinism, the case it lacks (varlen), and the raw ops' input checks. Outputs
are NaN-poisoned (conftest: FASTLM_POISON=1), so an element the kernels forget to write fails. Always on CPU
tensors, whatever the machine."""

import math

import pytest
import torch
import torch.nn.functional as TF
from test_attention import DTYPES, _fold_causal

import fastlm
import fastlm.functional as F

CPU = torch.device("cpu")
CPU_DTYPES = DTYPES


def _cpu_forward_check(B, H, Hkv, Sq, Sk, D, dtype, causal=False, mask=None, layout=None):
    """fastlm's cpu forward (and lse) against float64 within the dtype's tolerance and the 2x oracle."""
    from helpers import assert_close_ref

    if layout == "bshd":
        mk = lambda s: torch.randn(s[0], s[2], s[1], s[3]).to(dtype).transpose(1, 2)  # noqa: E731
    else:
        mk = lambda s: torch.randn(s).to(dtype)  # noqa: E731
    q, k, v = mk((B, H, Sq, D)), mk((B, Hkv, Sk, D)), mk((B, Hkv, Sk, D))
    gqa = H != Hkv
    m = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    with fastlm.backend("cpu"):
        out, lse = F.scaled_dot_product_attention(
            q, k, v, attn_mask=m, is_causal=causal, enable_gqa=gqa, return_lse=True
        )
    full = _fold_causal(m, Sq, Sk, CPU) if causal else m
    allowed = None
    if full is not None:
        allowed = (full if full.dtype == torch.bool else full > float("-inf")).expand(B, H, Sq, Sk)
    empty = None if allowed is None else ~allowed.any(-1, keepdim=True)
    ref_mask = full if empty is None else full.masked_fill(empty, True if full.dtype == torch.bool else 0.0)

    def ref(cast):
        mm = ref_mask if ref_mask is None or ref_mask.dtype == torch.bool else cast(ref_mask)
        o = TF.scaled_dot_product_attention(cast(q), cast(k), cast(v), attn_mask=mm, enable_gqa=gqa)
        return o if empty is None else o.masked_fill(empty, 0.0)

    assert_close_ref(out, ref(lambda t: t.double()), dtype, "out", None if dtype == torch.float32 else ref(lambda t: t))
    # lse: natural log of the sum of exp of the scaled (masked) scores; -inf on rows with no visible key
    kk = k.double().repeat_interleave(H // Hkv, 1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(D)
    if full is not None:
        s = s.masked_fill(~full, float("-inf")) if full.dtype == torch.bool else s + full.double()
    want = torch.logsumexp(s, -1)
    lse_tol = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-3}[dtype]
    torch.testing.assert_close(lse.double(), want, atol=lse_tol, rtol=lse_tol)
    return out, lse


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_bert_sizes(dtype, causal):
    _cpu_forward_check(2, 12, 12, 512, 512, 64, dtype, causal)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("D", [1, 7, 16, 80, 96, 128, 160, 192, 256])
def test_cpu_head_dims(dtype, D):
    _cpu_forward_check(1, 3, 3, 77, 150, D, dtype, causal=D % 2 == 0)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(
    "Sq,Sk,causal",
    [
        (1, 1024, False),
        (1, 1, True),
        (3, 700, False),
        (5, 300, True),
        (300, 70, True),
        (200, 333, False),
        (33, 65, True),
    ],
)
def test_cpu_decoding_and_ragged(dtype, Sq, Sk, causal):
    """Sq = 1 (decoding), blocks of a few rows (the row-at-a-time path), Sq > Sk with causal (rows beyond Sk see all
    keys), ragged last tiles."""
    _cpu_forward_check(2, 4, 2, Sq, Sk, 128, dtype, causal)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H,Hkv", [(32, 8), (8, 1)])
def test_cpu_gqa_strided(dtype, causal, H, Hkv):
    _cpu_forward_check(1, H, Hkv, 300, 300, 128, dtype, causal, layout="bshd")


CPU_MASKS = {
    # (B, 1, 1, Sk) key padding: one bias per key (stride 0 over queries); batch 1 has whole tiles masked
    "bool_padding": lambda B, H, Sq, Sk: (torch.arange(Sk) < torch.tensor([Sk, 37])[:, None]).view(B, 1, 1, Sk),
    "bool_full": lambda B, H, Sq, Sk: torch.rand(B, H, Sq, Sk) > 0.5,
    "float_per_batch": lambda B, H, Sq, Sk: torch.randn(B, 1, Sq, Sk),
    "float_2d_inf": lambda B, H, Sq, Sk: torch.randn(Sq, Sk).masked_fill(torch.rand(Sq, Sk) < 0.4, float("-inf")),
    "float_padding_inf": lambda B, H, Sq, Sk: torch.zeros(B, 1, 1, Sk).masked_fill(
        torch.arange(Sk) >= torch.tensor([Sk // 3, Sk])[:, None, None, None], float("-inf")
    ),
}


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", list(CPU_MASKS))
def test_cpu_masks(dtype, causal, kind):
    B, H, Sq, Sk = 2, 6, 130, 260
    _cpu_forward_check(B, H, 3, Sq, Sk, 64, dtype, causal, mask=CPU_MASKS[kind](B, H, Sq, Sk))


def test_cpu_fully_masked_rows_and_tiles():
    B, H, Sq, Sk = 2, 4, 100, 300
    mask = torch.rand(B, H, Sq, Sk) > 0.2
    mask[:, :, :, 64:256] = False  # whole key tiles
    mask[1, 2, 7] = False  # whole rows
    mask[0, :, 40:80] = False  # a whole query block's rows
    out, lse = _cpu_forward_check(B, H, H, Sq, Sk, 64, torch.float32, mask=mask)
    assert torch.equal(out[1, 2, 7], torch.zeros(64)) and lse[1, 2, 7] == float("-inf")
    assert torch.equal(out[0, :, 40:80], torch.zeros(H, 40, 64)) and bool((lse[0, :, 40:80] == float("-inf")).all())


def test_cpu_thread_count_invariant():
    """Every row is computed by one thread in a fixed order: the result does not depend on the thread count."""
    from helpers import at_thread_counts

    q, k, v = (torch.randn(2, 4, 150, 64) for _ in range(3))
    with fastlm.backend("cpu"):
        outs = at_thread_counts(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), (1, max(torch.get_num_threads(), 2))
        )
    assert torch.equal(outs[0], outs[1])


def test_cpu_unsupported_cases_raise():
    from fastlm.dispatch import UnsupportedCaseError

    with (
        fastlm.backend("cpu"),
        pytest.raises(UnsupportedCaseError, match="cpu backend's attention does not support varlen"),
    ):
        cu = torch.tensor([0, 3, 8], dtype=torch.int32)
        F.varlen_attention(*(torch.randn(8, 2, 16) for _ in range(3)), cu, cu, 5, 5)


def _raw(
    q=None,
    k=None,
    v=None,
    mask=None,
    cu=None,
    dropout_p=0.0,
    dtype=torch.float32,
    window=(-1, -1),
    softcap=0.0,
    sinks=None,
    alibi=None,
    rng=None,
):
    q = torch.randn(1, 2, 8, 16, dtype=dtype) if q is None else q
    k = torch.randn(1, 2, 8, 16, dtype=dtype) if k is None else k
    v = torch.randn(1, 2, 8, 16, dtype=dtype) if v is None else v
    rng = torch.zeros(1, dtype=torch.int64) if rng is None else rng
    return torch.ops.fastlm.attention_fwd_cpu(
        q, k, v, mask, cu, cu, 8, 8, 0.25, False, dropout_p, rng, *window, softcap, sinks, alibi
    )


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(cu=torch.tensor([0, 8], dtype=torch.int32)), "varlen"),
        (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
        (dict(dropout_p=-0.1), r"dropout_p must be in \[0, 1\)"),
        (dict(dropout_p=0.5, rng=torch.zeros(2, dtype=torch.int64)), r"rng must be a \(1,\) int64"),
        (dict(dropout_p=0.5, rng=torch.zeros(1, dtype=torch.int32)), r"rng must be a \(1,\) int64"),
        (dict(q=torch.randn(1, 2, 8, 16, dtype=torch.float64)), "float32, float16 or bfloat16"),
        (dict(k=torch.randn(1, 2, 8, 16, dtype=torch.float16)), "must have q's dtype"),
        (dict(q=torch.randn(1, 2, 16, 8).transpose(-1, -2)), "unit stride"),
        (dict(q=torch.randn(2, 8, 16)), "4-D"),
        (dict(q=torch.randn(1, 3, 8, 16)), "multiple"),
        (dict(k=torch.randn(1, 2, 8, 32), v=torch.randn(1, 2, 8, 32)), "head dim"),
        (dict(v=torch.randn(1, 2, 9, 16)), "same shape"),
        (dict(mask=torch.ones(1, 2, 8, 9, dtype=torch.bool)), r"mask must be a \(B, H, Sq, Sk\)"),
        (dict(mask=torch.ones(1, 2, 8, 8, dtype=torch.int32)), "mask must be bool"),
        (dict(window=(-2, 0)), "window sizes must be >= 0"),
        (dict(window=(3, -5)), "window sizes must be >= 0"),
        (dict(softcap=-1.0), "softcap must be finite and >= 0"),
        (dict(softcap=float("inf")), "softcap must be finite and >= 0"),
        (dict(sinks=torch.zeros(3)), r"sinks must have shape \(H,\)"),
        (dict(sinks=torch.zeros(1, 2)), r"sinks must have shape \(H,\)"),
        (dict(sinks=torch.zeros(2, dtype=torch.float16)), "sinks must be float32"),
        (dict(sinks=torch.zeros(4)[::2]), "sinks must be contiguous"),
        (dict(alibi=torch.zeros(2)), r"alibi must have shape \(B, H\)"),
        (dict(alibi=torch.zeros(1, 3)), r"alibi must have shape \(B, H\)"),
        (dict(alibi=torch.zeros(1, 2, dtype=torch.float64)), "alibi must be float32"),
        # expanded (stride-0) keys of any claimed length: a size check, not a wrapped-around scratch allocation
        (
            dict(
                k=torch.randn(1, 1, 1, 16).expand(1, 1, 1 << 40, 16),
                v=torch.randn(1, 1, 1, 16).expand(1, 1, 1 << 40, 16),
            ),
            "sequence lengths up to",
        ),
    ],
)
def test_cpu_raw_op_bad_input(kw, match):
    with pytest.raises(RuntimeError, match=match):
        _raw(**kw)


def test_cpu_raw_op_no_keys():
    o, lse = _raw(k=torch.randn(1, 2, 0, 16), v=torch.randn(1, 2, 0, 16))
    assert torch.equal(o, torch.zeros(1, 2, 8, 16)) and bool((lse == float("-inf")).all())


def test_cpu_raw_op_no_keys_with_sinks():
    """No key at all: o = 0 and, with sinks, lse = sink[h] (the sink is the row's only term)."""
    sinks = torch.tensor([0.5, -2.0])
    o, lse = _raw(k=torch.randn(1, 2, 0, 16), v=torch.randn(1, 2, 0, 16), sinks=sinks)
    assert torch.equal(o, torch.zeros(1, 2, 8, 16)) and torch.equal(lse, sinks[None, :, None].expand(1, 2, 8))


# ---------------------------------------------------------------------------------------------------------------
# Score modifiers (issue 18): window, softcap, sinks, ALiBi, and the backward's mask / sink gradients, through the
# ops directly against an explicit float64 reference.


def _ref_attention(q, k, v, mask, scale, causal, window, softcap, sinks, alibi, keep=None, dropout_p=0.0):
    """Explicit attention in q's dtype (float64 for the oracle): o (B, H, Sq, D) and lse (B, H, Sq), differentiable
    in q, k, v, a float mask (any broadcastable shape) and sinks (H,). Rows with no visible key (and no sink): o = 0,
    lse = -inf. keep: dropout's (B, H, Sq, Sk) keep mask, the kept probabilities scaled by 1 / (1 - dropout_p)."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    k, v = (t.repeat_interleave(H // Hkv, 1) for t in (k, v))
    s = q @ k.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i, j, off = torch.arange(Sq)[:, None], torch.arange(Sk)[None, :], Sk - Sq
    if alibi is not None:
        s = s - alibi.to(s.dtype)[:, :, None, None] * (i + off - j).abs()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    hidden = torch.zeros(Sq, Sk, dtype=torch.bool)
    if causal:
        hidden |= j > i
    if window[0] >= 0:
        hidden |= j < i + off - window[0]
    if window[1] >= 0:
        hidden |= j > i + off + window[1]
    s = s.masked_fill(hidden, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype)[None, :, None, None].expand(B, H, Sq, 1)], -1)
    lse = torch.logsumexp(s.detach(), -1)
    empty = torch.isinf(lse)[..., None]  # no visible key, no sink: p = 0 (no NaN in the softmax or its gradient)
    p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)[..., :Sk]
    if keep is not None:
        p = p * keep.to(p.dtype) / (1 - dropout_p)
    return p @ v, lse


def _fwd_op(q, k, v, mask4, scale, causal, window, softcap, sinks, alibi, dropout=(0.0, 0)):
    """The raw forward op; dropout = (p, seed)."""
    rng = torch.tensor([dropout[1]], dtype=torch.int64)
    Sq, Sk = q.shape[2], k.shape[2]
    return torch.ops.fastlm.attention_fwd_cpu(
        q, k, v, mask4, None, None, Sq, Sk, scale, causal, dropout[0], rng, *window, softcap, sinks, alibi
    )


def _bwd_op(do, q, k, v, o, lse, mask4, scale, causal, window, softcap, sinks, alibi, mask_grad, dropout=(0.0, 0)):
    rng = torch.tensor([dropout[1]], dtype=torch.int64)
    Sq, Sk = q.shape[2], k.shape[2]
    return torch.ops.fastlm.attention_bwd_cpu(
        do,
        q,
        k,
        v,
        o,
        lse,
        mask4,
        None,
        None,
        Sq,
        Sk,
        scale,
        causal,
        dropout[0],
        rng,
        *window,
        softcap,
        sinks,
        alibi,
        mask_grad,
    )


def _randn(shape, dtype, layout):
    """A (B, H, S, D) tensor; layout "bshd": a transposed view of a (B, S, H, D) one (HF's layout, strided)."""
    if layout == "bshd":
        return torch.randn(shape[0], shape[2], shape[1], shape[3]).to(dtype).transpose(1, 2)
    return torch.randn(shape).to(dtype)


def _keep_mask(B, H, Hkv, Sq, Sk, causal, window, dropout):
    """Dropout's keep mask (B, H, Sq, Sk) as the kernel draws it for (p, seed) = dropout, recovered from a forward
    with q = 0 (every visible key equally likely, none underflows) and V = I (o[..., j] = p_ij z_ij); the mask is a
    function of (seed, b, h, i, j) only, so it is the one of any call with these sizes. Keys outside the band: 0."""
    q = torch.zeros(B, H, Sq, Sk)
    k = torch.zeros(B, Hkv, Sk, Sk)
    eye = torch.eye(Sk).expand(B, Hkv, Sk, Sk).contiguous()
    o, _ = _fwd_op(q, k, eye, None, 1.0, causal, window, 0.0, None, None, dropout)
    return o != 0


def _modifier_check(
    B,
    H,
    Hkv,
    Sq,
    Sk,
    D,
    dtype,
    causal=False,
    window=(-1, -1),
    softcap=0.0,
    sinks=False,
    alibi=False,
    mask=None,
    backward=True,
    layout=None,
    dropout=0.0,
):
    """The cpu forward (o, lse) and backward (dq, dk, dv, dmask, dsinks) against float64 autograd of the explicit
    reference: the dtype's tolerance and FlashAttention's 2x rule (torch's error: the same reference in dtype).
    layout "bshd": q, k, v and do strided (transposed views); dropout > 0: with a fresh seed, the reference applying
    the kernel's own keep mask (_keep_mask). Returns (o, lse, (dq, dk, dv, dmask, dsinks) or None)."""
    from helpers import assert_close_ref

    q = _randn((B, H, Sq, D), dtype, layout)
    k, v = (_randn((B, Hkv, Sk, D), dtype, layout) for _ in range(2))
    sk = torch.randn(H) * 2 if sinks else None
    al = torch.rand(B, H) * 0.5 if alibi else None
    scale = D**-0.5
    mask_leaf = None
    if mask is not None:
        mask_leaf = mask(B, H, Sq, Sk)
        if mask_leaf.dtype != torch.bool:
            mask_leaf = mask_leaf.to(dtype)
    mask4 = None if mask_leaf is None else mask_leaf.expand(B, H, Sq, Sk)
    float_mask = mask_leaf is not None and mask_leaf.dtype != torch.bool
    drop = (dropout, int(torch.randint(0, 2**62, ())))
    keep = _keep_mask(B, H, Hkv, Sq, Sk, causal, window, drop) if dropout > 0 else None
    o, lse = _fwd_op(q, k, v, mask4, scale, causal, window, softcap, sk, al, drop)
    mods = (scale, causal, window, softcap)

    def ref(cast):
        leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
        m = None
        if mask_leaf is not None:
            m = mask_leaf if not float_mask else cast(mask_leaf).detach().requires_grad_()
        s_ = None if sk is None else cast(sk).detach().requires_grad_()
        ro, rl = _ref_attention(*leaves, m, *mods, s_, al, keep, dropout)
        return ro, rl, leaves + [m if float_mask else None, s_]

    ro64, rl64, leaves64 = ref(lambda t: t.double())
    ro16, _, leaves16 = ref(lambda t: t) if dtype != torch.float32 else (None, None, None)
    assert_close_ref(o, ro64, dtype, "out", ro16)
    # lse: -inf exactly where the reference's is (rows with no visible key and no sink)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl64)), "lse: -inf rows differ"
    lse_tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(
        lse.double().nan_to_num(0, 0, 0), rl64.detach().nan_to_num(0, 0, 0), atol=lse_tol, rtol=lse_tol
    )
    if not backward:
        return o, lse, None
    do = _randn((B, H, Sq, D), dtype, layout)
    grads = _bwd_op(do, q, k, v, o, lse, mask4, *mods, sk, al, float_mask, drop)
    dq, dk, dv, dmask, dsinks = grads
    names = ["dq", "dk", "dv", "dmask", "dsinks"]
    wanted = [i for i, t in enumerate(leaves64) if t is not None]
    g64 = torch.autograd.grad(ro64, [leaves64[i] for i in wanted], do.double(), allow_unused=True)
    g16 = [None] * len(wanted)
    if ro16 is not None:
        g16 = torch.autograd.grad(ro16, [leaves16[i] for i in wanted], do, allow_unused=True)
    for idx, want, low in zip(wanted, g64, g16, strict=True):
        name, got = names[idx], grads[idx]
        want = torch.zeros_like(leaves64[idx]) if want is None else want
        if name in ("dq", "dk", "dv"):  # contiguous, in the inputs' dtype
            assert got.is_contiguous() and got.dtype == dtype, name
        if name == "dmask":  # the op keeps the 4-D reduced shape: [1 if broadcast else size]
            assert got.dtype == torch.float32
            assert list(got.shape) == [1 if mask4.stride(d) == 0 else mask4.size(d) for d in range(4)]
            want = want.reshape(got.shape)
            low = None if low is None else low.reshape(got.shape)
            # dmask is fp32 math on the 16-bit inputs: within the dtype's tolerance, 2x rule against torch's own
        if name == "dsinks":
            assert got.dtype == torch.float32 and got.shape == (H,)
        assert_close_ref(got, want, dtype, name, low)
    if not float_mask:
        assert dmask.shape == (0,) and dmask.dtype == torch.float32
    if sk is None:
        assert dsinks.shape == (0,) and dsinks.dtype == torch.float32
    return o, lse, grads


MODIFIERS = {
    "window_left": dict(window=(9, -1)),
    "window_right": dict(window=(-1, 6)),
    "window_both": dict(window=(5, 11)),
    "window_causal": dict(window=(20, 0)),  # Mistral: bottom-right causal band
    "window_0": dict(window=(0, 0)),  # each query sees its own (aligned) key only
    "window_1": dict(window=(1, 1)),
    "window_ge_sk": dict(window=(400, 400)),  # wider than the keys: no window
    "window_and_causal_flag": dict(causal=True, window=(12, -1)),
    "softcap": dict(softcap=2.0),
    "sinks": dict(sinks=True),
    "alibi": dict(alibi=True),
    "softcap_alibi_sinks": dict(softcap=5.0, alibi=True, sinks=True),
    "all_float_mask": dict(
        window=(30, 0), softcap=3.0, alibi=True, sinks=True, mask=lambda B, H, Sq, Sk: torch.randn(1, H, 1, Sk)
    ),
    "all_bool_mask": dict(
        window=(25, 4), softcap=3.0, alibi=True, sinks=True, mask=lambda B, H, Sq, Sk: torch.rand(B, 1, Sq, Sk) > 0.3
    ),
}

# (Sq, Sk): the row path (Sq < 4: decoding and a few queries), the block path (Sq >= 4, ragged tiles), Sq > Sk
MODIFIER_SHAPES = [(1, 150), (3, 70), (70, 150), (90, 40)]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("Sq,Sk", MODIFIER_SHAPES)
@pytest.mark.parametrize("case", list(MODIFIERS))
def test_cpu_modifiers(case, Sq, Sk, dtype):
    _modifier_check(2, 4, 2, Sq, Sk, 32, dtype, **MODIFIERS[case])


# Additive float masks that require grad, broadcast in every way torch allows: dmask summed over the broadcast dims.
GRAD_MASKS = {
    "full": lambda B, H, Sq, Sk: torch.randn(B, H, Sq, Sk),
    "per_batch": lambda B, H, Sq, Sk: torch.randn(B, 1, Sq, Sk),
    "2d": lambda B, H, Sq, Sk: torch.randn(Sq, Sk),
    "per_head_key": lambda B, H, Sq, Sk: torch.randn(H, 1, Sk),
    "with_inf": lambda B, H, Sq, Sk: torch.randn(1, H, Sq, Sk).masked_fill(torch.rand(1, H, Sq, Sk) < 0.3, -math.inf),
}


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("Sq,Sk", [(2, 90), (40, 70)])
@pytest.mark.parametrize("kind", list(GRAD_MASKS))
def test_cpu_mask_grad(kind, Sq, Sk, dtype):
    _modifier_check(2, 4, 4, Sq, Sk, 32, dtype, causal=Sq == Sk, mask=GRAD_MASKS[kind])


@pytest.mark.parametrize("Sq", [1, 2, 3, 5, 32, 33])
def test_cpu_row_and_block_paths_agree_on_modifiers(Sq):
    """Every query count up to the block size, with all modifiers on and GQA over 4 query heads per kv head."""
    _modifier_check(1, 8, 2, Sq, 300, 64, torch.float32, window=(100, 0), softcap=4.0, sinks=True, alibi=True)


@pytest.mark.parametrize("Sq", [1, 2, 32, 64])
def test_cpu_window_skips_keys_outside_the_band(Sq):
    """Keys (and values) outside every query's band are never read: NaN there leaves the result finite and right
    (a masked-but-visited tile would turn the NaN values into NaN outputs through 0 * NaN)."""
    Sk, left = 512, 40
    q, k, v = torch.randn(1, 2, Sq, 64), torch.randn(1, 2, Sk, 64), torch.randn(1, 2, Sk, 64)
    first = Sk - Sq - left  # the first key the first query sees
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :first] = float("nan")
    v2[:, :, :first] = float("nan")
    o, lse = _fwd_op(q, k2, v2, None, 0.125, False, (left, 0), 0.0, None, None)
    ro, rl = _ref_attention(q.double(), k.double(), v.double(), None, 0.125, False, (left, 0), 0.0, None, None)
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), rl, atol=1e-5, rtol=1e-5)


def test_cpu_unbounded_window_is_the_default_path():
    """A window wider than the keys (either side) is no window: bitwise the default path's result."""
    q, k, v = torch.randn(2, 4, 40, 32), torch.randn(2, 2, 60, 32), torch.randn(2, 2, 60, 32)
    base = _fwd_op(q, k, v, None, 0.2, True, (-1, -1), 0.0, None, None)
    for window in [(60, -1), (-1, 40), (1000, 1000)]:
        got = _fwd_op(q, k, v, None, 0.2, True, window, 0.0, None, None)
        assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1]), window


def test_cpu_sinks_of_minus_inf_are_no_sinks():
    q, k, v = torch.randn(1, 3, 37, 32), torch.randn(1, 3, 50, 32), torch.randn(1, 3, 50, 32)
    base = _fwd_op(q, k, v, None, 0.2, False, (-1, -1), 0.0, None, None)
    got = _fwd_op(q, k, v, None, 0.2, False, (-1, -1), 0.0, torch.full((3,), -math.inf), None)
    torch.testing.assert_close(got[0], base[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], base[1], atol=1e-6, rtol=1e-6)


def test_cpu_modifiers_thread_count_invariant():
    from helpers import at_thread_counts

    q, k, v = torch.randn(2, 4, 150, 64), torch.randn(2, 2, 400, 64), torch.randn(2, 2, 400, 64)
    sinks, alibi = torch.randn(4), torch.rand(2, 4)
    outs = at_thread_counts(
        lambda: _fwd_op(q, k, v, None, 0.125, False, (64, 0), 3.0, sinks, alibi)[0],
        (1, max(torch.get_num_threads(), 2)),
    )
    assert torch.equal(outs[0], outs[1])


def test_cpu_bwd_mask_grad_needs_a_float_mask():
    q = torch.randn(1, 2, 8, 16)
    o, lse = _fwd_op(q, q, q, None, 0.25, False, (-1, -1), 0.0, None, None)
    with pytest.raises(RuntimeError, match="mask_grad needs an additive float mask"):
        _bwd_op(q, q, q, q, o, lse, None, 0.25, False, (-1, -1), 0.0, None, None, True)


@pytest.mark.parametrize("Sq", [1, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_decode_gqa_grouped_and_per_head_agree(Sq, masked):
    """Decoding with GQA takes one work item per (batch, kv head) when there are at least as many as threads (each
    K/V row read once for the group's query heads), else one per query head: both against float64, and each other."""
    from helpers import at_thread_counts

    B, H, Hkv, Sk, D = 1, 8, 2, 333, 64
    mask = (lambda B, H, Sq, Sk: torch.randn(B, H, Sq, Sk)) if masked else None
    kw = dict(window=(200, 0), softcap=4.0, sinks=True, alibi=True, mask=mask, backward=False)
    outs = at_thread_counts(lambda: _modifier_check(B, H, Hkv, Sq, Sk, D, torch.float32, **kw), (1, 8))
    q = torch.randn(B, H, Sq, D)
    k, v = torch.randn(B, Hkv, Sk, D), torch.randn(B, Hkv, Sk, D)
    sinks, alibi = torch.randn(H), torch.rand(B, H)
    grouped, per_head = at_thread_counts(
        lambda: _fwd_op(q, k, v, None, 0.125, True, (100, 0), 3.0, sinks, alibi), (1, 8)
    )
    assert len(outs) == 2
    torch.testing.assert_close(grouped[0], per_head[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grouped[1], per_head[1], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The fused backward (csrc/cpu/attention_bwd.cpp) at real sizes, and dropout


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("D", [16, 64, 80, 128, 256])
def test_cpu_backward_head_dims(dtype, D):
    """Ragged query blocks and key tiles (100, 130: multiples of neither), GQA, causal, strided (HF) inputs."""
    _modifier_check(2, 4, 2, 100, 130, D, dtype, causal=True, layout="bshd")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(
    "Sq,Sk,causal", [(256, 256, False), (256, 256, True), (96, 300, True), (300, 96, True), (77, 150, False)]
)
def test_cpu_backward_shapes(dtype, Sq, Sk, causal):
    """Sq = Sk, Sq < Sk and Sq > Sk (causal top-left: the rows past Sk see every key), 4 query heads per kv head."""
    _modifier_check(2, 8, 2, Sq, Sk, 64, dtype, causal=causal)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("kind", list(CPU_MASKS))
def test_cpu_backward_masks(dtype, kind):
    """The forward's mask kinds (bool and additive, broadcast views, -inf entries, whole masked tiles) through the
    backward; the additive ones with their gradient."""
    _modifier_check(2, 6, 3, 130, 260, 64, dtype, causal=kind.startswith("bool"), mask=CPU_MASKS[kind])


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_cpu_backward_empty_rows(dtype):
    """Rows whose every key is masked (a whole query block included) and, with the window, rows that see no key:
    zero gradients there, no NaN anywhere (the reference's empty rows give 0 too)."""
    B, H, Sq, Sk = 2, 4, 100, 300

    def mask(B, H, Sq, Sk):
        m = torch.randn(B, H, Sq, Sk)
        m[:, :, :, 64:256] = -math.inf  # whole key tiles
        m[1, 2, 7] = -math.inf  # a whole row
        m[0, :, 32:64] = -math.inf  # a whole query block
        return m

    _, lse, (dq, dk, dv, dmask, _) = _modifier_check(B, H, 2, Sq, Sk, 64, dtype, mask=mask)
    assert torch.equal(dq[1, 2, 7], torch.zeros(64, dtype=dtype)) and lse[1, 2, 7] == -math.inf
    assert torch.equal(dq[0, :, 32:64], torch.zeros(H, 32, 64, dtype=dtype))
    assert torch.equal(dmask[:, :, :, 64:256], torch.zeros(B, H, Sq, 192))
    # a window that leaves the last queries no key (Sq > Sk, the band's right edge below the first key)
    _modifier_check(1, 2, 1, 90, 40, 32, dtype, window=(3, -1), sinks=False)


def test_cpu_backward_chunked_mask_grads():
    """One (batch, kv head) pair on 2 threads: its query blocks are split into chunks whose partial dK / dV are
    summed afterwards; masks broadcast over heads and queries then need the dmask buffer kept per head / query."""
    from helpers import at_thread_counts

    for kind in ("2d", "per_head_key", "full"):
        at_thread_counts(
            lambda kind=kind: _modifier_check(
                1, 3, 1, 150, 170, 64, torch.float32, causal=True, sinks=True, mask=GRAD_MASKS[kind]
            ),
            (2,),
        )


def test_cpu_backward_deterministic():
    """Run to run bitwise equal at a fixed thread count (no atomics); across thread counts equal within rounding
    (the chunking of (batch, kv head) items depends on the thread count: B * Hkv = 1 here)."""
    from helpers import at_thread_counts

    q, do = torch.randn(1, 4, 200, 64), torch.randn(1, 4, 200, 64)
    k, v = torch.randn(1, 1, 230, 64), torch.randn(1, 1, 230, 64)
    mask = torch.randn(1, 1, 200, 230).expand(1, 4, 200, 230)
    sinks = torch.randn(4)
    args = (mask, 0.125, True, (-1, -1), 2.0, sinks, None)

    def grads():
        o, lse = _fwd_op(q, k, v, *args)
        return _bwd_op(do, q, k, v, o, lse, *args, True)

    one, two, again = at_thread_counts(grads, (1, 2, 2))
    for a, b, c in zip(one, two, again, strict=True):
        assert torch.equal(b, c)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(
    "Sq,Sk,kw",
    [
        (130, 150, dict()),
        (66, 70, dict(causal=True)),  # rows 64, 65: the forward's row path, the backward's block path
        (2, 90, dict()),  # decoding-like: the forward's row path
        (
            100,
            120,
            dict(
                window=(40, 3), softcap=3.0, sinks=True, alibi=True, mask=lambda B, H, Sq, Sk: torch.randn(B, 1, Sq, Sk)
            ),
        ),
    ],
    ids=["plain", "causal-ragged", "rows", "all-modifiers"],
)
def test_cpu_dropout_exact(dtype, Sq, Sk, kw):
    """Dropout: the output, lse and every gradient against the float64 reference applying the kernel's own keep
    mask (recovered with V = I), with GQA."""
    _modifier_check(2, 4, 2, Sq, Sk, 64, dtype, dropout=0.3, **kw)


def test_cpu_dropout_statistics_and_seed():
    """The keep rate is 1 - p, kept probabilities are scaled by 1 / (1 - p), the same seed gives the same output (and
    gradients), another seed another mask, and the mask does not depend on the thread count."""
    from helpers import at_thread_counts

    B, H, Sq, Sk, p = 2, 4, 256, 128, 0.25
    keep = _keep_mask(B, H, H, Sq, Sk, False, (-1, -1), (p, 1234))
    kept = keep.double().mean().item()
    n = keep.numel()
    assert abs(kept - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n), f"keep rate {kept:.4f} vs {1 - p}"
    # rows and key columns alike (no structure in the counter): every query row and key column keeps about 1 - p
    assert (keep.double().mean((0, 1, 2)) - (1 - p)).abs().max() < 0.06
    assert not torch.equal(keep, _keep_mask(B, H, H, Sq, Sk, False, (-1, -1), (p, 1235)))
    assert torch.equal(keep, _keep_mask(B, H, H, Sq, Sk, False, (-1, -1), (p, 1234)))
    # o = P Z V with V = I: kept entries are p_ij / (1 - p)
    q, k = torch.randn(B, H, Sq, Sk) * 0.3, torch.randn(B, H, Sk, Sk)
    eye = torch.eye(Sk).expand(B, H, Sk, Sk).contiguous()
    pz, _ = _fwd_op(q, k, eye, None, 1.0, False, (-1, -1), 0.0, None, None, (p, 1234))
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2), -1)
    torch.testing.assert_close(pz.double(), probs * keep / (1 - p), atol=1e-6, rtol=1e-5)
    # same seed: bitwise the same forward and backward, at any thread count
    v, do = torch.randn(B, H, Sk, 64), torch.randn(B, H, Sq, 64)
    q2, k2 = torch.randn(B, H, Sq, 64), torch.randn(B, H, Sk, 64)

    def run():
        o, lse = _fwd_op(q2, k2, v, None, 0.125, False, (-1, -1), 0.0, None, None, (p, 99))
        return (o, *_bwd_op(do, q2, k2, v, o, lse, None, 0.125, False, (-1, -1), 0.0, None, None, False, (p, 99))[:3])

    first, second, single = at_thread_counts(run, (2, 2, 1))
    for a, b, c in zip(first, second, single, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_cpu_dropout_through_the_api():
    """F.scaled_dot_product_attention with dropout_p on the cpu backend: the seed comes from torch's generator."""
    q, k, v = (torch.randn(1, 2, 40, 32, requires_grad=True) for _ in range(3))
    with fastlm.backend("cpu"):
        torch.manual_seed(3)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
        torch.manual_seed(3)
        b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
        c = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
        a.sum().backward()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v))
