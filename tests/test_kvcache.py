"""Split-KV decode (kernels/attention/decode.py) and attention_with_kvcache (fastlm/ops/kvcache.py).

The decode kernel is checked against the ordinary forward (FASTLM_SPLIT_KV forced on vs off, through the public
SDPA) and, with the score modifiers, per-batch lengths and paged keys, against a float64 reference with an explicit
bias; attention_with_kvcache against its float64 reference (the torch backend, itself checked against torch's
SDPA), contiguous vs paged, the cache contents after the append, and bad inputs.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import DEVICE, ON_GPU, OPCHECK_TESTS, TOL, assert_close_ref

import fastlm
import fastlm.functional as F
from fastlm import extension
from fastlm.dispatch import BackendUnavailableError
from fastlm.ops.kvcache import reference_attention_with_kvcache

pytest.importorskip("triton")
if not ON_GPU and os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from fastlm.kernels.attention.decode import decode_fwd  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])  # interpreter: bf16 dots are wrong


def _ref_dense(
    q, k, v, scale, *, mask=None, causal=False, window=(-1, -1), softcap=0.0, sinks=None, alibi=None, seqlens=None
):
    """float64 (o, lse) of q (B, H, Sq, D) against k/v (B, Hkv, Sk, D) with an explicit bias (SPEC of issue 18):
    keys j < seqlens[b] (all when None), window / ALiBi bottom-right with off = L_b - Sq, top-left causal."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    G = H // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    L = torch.full((B,), Sk) if seqlens is None else seqlens.long().cpu()
    off = (L - Sq).to(q.device)[:, None, None, None]
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    if alibi is not None:
        s = s - alibi.double()[:, :, None, None] * (i + off - j).abs()
    ok = j < L.to(q.device)[:, None, None, None]
    if mask is not None:
        if mask.dtype == torch.bool:
            ok = ok & mask
        else:
            s = s + mask.double()
    if causal:
        ok = ok & (j <= i)
    if window[0] >= 0:
        ok = ok & (j >= i + off - window[0])
    if window[1] >= 0:
        ok = ok & (j <= i + off + window[1])
    s = s.masked_fill(~ok, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double()[None, :, None, None].expand(B, H, Sq, 1)], -1)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.matmul(p[..., :Sk], v), lse


def _check_o_lse(o, lse, ref_o, ref_lse, dtype, name=""):
    assert_close_ref(o, ref_o, dtype, f"o{name}")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), f"lse{name}: -inf rows differ"
    fin = ~torch.isinf(ref_lse)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=atol * 10, rtol=rtol)


def _qkv(B, H, Hkv, Sq, Sk, D, dtype, transposed=False):
    if transposed:  # HF's (B, S, H, D) storage seen as (B, H, S, D): non-contiguous strides
        q = torch.randn(B, Sq, H, D, dtype=dtype, device=DEVICE).transpose(1, 2)
        k, v = (torch.randn(B, Sk, Hkv, D, dtype=dtype, device=DEVICE).transpose(1, 2) for _ in range(2))
        return q, k, v
    q = torch.randn(B, H, Sq, D, dtype=dtype, device=DEVICE)
    return (
        q,
        torch.randn(B, Hkv, Sk, D, dtype=dtype, device=DEVICE),
        torch.randn(B, Hkv, Sk, D, dtype=dtype, device=DEVICE),
    )


def _sdpa(q, k, v, split: bool, monkeypatch, **kw):
    """Public SDPA on the triton backend with the split-KV path forced on / off; checks which path ran."""
    from fastlm.kernels.attention import decode

    calls = []
    real = decode.decode_fwd
    monkeypatch.setattr(decode, "decode_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("FASTLM_SPLIT_KV", "1" if split else "0")
    with fastlm.backend("triton"):
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], return_lse=True, **kw)
    monkeypatch.setattr(decode, "decode_fwd", real)
    assert len(calls) == int(split), f"split-KV path {'not ' if split else ''}taken"
    return out


