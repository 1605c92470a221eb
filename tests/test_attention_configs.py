"""Attention launch configurations on the Triton backend: the TMA (tensor-descriptor) path, the warp-specialised
forward, every config of the autotune space, and the choice logic (layouts TMA can describe, autotune switches).

On CPU the kernels run in the interpreter, which executes TMA descriptor loads (zero-filling out-of-bounds rows and
columns like the copy engine) and the warp-specialised variant's single loop; the hardware side of both (UTMALDG,
USETMAXREG, no spills, shared memory) is checked by the static sm_90 compile (tests/test_static.py). On a GPU the
same tests run compiled, and the gpu-marked ones run the autotuner.
"""

import math

import pytest
import torch
import torch.nn.functional as TF
from helpers import DEVICE, ON_GPU
from test_attention import check_attention

import fastlm
import fastlm.functional as F

pytest.importorskip("triton")
from fastlm.kernels import MASK_ADD, MASK_BOOL, MASK_NONE  # noqa: E402
from fastlm.kernels.attention import backward as AB  # noqa: E402
from fastlm.kernels.attention import configs as C  # noqa: E402
from fastlm.kernels.attention import forward as A  # noqa: E402

# fp16 dots are right in the interpreter (bf16 ones are not); on a GPU the TMA path is taken for fp16/bf16 only
DTYPE = torch.float16


def _seed(value: int) -> torch.Tensor:
    """Dropout's seed as the launchers take it: an int64 tensor on the inputs' device, read by the kernel."""
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


@pytest.fixture
def triton_tma(monkeypatch):
    """The Triton backend with TMA wherever the layout allows (as on sm_90), counting the descriptors made."""
    monkeypatch.setenv("FASTLM_ATTENTION_TMA", "1")
    made = []
    real = A.descriptor

    def spy(t, rows):
        made.append(tuple(t.shape))
        return real(t, rows)

    monkeypatch.setattr(A, "descriptor", spy)
    monkeypatch.setattr(AB, "descriptor", spy)
    with fastlm.backend("triton"):
        yield made


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "B,H,Hkv,Sq,Sk,D,layout",
    [
        (2, 2, 2, 37, 53, 64, None),  # ragged: rows past S come back zero from the descriptor
        (1, 4, 2, 50, 20, 80, "bshd"),  # head dim padded to 128 by the descriptor's zero fill; GQA; HF layout
        (1, 2, 1, 1, 40, 32, None),  # decoding, MQA
    ],
)
def test_tma_path_matches_reference(triton_tma, B, H, Hkv, Sq, Sk, D, layout, causal):
    check_attention(B, H, Hkv, Sq, Sk, D, DTYPE, causal=causal, layout=layout)
    # forward: q, k, v; backward: q, do (dK/dV) and k, v (dQ)
    assert len(triton_tma) == 7, triton_tma


def test_tma_path_with_masks_and_dropout(triton_tma, monkeypatch):
    mask = torch.rand(2, 1, 33, 45, device=DEVICE) > 0.3
    check_attention(2, 2, 2, 33, 45, 64, DTYPE, causal=True, mask=mask)
    assert len(triton_tma) == 5  # with a mask ("lean" configs) dK/dV loads Q and dO with pointers
    q, k, v = (torch.randn(1, 2, 32, 32, device=DEVICE, dtype=DTYPE) for _ in range(3))
    torch.manual_seed(3)
    with_tma = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert len(triton_tma) == 8
    monkeypatch.setenv("FASTLM_ATTENTION_TMA", "0")
    torch.manual_seed(3)
    without = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert len(triton_tma) == 8
    torch.testing.assert_close(with_tma, without, atol=2e-3, rtol=2e-3)


