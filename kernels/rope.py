"""Fused rotary position embedding (RoPE) of q and k, forward and backward, in one launch.

Each head vector x (head_dim D) of q and of k is rotated pairwise over its first ``rot`` dims (``rot`` = the tables'
last dim; the remaining D - rot dims pass through: partial rotary, as Phi-3). A pair is (a, b) = (j, j + rot/2)
(GPT-NeoX / Llama's ``rotate_half``) or (2j, 2j + 1) (``interleaved``: GPT-J / Cohere), j < rot/2, with the tables'
own entries at both indices, so the result equals HF's ``x * cos + rotate_half(x) * sin`` for any tables:
    forward:   y_a = x_a cos_a - x_b sin_a            y_b = x_b cos_b + x_a sin_b
    backward (the transpose of that linear map, which is what a gradient needs):
               dx_a = dy_a cos_a + dy_b sin_b         dx_b = dy_b cos_b - dy_a sin_a
The backward is the forward with the sine table swapped within each pair and negated (sa, sb) <- (-sb, -sa): one
kernel, a BACKWARD constexpr. Math in fp32; the output's dtype is the launcher's choice (HF's type promotion).

One program per token row (b, s): it loads the row's cos / sin once (stride 0 where the tables broadcast over batch
or positions) and rotates all Hq heads of q and Hk heads of k (GQA: Hq != Hk) in [BLOCK_H, rot/2] tiles whose
inner dim is unit-stride, so q and k are read and written once, coalesced, in whatever layout they come:
(B, H, S, D) or (B, S, H, D), any strides with a unit last stride (HF's ``view(B, S, H, D).transpose(1, 2)``
without a copy). In place (QO == Q, KO == K) each element is read before the program writes it, and the
pass-through dims are not touched.

Bytes: read q, k, cos, sin; write q_out, k_out:
    (Hq + Hk) * D * (e_in + e_out) + 2 * rot * e_cos per token row, the tables' bytes once per distinct table row
    (in place: the pass-through dims are neither read nor written).
Limits: D and rot even, 2 <= rot <= D; a grid axis of B * S rows (< 2**31).
"""

import torch
import triton
import triton.language as tl
from fastlm.kernels import launch_grid, on_tensor_device

TILE = 2048  # elements of one [BLOCK_H, BLOCK_HALF] tile (four live in registers: x_a, x_b, y_a, y_b)
MAX_PASS = 128  # widest chunk of the pass-through copy


@triton.jit
def rotate_heads(
    X,  # input heads of one tensor (q or k): head h of the row at x_row + h * stride_xh, unit stride within the head
    Y,  # output (may be X itself: in place)
    x_row,  # int64 offset of the row's first head in X
    y_row,  # int64 offset of the row's first head in Y
    stride_xh,  # head stride of X
    stride_yh,  # head stride of Y
    H,  # heads of this tensor
    cos_a,  # [BLOCK_HALF] fp32 cos at the pairs' first index
    cos_b,  # [BLOCK_HALF] fp32 cos at the pairs' second index
    sin_a,  # [BLOCK_HALF] fp32 sin (or -sin_b in the backward)
    sin_b,  # [BLOCK_HALF] fp32 sin (or -sin_a in the backward)
    off_a,  # [BLOCK_HALF] first index of each pair within the head
    off_b,  # [BLOCK_HALF] second index of each pair
    pair_ok,  # [BLOCK_HALF] j < rot / 2
    rot,  # rotated dims
    D,  # head dim
    COPY_PASS: tl.constexpr,  # copy dims rot..D (out of place with rot < D)
    PAIRED_TILE: tl.constexpr,  # interleaved pairs with rot == 2 * BLOCK_HALF: one contiguous tile, split in registers
    BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        h_ok = h < H
        xh = X + x_row + h.to(tl.int64)[:, None] * stride_xh
        yh = Y + y_row + h.to(tl.int64)[:, None] * stride_yh
        if PAIRED_TILE:
            # interleaved, rot == 2 * BLOCK_HALF: one contiguous [BLOCK_H, rot] tile, split into its (even, odd)
            # lanes in registers, instead of two stride-2 accesses (which cannot be vectorised)
            d = tl.arange(0, 2 * BLOCK_HALF)
            m = h_ok[:, None] & (d < 2 * BLOCK_HALF)[None, :]
            x = tl.load(xh + d[None, :], mask=m, other=0.0).to(tl.float32)
            xa, xb = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_HALF, 2]))
            ya = xa * cos_a[None, :] - xb * sin_a[None, :]
            yb = xb * cos_b[None, :] + xa * sin_b[None, :]
            y = tl.reshape(tl.join(ya, yb), [BLOCK_H, 2 * BLOCK_HALF])
            tl.store(yh + d[None, :], y.to(Y.dtype.element_ty), mask=m)
        else:
            m = h_ok[:, None] & pair_ok[None, :]
            xa = tl.load(xh + off_a[None, :], mask=m, other=0.0).to(tl.float32)
            xb = tl.load(xh + off_b[None, :], mask=m, other=0.0).to(tl.float32)
            ya = xa * cos_a[None, :] - xb * sin_a[None, :]
            yb = xb * cos_b[None, :] + xa * sin_b[None, :]
            tl.store(yh + off_a[None, :], ya.to(Y.dtype.element_ty), mask=m)
            tl.store(yh + off_b[None, :], yb.to(Y.dtype.element_ty), mask=m)
        if COPY_PASS:
            for p0 in range(rot, D, BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P)
                pm = h_ok[:, None] & (p < D)[None, :]
                v = tl.load(xh + p[None, :], mask=pm, other=0.0)
                tl.store(yh + p[None, :], v.to(Y.dtype.element_ty), mask=pm)


