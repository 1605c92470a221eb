"""Flash attention backward in Triton (FA2 scheme; see forward.py for the forward and the notation).

delta = rowsum(dO * O) (preprocess kernel); one program per key block computes dK, dV by streaming the queries of
every query head that shares its key/value head (GQA without atomics); one program per query block computes dQ by
streaming keys. No atomics for dQ, dK, dV: bitwise deterministic for a given launch config (only the gradient of
a broadcast mask is summed with atomics).
    p = exp(s - lse); z = dropout keep / (1 - p_drop); dV += (p z)^T dO; dP = dO V^T; dS = p (z dP - delta)
    dK += dS^T q * scale;  dQ += dS k * scale
The score modifiers as in the forward (the dK/dV programs stream only the queries whose window reaches their keys,
dQ only the band's key tiles); a soft cap multiplies dS by 1 - tanh^2. With MASK_GRAD the dK/dV kernel, which visits
each (b, h, i, j) once, writes dS (w.r.t. the capped, biased score) into the mask's gradient: plain stores, or summed
over the tile's broadcast axes and added atomically when the mask broadcasts. dsinks is computed in torch from lse and
delta (O(B H Sq)).
On sm_90 the streamed operands (Q and dO for dK/dV, K and V for dQ) come through TMA descriptors when the layout
allows, as in the forward. FLOPs: 2.5x the forward's.
"""

import warnings

import torch
import triton
import triton.language as tl
from fastlm.kernels import LOG2E, empty, launch_grid, on_tensor_device
from fastlm.kernels.attention.configs import (
    DKDV_FP32,
    DKDV_LEAN,
    DKDV_PTR,
    DKDV_TMA,
    DQ_FP32,
    DQ_LEAN,
    DQ_PTR,
    DQ_TMA,
    autotune_enabled,
    autotuned,
    block_d,
    bwd_dkdv_configs,
    bwd_dq_configs,
    descriptor,
    dkdv_tma,
    fp32_case,
    is_lean,
    lean_case,
    precision,
    use_tma,
)
from fastlm.kernels.attention.forward import feature_args, mask_kind_of
from fastlm.kernels.attention.tiles import (
    dense_strides,
    dropout_seed,
    keep,
    load_tile,
    scores,
    seq_bounds,
    tile_allowed,
    tile_ids,
    varlen_strides,
    window_keys,
    window_queries,
)

# MASK_GRAD bits of the dK/dV kernel: dS into the mask's gradient; atomically (some dim broadcast); summed over the
# tile's queries (the mask broadcast over queries); summed over its keys (broadcast over keys)
DMASK_ON, DMASK_ATOMIC, DMASK_SUM_M, DMASK_SUM_N = 1, 2, 4, 8
_DMASK_ATOMIC, _DMASK_SUM_M, _DMASK_SUM_N = (tl.constexpr(x) for x in (DMASK_ATOMIC, DMASK_SUM_M, DMASK_SUM_N))

DKDV_BOXES = (("QDesc", "BLOCK_M"), ("DODesc", "BLOCK_M"))  # descriptor argument -> its box rows
DQ_BOXES = (("KDesc", "BLOCK_N"), ("VDesc", "BLOCK_N"))