def test_tma_layout_rules():
    """TMA needs a unit last stride, a 16-byte aligned base and 16-byte multiple strides; size-1 dims are free."""
    x = torch.randn(2, 3, 40, 64, dtype=torch.float16)
    assert C.tma_strides(x) == list(x.stride())
    assert C.tma_strides(x[:, :, 1:]) == list(x.stride())  # offset 64 halves = 128 bytes: aligned
    assert C.tma_strides(x[..., 1:]) is None  # base off by 2 bytes, and a 63-wide row
    assert C.tma_strides(torch.randn(2, 3, 40, 12, dtype=torch.float16)) is None  # 24-byte rows
    assert C.tma_strides(x.transpose(-1, -2)) is None  # last dim not contiguous
    assert C.tma_strides(x[:1].expand(2, 3, 40, 64)) is None  # stride 0 over a dim of 2
    one = torch.randn(1, 1, 40, 64, dtype=torch.float16)[:, :, :, :]
    assert C.tma_strides(one.as_strided(one.shape, (7, 5, 64, 1))) == [2560, 2560, 64, 1]
    # decoding (S = 1) with a 72-byte row: the unused stride is rounded up to 16 bytes
    assert C.tma_strides(torch.randn(1, 1, 1, 36, dtype=torch.float16)) == [40, 40, 40, 1]
    assert C.tma_strides(torch.empty(2, 3, 0, 64, dtype=torch.float16)) is None


def test_tma_choice(monkeypatch):
    x = torch.randn(1, 2, 16, 64, dtype=torch.float16)
    monkeypatch.setenv("FASTLM_ATTENTION_TMA", "auto")
    assert not C.use_tma(x, x, x)  # auto: CUDA sm_90+ only
    monkeypatch.setenv("FASTLM_ATTENTION_TMA", "1")
    assert C.use_tma(x, x, x)
    assert C.use_tma(x, x[..., :32], x)  # a column slice keeps aligned strides
    assert not C.use_tma(x, x[..., 1:33], x)  # a base 2 bytes off
    monkeypatch.setenv("FASTLM_ATTENTION_TMA", "0")
    assert not C.use_tma(x, x, x)


# ---------------------------------------------------------------------------------------------------------------
# Every config of the autotune space computes the same thing as the default (block sizes, TMA, the WS loop)


def _fwd_ref(q, k, v, causal):
    o = TF.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return o, torch.logsumexp(s, -1)


def _all_fwd_configs():
    out = []
    for D in (64, 128, 256):
        for tma in (False, True):
            # warp-specialised configs compile on Triton 3.6 only; the interpreter runs their loop anywhere
            ws = tma and (A.WS_TRITON or A.INTERPRET)
            cfgs = [(c, 0.0) for c in C.fwd_configs(D, tma, ws, interpret=False)]
            cfgs += [(c, 0.2) for c in C.fwd_configs(D, tma, False, interpret=False, lean=True)]
            for cfg, p in cfgs:
                label = f"D{D}-{'tma' if tma else 'ptr'}-M{cfg['BLOCK_M']}N{cfg['BLOCK_N']}w{cfg['num_warps']}"
                label += f"s{cfg['num_stages']}{'-ws' if cfg['WS'] else ''}{'-lean' if p else ''}"
                out.append(pytest.param(D, tma, cfg, p, id=label))
    return out