@triton.jit
def rope_kernel(
    Q,  # (B, S, Hq, D) addressed by (stride_qb, stride_qs, stride_qh), unit last stride
    K,  # (B, S, Hk, D) addressed by (stride_kb, stride_ks, stride_kh), unit last stride
    QO,  # q's output (QO == Q in place), by (stride_qob, stride_qos, stride_qoh)
    KO,  # k's output (KO == K in place), by (stride_kob, stride_kos, stride_koh)
    Cos,  # (Bc, Sc, rot) table, addressed by (stride_cb, stride_cs): stride 0 where it broadcasts; unit last stride
    Sin,  # (Bc, Sc, rot) table, addressed by (stride_sb, stride_ss)
    S,  # positions per batch: row = b * S + s
    Hq,  # heads of q
    Hk,  # heads of k
    half,  # pairs: rot / 2 (passed halved, so that Triton sees its divisibility for the j + half accesses)
    D,  # head dim
    stride_qb,  # q's batch stride
    stride_qs,  # q's position stride
    stride_qh,  # q's head stride
    stride_kb,  # k's batch stride
    stride_ks,  # k's position stride
    stride_kh,  # k's head stride
    stride_qob,  # q_out's batch stride
    stride_qos,  # q_out's position stride
    stride_qoh,  # q_out's head stride
    stride_kob,  # k_out's batch stride
    stride_kos,  # k_out's position stride
    stride_koh,  # k_out's head stride
    stride_cb,  # cos's batch stride (0: broadcast)
    stride_cs,  # cos's position stride (0: broadcast)
    stride_sb,  # sin's batch stride (0: broadcast)
    stride_ss,  # sin's position stride (0: broadcast)
    INTERLEAVED: tl.constexpr,  # pairs (2j, 2j + 1) instead of (j, j + rot / 2)
    BACKWARD: tl.constexpr,  # the transposed rotation (gradients)
    COPY_PASS: tl.constexpr,  # copy the pass-through dims rot..D (out of place, rot < D)
    BLOCK_HALF: tl.constexpr,  # >= rot / 2, a power of 2
    EXACT: tl.constexpr,  # BLOCK_HALF == rot / 2 (no pair mask)
    BLOCK_HQ: tl.constexpr,  # q heads per tile
    BLOCK_HK: tl.constexpr,  # k heads per tile
    BLOCK_P: tl.constexpr,  # pass-through chunk
):
    row = tl.program_id(0).to(tl.int64)
    b = row // S
    s = row % S
    rot = 2 * half
    j = tl.arange(0, BLOCK_HALF)
    if EXACT:
        pair_ok = j < BLOCK_HALF  # all true, known at compile time: the head mask alone, vector accesses kept
    else:
        pair_ok = j < half
    if INTERLEAVED:
        off_a = 2 * j
        off_b = 2 * j + 1
    elif EXACT:
        off_a = j
        off_b = j + BLOCK_HALF  # == half, as a constant: aligned vector accesses of the second halves too
    else:
        off_a = j
        off_b = j + half
    c_row = Cos + b * stride_cb + s * stride_cs
    s_row = Sin + b * stride_sb + s * stride_ss
    cos_a = tl.load(c_row + off_a, mask=pair_ok, other=0.0).to(tl.float32)
    cos_b = tl.load(c_row + off_b, mask=pair_ok, other=0.0).to(tl.float32)
    sin_a = tl.load(s_row + off_a, mask=pair_ok, other=0.0).to(tl.float32)
    sin_b = tl.load(s_row + off_b, mask=pair_ok, other=0.0).to(tl.float32)
    if BACKWARD:
        sin_a, sin_b = -sin_b, -sin_a
    rotate_heads(
        Q,
        QO,
        b * stride_qb + s * stride_qs,
        b * stride_qob + s * stride_qos,
        stride_qh,
        stride_qoh,
        Hq,
        cos_a,
        cos_b,
        sin_a,
        sin_b,
        off_a,
        off_b,
        pair_ok,
        rot,
        D,
        COPY_PASS,
        INTERLEAVED and EXACT,
        BLOCK_HALF,
        BLOCK_HQ,
        BLOCK_P,
    )
    rotate_heads(
        K,
        KO,
        b * stride_kb + s * stride_ks,
        b * stride_kob + s * stride_kos,
        stride_kh,
        stride_koh,
        Hk,
        cos_a,
        cos_b,
        sin_a,
        sin_b,
        off_a,
        off_b,
        pair_ok,
        rot,
        D,
        COPY_PASS,
        INTERLEAVED and EXACT,
        BLOCK_HALF,
        BLOCK_HK,
        BLOCK_P,
    )