# ---------------------------------------------------------------------------------------------------------------
# Decode kernel vs the ordinary forward (public SDPA, FASTLM_SPLIT_KV forced on / off)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "Sq,Sk,G",
    [(1, 5, 1), (1, 200, 4), (2, 37, 2), (4, 130, 1), (7, 64, 2), (16, 90, 1), (16, 33, 4), (3, 16, 4), (1, 2000, 2)],
)
def test_decode_matches_ordinary_forward(Sq, Sk, G, dtype, monkeypatch):
    q, k, v = _qkv(2, 2 * G, 2, Sq, Sk, 32, dtype, transposed=Sq % 2 == 1)
    o1, lse1 = _sdpa(q, k, v, True, monkeypatch)
    o0, lse0 = _sdpa(q, k, v, False, monkeypatch)
    ref_o, ref_lse = _ref_dense(q, k, v, 1 / math.sqrt(32))
    _check_o_lse(o1, lse1, ref_o, ref_lse, dtype, " split")
    _check_o_lse(o0, lse0, ref_o, ref_lse, dtype, " ordinary")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(o1.float(), o0.float(), atol=2 * atol * max(1.0, ref_o.abs().max().item()), rtol=rtol)


@pytest.mark.parametrize("kind", ["causal", "bool", "additive"])
def test_decode_masks_and_causal_match_ordinary(kind, monkeypatch):
    """Top-left causal (Sq != Sk: the first keys only), a bool mask with a fully masked row, a broadcast additive
    mask: the split path's (o, lse) equal the ordinary forward's."""
    B, H, Sq, Sk = 2, 4, 5, 150
    q, k, v = _qkv(B, H, 2, Sq, Sk, 32, torch.float16)
    kw = {}
    if kind == "causal":
        kw["is_causal"] = True
    elif kind == "bool":
        mask = torch.rand(B, 1, Sq, Sk, device=DEVICE) > 0.3
        mask[0, :, 1] = False  # an empty row
        kw["attn_mask"] = mask
    else:
        kw["attn_mask"] = torch.randn(1, H, Sq, Sk, device=DEVICE, dtype=torch.float16)
    o1, lse1 = _sdpa(q, k, v, True, monkeypatch, **kw)
    o0, lse0 = _sdpa(q, k, v, False, monkeypatch, **kw)
    mask = kw.get("attn_mask")
    ref_o, ref_lse = _ref_dense(
        q, k, v, 1 / math.sqrt(32), mask=None if mask is None else mask.expand(B, H, Sq, Sk), causal=kind == "causal"
    )
    _check_o_lse(o1, lse1, ref_o, ref_lse, torch.float16, " split")
    _check_o_lse(o0, lse0, ref_o, ref_lse, torch.float16, " ordinary")