@pytest.mark.configs
@pytest.mark.parametrize("D,tma,cfg,p", _all_fwd_configs())
def test_every_forward_config(D, tma, cfg, p):
    """Every config against the float64 reference; the lean configs (for a mask and/or dropout) with both, against
    the smallest-tile config with the same seed (the dropout mask is a function of (row, key), not of the tiling)."""
    # ragged against every block size; batch and GQA indices (smaller with dropout: its reference runs 16x16 tiles)
    B, H, Hkv, Sq, Sk = (1, 2, 1, 70, 90) if p else (2, 2, 1, 150, 197)
    q = torch.randn(B, H, Sq, D, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(B, Hkv, Sk, D, device=DEVICE, dtype=DTYPE) for _ in range(2))
    mask = (torch.rand(B, 1, Sq, Sk, device=DEVICE) > 0.2).expand(B, H, Sq, Sk) if p else None
    for causal in (False, True):
        args = (q, k, v, mask, 1 / math.sqrt(D), causal, p, _seed(99), 0)
        o, lse = A.attn_fwd(*args, config=cfg, tma=tma)
        if p:
            small = C.INTERPRET_CFG if A.INTERPRET else C.FWD_PTR[C.bucket(D)][-1]
            o2, lse2 = A.attn_fwd(*args, config=small, tma=False)
            torch.testing.assert_close(o, o2, atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(lse, lse2, atol=1e-5, rtol=1e-5)
            continue
        ref_o, ref_lse = _fwd_ref(q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1), causal)
        torch.testing.assert_close(o.double(), ref_o, atol=4e-3, rtol=4e-3)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.configs
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("lean", [False, True], ids=["plain", "mask"])
def test_every_fp32_config(D, lean):
    """float32 attention's own tiles (FP32 tables: true fp32 dots, spill-free where one exists), forward and
    backward, against the float64 reference; lean: with a mask (and causal), as those tables are chosen for."""
    B, H, Hkv, Sq, Sk = 1, 2, 1, 40, 57
    q = torch.randn(B, H, Sq, D, device=DEVICE)
    k, v = (torch.randn(B, Hkv, Sk, D, device=DEVICE) for _ in range(2))
    do = torch.randn(B, H, Sq, D, device=DEVICE)
    mask = torch.rand(B, 1, Sq, Sk, device=DEVICE) > 0.2
    mask[..., 0] = True  # every query sees a key under the causal mask too (torch would give NaN rows)
    mask = mask.expand(B, H, Sq, Sk) if lean else None
    scale = 1 / math.sqrt(D)
    cfg = C.fwd_configs(D, False, False, interpret=False, lean=lean, fp32=True)[0]
    cfgs = (
        C.bwd_dkdv_configs(D, False, interpret=False, lean=lean, fp32=True)[0],
        C.bwd_dq_configs(D, False, interpret=False, lean=lean, fp32=True)[0],
    )
    assert cfg == C.FWD_FP32[lean][D] and cfgs == (C.DKDV_FP32[lean][D], C.DQ_FP32[lean][D])
    o, lse = A.attn_fwd(q, k, v, mask, scale, lean, 0.0, _seed(0), 0, config=cfg, tma=False)
    dq, dk, dv, _, _ = AB.attn_bwd(do, q, k, v, o, lse, mask, scale, lean, 0.0, _seed(0), 0, configs=cfgs, tma=False)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = TF.scaled_dot_product_attention(
        *leaves, attn_mask=None if mask is None else mask & torch.ones(Sq, Sk, dtype=torch.bool).tril(), enable_gqa=True
    )
    refs = torch.autograd.grad(ref, leaves, do.double())
    torch.testing.assert_close(o.double(), ref, atol=2e-5, rtol=2e-5)
    for name, a, r in zip(("dq", "dk", "dv"), (dq, dk, dv), refs, strict=True):
        torch.testing.assert_close(a.double(), r, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif(ON_GPU and not A.WS_TRITON, reason="warp-specialised configs compile on Triton 3.6 only")
@pytest.mark.parametrize("cfg", [c for c in C.FWD_TMA[64] if c["WS"]][:1], ids=["ws"])
def test_warp_specialised_loop_with_dropout_matches_default(cfg):
    """The WS variant's loop (one loop, masks on every tile) draws the same dropout numbers as the two-loop default
    (the launcher does not pick WS configs with dropout, for their spills; the loop must still be right)."""
    q, k, v = (torch.randn(1, 2, 150, 64, device=DEVICE, dtype=DTYPE) for _ in range(3))
    args = (q, k, v, None, 0.125, True, 0.2, _seed(1234), 0)
    ws, ws_lse = A.attn_fwd(*args, config=cfg, tma=True)
    ref, ref_lse = A.attn_fwd(*args, config=C.fwd_configs(64, True, ws=False, interpret=False)[0], tma=True)
    torch.testing.assert_close(ws, ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(ws_lse, ref_lse, atol=1e-5, rtol=1e-5)


def _all_bwd_configs():
    out = []
    for D in (64, 128, 256):
        for tma in (False, True):
            for p in (0.0, 0.2):
                tma_kv = C.dkdv_tma(D, tma, p > 0)
                kv = C.bwd_dkdv_configs(D, tma_kv, interpret=False, lean=p > 0)
                dq = C.bwd_dq_configs(D, tma, interpret=False, lean=p > 0)
                for i in range(max(len(kv), len(dq))):
                    a, b = kv[min(i, len(kv) - 1)], dq[min(i, len(dq) - 1)]
                    label = (
                        f"D{D}-{'tma' if tma else 'ptr'}-kv{a['BLOCK_M']}x{a['BLOCK_N']}-q{b['BLOCK_M']}x{b['BLOCK_N']}"
                    )
                    out.append(pytest.param(D, tma, (a, b), p, id=f"{label}-{i}{'-lean' if p else ''}"))
    return out


@pytest.mark.configs
@pytest.mark.parametrize("D,tma,cfgs,p", _all_bwd_configs())
def test_every_backward_config(D, tma, cfgs, p):
    """dQ, dK, dV of every config pair against the float64 reference; the lean pair with a mask and dropout,
    against the smallest tiles with the same seed."""
    # ragged against every block size; batch and GQA indices (smaller with dropout: its reference runs 16x16 tiles)
    B, H, Hkv, Sq, Sk = (1, 2, 1, 70, 90) if p else (2, 2, 1, 150, 197)
    q = torch.randn(B, H, Sq, D, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(B, Hkv, Sk, D, device=DEVICE, dtype=DTYPE) for _ in range(2))
    do = torch.randn(B, H, Sq, D, device=DEVICE, dtype=DTYPE)
    scale = 1 / math.sqrt(D)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    mask = (torch.rand(B, 1, Sq, Sk, device=DEVICE) > 0.2).expand(B, H, Sq, Sk) if p else None
    for causal in (False, True):
        o, lse = A.attn_fwd(q, k, v, mask, scale, causal, p, _seed(5), 0)
        args = (do, q, k, v, o, lse, mask, scale, causal, p, _seed(5), 0)
        grads = AB.attn_bwd(*args, configs=cfgs, tma=tma)[:3]
        if p:
            small = C.bwd_entry(16, 16, 4, 1) if A.INTERPRET else C.bwd_entry(32, 64, 4, 2)
            refs = AB.attn_bwd(*args, configs=(small, small), tma=False)[:3]
            for name, a, r in zip(("dq", "dk", "dv"), grads, refs, strict=True):
                torch.testing.assert_close(a, r, atol=5e-3, rtol=5e-3, msg=lambda m, n=name: f"{n}: {m}")
            continue
        ref = TF.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=True)
        refs = torch.autograd.grad(ref, leaves, do.double())
        for name, a, r in zip(("dq", "dk", "dv"), grads, refs, strict=True):
            scale_r = max(r.abs().max().item(), 1.0)
            torch.testing.assert_close(a.double(), r, atol=5e-3 * scale_r, rtol=5e-3, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# Autotuning


def test_autotune_space_is_the_config_tables():
    """The autotuner searches exactly the table of the call's head dim and layout (the WS entries only where they
    apply), and the default of every table is its first entry."""
    for D in (64, 128, 256):
        for tma in (False, True):
            for mask_kind in (MASK_NONE, MASK_BOOL):
                kw = dict(BLOCK_D=D, TMA=tma, MASK_KIND=mask_kind, DROPOUT=False, PREC="tf32")
                got = A.attn_fwd_tuned.early_config_prune(A.attn_fwd_tuned.configs, {}, **kw)
                want = C.fwd_configs(
                    D, tma, tma and A.WS_TRITON and mask_kind == 0, interpret=False, lean=mask_kind != 0
                )
                as_dicts = [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in got]
                canon = lambda ds: sorted(tuple(sorted(d.items())) for d in ds)  # noqa: E731
                assert canon(as_dicts) == canon(want)
            kw = dict(BLOCK_D=D, TMA=tma, MASK_KIND=0, DROPOUT=False, PREC="tf32")
            if not tma or D in C.DKDV_TMA:
                got = AB.dkdv_tuned.early_config_prune(AB.dkdv_tuned.configs, {}, **kw)
                assert len(got) == len(C.bwd_dkdv_configs(D, tma, interpret=False))
            got = AB.dq_tuned.early_config_prune(AB.dq_tuned.configs, {}, **kw)
            assert len(got) == len(C.bwd_dq_configs(D, tma, interpret=False))
            lean = AB.dq_tuned.early_config_prune(AB.dq_tuned.configs, {}, **(kw | dict(DROPOUT=True)))
            assert len(lean) == 1 and lean[0].kwargs["BLOCK_N"] == C.DQ_LEAN[tma][D]["BLOCK_N"]
    assert not any(c["WS"] for t in C.FWD_PTR.values() for c in t), "warp specialisation needs the TMA path"
    with_dropout = A.attn_fwd_tuned.early_config_prune(
        A.attn_fwd_tuned.configs, {}, BLOCK_D=128, TMA=True, MASK_KIND=0, DROPOUT=True, PREC="tf32"
    )
    assert len(with_dropout) == 1 and not with_dropout[0].kwargs["WS"]
    for D in (64, 128, 256):  # float32: exactly the one FP32 entry of each kernel
        for lean in (False, True):
            kw = dict(BLOCK_D=D, TMA=False, MASK_KIND=MASK_ADD if lean else 0, DROPOUT=False, PREC="ieee")
            for tuned, table in (
                (A.attn_fwd_tuned, C.FWD_FP32),
                (AB.dkdv_tuned, C.DKDV_FP32),
                (AB.dq_tuned, C.DQ_FP32),
            ):
                got = tuned.early_config_prune(tuned.configs, {}, **kw)
                want = table[lean][D]
                assert [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in got] == [want]


def test_autotune_pre_hook_reboxes_the_descriptors():
    """Each autotune config's pre-hook sets the descriptors' boxes to its own block sizes (TMA calls only)."""
    x = torch.randn(1, 2, 64, 80, dtype=torch.float16)
    for tuned, names in ((A.attn_fwd_tuned, A.FWD_BOXES), (AB.dq_tuned, AB.DQ_BOXES)):
        for config in tuned.configs[:3]:
            nargs = {n: A.descriptor(x, 16) for n, _ in names} | {"TMA": True, "BLOCK_D": 128} | config.kwargs
            config.pre_hook(nargs)
            for n, block in names:
                assert nargs[n].block_shape == [1, 1, config.kwargs[block], 128]
            nargs = {n: x for n, _ in names} | {"TMA": False, "BLOCK_D": 128} | config.kwargs
            config.pre_hook(nargs)  # pointer arguments: untouched
            assert all(nargs[n] is x for n, _ in names)


def test_warp_specialised_configs_need_their_triton(monkeypatch):
    ws = next(c for c in C.FWD_TMA[64] if c["WS"])
    q = torch.randn(1, 1, 16, 64, device=DEVICE, dtype=DTYPE)
    monkeypatch.setattr(A, "INTERPRET", False)
    monkeypatch.setattr(A, "WS_TRITON", False)
    with pytest.raises(ValueError, match="warp-specialised configs need TMA and Triton 3.6"):
        A.attn_fwd(q, q, q, None, 0.125, False, 0.0, _seed(0), 0, config=ws, tma=True)


def test_autotune_is_opt_in(monkeypatch):
    x = torch.randn(2, device=DEVICE)
    monkeypatch.delenv("FASTLM_AUTOTUNE", raising=False)
    assert not C.autotune_enabled(x)
    monkeypatch.setenv("FASTLM_AUTOTUNE", "1")
    assert C.autotune_enabled(x) == (ON_GPU and not A.INTERPRET)
    torch.use_deterministic_algorithms(True)
    try:
        assert not C.autotune_enabled(x)  # a fixed config keeps results bitwise equal across processes
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.gpu
@pytest.mark.configs
def test_autotuned_attention_matches_reference(monkeypatch):
    """FASTLM_AUTOTUNE=1 on the GPU: the tuned kernels (whichever config wins, descriptors re-boxed by the pre-hook)
    pass the 2x oracle. One key only (each key compiles the whole table); every config is also run on its own by
    test_every_forward_config / test_every_backward_config."""
    monkeypatch.setenv("FASTLM_AUTOTUNE", "1")
    with fastlm.backend("triton"):
        check_attention(2, 4, 2, 1024, 1024, 128, torch.bfloat16)