# ---------------------------------------------------------------------------------------------------------------
# Launch heuristic


def config(Hq: int, Hk: int, rot: int, D: int, copy_pass: bool) -> dict:
    """Tiles of ~TILE elements: all heads of a row in one tile when they fit (Llama-3-8B, D = 128: the 32 q heads
    in one [32, 64] tile, the 8 k heads in one [8, 64] tile), else a loop over head tiles."""
    block_half = triton.next_power_of_2(max(1, rot // 2))
    cap = max(1, TILE // block_half)
    block_hq = min(triton.next_power_of_2(max(1, Hq)), cap)
    block_hk = min(triton.next_power_of_2(max(1, Hk)), cap)
    block_p = min(MAX_PASS, triton.next_power_of_2(max(1, D - rot))) if copy_pass else 1
    warps = 4 if max(block_hq, block_hk) * block_half <= 1024 else 8
    return dict(
        BLOCK_HALF=block_half,
        EXACT=block_half == rot // 2,
        BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk,
        BLOCK_P=block_p,
        num_warps=warps,
    )


# ---------------------------------------------------------------------------------------------------------------
# Host function: the inputs are checked (and the tables normalised to (Bc, Sc, rot)) by fastlm.ops.rope.


def axes(t: torch.Tensor, head_axis: int) -> tuple[int, int, int]:
    """(batch, position, head) strides of a 4-D (B, H, S, D) (head_axis 1) or (B, S, H, D) (head_axis 2) tensor."""
    return t.stride(0), t.stride(3 - head_axis), t.stride(head_axis)


@on_tensor_device
def rope(q, k, qo, ko, cos, sin, head_axis: int, interleaved: bool, backward: bool) -> None:
    """Rotate q into qo and k into ko (see the module docstring); qo is q and ko is k in place.

    q: (B, Hq, S, D) or (B, S, Hq, D) (``head_axis`` 1 or 2), k likewise with Hk heads, qo / ko of their shapes,
    all with unit last strides (any other strides); cos, sin: (Bc, Sc, rot) with Bc in {1, B}, Sc in {1, S}, unit
    last stride. The outputs' dtype is theirs (fastlm.ops.rope allocates them).
    """
    inplace = qo is q  # in place: the pass-through dims stay as they are
    B, S, D = q.shape[0], q.shape[3 - head_axis], q.shape[3]
    Hq, Hk = q.shape[head_axis], k.shape[head_axis]
    rot = cos.shape[-1]
    if B * S == 0 or (Hq == 0 and Hk == 0):
        return
    copy_pass = not inplace and rot < D
    cfg = config(Hq, Hk, rot, D, copy_pass)
    warps = cfg.pop("num_warps")
    bcast = [(cos.stride(i) if cos.shape[i] > 1 else 0) for i in (0, 1)] + [
        (sin.stride(i) if sin.shape[i] > 1 else 0) for i in (0, 1)
    ]
    rope_kernel[launch_grid(B * S)](
        q,
        k,
        qo,
        ko,
        cos,
        sin,
        S,
        Hq,
        Hk,
        rot // 2,
        D,
        *axes(q, head_axis),
        *axes(k, head_axis),
        *axes(qo, head_axis),
        *axes(ko, head_axis),
        *bcast,
        INTERLEAVED=interleaved,
        BACKWARD=backward,
        COPY_PASS=copy_pass,
        num_warps=warps,
        **cfg,
    )