def test_backward_after_split_forward(monkeypatch):
    """The ordinary backward runs on the split path's (o, lse): gradients equal those of the ordinary forward."""
    q, k, v = _qkv(1, 4, 2, 3, 70, 32, torch.float32)
    grads = []
    for split in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o, _ = _sdpa(*leaves, split, monkeypatch)
        g = torch.randn_like(o) if not grads else grads[0][0]
        torch.autograd.backward(o, g)
        grads.append([g] + [t.grad for t in leaves])
    for a, b in zip(grads[0][1:], grads[1][1:], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


PUBLIC_MODIFIERS = {
    "causal": dict(is_causal=True),  # no window: top-left, torch's rule (the op's causal flag)
    "window": dict(window=(8, None)),
    "window_causal": dict(window=(20, 0), is_causal=True),
    "softcap": dict(softcap=1.5),
    "sinks": dict(sinks=True),
    "alibi_h": dict(alibi_slopes="h"),
    "alibi_bh": dict(alibi_slopes="bh"),
    "all": dict(window=(40, None), is_causal=True, softcap=3.0, sinks=True, alibi_slopes="h"),
}


@pytest.mark.parametrize("name", list(PUBLIC_MODIFIERS))
def test_public_sdpa_modifiers_on_the_split_path(name, monkeypatch):
    """The hook passes the modifiers through: F.scaled_dot_product_attention with the split path forced gives the
    reference's (o, lse), and the ordinary backward after it the same gradients as after the ordinary forward."""
    B, H, Hkv, Sq, Sk, D = 2, 4, 2, 3, 100, 32
    q, k, v = _qkv(B, H, Hkv, Sq, Sk, D, torch.float32)
    kw = dict(PUBLIC_MODIFIERS[name])
    if kw.get("sinks"):
        kw["sinks"] = torch.randn(H, device=DEVICE)
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = torch.rand(H if kw["alibi_slopes"] == "h" else (B, H), device=DEVICE) * 0.2
    o, lse = _sdpa(q, k, v, True, monkeypatch, **kw)
    w = kw.get("window")
    causal = bool(kw.get("is_causal")) and w is None  # with a window, is_causal is its right side 0 (bottom-right)
    window = (
        (-1, -1) if w is None else tuple(-1 if x is None else x for x in (w[0], 0 if kw.get("is_causal") else w[1]))
    )
    alibi = kw.get("alibi_slopes")
    ref_o, ref_lse = _ref_dense(
        q,
        k,
        v,
        1 / math.sqrt(D),
        causal=causal,
        window=window,
        softcap=kw.get("softcap", 0.0),
        sinks=kw.get("sinks"),
        alibi=None if alibi is None else alibi.expand(B, H),
    )
    _check_o_lse(o, lse, ref_o, ref_lse, torch.float32)
    grads = []
    for split in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o, _ = _sdpa(*leaves, split, monkeypatch, **kw)
        torch.autograd.backward(o, torch.ones_like(o))
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_use_split_kv_rule(monkeypatch):
    from fastlm.kernels.attention.decode import SPLIT_KV_MIN_KEYS, use_split_kv

    monkeypatch.delenv("FASTLM_SPLIT_KV", raising=False)
    q = torch.empty(1, 2, 1, 64)
    assert use_split_kv(q, torch.empty(1, 2, SPLIT_KV_MIN_KEYS, 64), 0.0)
    assert not use_split_kv(q, torch.empty(1, 2, SPLIT_KV_MIN_KEYS - 1, 64), 0.0)
    assert not use_split_kv(q, torch.empty(1, 2, 4096, 64), 0.1)  # dropout: the ordinary kernel
    assert not use_split_kv(torch.empty(1, 2, 17, 64), torch.empty(1, 2, 4096, 64), 0.0)  # Sq > 16
    assert not use_split_kv(torch.empty(64, 32, 1, 64), torch.empty(64, 32, 4096, 64), 0.0)  # the grid fills
    monkeypatch.setenv("FASTLM_SPLIT_KV", "0")
    assert not use_split_kv(q, torch.empty(1, 2, 4096, 64), 0.0)
    monkeypatch.setenv("FASTLM_SPLIT_KV", "1")
    assert use_split_kv(q, torch.empty(1, 2, 8, 64), 0.0)
    assert not use_split_kv(torch.empty(3, 2, 64), torch.empty(3, 2, 64), 0.0, varlen=True)


# ---------------------------------------------------------------------------------------------------------------
# Decode kernel with the score modifiers, per-batch lengths and forced split counts, vs the float64 reference

MODIFIERS = {
    "none": {},
    "window_left": dict(window=(20, -1)),
    "window_right": dict(window=(-1, 0)),
    "window_both": dict(window=(7, 2)),
    "window_zero": dict(window=(0, 0)),
    "window_wide": dict(window=(500, 500)),
    "softcap": dict(softcap=0.7),
    "sinks": dict(sinks=True),
    "alibi": dict(alibi=True),
    "all": dict(window=(30, 0), softcap=2.0, sinks=True, alibi=True),
}


def _modifier_tensors(kw, B, H):
    kw = dict(kw)
    if kw.get("sinks"):
        kw["sinks"] = torch.randn(H, device=DEVICE)
    if kw.get("alibi"):
        kw["alibi"] = torch.rand(B, H, device=DEVICE) * 0.3
    return kw


@pytest.mark.parametrize("name", list(MODIFIERS))
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_modifiers_vs_reference(name, splits):
    B, H, Hkv, Sq, Sk, D = 3, 4, 2, 4, 120, 32
    q, k, v = _qkv(B, H, Hkv, Sq, Sk, D, torch.float16, transposed=True)
    kw = _modifier_tensors(MODIFIERS[name], B, H)
    seqlens = torch.tensor([120, 0, 45], dtype=torch.int32, device=DEVICE)  # full, empty, ragged
    scale = 0.3
    o, lse = decode_fwd(q, k, v, None, scale, False, seqlens=seqlens, splits=splits, **kw)
    ref_o, ref_lse = _ref_dense(q, k, v, scale, seqlens=seqlens, **kw)
    _check_o_lse(o, lse, ref_o, ref_lse, torch.float16)


@pytest.mark.parametrize("D", [16, 40, 128])
def test_decode_head_dims_and_many_splits(D):
    q, k, v = _qkv(1, 8, 1, 2, 300, D, torch.float32)  # GROUP 8: 16 packed rows
    for splits in (2, 7, 19):
        o, lse = decode_fwd(q, k, v, None, 1 / math.sqrt(D), False, splits=splits)
        _check_o_lse(o, lse, *_ref_dense(q, k, v, 1 / math.sqrt(D)), torch.float32, f" splits={splits}")


@pytest.mark.parametrize("kw", [{}, dict(window=(5, 0)), dict(causal=True), dict(window=(3, 1), alibi=True)])
def test_decode_row_blocks(kw):
    """Sq * GROUP packed rows over several row blocks (BLOCK_M = 16 forced: 16 x 4 = 64 rows, 4 blocks), each
    cutting its key range to its own queries' band."""
    B, H = 2, 4
    q, k, v = _qkv(B, H, 1, 16, 70, 16, torch.float32)
    kw = _modifier_tensors(kw, B, H)
    causal = kw.pop("causal", False)
    seqlens = torch.tensor([70, 23], dtype=torch.int32, device=DEVICE)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    o, lse = decode_fwd(q, k, v, None, 0.25, causal, seqlens=seqlens, splits=3, config=cfg, **kw)
    _check_o_lse(o, lse, *_ref_dense(q, k, v, 0.25, seqlens=seqlens, causal=causal, **kw), torch.float32)


def test_decode_empty_rows_with_sinks():
    """No visible key: o = 0, lse = -inf, or the sink's logit with sinks."""
    q, k, v = _qkv(2, 2, 2, 3, 50, 16, torch.float32)
    sinks = torch.tensor([0.5, -1.0], device=DEVICE)
    seqlens = torch.tensor([0, 50], dtype=torch.int32, device=DEVICE)
    o, lse = decode_fwd(q, k, v, None, 0.25, False, seqlens=seqlens, sinks=sinks, window=(0, -1), splits=3)
    assert torch.equal(o[0], torch.zeros_like(o[0]))
    torch.testing.assert_close(lse[0], sinks[:, None].expand(2, 3))
    o, lse = decode_fwd(q, k, v, None, 0.25, False, seqlens=seqlens)
    assert torch.equal(o[0], torch.zeros_like(o[0])) and torch.isneginf(lse[0]).all()


# ---------------------------------------------------------------------------------------------------------------
# attention_with_kvcache


def _cache_case(B, Hkv, D, S_max, dtype, seqlens, block_size=None):
    """A filled contiguous cache and the same content paged through a random block table."""
    kc = torch.randn(B, S_max, Hkv, D, dtype=dtype, device=DEVICE)
    vc = torch.randn(B, S_max, Hkv, D, dtype=dtype, device=DEVICE)
    cs = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    if block_size is None:
        return kc, vc, cs, None, None, None
    per = S_max // block_size
    perm = torch.randperm(B * per + 3, device=DEVICE)[: B * per]  # 3 spare pages, random order
    bt = perm.view(B, per).to(torch.int32)
    kp = torch.randn(B * per + 3, block_size, Hkv, D, dtype=dtype, device=DEVICE)
    vp = torch.randn_like(kp)
    kp[bt.long()] = kc.view(B, per, block_size, Hkv, D)
    vp[bt.long()] = vc.view(B, per, block_size, Hkv, D)
    return kc, vc, cs, kp, vp, bt


def _paged_to_dense(pages, bt):
    B, per = bt.shape
    return pages[bt.long()].reshape(B, per * pages.shape[1], *pages.shape[2:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Sq,S_new", [(1, 1), (1, 0), (4, 4), (3, 0), (16, 16)])
@pytest.mark.parametrize("name", ["none", "all", "window_both"])
def test_kvcache_contiguous_and_paged_vs_reference(Sq, S_new, name, dtype):
    B, H, Hkv, D, S_max, bs = 3, 4, 2, 32, 128, 16
    seqlens = [0, 61, 128 - S_new]  # nothing cached yet, ragged, full after the append
    kc, vc, cs, kp, vp, bt = _cache_case(B, Hkv, D, S_max, dtype, seqlens, bs)
    q = torch.randn(B, Sq, H, D, dtype=dtype, device=DEVICE)
    k = v = None
    if S_new:
        k = torch.randn(B, S_new, Hkv, D, dtype=dtype, device=DEVICE)
        v = torch.randn(B, S_new, Hkv, D, dtype=dtype, device=DEVICE)
    mod = dict(MODIFIERS[name])
    kw = {}
    if "window" in mod:
        kw["window"] = tuple(None if w < 0 else w for w in mod["window"])
        kw["is_causal"] = not kw["window"][1]  # (7, 2): a right side, not causal
    if "softcap" in mod:
        kw["softcap"] = mod["softcap"]
    if mod.get("sinks"):
        kw["sinks"] = torch.randn(H, device=DEVICE)
    if mod.get("alibi"):
        kw["alibi_slopes"] = torch.rand(H, device=DEVICE) * 0.3
    # expected cache after the append
    kc_want, vc_want = kc.clone(), vc.clone()
    for b, n in enumerate(seqlens):
        if S_new:
            kc_want[b, n : n + S_new], vc_want[b, n : n + S_new] = k[b], v[b]
    with fastlm.backend("triton"):
        out = F.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=cs, **kw)
        out_p = F.attention_with_kvcache(q, kp, vp, k, v, cache_seqlens=cs, block_table=bt, **kw)
    assert torch.equal(kc, kc_want) and torch.equal(vc, vc_want), "contiguous cache after the append"
    assert torch.equal(_paged_to_dense(kp, bt), kc_want) and torch.equal(_paged_to_dense(vp, bt), vc_want)
    assert torch.equal(out, out_p), "paged and contiguous caches give different outputs"
    w = kw.get("window", (None, None))
    ref = reference_attention_with_kvcache(
        q.double(),
        kc_want.double(),
        vc_want.double(),
        cs + S_new,
        None,
        1 / math.sqrt(D),
        -1 if w[0] is None else w[0],
        0 if kw.get("is_causal", True) else w[1],
        kw.get("softcap", 0.0),
        kw.get("sinks"),
        None if "alibi_slopes" not in kw else kw["alibi_slopes"].expand(B, H),
    )
    assert_close_ref(out, ref, dtype, "out")


def test_reference_matches_torch_sdpa():
    """The oracle itself: without modifiers, the float64 reference equals torch's SDPA on each sequence's keys
    (bottom-right causal as an explicit mask)."""
    B, H, Hkv, D, Sq = 3, 4, 2, 16, 3
    kc, vc, cs, *_ = _cache_case(B, Hkv, D, 40, torch.float64, [5, 40, 17])
    q = torch.randn(B, Sq, H, D, dtype=torch.float64, device=DEVICE)
    ref = reference_attention_with_kvcache(q, kc, vc, cs, None, 0.5, -1, 0, 0.0, None, None)
    for b, L in enumerate(cs.tolist()):
        keep = torch.ones(Sq, L, dtype=torch.bool, device=DEVICE).tril(L - Sq)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[b].transpose(0, 1),
            kc[b, :L].transpose(0, 1),
            vc[b, :L].transpose(0, 1),
            keep,
            scale=0.5,
            enable_gqa=True,
        ).transpose(0, 1)
        torch.testing.assert_close(ref[b], want)


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_kvcache_other_backends(impl):
    if impl == "cpu" and (extension.lib is None or DEVICE.type != "cpu"):
        pytest.skip("the cpu backend needs fastlm._C and CPU tensors")
    B, H, Hkv, D, Sq = 2, 4, 2, 32, 2
    kc, vc, cs, kp, vp, bt = _cache_case(B, Hkv, D, 64, torch.float32, [0, 40], 16)
    kc, vc, kp, vp = (t.cpu() for t in (kc, vc, kp, vp))
    cs, bt = cs.cpu(), bt.cpu()
    q = torch.randn(B, Sq, H, D)
    k, v = torch.randn(B, 2, Hkv, D), torch.randn(B, 2, Hkv, D)
    with fastlm.backend("triton"):
        want = F.attention_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=cs)
    with fastlm.backend(impl):
        got = F.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=cs)
        got_p = F.attention_with_kvcache(q, kp, vp, k, v, cache_seqlens=cs, block_table=bt)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_p, want, atol=1e-5, rtol=1e-5)