@triton.jit
def attn_bwd_preprocess_kernel(
    O,  # forward output: dense (B, H, Sq, D) or varlen (total, H, D)
    DO,  # incoming gradient dO, O's shape
    Delta,  # output rowsum(dO * O), Lse's layout
    stride_ob,  # O strides: batch, head, row
    stride_oh,
    stride_om,
    stride_db,  # dO strides: batch, head, row
    stride_dh,
    stride_dm,
    lse_sb,  # Delta strides: batch, head
    lse_sh,
    H,  # heads
    Sq,  # rows per (batch, head): Sq (dense) or total (varlen, then B = 1)
    D,  # head dim
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # head dim padded to a power of two
):
    """delta = rowsum(dO * O) over dense (B, H, Sq, D) or varlen (total, H, D) (then B = 1, Sq = total)."""
    pid_m, bh = tile_ids(Sq, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < Sq)[:, None] & (offs_d < D)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows * stride_om + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + rows * stride_dm + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + b * lse_sb + h * lse_sh + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def store_dmask(
    DM,  # this (batch, head)'s dmask: element (m, n) at m * dm_m + n * dm_n
    ds,  # [BLOCK_M, BLOCK_N] dL/ds of the tile, natural units
    offs_m,  # [BLOCK_M] query positions
    offs_n,  # [BLOCK_N] key positions
    Sq,
    Sk,
    dm_m,  # dmask strides (0 on broadcast dims)
    dm_n,
    MASK_GRAD: tl.constexpr,  # DMASK_* bits
):
    """dS of a tile into the mask's gradient: plain stores (no broadcast dim: each element written once), else
    summed over the tile's broadcast axes and atomically added (other programs add into the same elements)."""
    ok_m = offs_m < Sq
    ok_n = offs_n < Sk
    ds = tl.where(ok_m[:, None] & ok_n[None, :], ds, 0.0)
    if _DMASK_SUM_M & MASK_GRAD:
        if _DMASK_SUM_N & MASK_GRAD:
            tl.atomic_add(DM, tl.sum(tl.sum(ds, 1), 0), sem="relaxed")
        else:
            tl.atomic_add(DM + offs_n.to(tl.int64) * dm_n, tl.sum(ds, 0), mask=ok_n, sem="relaxed")
    elif _DMASK_SUM_N & MASK_GRAD:
        tl.atomic_add(DM + offs_m.to(tl.int64) * dm_m, tl.sum(ds, 1), mask=ok_m, sem="relaxed")
    else:
        ptrs = DM + offs_m[:, None].to(tl.int64) * dm_m + offs_n[None, :].to(tl.int64) * dm_n
        if _DMASK_ATOMIC & MASK_GRAD:
            tl.atomic_add(ptrs, ds, mask=ok_m[:, None] & ok_n[None, :], sem="relaxed")
        else:
            tl.store(ptrs, ds, mask=ok_m[:, None] & ok_n[None, :])


