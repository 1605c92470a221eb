"""Flash attention backward in Triton (FA2 scheme; see kernels/attention.py for the forward and the notation).

delta = rowsum(dO * O) (preprocess kernel); one program per key block computes dK, dV by streaming the queries of
every query head that shares its key/value head (GQA without atomics); one program per query block computes dQ by
streaming keys. No atomics anywhere: the backward is bitwise deterministic for a given launch config.
    p = exp(s - lse); z = dropout keep / (1 - p_drop); dV += (p z)^T dO; dP = dO V^T; dS = p (z dP - delta)
    dK += dS^T q * scale;  dQ += dS k * scale
On sm_90 the streamed operands (Q and dO for dK/dV, K and V for dQ) come through TMA descriptors when the layout
allows, as in the forward. FLOPs: 2.5x the forward's.
"""

import torch
import triton
import triton.language as tl
from fastlm.kernels import empty, launch_grid, on_tensor_device
from fastlm.kernels.attention import (
    _dense_strides,
    _keep,
    _kv_tile,
    _scores,
    _seed,
    _seq,
    _tile_allowed,
    _tile_ids,
    _varlen_strides,
)
from fastlm.kernels.attention_configs import (
    DKDV_FP32,
    DKDV_LEAN,
    DKDV_PTR,
    DKDV_TMA,
    DQ_FP32,
    DQ_LEAN,
    DQ_PTR,
    DQ_TMA,
    MASK_ADD,
    MASK_BOOL,
    MASK_NONE,
    _autotuned,
    autotune_enabled,
    block_d,
    bwd_dkdv_configs,
    bwd_dq_configs,
    descriptor,
    dkdv_tma,
    fp32_case,
    lean_case,
    precision,
    use_tma,
)


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
    pid_m, bh = _tile_ids(Sq, BLOCK_M)
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
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    Mask,
    DO,
    Qd,
    DOd,
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
    Seed,
    rng_offset,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
    TMA: tl.constexpr,
):
    pid_n, bh = _tile_ids(Sk_max, BLOCK_N)
    b = bh // Hkv
    h_kv = bh % Hkv
    seed = _seed(Seed, DROPOUT)
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
            h32 = h_kv * GROUP + g
            h64 = hk64 * GROUP + g
            Q_ = Q + b64 * stride_qb + h64 * stride_qh + q0.to(tl.int64) * stride_qm
            DO_ = DO + b64 * stride_dob + h64 * stride_doh + q0.to(tl.int64) * stride_dom
            M_ = Mask + b64 * sm_b + h64 * sm_h
            lse_base = b64 * lse_sb + h64 * lse_sh + q0.to(tl.int64)
            for start_m in range(lo, Sq, BLOCK_M):
                offs_m = start_m + offs_m0
                if _tile_allowed(M_, offs_m, offs_n, Sq, Sk, sm_m, sm_n, MASK_KIND):
                    q = _kv_tile(Q_, Qd, b, h32, start_m, offs_m, offs_d, Sq, D, stride_qm, TMA, BLOCK_M, BLOCK_D)
                    do = _kv_tile(DO_, DOd, b, h32, start_m, offs_m, offs_d, Sq, D, stride_dom, TMA, BLOCK_M, BLOCK_D)
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
    Kd,
    Vd,
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
    Seed,
    rng_offset,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
    TMA: tl.constexpr,
):
    pid_m, bh = _tile_ids(Sq_max, BLOCK_M)
    b = bh // H
    h = bh % H
    seed = _seed(Seed, DROPOUT)
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
        hkv = h // GROUP
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            if _tile_allowed(M_, offs_m, offs_n, Sq, Sk, sm_m, sm_n, MASK_KIND):
                k = _kv_tile(K_, Kd, b, hkv, start_n, offs_n, offs_d, Sk, D, stride_kn, TMA, BLOCK_N, BLOCK_D)
                v = _kv_tile(V_, Vd, b, hkv, start_n, offs_n, offs_d, Sk, D, stride_vn, TMA, BLOCK_N, BLOCK_D)
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


_dkdv_tuned = _autotuned(
    _attn_bwd_dkdv_kernel,
    (DKDV_TMA, DKDV_PTR, *({b: [c] for b, c in t.items()} for t in (DKDV_LEAN, *DKDV_FP32.values()))),
    (("Qd", "BLOCK_M"), ("DOd", "BLOCK_M")),
    lambda kw: bwd_dkdv_configs(kw["BLOCK_D"], kw["TMA"], False, lean_case(kw), fp32_case(kw)),
)
_dq_tuned = _autotuned(
    _attn_bwd_dq_kernel,
    (DQ_TMA, DQ_PTR, *({b: [c] for b, c in t.items()} for t in (*DQ_LEAN.values(), *DQ_FP32.values()))),
    (("Kd", "BLOCK_N"), ("Vd", "BLOCK_N")),
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
):
    """dq, dk, dv (in q/k/v's layouts, contiguous), deterministic for a given config.
    configs / tma: force (dK/dV config, dQ config) and the TMA path (tests); None = the defaults."""
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
    _attn_bwd_preprocess[launch_grid(triton.cdiv(pre_grid_rows, 64) * pre_b * H)](
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
    tma = (not varlen and use_tma(q, k, v, do)) if tma is None else tma
    lean = mask_kind != MASK_NONE or dropout_p > 0.0
    tma_kv = dkdv_tma(D, tma, lean)
    tuned = configs is None and autotune_enabled(q)
    fp32 = q.dtype == torch.float32
    cfg_kv, cfg_q = configs or (
        bwd_dkdv_configs(D, tma_kv, lean=lean, fp32=fp32)[0],
        bwd_dq_configs(D, tma, lean=lean, fp32=fp32)[0],
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
    ]
    # boxes: [1, 1, rows, BLOCK_D]; the autotune pre-hook resets them per config
    if tma_kv:
        dk_args[5:7] = [descriptor(q, cfg_kv["BLOCK_M"]), descriptor(do, cfg_kv["BLOCK_M"])]
    if tma:
        dq_args[5:7] = [descriptor(k, cfg_q["BLOCK_N"]), descriptor(v, cfg_q["BLOCK_N"])]
    grid_kv = lambda meta: launch_grid(triton.cdiv(Sk, meta["BLOCK_N"]) * n_seq * Hkv)  # noqa: E731
    grid_q = lambda meta: launch_grid(triton.cdiv(Sq, meta["BLOCK_M"]) * n_seq * H)  # noqa: E731
    if tuned:
        _dkdv_tuned[grid_kv](*dk_args, **common, TMA=tma_kv)
        _dq_tuned[grid_q](*dq_args, **common, TMA=tma)
    else:
        _attn_bwd_dkdv_kernel[grid_kv](*dk_args, **common, TMA=tma_kv, **cfg_kv)
        _attn_bwd_dq_kernel[grid_q](*dq_args, **common, TMA=tma, **cfg_q)
    return dq, dk, dv