def test_kvcache_cpu_backend_modifiers():
    """The cpu backend passes window/softcap/sinks/alibi to the fused cpu attention: equal to the reference, under
    the cpu backend and under auto."""
    if extension.lib is None:
        pytest.skip("needs fastlm._C")
    B, H, Hkv, D, Sq = 2, 2, 1, 16, 1
    kc, vc, cs, *_ = _cache_case(B, Hkv, D, 48, torch.float32, [10, 47], None)
    kc, vc, cs = kc.cpu(), vc.cpu(), cs.cpu()
    q = torch.randn(B, Sq, H, D)
    kw = dict(window=(8, None), softcap=1.5, sinks=torch.randn(H), alibi_slopes=torch.rand(H))
    with fastlm.backend("torch"):
        want = F.attention_with_kvcache(q, kc, vc, cache_seqlens=cs, **kw)
    with fastlm.backend("cpu"):
        torch.testing.assert_close(F.attention_with_kvcache(q, kc, vc, cache_seqlens=cs, **kw), want)
    with fastlm.backend("auto"):
        torch.testing.assert_close(F.attention_with_kvcache(q, kc, vc, cache_seqlens=cs, **kw), want)


def test_kvcache_opcheck():
    """The registered op's schema and fake impl (torch.compile)."""
    from fastlm.ops.kvcache import attention_decode_triton

    B, Sq, H, Hkv, D = 2, 2, 4, 2, 16
    q = torch.randn(B, Sq, H, D, device=DEVICE)
    kc, vc = torch.randn(B, 40, Hkv, D, device=DEVICE), torch.randn(B, 40, Hkv, D, device=DEVICE)
    cs = torch.tensor([3, 40], dtype=torch.int32, device=DEVICE)
    args = (q, kc, vc, cs, None, 0.25, -1, 0, 0.0, torch.randn(H, device=DEVICE), None)
    torch.library.opcheck(attention_decode_triton, args, test_utils=OPCHECK_TESTS)


