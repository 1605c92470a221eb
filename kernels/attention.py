"""Flash attention forward and backward in Triton: SDPA semantics, masks read tile by tile, GQA, dropout, varlen.

Forward (FA2): each program owns BLOCK_M queries of one (sequence, head) and streams BLOCK_N keys at a time; with
s2 = q k^T * scale * log2(e) (+ mask bias), in base 2 so that exp2 is used:
    m_new = max(m, rowmax(s2)); p = exp2(s2 - m_new); l = l * exp2(m - m_new) + rowsum(p)
    acc = acc * exp2(m - m_new) + dropout(p) v;      o = acc / l;  lse = (m + log2(l)) * ln(2)
Causal masking (top-left, key <= query, as torch) costs only on the diagonal band: the key blocks entirely at or
below the diagonal run without masks (off-band); the band and a ragged last block run with masks (on-band).
A user mask (bool, True = attend, or additive float; broadcast dims have stride 0) is read tile by tile, and a tile
whose mask allows nothing is skipped before its matmuls. A query whose keys are all masked gets a zero output, zero
gradients and lse = -inf. Dropout: Philox numbers from (seed, offset + row * Sk_max + key), regenerated in the
backward, so no mask is stored; the normaliser l uses the undropped probabilities, as torch.

Backward (FA2): delta = rowsum(dO * O) (preprocess kernel); one program per key block computes dK, dV by streaming
the queries of every query head that shares its key/value head (GQA without atomics); one program per query block
computes dQ by streaming keys. No atomics anywhere: the backward is bitwise deterministic.
    p = exp(s - lse); z = dropout keep / (1 - p_drop); dV += (p z)^T dO; dP = dO V^T; dS = p (z dP - delta)
    dK += dS^T q * scale;  dQ += dS k * scale

Layouts: q (B, H, Sq, D), k/v (B, Hkv, Sk, D), any strides with a unit last stride; varlen: (total, H, D) with
cu_seqlens (int32, n + 1). lse: (B, H, Sq) fp32, or (H, total_q) for varlen. Head dims up to 256, padded to a power
of two inside the kernel (masked loads), never with a copy.

FLOPs: forward 4 * B * H * Sq * Sk * D (half with causal), backward 2.5x that.
"""

import os

import torch
import triton
import triton.language as tl

from fastlm.kernels import empty

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2
LOG2E = 1.4426950408889634


@triton.jit
def _seq(CuQ, CuK, b, Sq_max, Sk_max, VARLEN: tl.constexpr):
    """(first query token, first key token, Sq, Sk) of sequence b."""
    if VARLEN:
        q0 = tl.load(CuQ + b)
        k0 = tl.load(CuK + b)
        return q0, k0, tl.load(CuQ + b + 1) - q0, tl.load(CuK + b + 1) - k0
    return b * 0, b * 0, Sq_max + b * 0, Sk_max + b * 0