@triton.jit
def attn_bwd_dkdv_kernel(
    Q,  # queries: dense (B, H, Sq, D) or varlen (total_q, H, D); unit last stride
    K,  # keys: (B, Hkv, Sk, D) or (total_k, Hkv, D)
    V,  # values, K's shape
    Mask,  # user mask (B, H, Sq, Sk) view, bool or additive (MASK_KIND != none); else unused
    DO,  # incoming gradient dO, Q's shape
    QDesc,  # TMA descriptor of Q (TMA), boxes [1, 1, BLOCK_M, BLOCK_D]; else unused
    DODesc,  # TMA descriptor of dO (TMA), boxes [1, 1, BLOCK_M, BLOCK_D]; else unused
    Lse,  # (B, H, Sq) or (H, total_q) fp32 log-sum-exp saved by the forward
    Delta,  # rowsum(dO * O), Lse's shape (the preprocess kernel)
    DK,  # output dK, K's shape and its own strides
    DV,  # output dV, V's shape and its own strides
    CuQ,  # (n + 1,) int32 query offsets (VARLEN); else unused
    CuK,  # (n + 1,) int32 key offsets (VARLEN); else unused
    Alibi,  # (B, H) or (n, H) fp32 contiguous ALiBi slopes (ALIBI); else unused
    DMask,  # fp32 dL/dmask summed over the mask's broadcast dims (MASK_GRAD); else unused
    stride_qb,  # Q strides: batch (0 for varlen), head, row
    stride_qh,
    stride_qm,
    stride_kb,  # K strides: batch, head, row
    stride_kh,
    stride_kn,
    stride_vb,  # V strides: batch, head, row
    stride_vh,
    stride_vn,
    stride_dob,  # dO strides: batch, head, row
    stride_doh,
    stride_dom,
    stride_dkb,  # dK strides: batch, head, row
    stride_dkh,
    stride_dkn,
    stride_dvb,  # dV strides: batch, head, row
    stride_dvh,
    stride_dvn,
    sm_b,  # Mask strides: batch, head, query, key (0 on broadcast dims)
    sm_h,
    sm_m,
    sm_n,
    dm_b,  # DMask strides: batch, head, query, key (0 on the mask's broadcast dims)
    dm_h,
    dm_m,
    dm_n,
    lse_sb,  # Lse / Delta strides: batch, head (rows contiguous)
    lse_sh,
    H,  # query heads
    Hkv,  # key/value heads
    GROUP,  # query heads per kv head (GQA)
    Sq_max,  # queries per sequence (dense) or max_seqlen_q (varlen)
    Sk_max,  # keys per sequence (dense) or max_seqlen_k (varlen)
    D,  # head dim
    sm_scale,  # softmax scale
    dropout_p,  # dropout probability (DROPOUT)
    Seed,  # (1,) int64 Philox seed on the device (DROPOUT); else unused
    rng_offset,  # Philox offset of row 0, key 0 (as in the forward)
    softcap,  # soft cap c > 0 (SOFTCAP)
    win_left,  # window extents, -1 mapped to Sq_max + Sk_max (WINDOW)
    win_right,
    MASK_KIND: tl.constexpr,  # none / bool / additive (fastlm.kernels.MASK_*)
    CAUSAL: tl.constexpr,  # top-left aligned causal mask
    DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,  # packed sequences through CuQ / CuK
    BLOCK_M: tl.constexpr,  # queries per step
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,  # head dim padded to a power of two
    PREC: tl.constexpr,  # tl.dot input precision ("ieee" for fp32)
    TMA: tl.constexpr,  # Q and dO through the descriptors
    SOFTCAP: tl.constexpr,  # soft-capped scores: dS times the cap's derivative 1 - tanh^2
    ALIBI: tl.constexpr,  # ALiBi bias on the scores
    WINDOW: tl.constexpr,  # sliding window: only the queries whose band reaches the key block are streamed
    MASK_GRAD: tl.constexpr,  # 0, or DMASK_ON | DMASK_ATOMIC | DMASK_SUM_M | DMASK_SUM_N (dS into DMask)
):
    pid_n, bh = tile_ids(Sk_max, BLOCK_N)
    b = bh // Hkv
    h_kv = bh % Hkv
    seed = dropout_seed(Seed, DROPOUT)
    q0, k0, Sq, Sk = seq_bounds(CuQ, CuK, b, Sq_max, Sk_max, VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n < Sk:
        b64, hk64 = b.to(tl.int64), h_kv.to(tl.int64)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        kv_ok = (offs_n < Sk)[:, None] & (offs_d < D)[None, :]
        kv_rows = offs_n[:, None].to(tl.int64)
        k = tl.load(
            K + b64 * stride_kb + hk64 * stride_kh + (k0.to(tl.int64) + kv_rows) * stride_kn + offs_d[None, :],
            mask=kv_ok,
            other=0.0,
        )
        v = tl.load(
            V + b64 * stride_vb + hk64 * stride_vh + (k0.to(tl.int64) + kv_rows) * stride_vn + offs_d[None, :],
            mask=kv_ok,
            other=0.0,
        )
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        qk_scale = sm_scale * LOG2E
        lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0  # causal: queries before the block see none of it
        hi = Sq
        if WINDOW:  # only the queries whose band reaches the block
            w_lo, hi = window_queries(start_n, tl.minimum(start_n + BLOCK_N, Sk), Sq, Sk, win_left, win_right, BLOCK_M)
            lo = tl.maximum(lo, w_lo)
        for g in range(0, GROUP):
            h32 = h_kv * GROUP + g
            h64 = hk64 * GROUP + g
            q_rows = Q + b64 * stride_qb + h64 * stride_qh + q0.to(tl.int64) * stride_qm
            do_rows = DO + b64 * stride_dob + h64 * stride_doh + q0.to(tl.int64) * stride_dom
            mask_rows = Mask + b64 * sm_b + h64 * sm_h
            lse_base = b64 * lse_sb + h64 * lse_sh + q0.to(tl.int64)
            slope2 = 0.0
            if ALIBI:
                slope2 = tl.load(Alibi + b64 * H + h64) * LOG2E
            if MASK_GRAD != 0:
                dm_rows = DMask + b64 * dm_b + h64 * dm_h
            for start_m in range(lo, hi, BLOCK_M):
                offs_m = start_m + offs_m0
                if tile_allowed(mask_rows, offs_m, offs_n, Sq, Sk, sm_m, sm_n, MASK_KIND):
                    q = load_tile(
                        q_rows, QDesc, b, h32, start_m, offs_m, offs_d, Sq, D, stride_qm, TMA, BLOCK_M, BLOCK_D
                    )
                    do = load_tile(
                        do_rows, DODesc, b, h32, start_m, offs_m, offs_d, Sq, D, stride_dom, TMA, BLOCK_M, BLOCK_D
                    )
                    lse = tl.load(Lse + lse_base + offs_m, mask=offs_m < Sq, other=float("inf"))
                    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: p = 0
                    delta = tl.load(Delta + lse_base + offs_m, mask=offs_m < Sq, other=0.0)
                    s, cap_t = scores(
                        q,
                        k,
                        mask_rows,
                        offs_m,
                        offs_n,
                        Sq,
                        Sk,
                        sm_m,
                        sm_n,
                        qk_scale,
                        softcap,
                        slope2,
                        win_left,
                        win_right,
                        MASK_KIND,
                        CAUSAL,
                        True,
                        PREC,
                        SOFTCAP,
                        ALIBI,
                        WINDOW,
                    )
                    p = tl.math.exp2(s - lse[:, None] * LOG2E)  # [BLOCK_M, BLOCK_N]
                    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                    if DROPOUT:
                        rng_rows = rng_offset + (lse_base + offs_m) * Sk_max
                        z = tl.where(keep(seed, rng_rows, offs_n, dropout_p), 1.0 / (1.0 - dropout_p), 0.0)
                        dv += tl.dot(tl.trans((p * z).to(do.dtype)), do, input_precision=PREC)
                        ds = p * (z * dp - delta[:, None])
                    else:
                        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
                        ds = p * (dp - delta[:, None])
                    if MASK_GRAD != 0:
                        store_dmask(dm_rows, ds, offs_m, offs_n, Sq, Sk, dm_m, dm_n, MASK_GRAD)
                    if SOFTCAP:
                        ds = ds * (1.0 - cap_t * cap_t)
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        dk *= sm_scale
        dk_rows = DK + b64 * stride_dkb + hk64 * stride_dkh + (k0.to(tl.int64) + kv_rows) * stride_dkn
        dv_rows = DV + b64 * stride_dvb + hk64 * stride_dvh + (k0.to(tl.int64) + kv_rows) * stride_dvn
        tl.store(dk_rows + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_ok)
        tl.store(dv_rows + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def attn_bwd_dq_kernel(
    Q,  # queries: dense (B, H, Sq, D) or varlen (total_q, H, D); unit last stride
    K,  # keys: (B, Hkv, Sk, D) or (total_k, Hkv, D)
    V,  # values, K's shape
    Mask,  # user mask (B, H, Sq, Sk) view, bool or additive (MASK_KIND != none); else unused
    DO,  # incoming gradient dO, Q's shape
    KDesc,  # TMA descriptor of K (TMA), boxes [1, 1, BLOCK_N, BLOCK_D]; else unused
    VDesc,  # TMA descriptor of V (TMA), boxes [1, 1, BLOCK_N, BLOCK_D]; else unused
    Lse,  # (B, H, Sq) or (H, total_q) fp32 log-sum-exp saved by the forward
    Delta,  # rowsum(dO * O), Lse's shape (the preprocess kernel)
    DQ,  # output dQ, Q's shape and its own strides
    CuQ,  # (n + 1,) int32 query offsets (VARLEN); else unused
    CuK,  # (n + 1,) int32 key offsets (VARLEN); else unused
    Alibi,  # (B, H) or (n, H) fp32 contiguous ALiBi slopes (ALIBI); else unused
    stride_qb,  # Q strides: batch (0 for varlen), head, row
    stride_qh,
    stride_qm,
    stride_kb,  # K strides: batch, head, row
    stride_kh,
    stride_kn,
    stride_vb,  # V strides: batch, head, row
    stride_vh,
    stride_vn,
    stride_dob,  # dO strides: batch, head, row
    stride_doh,
    stride_dom,
    stride_dqb,  # dQ strides: batch, head, row
    stride_dqh,
    stride_dqm,
    sm_b,  # Mask strides: batch, head, query, key (0 on broadcast dims)
    sm_h,
    sm_m,
    sm_n,
    lse_sb,  # Lse / Delta strides: batch, head (rows contiguous)
    lse_sh,
    H,  # query heads
    GROUP,  # query heads per kv head (GQA)
    Sq_max,  # queries per sequence (dense) or max_seqlen_q (varlen)
    Sk_max,  # keys per sequence (dense) or max_seqlen_k (varlen)
    D,  # head dim
    sm_scale,  # softmax scale
    dropout_p,  # dropout probability (DROPOUT)
    Seed,  # (1,) int64 Philox seed on the device (DROPOUT); else unused
    rng_offset,  # Philox offset of row 0, key 0 (as in the forward)
    softcap,  # soft cap c > 0 (SOFTCAP)
    win_left,  # window extents, -1 mapped to Sq_max + Sk_max (WINDOW)
    win_right,
    MASK_KIND: tl.constexpr,  # none / bool / additive (fastlm.kernels.MASK_*)
    CAUSAL: tl.constexpr,  # top-left aligned causal mask
    DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,  # packed sequences through CuQ / CuK
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,  # head dim padded to a power of two
    PREC: tl.constexpr,  # tl.dot input precision ("ieee" for fp32)
    TMA: tl.constexpr,  # K and V through the descriptors
    SOFTCAP: tl.constexpr,  # soft-capped scores: dS times the cap's derivative 1 - tanh^2
    ALIBI: tl.constexpr,  # ALiBi bias on the scores
    WINDOW: tl.constexpr,  # sliding window: only the band's key tiles are visited
):
    pid_m, bh = tile_ids(Sq_max, BLOCK_M)
    b = bh // H
    h = bh % H
    seed = dropout_seed(Seed, DROPOUT)
    q0, k0, Sq, Sk = seq_bounds(CuQ, CuK, b, Sq_max, Sk_max, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m < Sq:
        b64, h64 = b.to(tl.int64), h.to(tl.int64)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q_ok = (offs_m < Sq)[:, None] & (offs_d < D)[None, :]
        rows = q0.to(tl.int64) + offs_m[:, None].to(tl.int64)
        q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + rows * stride_qm + offs_d[None, :], mask=q_ok, other=0.0)
        do = tl.load(
            DO + b64 * stride_dob + h64 * stride_doh + rows * stride_dom + offs_d[None, :], mask=q_ok, other=0.0
        )
        lse_idx = b64 * lse_sb + h64 * lse_sh + q0.to(tl.int64) + offs_m
        lse = tl.load(Lse + lse_idx, mask=offs_m < Sq, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        delta = tl.load(Delta + lse_idx, mask=offs_m < Sq, other=0.0)
        k_rows = K + b64 * stride_kb + (h64 // GROUP) * stride_kh + k0.to(tl.int64) * stride_kn
        v_rows = V + b64 * stride_vb + (h64 // GROUP) * stride_vh + k0.to(tl.int64) * stride_vn
        mask_rows = Mask + b64 * sm_b + h64 * sm_h
        rng_rows = rng_offset + lse_idx * Sk_max
        qk_scale = sm_scale * LOG2E
        hi = tl.minimum(Sk, start_m + BLOCK_M) if CAUSAL else Sk
        lo = 0
        if WINDOW:  # only the band's key tiles
            lo, w_hi, _, _ = window_keys(
                start_m, tl.minimum(start_m + BLOCK_M, Sq), Sq, Sk, win_left, win_right, BLOCK_N
            )
            hi = tl.minimum(hi, w_hi)
        slope2 = 0.0
        if ALIBI:
            slope2 = tl.load(Alibi + b64 * H + h64) * LOG2E
        hkv = h // GROUP
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            if tile_allowed(mask_rows, offs_m, offs_n, Sq, Sk, sm_m, sm_n, MASK_KIND):
                k = load_tile(k_rows, KDesc, b, hkv, start_n, offs_n, offs_d, Sk, D, stride_kn, TMA, BLOCK_N, BLOCK_D)
                v = load_tile(v_rows, VDesc, b, hkv, start_n, offs_n, offs_d, Sk, D, stride_vn, TMA, BLOCK_N, BLOCK_D)
                s, cap_t = scores(
                    q,
                    k,
                    mask_rows,
                    offs_m,
                    offs_n,
                    Sq,
                    Sk,
                    sm_m,
                    sm_n,
                    qk_scale,
                    softcap,
                    slope2,
                    win_left,
                    win_right,
                    MASK_KIND,
                    CAUSAL,
                    True,
                    PREC,
                    SOFTCAP,
                    ALIBI,
                    WINDOW,
                )
                p = tl.math.exp2(s - lse[:, None] * LOG2E)
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                if DROPOUT:
                    z = tl.where(keep(seed, rng_rows, offs_n, dropout_p), 1.0 / (1.0 - dropout_p), 0.0)
                    ds = p * (z * dp - delta[:, None])
                else:
                    ds = p * (dp - delta[:, None])
                if SOFTCAP:
                    ds = ds * (1.0 - cap_t * cap_t)
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        dq *= sm_scale
        tl.store(
            DQ + b64 * stride_dqb + h64 * stride_dqh + rows * stride_dqm + offs_d[None, :],
            dq.to(DQ.dtype.element_ty),
            mask=q_ok,
        )


dkdv_tuned = autotuned(
    attn_bwd_dkdv_kernel,
    (DKDV_TMA, DKDV_PTR, *({b: [c] for b, c in t.items()} for t in (DKDV_LEAN, *DKDV_FP32.values()))),
    DKDV_BOXES,
    lambda kw: bwd_dkdv_configs(kw["BLOCK_D"], kw["TMA"], False, lean_case(kw, dkdv=True), fp32_case(kw)),
    reset_to_zero=["DMask"],  # the mask gradient is accumulated (atomics): each timed run would add into it
)
dq_tuned = autotuned(
    attn_bwd_dq_kernel,
    (DQ_TMA, DQ_PTR, *({b: [c] for b, c in t.items()} for t in (*DQ_LEAN.values(), *DQ_FP32.values()))),
    DQ_BOXES,
    lambda kw: bwd_dq_configs(kw["BLOCK_D"], kw["TMA"], False, lean_case(kw), fp32_case(kw)),
)


@on_tensor_device
def attn_bwd(
    do,
    q,
    k,
    v,
    o,
    lse,
    mask,
    scale: float,
    causal: bool,
    dropout_p: float,
    seed: torch.Tensor,
    offset: int,
    cu_q=None,
    cu_k=None,
    max_q: int = 0,
    max_k: int = 0,
    configs: tuple | None = None,
    tma: bool | None = None,
    *,
    window: tuple = (-1, -1),
    softcap: float = 0.0,
    sinks=None,
    alibi=None,
    mask_grad: bool = False,
):
    """dq, dk, dv (in q/k/v's layouts, contiguous), dmask, dsinks; deterministic for a given config (dmask with a
    broadcast mask dim is summed with atomics, so not bitwise).
    configs / tma: force (dK/dV config, dQ config) and the TMA path (tests); None = the defaults.
    window, softcap, sinks, alibi: as the forward's (attn_fwd). mask_grad (an additive float mask only): dmask is
    dL/dmask, float32 of shape [1 if mask.stride(d) == 0 else mask.size(d)], summed over the broadcast dims; else
    empty (0,). dsinks: (H,) float32 dL/dsinks = -sum_{b,i} exp(sink - lse) * delta with sinks, else empty (0,)."""
    varlen = cu_q is not None
    D = q.shape[-1]
    dq, dk, dv = (empty(t.shape, t.dtype, t.device) for t in (q, k, v))
    if mask_grad and (mask is None or mask.dtype == torch.bool):
        raise ValueError("mask_grad: needs an additive float mask (a bool mask has no gradient)")
    dm_shape = [1 if mask.stride(d) == 0 else mask.size(d) for d in range(4)] if mask_grad else [0]
    dmask = torch.zeros(dm_shape, dtype=torch.float32, device=q.device)  # unvisited tiles have zero gradient
    dsinks = torch.zeros(sinks.shape if sinks is not None else (0,), dtype=torch.float32, device=q.device)
    if varlen:
        n_seq, H, Hkv, Sq, Sk = cu_q.shape[0] - 1, q.shape[1], k.shape[1], max_q, max_k
        st = varlen_strides
        lse_sb, lse_sh = 0, q.shape[0]
        pre_grid_rows, pre_b = q.shape[0], 1
    else:
        n_seq, H, Sq, Hkv, Sk = q.shape[0], q.shape[1], q.shape[2], k.shape[1], k.shape[2]
        st = dense_strides
        lse_sb, lse_sh = H * Sq, Sq
        pre_grid_rows, pre_b = Sq, n_seq
    feats, (softcap_arg, wl, wr) = feature_args(q, n_seq, H, Sq, Sk, window, softcap, sinks, alibi)
    if dq.numel() == 0 and dk.numel() == 0:
        return dq, dk, dv, dmask, dsinks
    if q.numel() == 0 or Sq == 0:  # no queries: no gradient reaches k and v
        return dq, dk.zero_(), dv.zero_(), dmask, dsinks
    delta = torch.empty_like(lse)
    BD = block_d(D)
    attn_bwd_preprocess_kernel[launch_grid(triton.cdiv(pre_grid_rows, 64) * pre_b * H)](
        o,
        do,
        delta,
        *st(o),
        *st(do),
        lse_sb,
        lse_sh,
        H,
        pre_grid_rows,
        D,
        BLOCK_M=64,
        BLOCK_D=BD,
    )
    if sinks is not None:  # dsinks = -sum_{b,i} exp(sink - lse) delta: O(B H Sq), in torch
        sink_b = sinks[:, None] if varlen else sinks[None, :, None]
        p_sink = torch.where(lse == float("-inf"), 0.0, torch.exp(sink_b - lse))  # -inf sink, empty row: 0, not NaN
        dsinks = (p_sink * delta).sum((1,) if varlen else (0, 2)).neg()
    mask_kind = mask_kind_of(mask)
    sm = mask.stride() if mask is not None else (0, 0, 0, 0)
    common = dict(
        MASK_KIND=mask_kind,
        CAUSAL=causal,
        DROPOUT=dropout_p > 0.0,
        VARLEN=varlen,
        BLOCK_D=BD,
        PREC=precision(q.dtype),
        SOFTCAP=feats["SOFTCAP"],
        ALIBI=feats["ALIBI"],
        WINDOW=feats["WINDOW"],
    )
    dm_mode, dm_strides = 0, (0, 0, 0, 0)
    if mask_grad:
        bcast = [mask.stride(d) == 0 and mask.size(d) > 1 for d in range(4)]
        dm_mode = DMASK_ON | (DMASK_ATOMIC if any(bcast) else 0)
        if any(bcast) and torch.are_deterministic_algorithms_enabled():  # as torch's nondeterministic ops do
            msg = "fastlm attention backward: the gradient of a broadcast additive mask uses atomic adds"
            if not torch.is_deterministic_algorithms_warn_only_enabled():
                raise RuntimeError(f"{msg}, which torch.use_deterministic_algorithms(True) forbids")
            warnings.warn(f"{msg}: it is not deterministic", stacklevel=2)
        dm_mode |= (DMASK_SUM_M if bcast[2] else 0) | (DMASK_SUM_N if bcast[3] else 0)
        dm_strides = dmask.expand(mask.shape).stride()
    m_arg = mask if mask is not None else q
    cq, ck = (cu_q, cu_k) if varlen else (lse, lse)
    tma = (not varlen and use_tma(q, k, v, do)) if tma is None else tma
    lean_kv = is_lean(mask_kind, dropout_p > 0.0, feats, dkdv=True)
    lean_q = is_lean(mask_kind, dropout_p > 0.0, feats, tma)
    tma_kv = dkdv_tma(D, tma, lean_kv)
    tuned = configs is None and autotune_enabled(q)
    fp32 = q.dtype == torch.float32
    cfg_kv, cfg_q = configs or (
        bwd_dkdv_configs(D, tma_kv, lean=lean_kv, fp32=fp32)[0],
        bwd_dq_configs(D, tma, lean=lean_q, fp32=fp32)[0],
    )
    dk_args = [
        q,
        k,
        v,
        m_arg,
        do,
        do,
        do,
        lse,
        delta,
        dk,
        dv,
        cq,
        ck,
        alibi if alibi is not None else lse,
        dmask,  # (0,) without mask_grad: never read, and what the autotuner zeroes (reset_to_zero)
        *st(q),
        *st(k),
        *st(v),
        *st(do),
        *st(dk),
        *st(dv),
        *sm,
        *dm_strides,
        lse_sb,
        lse_sh,
        H,
        Hkv,
        H // Hkv,
        Sq,
        Sk,
        D,
        scale,
        dropout_p,
        seed,
        offset,
        softcap_arg,
        wl,
        wr,
    ]
    dq_args = [
        q,
        k,
        v,
        m_arg,
        do,
        k,
        v,
        lse,
        delta,
        dq,
        cq,
        ck,
        alibi if alibi is not None else lse,
        *st(q),
        *st(k),
        *st(v),
        *st(do),
        *st(dq),
        *sm,
        lse_sb,
        lse_sh,
        H,
        H // Hkv,
        Sq,
        Sk,
        D,
        scale,
        dropout_p,
        seed,
        offset,
        softcap_arg,
        wl,
        wr,
    ]
    # boxes: [1, 1, rows, BLOCK_D]; the autotune pre-hook resets them per config
    if tma_kv:
        dk_args[5:7] = [descriptor(q, cfg_kv["BLOCK_M"]), descriptor(do, cfg_kv["BLOCK_M"])]
    if tma:
        dq_args[5:7] = [descriptor(k, cfg_q["BLOCK_N"]), descriptor(v, cfg_q["BLOCK_N"])]
    grid_kv = lambda meta: launch_grid(triton.cdiv(Sk, meta["BLOCK_N"]) * n_seq * Hkv)  # noqa: E731
    grid_q = lambda meta: launch_grid(triton.cdiv(Sq, meta["BLOCK_M"]) * n_seq * H)  # noqa: E731
    if tuned:
        dkdv_tuned[grid_kv](*dk_args, **common, TMA=tma_kv, MASK_GRAD=dm_mode)
        dq_tuned[grid_q](*dq_args, **common, TMA=tma)
    else:
        attn_bwd_dkdv_kernel[grid_kv](*dk_args, **common, TMA=tma_kv, MASK_GRAD=dm_mode, **cfg_kv)
        attn_bwd_dq_kernel[grid_q](*dq_args, **common, TMA=tma, **cfg_q)
    return dq, dk, dv, dmask, dsinks