def test_kvcache_compiles_fullgraph():
    B, Sq, H, Hkv, D = 2, 1, 2, 1, 16
    q = torch.randn(B, Sq, H, D, device=DEVICE)
    kc, vc = torch.zeros(B, 32, Hkv, D, device=DEVICE), torch.zeros(B, 32, Hkv, D, device=DEVICE)
    k, v = torch.randn(B, 1, Hkv, D, device=DEVICE), torch.randn(B, 1, Hkv, D, device=DEVICE)
    cs = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)

    def step(q, kc, vc, k, v, cs):
        return F.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=cs)

    with fastlm.backend("triton"):
        want = step(q, kc.clone(), vc.clone(), k, v, cs)
        kc2, vc2 = kc.clone(), vc.clone()
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc2, vc2, k, v, cs)
    torch.testing.assert_close(got, want)
    assert torch.equal(kc2[1, 5], k[1, 0]) and torch.equal(kc2[0, 0], k[0, 0])


def _bad(match, exc=ValueError, **over):
    B, Sq, H, Hkv, D = 2, 1, 4, 2, 16
    args = dict(
        q=torch.randn(B, Sq, H, D, device=DEVICE),
        k_cache=torch.zeros(B, 32, Hkv, D, device=DEVICE),
        v_cache=torch.zeros(B, 32, Hkv, D, device=DEVICE),
        cache_seqlens=torch.tensor([0, 5], dtype=torch.int32, device=DEVICE),
    )
    args.update(over)
    with fastlm.backend("triton"), pytest.raises(exc, match=match):
        F.attention_with_kvcache(**args)