@triton.jit
def _scores(
    q,
    k,
    Mask,
    offs_m,
    offs_n,
    Sq,
    Sk,
    sm_m,
    sm_n,
    qk_scale,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    CHECK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Base-2 scores q k^T * scale * log2(e) of a [BLOCK_M, BLOCK_N] tile, masked."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASK_KIND != 0:
        ok = (offs_m < Sq)[:, None] & (offs_n < Sk)[None, :]
        mv = tl.load(Mask + offs_m[:, None].to(tl.int64) * sm_m + offs_n[None, :].to(tl.int64) * sm_n, mask=ok, other=0)
        if MASK_KIND == 1:
            s = tl.where(mv != 0, s, float("-inf"))
        else:
            s = s + mv.to(tl.float32) * 1.4426950408889634
    if CHECK:
        s = tl.where((offs_n < Sk)[None, :], s, float("-inf"))
    if CAUSAL:
        s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
    return s


@triton.jit
def _tile_allowed(Mask, offs_m, offs_n, Sq, Sk, sm_m, sm_n, MASK_KIND: tl.constexpr):
    """False when the user mask allows no (query, key) pair of the tile: the tile can be skipped."""
    if MASK_KIND == 0:
        return True
    ok = (offs_m < Sq)[:, None] & (offs_n < Sk)[None, :]
    mv = tl.load(Mask + offs_m[:, None].to(tl.int64) * sm_m + offs_n[None, :].to(tl.int64) * sm_n, mask=ok, other=0)
    if MASK_KIND == 1:
        allowed = ok & (mv != 0)
    else:
        allowed = ok & (mv.to(tl.float32) > float("-inf"))
    return tl.max(allowed.to(tl.int32)) > 0


@triton.jit
def _keep(seed, rng_rows, offs_n, dropout_p):
    """Dropout's keep mask of a tile, from Philox at (row * Sk_max + key)."""
    return tl.rand(seed, rng_rows[:, None] + offs_n[None, :]) >= dropout_p


@triton.jit
def _fwd_block(
    acc,
    m_i,
    l_i,
    q,
    K_,
    V_,
    M_,
    start_n,
    offs_m,
    offs_n0,
    offs_d,
    Sq,
    Sk,
    D,
    stride_kn,
    stride_vn,
    sm_m,
    sm_n,
    qk_scale,
    dropout_p,
    seed,
    rng_rows,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    CHECK: tl.constexpr,
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
):
    offs_n = start_n + offs_n0
    if _tile_allowed(M_, offs_m, offs_n, Sq, Sk, sm_m, sm_n, MASK_KIND):
        kv_ok = (offs_n < Sk)[:, None] & (offs_d < D)[None, :]
        k = tl.load(K_ + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _scores(q, k, M_, offs_m, offs_n, Sq, Sk, sm_m, sm_n, qk_scale, MASK_KIND, CAUSAL, CHECK, PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            p = tl.where(_keep(seed, rng_rows, offs_n, dropout_p), p / (1.0 - dropout_p), 0.0)
        v = tl.load(V_ + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    Mask,
    O,
    Lse,
    CuQ,
    CuK,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    sm_b,
    sm_h,
    sm_m,
    sm_n,
    lse_sb,
    lse_sh,
    H,
    GROUP,
    Sq_max,
    Sk_max,
    D,
    qk_scale,
    dropout_p,
    seed,
    rng_offset,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    q0, k0, Sq, Sk = _seq(CuQ, CuK, b, Sq_max, Sk_max, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m < Sq:
        b64, h64 = b.to(tl.int64), h.to(tl.int64)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q_ok = (offs_m < Sq)[:, None] & (offs_d < D)[None, :]
        Q_ = Q + b64 * stride_qb + q0.to(tl.int64) * stride_qm + h64 * stride_qh
        q = tl.load(Q_ + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :], mask=q_ok, other=0.0)
        K_ = K + b64 * stride_kb + k0.to(tl.int64) * stride_kn + (h64 // GROUP) * stride_kh
        V_ = V + b64 * stride_vb + k0.to(tl.int64) * stride_vn + (h64 // GROUP) * stride_vh
        M_ = Mask + b64 * sm_b + h64 * sm_h
        lse_row = b64 * lse_sb + h64 * lse_sh + q0.to(tl.int64) + offs_m  # also the dropout row index
        rng_rows = rng_offset + lse_row * Sk_max
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        if CAUSAL:
            hi = tl.minimum(Sk, start_m + BLOCK_M)
            full_hi = tl.minimum(start_m + 1, Sk) // BLOCK_N * BLOCK_N  # every key <= every query of the block
        else:
            hi = Sk
            full_hi = Sk // BLOCK_N * BLOCK_N
        for start_n in range(0, full_hi, BLOCK_N):  # off-band: no causal or bounds masks
            acc, m_i, l_i = _fwd_block(
                acc,
                m_i,
                l_i,
                q,
                K_,
                V_,
                M_,
                start_n,
                offs_m,
                offs_n0,
                offs_d,
                Sq,
                Sk,
                D,
                stride_kn,
                stride_vn,
                sm_m,
                sm_n,
                qk_scale,
                dropout_p,
                seed,
                rng_rows,
                MASK_KIND,
                False,
                False,
                DROPOUT,
                PREC,
            )
        for start_n in range(full_hi, hi, BLOCK_N):  # on-band: the diagonal and the ragged last block
            acc, m_i, l_i = _fwd_block(
                acc,
                m_i,
                l_i,
                q,
                K_,
                V_,
                M_,
                start_n,
                offs_m,
                offs_n0,
                offs_d,
                Sq,
                Sk,
                D,
                stride_kn,
                stride_vn,
                sm_m,
                sm_n,
                qk_scale,
                dropout_p,
                seed,
                rng_rows,
                MASK_KIND,
                CAUSAL,
                True,
                DROPOUT,
                PREC,
            )
        empty_row = l_i == 0.0
        l_safe = tl.where(empty_row, 1.0, l_i)
        o = acc / l_safe[:, None]
        lse = tl.where(empty_row, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        O_ = O + b64 * stride_ob + q0.to(tl.int64) * stride_om + h64 * stride_oh
        tl.store(O_ + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :], o.to(O.dtype.element_ty), mask=q_ok)
        tl.store(Lse + lse_row, lse, mask=offs_m < Sq)


@triton.jit
def _attn_bwd_preprocess(
    O,
    DO,
    Delta,
    stride_ob,
    stride_oh,
    stride_om,
    stride_db,
    stride_dh,
    stride_dm,
    lse_sb,
    lse_sh,
    H,
    Sq,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) over dense (B, H, Sq, D) or varlen (total, H, D) (then B = 1, Sq = total)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = (tl.program_id(1) // H).to(tl.int64)
    h = (tl.program_id(1) % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < Sq)[:, None] & (offs_d < D)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows * stride_om + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + rows * stride_dm + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + b * lse_sb + h * lse_sh + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    Mask,
    DO,
    Lse,
    Delta,
    DK,
    DV,
    CuQ,
    CuK,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    sm_b,
    sm_h,
    sm_m,
    sm_n,
    lse_sb,
    lse_sh,
    H,
    Hkv,
    GROUP,
    Sq_max,
    Sk_max,
    D,
    sm_scale,
    dropout_p,
    seed,
    rng_offset,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1) // Hkv
    h_kv = tl.program_id(1) % Hkv
    q0, k0, Sq, Sk = _seq(CuQ, CuK, b, Sq_max, Sk_max, VARLEN)
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
        qk_scale = sm_scale * 1.4426950408889634
        lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0  # causal: queries before the block see none of it
        for g in range(0, GROUP):
            h64 = hk64 * GROUP + g
            Q_ = Q + b64 * stride_qb + h64 * stride_qh + q0.to(tl.int64) * stride_qm
            DO_ = DO + b64 * stride_dob + h64 * stride_doh + q0.to(tl.int64) * stride_dom
            M_ = Mask + b64 * sm_b + h64 * sm_h
            lse_base = b64 * lse_sb + h64 * lse_sh + q0.to(tl.int64)
            for start_m in range(lo, Sq, BLOCK_M):
                offs_m = start_m + offs_m0
                if _tile_allowed(M_, offs_m, offs_n, Sq, Sk, sm_m, sm_n, MASK_KIND):
                    q_ok = (offs_m < Sq)[:, None] & (offs_d < D)[None, :]
                    rows = offs_m[:, None].to(tl.int64)
                    q = tl.load(Q_ + rows * stride_qm + offs_d[None, :], mask=q_ok, other=0.0)
                    do = tl.load(DO_ + rows * stride_dom + offs_d[None, :], mask=q_ok, other=0.0)
                    lse = tl.load(Lse + lse_base + offs_m, mask=offs_m < Sq, other=float("inf"))
                    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: p = 0
                    delta = tl.load(Delta + lse_base + offs_m, mask=offs_m < Sq, other=0.0)
                    s = _scores(q, k, M_, offs_m, offs_n, Sq, Sk, sm_m, sm_n, qk_scale, MASK_KIND, CAUSAL, True, PREC)
                    p = tl.math.exp2(s - lse[:, None] * 1.4426950408889634)  # [BLOCK_M, BLOCK_N]
                    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                    if DROPOUT:
                        rng_rows = rng_offset + (lse_base + offs_m) * Sk_max
                        z = tl.where(_keep(seed, rng_rows, offs_n, dropout_p), 1.0 / (1.0 - dropout_p), 0.0)
                        dv += tl.dot(tl.trans((p * z).to(do.dtype)), do, input_precision=PREC)
                        ds = p * (z * dp - delta[:, None])
                    else:
                        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
                        ds = p * (dp - delta[:, None])
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        dk *= sm_scale
        DK_ = DK + b64 * stride_dkb + hk64 * stride_dkh + (k0.to(tl.int64) + kv_rows) * stride_dkn
        DV_ = DV + b64 * stride_dvb + hk64 * stride_dvh + (k0.to(tl.int64) + kv_rows) * stride_dvn
        tl.store(DK_ + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_ok)
        tl.store(DV_ + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    Mask,
    DO,
    Lse,
    Delta,
    DQ,
    CuQ,
    CuK,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    sm_b,
    sm_h,
    sm_m,
    sm_n,
    lse_sb,
    lse_sh,
    H,
    GROUP,
    Sq_max,
    Sk_max,
    D,
    sm_scale,
    dropout_p,
    seed,
    rng_offset,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    q0, k0, Sq, Sk = _seq(CuQ, CuK, b, Sq_max, Sk_max, VARLEN)
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
        K_ = K + b64 * stride_kb + (h64 // GROUP) * stride_kh + k0.to(tl.int64) * stride_kn
        V_ = V + b64 * stride_vb + (h64 // GROUP) * stride_vh + k0.to(tl.int64) * stride_vn
        M_ = Mask + b64 * sm_b + h64 * sm_h
        rng_rows = rng_offset + lse_idx * Sk_max
        qk_scale = sm_scale * 1.4426950408889634
        hi = tl.minimum(Sk, start_m + BLOCK_M) if CAUSAL else Sk
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            if _tile_allowed(M_, offs_m, offs_n, Sq, Sk, sm_m, sm_n, MASK_KIND):
                kv_ok = (offs_n < Sk)[:, None] & (offs_d < D)[None, :]
                k = tl.load(K_ + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
                v = tl.load(V_ + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
                s = _scores(q, k, M_, offs_m, offs_n, Sq, Sk, sm_m, sm_n, qk_scale, MASK_KIND, CAUSAL, True, PREC)
                p = tl.math.exp2(s - lse[:, None] * 1.4426950408889634)
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                if DROPOUT:
                    z = tl.where(_keep(seed, rng_rows, offs_n, dropout_p), 1.0 / (1.0 - dropout_p), 0.0)
                    ds = p * (z * dp - delta[:, None])
                else:
                    ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        dq *= sm_scale
        tl.store(
            DQ + b64 * stride_dqb + h64 * stride_dqh + rows * stride_dqm + offs_d[None, :],
            dq.to(DQ.dtype.element_ty),
            mask=q_ok,
        )


# ---------------------------------------------------------------------------------------------------------------
# Launch heuristics (per architecture choices live here only)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def fwd_config(D: int) -> dict:
    if INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if D <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if D <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)


def bwd_dkdv_config(D: int) -> dict:
    """BLOCK_N keys per program, BLOCK_M queries per step. Chosen from the static sm_90 report: every dot on wgmma
    (HGMMA) and no spills up to D = 128; at D = 256 no wgmma tiling is spill-free, so mma.sync tiles are used."""
    if INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if D <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    if D <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=1)


def bwd_dq_config(D: int) -> dict:
    """BLOCK_M queries per program, BLOCK_N keys per step (same criteria as bwd_dkdv_config)."""
    if INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if D <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=1)


def precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 dots (as torch's fp32 SDPA), not TF32; fp16/bf16 dots ignore this
    return "ieee" if dtype == torch.float32 else "tf32"


def block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


# ---------------------------------------------------------------------------------------------------------------
# Host functions. Validation, GQA head counts and layouts are prepared by fastlm.ops.attention.


def _dense_strides(t):  # (B, H, S, D) -> (stride_b, stride_h, stride_s)
    return t.stride(0), t.stride(1), t.stride(2)


def _varlen_strides(t):  # (total, H, D) -> (0, stride_h, stride_token)
    return 0, t.stride(1), t.stride(0)


def attn_fwd(
    q,
    k,
    v,
    mask,
    scale: float,
    causal: bool,
    dropout_p: float,
    seed: int,
    offset: int,
    cu_q=None,
    cu_k=None,
    max_q: int = 0,
    max_k: int = 0,
):
    """o, lse. Dense: q (B, H, Sq, D), k/v (B, Hkv, Sk, D), mask a (B, H, Sq, Sk) view or None.
    Varlen: q (total_q, H, D), k/v (total_k, Hkv, D), cu_q/cu_k (n + 1,) int32; no mask."""
    varlen = cu_q is not None
    D = q.shape[-1]
    if varlen:
        n_seq, H, Hkv = cu_q.shape[0] - 1, q.shape[1], k.shape[1]
        Sq, Sk = max_q, max_k
        qs, ks, vs = _varlen_strides(q), _varlen_strides(k), _varlen_strides(v)
        o = empty(q.shape, q.dtype, q.device)
        os_ = _varlen_strides(o)
        lse = empty((H, q.shape[0]), torch.float32, q.device)
        lse_sb, lse_sh = 0, q.shape[0]
    else:
        n_seq, H, Sq = q.shape[0], q.shape[1], q.shape[2]
        Hkv, Sk = k.shape[1], k.shape[2]
        qs, ks, vs = _dense_strides(q), _dense_strides(k), _dense_strides(v)
        o = empty(q.shape, q.dtype, q.device)
        os_ = _dense_strides(o)
        lse = empty((n_seq, H, Sq), torch.float32, q.device)
        lse_sb, lse_sh = H * Sq, Sq
    if o.numel() == 0 or Sq == 0:
        return o, lse
    mask_kind = MASK_NONE if mask is None else (MASK_BOOL if mask.dtype == torch.bool else MASK_ADD)
    sm = mask.stride() if mask is not None else (0, 0, 0, 0)
    cfg = fwd_config(D)
    grid = (triton.cdiv(Sq, cfg["BLOCK_M"]), n_seq * H)
    cu = cu_q if varlen else lse
    _attn_fwd_kernel[grid](
        q,
        k,
        v,
        mask if mask is not None else q,
        o,
        lse,
        cu,
        cu_k if varlen else lse,
        *qs,
        *ks,
        *vs,
        *os_,
        *sm,
        lse_sb,
        lse_sh,
        H,
        H // Hkv,
        Sq,
        Sk,
        D,
        scale * LOG2E,
        dropout_p,
        seed,
        offset,
        MASK_KIND=mask_kind,
        CAUSAL=causal,
        DROPOUT=dropout_p > 0.0,
        VARLEN=varlen,
        BLOCK_D=block_d(D),
        PREC=precision(q.dtype),
        **cfg,
    )
    return o, lse


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
    seed: int,
    offset: int,
    cu_q=None,
    cu_k=None,
    max_q: int = 0,
    max_k: int = 0,
):
    """dq, dk, dv (in q/k/v's layouts, contiguous), deterministic."""
    varlen = cu_q is not None
    D = q.shape[-1]
    dq, dk, dv = (empty(t.shape, t.dtype, t.device) for t in (q, k, v))
    if varlen:
        n_seq, H, Hkv, Sq, Sk = cu_q.shape[0] - 1, q.shape[1], k.shape[1], max_q, max_k
        st = _varlen_strides
        lse_sb, lse_sh = 0, q.shape[0]
        pre_grid_rows, pre_b = q.shape[0], 1
    else:
        n_seq, H, Sq, Hkv, Sk = q.shape[0], q.shape[1], q.shape[2], k.shape[1], k.shape[2]
        st = _dense_strides
        lse_sb, lse_sh = H * Sq, Sq
        pre_grid_rows, pre_b = Sq, n_seq
    if dq.numel() == 0 and dk.numel() == 0:
        return dq, dk, dv
    if q.numel() == 0 or Sq == 0:  # no queries: no gradient reaches k and v
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    BD = block_d(D)
    _attn_bwd_preprocess[(triton.cdiv(pre_grid_rows, 64), pre_b * H)](
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
    mask_kind = MASK_NONE if mask is None else (MASK_BOOL if mask.dtype == torch.bool else MASK_ADD)
    sm = mask.stride() if mask is not None else (0, 0, 0, 0)
    common = dict(
        MASK_KIND=mask_kind, CAUSAL=causal, DROPOUT=dropout_p > 0.0, VARLEN=varlen, BLOCK_D=BD, PREC=precision(q.dtype)
    )
    m_arg = mask if mask is not None else q
    cq, ck = (cu_q, cu_k) if varlen else (lse, lse)
    cfg = bwd_dkdv_config(D)
    _attn_bwd_dkdv_kernel[(triton.cdiv(Sk, cfg["BLOCK_N"]), n_seq * Hkv)](
        q,
        k,
        v,
        m_arg,
        do,
        lse,
        delta,
        dk,
        dv,
        cq,
        ck,
        *st(q),
        *st(k),
        *st(v),
        *st(do),
        *st(dk),
        *st(dv),
        *sm,
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
        **common,
        **cfg,
    )
    cfg = bwd_dq_config(D)
    _attn_bwd_dq_kernel[(triton.cdiv(Sq, cfg["BLOCK_M"]), n_seq * H)](
        q,
        k,
        v,
        m_arg,
        do,
        lse,
        delta,
        dq,
        cq,
        ck,
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
        **common,
        **cfg,
    )
    return dq, dk, dv


def static_configs():
    """The shipped launch configurations (bf16, no mask, causal and not, head dims 64/128/256) of the forward and
    the two backward kernels, for the static report: (kernel, signature, constexprs, num_warps, name, label)."""
    from fastlm.bench.static import signature

    bf16 = {n: "*bf16" for n in ("Q", "K", "V", "Mask", "O", "DO", "DK", "DV", "DQ")}
    ptrs = bf16 | {"Lse": "*fp32", "Delta": "*fp32", "CuQ": "*i32", "CuK": "*i32"}
    floats = ("qk_scale", "sm_scale", "dropout_p")
    for D in (64, 128, 256):
        for causal in (False, True):
            for name, kernel, config in (
                ("attn_fwd", _attn_fwd_kernel, fwd_config),
                ("attn_bwd_dkdv", _attn_bwd_dkdv_kernel, bwd_dkdv_config),
                ("attn_bwd_dq", _attn_bwd_dq_kernel, bwd_dq_config),
            ):
                cfg = dict(config(D))
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                consts = dict(
                    MASK_KIND=0, CAUSAL=causal, DROPOUT=False, VARLEN=False, BLOCK_D=block_d(D), PREC="tf32", **cfg
                )
                sig = signature(kernel, consts, ptrs, floats, ("seed", "rng_offset"))
                label = f"D={D} causal={causal} M={cfg['BLOCK_M']} N={cfg['BLOCK_N']}"
                yield kernel, sig, consts, (warps, stages), name, label
