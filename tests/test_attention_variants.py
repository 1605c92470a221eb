"""The Triton attention kernels' variants, through their launchers (fastlm.kernels.attention.attn_fwd / attn_bwd):
sliding window (bottom-right aligned, -1 = unbounded side), soft-capped scores, attention sinks, ALiBi slopes and the
gradient of an additive mask (summed over its broadcast dims), alone and combined with causal, bool / additive masks,
GQA, Sq != Sk, varlen and dropout. Checked against an explicit float64 reference built here: o, lse, dq, dk, dv,
dmask, dsinks. Kernel outputs are NaN-poisoned (conftest: FASTLM_POISON=1), so an unwritten element fails.

On CPU the kernels run in Triton's interpreter: tiny shapes, fp32 and fp16 (interpreted bf16 dots are wrong).
"""

import math

import pytest
import torch
from fastlm.kernels.attention import attn_bwd, attn_fwd
from helpers import DEVICE, TOL

import fastlm
import fastlm.functional as F

B, H, HKV = 2, 4, 2


@pytest.fixture(autouse=True)
def _no_split_kv(monkeypatch):
    """These tests are of the forward kernel (forward.py): keep attn_fwd off its split-KV decode route."""
    monkeypatch.setenv("FASTLM_SPLIT_KV", "0")


DTYPES = [pytest.param(d, id=str(d).split(".")[-1]) for d in (torch.float32, torch.float16)]


def _seed(n=0):
    return torch.tensor([n], dtype=torch.int64, device=DEVICE)