def test_kvcache_bad_inputs():
    B, H, Hkv, D = 2, 4, 2, 16
    _bad("window left size must be an int >= 0", window=(-2, None))
    _bad("window right size", window=(4, -1))
    _bad("window must be None or a", window=5)
    _bad("the right size must be 0 or None", window=(4, 2))  # is_causal (the default) with a right side
    _bad(r"sinks must have shape \(4,\)", sinks=torch.zeros(3, device=DEVICE))
    _bad("alibi_slopes must be", alibi_slopes=torch.zeros(B, H + 1, device=DEVICE))
    _bad("softcap must be", softcap=-1.0)
    _bad("cache_seqlens must be a 1-D int32", TypeError, cache_seqlens=torch.tensor([0, 5], device=DEVICE))
    _bad("cache_seqlens must have B", cache_seqlens=torch.tensor([0], dtype=torch.int32, device=DEVICE))
    _bad("k and v must be given together", k=torch.zeros(B, 1, Hkv, D, device=DEVICE))
    _bad("k and v must be", k=torch.zeros(B, 1, Hkv, D + 1, device=DEVICE), v=torch.zeros(B, 1, Hkv, D + 1))
    _bad("multiple of the cache's kv heads", q=torch.randn(B, 1, 3, D, device=DEVICE))
    _bad("share a dtype", TypeError, k_cache=torch.zeros(B, 32, Hkv, D, dtype=torch.float16, device=DEVICE))
    _bad("block_table must be a 2-D int32", TypeError, block_table=torch.zeros(B, 2, dtype=torch.int64))
    paged = torch.zeros(4, 16, Hkv, D, device=DEVICE)
    _bad(
        "block_size must be a multiple of 16",
        k_cache=torch.zeros(4, 8, Hkv, D),
        v_cache=torch.zeros(4, 8, Hkv, D),
        block_table=torch.zeros(B, 2, dtype=torch.int32),
    )
    if DEVICE.type == "cpu":  # values are checked on the host for CPU tensors only
        _bad("cache's capacity", cache_seqlens=torch.tensor([0, 40], dtype=torch.int32))
        _bad("cache's capacity", cache_seqlens=torch.tensor([-1, 4], dtype=torch.int32))
        _bad(
            r"block_table\[1, 0\] = 4 points outside the cache's 4 blocks",
            k_cache=paged,
            v_cache=paged.clone(),
            block_table=torch.tensor([[0, 1], [4, 2]], dtype=torch.int32),
        )
        # an unused entry (past the sequence's pages) may hold anything, as FlashAttention's
        with fastlm.backend("triton"):
            F.attention_with_kvcache(
                torch.randn(B, 1, H, D),
                paged,
                paged.clone(),
                cache_seqlens=torch.tensor([3, 20], dtype=torch.int32),
                block_table=torch.tensor([[0, 99], [1, 2]], dtype=torch.int32),
            )
    q = torch.randn(B, 1, H, D, device=DEVICE, requires_grad=True)
    _bad("inference only", RuntimeError, q=q)
    with torch.no_grad():
        with fastlm.backend("triton"):
            F.attention_with_kvcache(
                q,
                torch.zeros(B, 32, Hkv, D, device=DEVICE),
                torch.zeros(B, 32, Hkv, D, device=DEVICE),
                cache_seqlens=torch.tensor([0, 5], dtype=torch.int32, device=DEVICE),
            )