def reference(q, k, v, mask, scale, causal, window=(-1, -1), softcap=0.0, sinks=None, alibi=None, keep=None, p=0.0):
    """float64 (o, lse) of one dense batch: q (B, H, Sq, D), k/v (B, Hkv, Sk, D), mask (B|1, H|1, Sq|1, Sk) bool or
    additive, sinks (H,), alibi (B, H); keep: a (B, H, Sq, Sk) dropout keep mask (probabilities scaled by 1/(1-p)).
    Differentiable in q, k, v, the additive mask and the sinks."""
    Bq, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    g = Hq // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = scale * q @ k.transpose(-1, -2)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    diag = i + (Sk - Sq)
    if alibi is not None:
        s = s - alibi.double()[:, :, None, None] * (diag - j).abs()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    hidden = torch.zeros(Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:
        hidden |= j > i
    left, right = window
    if left >= 0:
        hidden |= j < diag - left
    if right >= 0:
        hidden |= j > diag + right
    s = s.masked_fill(hidden, float("-inf"))
    m = s.detach().amax(-1, keepdim=True) if Sk else s.new_full((*s.shape[:-1], 1), float("-inf"))
    if sinks is not None:
        m = torch.maximum(m, sinks.detach().double()[None, :, None, None])
    m = torch.where(m == float("-inf"), 0.0, m)
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.exp(sinks.double()[None, :, None, None] - m)
    lse = torch.where(denom > 0, m + torch.log(denom.clamp_min(1e-300)), float("-inf")).squeeze(-1)
    prob = e / torch.where(denom > 0, denom, 1.0)
    if keep is not None:
        prob = prob * keep / (1 - p)
    return prob @ v, lse


def check(got, ref, dtype, name, extra=1.0):
    """``got`` (computed in ``dtype``) against the float64 reference: the dtype's tolerance relative to the
    reference's magnitude (fastlm's tests/helpers.TOL), times ``extra``."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert not got.isnan().any(), f"{name}: NaN (an unwritten element or bad math)"
    atol, rtol = TOL[dtype]
    scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
    torch.testing.assert_close(
        got.double(), ref, atol=atol * scale * extra, rtol=rtol * extra, msg=lambda m: f"{name}: {m}"
    )


def run_case(
    dtype,
    Sq,
    Sk,
    D=16,
    causal=False,
    window=(-1, -1),
    softcap=0.0,
    sinks=False,
    alibi=False,
    mask=None,
    mask_shape=None,
    mask_grad=False,
    kv_nan_rows=None,
    tma=None,
):
    """Forward and backward of one dense case against ``reference``. mask: None, "bool" or "add", of
    ``mask_shape`` (broadcast to (B, H, Sq, Sk) as the op layer passes it); kv_nan_rows: key rows set to NaN in K
    and V (rows the window must never load)."""
    q = torch.randn(B, H, Sq, D, device=DEVICE).to(dtype)
    k, v = (torch.randn(B, HKV, Sk, D, device=DEVICE).to(dtype) for _ in range(2))
    do = torch.randn(B, H, Sq, D, device=DEVICE).to(dtype)
    if kv_nan_rows is not None:
        k[:, :, kv_nan_rows], v[:, :, kv_nan_rows] = float("nan"), float("nan")
    scale = 1 / math.sqrt(D)
    sink_t = torch.randn(H, device=DEVICE) if sinks else None
    slopes = torch.rand(B, H, device=DEVICE) * 0.5 if alibi else None
    m = None
    if mask is not None:
        shape = mask_shape or (B, H, Sq, Sk)
        if mask == "bool":
            m = torch.rand(shape, device=DEVICE) > 0.3
        else:
            m = torch.randn(shape, device=DEVICE).to(dtype)
            m = m.masked_fill(torch.rand(shape, device=DEVICE) < 0.2, float("-inf"))
    mk = m.expand(B, H, Sq, Sk) if m is not None else None
    feats = dict(window=window, softcap=softcap, sinks=sink_t, alibi=slopes)
    o, lse = attn_fwd(q, k, v, mk, scale, causal, 0.0, _seed(), 0, tma=tma, **feats)
    dq, dk, dv, dmask, dsinks = attn_bwd(
        do, q, k, v, o, lse, mk, scale, causal, 0.0, _seed(), 0, tma=tma, **feats, mask_grad=mask_grad
    )

    clean = lambda t: t.nan_to_num(0.0) if kv_nan_rows is not None else t  # noqa: E731 (never reached rows)
    leaves = [clean(t).double().requires_grad_() for t in (q, k, v)]
    m64 = m if m is None or m.dtype == torch.bool else m.double().requires_grad_(mask_grad)
    s64 = sink_t.double().requires_grad_() if sinks else None
    o_ref, lse_ref = reference(*leaves, m64, scale, causal, window, softcap, s64, slopes)
    wrt = leaves + ([m64] if mask_grad else []) + ([s64] if sinks else [])
    grads = torch.autograd.grad(o_ref, wrt, do.double())
    check(o, o_ref, dtype, "o")
    finite = lse_ref > float("-inf")
    assert torch.equal(lse == float("-inf"), ~finite), "lse: empty rows differ"
    check(lse[finite], lse_ref[finite], torch.float32, "lse", 10.0)
    for name, got, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), grads[:3], strict=True):
        check(got, ref, dtype, name)
    if mask_grad:
        assert dmask.dtype == torch.float32
        summed = B * H * Sq * Sk // dmask.numel()  # dS terms per entry: their rounding errors add up
        check(dmask, grads[3], dtype, "dmask", math.sqrt(summed))
    else:
        assert dmask.shape == (0,)
    if sinks:
        assert dsinks.shape == (H,) and dsinks.dtype == torch.float32
        check(dsinks, grads[-1], dtype, "dsinks")
    else:
        assert dsinks.shape == (0,)
    return o, lse


# (Sq, Sk) pairs: a single query / key, ragged against the 16-wide interpreter tiles, Sq > Sk and Sq < Sk
SHAPES = [(1, 23), (17, 1), (17, 23), (33, 64), (40, 23)]
# fp16 on a subset (the window logic is dtype-blind; the rounding of the features is checked in both)
WINDOW_CASES = [
    pytest.param(torch.float32, w, id=f"w{w[0]}_{w[1]}-float32")
    for w in [(0, 0), (1, 1), (3, -1), (-1, 2), (0, -1), (-1, 0), (100, 100), (5, 0)]
] + [pytest.param(torch.float16, w, id=f"w{w[0]}_{w[1]}-float16") for w in [(0, 0), (3, -1), (100, 100)]]


@pytest.mark.parametrize("dtype,window", WINDOW_CASES)
@pytest.mark.parametrize("Sq,Sk", SHAPES)
def test_window(dtype, Sq, Sk, window):
    run_case(dtype, Sq, Sk, window=window)


@pytest.mark.parametrize("Sq,Sk", [(17, 23), (40, 40), (33, 64)])
@pytest.mark.parametrize("window", [(0, 0), (7, 3), (-1, 5), (20, -1)], ids=lambda w: f"w{w[0]}_{w[1]}")
def test_window_with_causal(Sq, Sk, window):
    """Causal is top-left aligned (key <= query), the window bottom-right: both apply."""
    run_case(torch.float32, Sq, Sk, causal=True, window=window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Sq,Sk", SHAPES)
@pytest.mark.parametrize("causal,softcap", [(False, 0.5), (True, 5.0)])
def test_softcap(dtype, Sq, Sk, causal, softcap):
    run_case(dtype, Sq, Sk, D=32, causal=causal, softcap=softcap)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Sq,Sk", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_sinks(dtype, Sq, Sk, causal):
    """With sinks, lse includes exp(sink) and rows with no key give o = 0, lse = the sink (Sq > Sk + causal)."""
    run_case(dtype, Sq, Sk, causal=causal, sinks=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Sq,Sk", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_alibi(dtype, Sq, Sk, causal):
    run_case(dtype, Sq, Sk, causal=causal, alibi=True)


MASK_SHAPES = {
    "11qk": (1, 1, None, None),
    "b1qk": (B, 1, None, None),
    "1h1k": (1, H, 1, None),
    "bhqk": (B, H, None, None),
    "bhq1": (B, H, None, 1),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=list(MASK_SHAPES))
@pytest.mark.parametrize("Sq,Sk,causal", [(17, 23, False), (33, 40, True)])
def test_mask_grad(dtype, shape, Sq, Sk, causal):
    """dL/dmask summed over the mask's broadcast dims (atomics), or stored (no broadcast dim)."""
    full = tuple(d if d is not None else (Sq, Sk)[i - 2] for i, d in enumerate(MASK_SHAPES[shape]))
    run_case(dtype, Sq, Sk, causal=causal, mask="add", mask_shape=full, mask_grad=True)


@pytest.mark.parametrize("mask", [None, "bool", "add"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "dtype,Sq,Sk",
    [(torch.float32, 17, 23), (torch.float16, 33, 40), (torch.float32, 40, 23)],
    ids=["17x23-float32", "33x40-float16", "40x23-float32"],
)
def test_everything_at_once(dtype, mask, causal, Sq, Sk):
    """Window + soft cap + sinks + ALiBi together, with each mask kind (and its gradient) and causal."""
    run_case(
        dtype,
        Sq,
        Sk,
        D=32,
        causal=causal,
        window=(9, 4),
        softcap=4.0,
        sinks=True,
        alibi=True,
        mask=mask,
        mask_shape=(B, 1, Sq, Sk),
        mask_grad=mask == "add",
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "add"])
def test_tma_path(causal, mask):
    """The TMA loads (fp16, descriptors; the interpreter runs them too) with every feature."""
    run_case(
        torch.float16,
        40,
        64,
        D=32,
        causal=causal,
        window=(20, 3),
        softcap=4.0,
        sinks=True,
        alibi=True,
        mask=mask,
        mask_shape=(1, H, 40, 64),
        mask_grad=mask is not None,
        tma=True,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_never_loads_tiles_outside_the_band(dtype):
    """Key rows outside every query's band hold NaN in K and V: a tile of them that was loaded would poison the
    output (0 * NaN in p @ v) or dK/dV; the launch must skip them (forward, dQ: key loop bounds; dK/dV: empty query
    range). Sq = 16, Sk = 96, window (3, 0): the queries see keys 77..95 only; rows 0..63 (four whole 16-key tiles,
    two whole 32-key tiles) are NaN."""
    _, _ = run_case(dtype, 16, 96, window=(3, 0), kv_nan_rows=slice(0, 64), sinks=True, alibi=True, softcap=3.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_with_features(dtype):
    """Dropout with window, soft cap, sinks and ALiBi: V = identity reveals the keep mask in o (o[i, j] =
    p_ij z_ij / (1 - p)); the kept entries must equal the reference probabilities, and the backward must match the
    reference run with that keep mask."""
    Sq, Sk, D, pd = 23, 30, 32, 0.3
    scale = 0.3
    q = torch.randn(B, H, Sq, D, device=DEVICE).to(dtype)
    k = torch.randn(B, HKV, Sk, D, device=DEVICE).to(dtype)
    v = torch.eye(Sk, D, device=DEVICE).expand(B, HKV, Sk, D).contiguous().to(dtype)
    do = torch.randn(B, H, Sq, D, device=DEVICE).to(dtype)
    sinks, slopes = torch.randn(H, device=DEVICE), torch.rand(B, H, device=DEVICE) * 0.3
    feats = dict(window=(6, 2), softcap=3.0, sinks=sinks, alibi=slopes)
    o, lse = attn_fwd(q, k, v, None, scale, False, pd, _seed(7), 0, **feats)
    dq, dk, dv, _, dsinks = attn_bwd(do, q, k, v, o, lse, None, scale, False, pd, _seed(7), 0, **feats)
    keep = (o[..., :Sk] != 0).double()
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    s64 = sinks.double().requires_grad_()
    args = (False, (6, 2), 3.0, s64, slopes)
    o_ref, lse_ref = reference(*leaves, None, scale, *args, keep=keep, p=pd)
    o_plain, lse_plain = reference(*leaves, None, scale, *args)  # o_plain[..., j] = p_ij (V = identity)
    dropped = 1 - keep[o_plain.detach()[..., :Sk] > 1e-3].mean().item()
    assert 0.15 < dropped < 0.45, f"dropout rate {dropped:.2f} for p = {pd}"
    check(o, o_ref.detach(), dtype, "o")
    check(lse, lse_plain.detach(), torch.float32, "lse", 10.0)
    grads = torch.autograd.grad(o_ref, [*leaves, s64], do.double())
    for name, got, ref in zip(("dq", "dk", "dv", "dsinks"), (dq, dk, dv, dsinks), grads, strict=True):
        check(got, ref, dtype, name)


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "feats",
    [
        dict(window=(4, 1)),
        dict(window=(-1, 0), sinks=True),
        dict(softcap=2.0, alibi=True),
        dict(window=(6, 3), softcap=3.0, sinks=True, alibi=True),
    ],
    ids=["window", "window-causal-sinks", "softcap-alibi", "all"],
)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen(dtype, feats, causal):
    """Packed sequences: the window's diagonal and ALiBi's distances use each sequence's own Sk - Sq; slopes are
    (n_seq, H). Lengths include an empty query list, an empty key list and Sq > Sk."""
    lq, lk = [5, 17, 0, 12, 9], [5, 23, 4, 3, 0]
    n, D = len(lq), 16
    cu_q, cu_k = _cu(lq), _cu(lk)
    q = torch.randn(sum(lq), H, D, device=DEVICE).to(dtype)
    k, v = (torch.randn(sum(lk), HKV, D, device=DEVICE).to(dtype) for _ in range(2))
    do = torch.randn(sum(lq), H, D, device=DEVICE).to(dtype)
    window, softcap = feats.get("window", (-1, -1)), feats.get("softcap", 0.0)
    sinks = torch.randn(H, device=DEVICE) if feats.get("sinks") else None
    slopes = torch.rand(n, H, device=DEVICE) * 0.5 if feats.get("alibi") else None
    kw = dict(window=window, softcap=softcap, sinks=sinks, alibi=slopes)
    args = (cu_q, cu_k, max(lq), max(lk))
    o, lse = attn_fwd(q, k, v, None, 0.25, causal, 0.0, _seed(), 0, *args, **kw)
    dq, dk, dv, _, dsinks = attn_bwd(do, q, k, v, o, lse, None, 0.25, causal, 0.0, _seed(), 0, *args, **kw)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    s64 = sinks.double().requires_grad_() if sinks is not None else None
    outs, lses = [], []
    for b in range(n):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        qb, kb, vb = (t[s].transpose(0, 1)[None] for t, s in zip(leaves, (sq, sk, sk), strict=True))
        al = slopes[b : b + 1] if slopes is not None else None
        ob, lb = reference(qb, kb, vb, None, 0.25, causal, window, softcap, s64, al)
        outs.append(ob[0].transpose(0, 1))
        lses.append(lb[0])
    o_ref, lse_ref = torch.cat(outs), torch.cat(lses, 1)
    wrt = leaves + ([s64] if sinks is not None else [])
    grads = torch.autograd.grad(o_ref, wrt, do.double())
    check(o, o_ref, dtype, "o")
    finite = lse_ref > float("-inf")
    assert torch.equal(lse == float("-inf"), ~finite), "lse: empty rows differ"
    check(lse[finite], lse_ref[finite].detach(), torch.float32, "lse", 10.0)
    for name, got, ref in zip(("dq", "dk", "dv", "dsinks"), (dq, dk, dv, dsinks), grads, strict=False):
        check(got, ref, dtype, name)


def test_no_keys_with_sinks():
    """Sk = 0: o = 0, lse = the sink, no gradient."""
    q = torch.randn(B, H, 5, 16, device=DEVICE)
    k = v = torch.randn(B, HKV, 0, 16, device=DEVICE)
    sinks = torch.randn(H, device=DEVICE)
    o, lse = attn_fwd(q, k, v, None, 0.25, False, 0.0, _seed(), 0, sinks=sinks)
    assert torch.equal(o, torch.zeros_like(o))
    assert torch.equal(lse, sinks[None, :, None].expand(B, H, 5))


def test_bad_arguments():
    q = torch.randn(1, H, 4, 16, device=DEVICE)
    k = torch.randn(1, HKV, 4, 16, device=DEVICE)
    args = (q, k, k, None, 0.25, False, 0.0, _seed(), 0)
    with pytest.raises(ValueError, match="window"):
        attn_fwd(*args, window=(-2, 0))
    with pytest.raises(ValueError, match="softcap"):
        attn_fwd(*args, softcap=-1.0)
    with pytest.raises(ValueError, match="sinks"):
        attn_fwd(*args, sinks=torch.zeros(H + 1, device=DEVICE))
    with pytest.raises(ValueError, match="alibi"):
        attn_fwd(*args, alibi=torch.zeros(H, device=DEVICE))
    o, lse = attn_fwd(*args)
    bool_mask = torch.ones(1, H, 4, 4, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="mask_grad"):
        attn_bwd(o, q, k, k, o, lse, bool_mask, 0.25, False, 0.0, _seed(), 0, mask_grad=True)
    with pytest.raises(ValueError, match="mask_grad"):
        attn_bwd(o, q, k, k, o, lse, None, 0.25, False, 0.0, _seed(), 0, mask_grad=True)


# ---------------------------------------------------------------------------------------------------------------
# The public API on the triton backend (fastlm.functional), for the models' combinations; the generic modifier tests
# over every backend are in test_attention_api.py.


def _public_case(dtype, Sq, Sk, kw, ref_kw, mask_shape=None, sinks=False, alibi=None):
    """F.scaled_dot_product_attention(**kw) on the triton backend against ``reference(**ref_kw)``: output and the
    gradients of q, k, v, the additive mask and the sinks."""
    D = 16
    q = torch.randn(B, H, Sq, D, device=DEVICE).to(dtype)
    k, v = (torch.randn(B, HKV, Sk, D, device=DEVICE).to(dtype) for _ in range(2))
    m = torch.randn(mask_shape, device=DEVICE).to(dtype) if mask_shape else None
    s = torch.randn(H, device=DEVICE) if sinks else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v, m, s) if t is not None]
    it = iter(leaves)
    q_, k_, v_ = next(it), next(it), next(it)
    m_ = next(it) if m is not None else None
    s_ = next(it) if s is not None else None
    with fastlm.backend("triton"):
        o = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=m_, enable_gqa=True, sinks=s_, **kw)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves, do)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(l64)
    q64, k64, v64 = next(it), next(it), next(it)
    m64 = next(it) if m is not None else None
    s64 = next(it) if s is not None else None
    o64, _ = reference(q64, k64, v64, m64, 1 / math.sqrt(D), sinks=s64, alibi=alibi, **ref_kw)
    refs = torch.autograd.grad(o64, l64, do.double())
    check(o, o64, dtype, "o")
    names = ("dq", "dk", "dv", *(["dmask"] if m is not None else []), *(["dsinks"] if s is not None else []))
    for name, got, ref in zip(names, grads, refs, strict=True):
        check(got, ref, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Sq,Sk", [(9, 13), (13, 13), (1, 20)])
def test_public_sliding_window_with_sinks(dtype, Sq, Sk):
    """gpt-oss: causal sliding window with sinks, GQA; with is_causal the window's right side is 0 and the causal
    edge is bottom-right aligned (as FlashAttention) also when Sq != Sk."""
    kw = dict(is_causal=True, window=(5, None))
    _public_case(dtype, Sq, Sk, kw, dict(causal=False, window=(5, 0)), sinks=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_softcap_window_and_mask_gradient(dtype):
    """Gemma-2: soft cap + causal sliding window, with a per-key additive mask (1, 1, 1, Sk) broadcast over batch,
    heads and queries: its gradient is the sum of dS over them."""
    kw = dict(is_causal=True, window=(6, 0), softcap=2.0)
    _public_case(dtype, 17, 17, kw, dict(causal=True, window=(6, 0), softcap=2.0), mask_shape=(1, 1, 1, 17))


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_alibi(dtype):
    """BLOOM / MPT: ALiBi slopes per head (the op layer expands (H,) to (B, H))."""
    slopes = torch.exp2(-8.0 * torch.arange(1, H + 1, device=DEVICE) / H)
    kw = dict(is_causal=True, alibi_slopes=slopes)
    _public_case(dtype, 20, 20, kw, dict(causal=True), alibi=slopes.expand(B, H))


def test_public_varlen_window_sinks_alibi():
    """F.varlen_attention with a causal window, sinks and per-sequence ALiBi slopes."""
    lq, lk = [3, 11, 7], [3, 14, 7]
    cu_q, cu_k = _cu(lq), _cu(lk)
    q = torch.randn(sum(lq), H, 16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(sum(lk), HKV, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    sinks = torch.randn(H, device=DEVICE, requires_grad=True)
    slopes = torch.rand(3, H, device=DEVICE)
    with fastlm.backend("triton"):
        o = F.varlen_attention(
            q, k, v, cu_q, cu_k, max(lq), max(lk), is_causal=True, window=(4, None), sinks=sinks, alibi_slopes=slopes
        )
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, [q, k, v, sinks], do)
    l64 = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    outs = []
    for b in range(3):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        qb, kb, vb = (t[s].transpose(0, 1)[None] for t, s in zip(l64[:3], (sq, sk, sk), strict=True))
        ob, _ = reference(qb, kb, vb, None, 0.25, False, (4, 0), sinks=l64[3], alibi=slopes[b : b + 1])
        outs.append(ob[0].transpose(0, 1))
    o64 = torch.cat(outs)
    refs = torch.autograd.grad(o64, l64, do.double())
    check(o, o64, torch.float32, "o")
    for name, got, ref in zip(("dq", "dk", "dv", "dsinks"), grads, refs, strict=True):
        check(got, ref, torch.float32, name)