def test_kvcache_fp64_needs_torch_backend():
    q = torch.randn(1, 1, 2, 16, dtype=torch.float64)
    kc = torch.zeros(1, 16, 2, 16, dtype=torch.float64)
    cs = torch.tensor([4], dtype=torch.int32)
    with fastlm.backend("triton"), pytest.raises(TypeError, match="float64"):
        F.attention_with_kvcache(q, kc, kc.clone(), cache_seqlens=cs)
    out = F.attention_with_kvcache(q, kc, kc.clone(), cache_seqlens=cs)  # auto: torch's reference for fp64
    assert out.dtype == torch.float64 and torch.equal(out, torch.zeros_like(out))
    assert BackendUnavailableError  # (imported for the backend errors above)


# ---------------------------------------------------------------------------------------------------------------
# Static compile check (sm_90, Triton of this venv, no GPU)

_STATIC = r"""
import json, sys
from fastlm.bench.static import compile_stat
from fastlm.kernels.attention import decode
sig = dict(Q="*bf16", K="*bf16", V="*bf16", Mask="*i1", Seqlens="*i32", BlockTable="*i32", Alibi="*fp32",
           OPart="*fp32", LPart="*fp32", scale="fp32", softcap="fp32")
names = decode.decode_split_kernel.arg_names
rows = []
for rows_, label, flags in [
    (1, "Sq=1 G=1 plain", dict()),
    (8, "Sq=1 G=8 paged+seqlens", dict(PAGED=True, SEQLENS=True)),
    (64, "Sq=16 G=4 all modifiers", dict(SEQLENS=True, PAGED=True, ALIBI=True, SOFTCAP=True, WINDOW=True)),
    (16, "Sq=16 G=1 bool mask causal", dict(MASK_KIND=1, CAUSAL=True)),
]:
    cfg = decode.decode_config(rows_, 128, None)
    cex = dict(MASK_KIND=0, CAUSAL=False, WINDOW=False, SOFTCAP=False, ALIBI=False, SEQLENS=False, PAGED=False,
               BLOCK_D=128, EVEN_D=True, PREC="tf32", BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"]) | flags
    s = {n: sig.get(n, "i32") for n in names if n not in cex}
    st = compile_stat(decode.decode_split_kernel, s, cex, cfg["num_warps"], 90, "decode_split", label,
                      cfg["num_stages"])
    rows.append(dict(kernel=st.kernel, config=f"{label} {cfg}", regs=st.registers, spill=st.stack_bytes +
                     st.local_bytes, hmma=st.hmma, hgmma=st.hgmma, ldg128=st.ldg128))
cn = decode.decode_combine_kernel.arg_names
cex = dict(SINKS=True, BLOCK_S=32, SPLIT_TILE=16, BLOCK_D=128, EVEN_D=True)
s = {n: dict(OPart="*fp32", LPart="*fp32", Sinks="*fp32", O="*bf16", Lse="*fp32", D="i32").get(n, "i32") for n in cn
     if n not in cex}
st = compile_stat(decode.decode_combine_kernel, s, cex, 4, 90, "decode_combine", "sinks", 1)
rows.append(dict(kernel=st.kernel, config="sinks BLOCK_S=32", regs=st.registers, spill=st.stack_bytes +
                 st.local_bytes, hmma=0, hgmma=0, ldg128=st.ldg128))
print(json.dumps(rows))
"""


def test_decode_kernels_compile_for_sm90_without_spills():
    """bf16, D = 128: the split kernel (decode configs of a GPU, plain and with every flag) and the combine compile
    for sm_90 with Triton's ptxas, without register spills, and the split kernel's dots run on tensor cores."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _STATIC], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    print("\n".join(str(r) for r in rows))
    assert rows and all(r["spill"] == 0 for r in rows), rows
    assert all(r["hmma"] + r["hgmma"] > 0 for r in rows if r["kernel"] == "decode_split"), rows
