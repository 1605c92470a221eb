"""Scaled dot-product attention (dense and varlen): registered ops, fake impls, autograd, public functions.

Ops (for <backend> in {triton, cuda, cpu}):
    fastlm::attention_fwd_<backend>(q, k, v, mask?, cu_q?, cu_k?, max_q, max_k, scale, causal, dropout_p, rng,
                                    window_left, window_right, softcap, sinks?, alibi?) -> (o, lse)
    fastlm::attention_bwd_<backend>(do, q, k, v, o, lse, mask?, cu_q?, cu_k?, max_q, max_k, scale, causal,
                                    dropout_p, rng, window_left, window_right, softcap, sinks?, alibi?, mask_grad)
        -> (dq, dk, dv, dmask, dsinks)
Dense: q (B, H, Sq, D), k/v (B, Hkv, Sk, D) (H a multiple of Hkv), any strides with a unit last stride; mask an
expanded (B, H, Sq, Sk) view (bool, True = attend, or additive float). Varlen: q (total_q, H, D), k/v
(total_k, Hkv, D), cu_q/cu_k int32 (n + 1,). ``rng`` is a (1,) int64 tensor holding dropout's Philox seed, on q's
device when dropout_p > 0: drawn there per call from torch's generator of that device (so torch.manual_seed makes
dropout reproducible, and a captured CUDA graph draws a fresh seed on every replay) and read by the kernel from
device memory, never on the host; without dropout it is an unused CPU zero. lse is fp32: (B, H, Sq) or (H, total_q);
it is not differentiable. The score modifiers (fastlm/ops/attention_args.py has their semantics): window sides
(-1 = unbounded; bottom-right aligned), softcap (0.0 = none), sinks (H,) fp32, alibi (B, H) fp32 slopes. dmask:
with mask_grad, the gradient of the additive mask summed over its broadcast (stride-0) dims, fp32 of shape
``mask_grad_shape(mask)``; else (0,). dsinks: (H,) fp32 with sinks, else (0,).
"""

import math

import torch
from torch import Tensor

from fastlm.dispatch import resolve
from fastlm.ops.attention_args import (
    attention_size,
    broadcast_qkv,
    call_features,
    check_call,
    check_cuda_case,
    check_qkv,
    checked_offsets,
    modifiers,
    rng_input,
    rows_16b_aligned,
    unit_last,
)
from fastlm.ops.registry import autocast_dtype, call, check_device, register


def _check_rng(rng: Tensor, q: Tensor, dropout_p: float) -> None:
    if dropout_p > 0 and (rng.device != q.device or rng.dtype != torch.int64 or rng.numel() != 1):
        raise ValueError(
            f"rng must be a (1,) int64 tensor on q's device ({q.device}) when dropout_p > 0, got {rng.dtype} "
            f"{list(rng.shape)} on {rng.device}"
        )


@torch.library.custom_op("fastlm::attention_fwd_triton", mutates_args=())
def attention_fwd_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    cu_q: Tensor | None,
    cu_k: Tensor | None,
    max_q: int,
    max_k: int,
    scale: float,
    causal: bool,
    dropout_p: float,
    rng: Tensor,
    window_left: int,
    window_right: int,
    softcap: float,
    sinks: Tensor | None,
    alibi: Tensor | None,
) -> tuple[Tensor, Tensor]:
    from fastlm.kernels.attention import attn_fwd

    _check_rng(rng, q, dropout_p)
    seed = rng if dropout_p > 0 else q  # without dropout the kernel never reads it (any device tensor will do)
    return attn_fwd(
        q,
        k,
        v,
        mask,
        scale,
        causal,
        dropout_p,
        seed,
        0,
        cu_q,
        cu_k,
        max_q,
        max_k,
        window=(window_left, window_right),
        softcap=softcap,
        sinks=sinks,
        alibi=alibi,
    )


@torch.library.custom_op("fastlm::attention_bwd_triton", mutates_args=())
def attention_bwd_triton(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    cu_q: Tensor | None,
    cu_k: Tensor | None,
    max_q: int,
    max_k: int,
    scale: float,
    causal: bool,
    dropout_p: float,
    rng: Tensor,
    window_left: int,
    window_right: int,
    softcap: float,
    sinks: Tensor | None,
    alibi: Tensor | None,
    mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from fastlm.kernels.attention import attn_bwd

    _check_rng(rng, q, dropout_p)
    seed = rng if dropout_p > 0 else q
    return attn_bwd(
        do,
        q,
        k,
        v,
        o,
        lse,
        mask,
        scale,
        causal,
        dropout_p,
        seed,
        0,
        cu_q,
        cu_k,
        max_q,
        max_k,
        window=(window_left, window_right),
        softcap=softcap,
        sinks=sinks,
        alibi=alibi,
        mask_grad=mask_grad,
    )


def mask_grad_shape(mask: Tensor) -> list[int]:
    """The shape of the additive mask's gradient as the backward ops return it: the (B, H, Sq, Sk) view's sizes with
    1 on its broadcast (stride-0) dims, which the gradient is summed over."""
    return [1 if st == 0 else n for st, n in zip(mask.stride(), mask.shape, strict=True)]


def _fwd_fake(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, causal, dropout_p, rng, wl, wr, softcap, sinks, alibi):
    lse_shape = (q.shape[1], q.shape[0]) if cu_q is not None else q.shape[:3]
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


def _bwd_fake(
    do,
    q,
    k,
    v,
    o,
    lse,
    mask,
    cu_q,
    cu_k,
    max_q,
    max_k,
    scale,
    causal,
    dropout_p,
    rng,
    wl,
    wr,
    softcap,
    sinks,
    alibi,
    mask_grad,
):
    f32 = torch.float32
    dmask = q.new_empty(mask_grad_shape(mask), dtype=f32) if mask_grad else q.new_empty((0,), dtype=f32)
    dsinks = q.new_empty(sinks.shape, dtype=f32) if sinks is not None else q.new_empty((0,), dtype=f32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask, dsinks


def _setup(ctx, inputs, output):
    q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, causal, dropout_p, rng, wl, wr, softcap, sinks, alibi = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, mask, cu_q, cu_k, rng, sinks, alibi)
    ctx.args = (max_q, max_k, scale, causal, dropout_p, wl, wr, softcap)
    ctx.mask_grad = mask is not None and mask.dtype != torch.bool and ctx.needs_input_grad[3]
    ctx.mark_non_differentiable(lse)


def grad_out_layout(do: Tensor, backend: str) -> Tensor:
    """The incoming gradient as the backward kernels read it: a unit last stride (every backend), and 16-byte
    aligned rows for the CUDA C++ kernels; a copy only when the layout lacks either."""
    if backend == "cuda" and not rows_16b_aligned(do):
        return do.clone(memory_format=torch.contiguous_format)  # a fresh (aligned) buffer even if do is contiguous
    return do if do.stride(-1) == 1 else do.contiguous()


def _backward(backend: str):
    bwd = ATTENTION_BWD[backend]

    def backward(ctx, do, _dlse):
        q, k, v, o, lse, mask, cu_q, cu_k, rng, sinks, alibi = ctx.saved_tensors
        max_q, max_k, scale, causal, dropout_p, wl, wr, softcap = ctx.args
        do = grad_out_layout(do, backend)
        dq, dk, dv, dmask, dsinks = call(
            bwd,
            do, q, k, v, o, lse, mask, cu_q, cu_k, max_q, max_k, scale, causal, dropout_p, rng, wl, wr, softcap,
            sinks, alibi, ctx.mask_grad,
        )  # fmt: skip
        # the mask's gradient: the kernels sum dS over the (B, H, Sq, Sk) view's broadcast (stride-0) dims; the
        # autograd of the caller's expand sums over them again, so each of the n broadcast copies gets 1/n of the
        # sum (a stride-0 view: no copy). The caller makes sure that only its own expand's dims have stride 0.
        if ctx.mask_grad:
            n = math.prod(size for size, st in zip(mask.shape, mask.stride(), strict=True) if st == 0 and size > 1)
            dmask = (dmask / n if n > 1 else dmask).to(mask.dtype).expand(mask.shape)
        else:
            dmask = None
        dsinks = dsinks if sinks is not None and ctx.needs_input_grad[15] else None
        return dq, dk, dv, dmask, None, None, None, None, None, None, None, None, None, None, None, dsinks, None

    return backward


ATTENTION_BWD = register("attention_bwd", _bwd_fake)
ATTENTION_FWD = register("attention_fwd", _fwd_fake, _backward, _setup)


# ---------------------------------------------------------------------------------------------------------------
# Public functions


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Flash attention with the signature and semantics of ``torch.nn.functional.scaled_dot_product_attention``,
    plus keyword-only score modifiers (fastlm/ops/attention_args.py has the exact formulas).

    Args:
        query: ``(*, H, Sq, D)``; key, value: ``(*, Hkv, Sk, D)``. The leading dims broadcast against each other as
            in torch (a 3-D query with 4-D key/value works; broadcast dims are stride-0 views, not copies); Hkv == H,
            Hkv == 1, H == 1, or H % Hkv == 0 with ``enable_gqa``. Any strides with a unit last stride (e.g. HF's
            transposed views): no copy. float16/bfloat16 (float32 too on the Triton and cpu paths); D <= 256.
        attn_mask: broadcastable to ``(*, H, Sq, Sk)``: bool (True = attend) or an additive float mask. Read tile by
            tile; fully masked tiles are skipped. May be combined with ``is_causal`` (torch raises there). An
            additive mask that requires grad gets its gradient, summed over its broadcast dims as autograd would,
            accumulated per tile (no dense ``(*, H, Sq, Sk)`` gradient buffer when the mask is broadcast).
        dropout_p: dropout on the attention probabilities, generated in the kernel from torch's default generator
            (``torch.manual_seed`` makes it reproducible) and regenerated in the backward.
        is_causal: top-left aligned causal mask (query i sees keys j <= i), as torch::

                keys ->      Sq = 3, Sk = 5
                q0  x . . . .
                q1  x x . . .
                q2  x x x . .

            With a ``window`` the causal edge is the window's right side (0), bottom-right aligned as in
            FlashAttention (the same as top-left when Sq == Sk).
        scale: defaults to ``1 / sqrt(D)``.
        window: ``(left, right)`` sliding window, each side an int >= 0 or None (unbounded): query i sees keys j with
            ``i + Sk - Sq - left <= j <= i + Sk - Sq + right`` (bottom-right aligned, FlashAttention's rule; with
            ``is_causal`` right is 0). Mistral's ``sliding_window=W`` is ``window=(W - 1, 0)``. Key tiles outside
            the band are skipped: the cost falls with the window.
        softcap: the scaled scores become ``softcap * tanh(s / softcap)`` (Gemma 2), before ALiBi and the mask.
        sinks: ``(H,)`` per-head logits joining each row's softmax denominator (gpt-oss's attention sinks; not
            multiplied by ``scale``), with their gradient.
        alibi_slopes: ``(H,)`` or ``(B, H)`` (broadcastable to ``(*, H)``): the bias ``-slope * |i + Sk - Sq - j|``
            is computed in the kernel (no bias tensor). Not trainable.
        return_lse: also return the log-sum-exp of the scores (sinks included), ``(*, H, Sq)`` fp32 (not
            differentiable), for merging partial attentions.

    Returns:
        ``(*, H, Sq, D)`` in the query's dtype. Queries whose every key is masked get zeros (torch gives NaN).
        Small Sq against long Sk (decoding) takes a split-KV kernel on the Triton backend automatically.
    """
    check_call(attn_mask, dropout_p)
    amp = autocast_dtype(query) if isinstance(query, Tensor) else None
    if amp is not None:  # as torch's SDPA under autocast (on its lower-precision list): q, k, v in the autocast dtype
        query, key, value = (
            t.to(amp) if isinstance(t, Tensor) and t.is_floating_point() else t for t in (query, key, value)
        )
    feats = call_features(attn_mask, dropout_p, False, window, softcap, sinks, alibi_slopes)
    backend = resolve("scaled_dot_product_attention", query, feats, size=attention_size(query, key))
    if backend == "torch":
        from fastlm import reference

        if return_lse:
            raise ValueError("return_lse needs a fused backend (triton, cuda or cpu)")
        if any(f in feats for f in ("window", "softcap", "sinks", "alibi")):  # the same checks as the fused paths
            q4, k4, _, lead, H, _ = broadcast_qkv(query, key, value, enable_gqa)
            modifiers(window, softcap, sinks, alibi_slopes, is_causal, q4.shape[2] == k4.shape[2], lead, H, query)
        return reference.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa,
            window=window, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
        )  # fmt: skip
    check_qkv(query, key, value, backend, 2)
    q4, k4, v4, lead, H, out_shape = broadcast_qkv(query, key, value, enable_gqa)
    B, Sq, D = q4.shape[0], q4.shape[2], q4.shape[3]
    Sk = k4.shape[2]
    mods = modifiers(window, softcap, sinks, alibi_slopes, is_causal, Sq == Sk, lead, H, query)
    mask4 = None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype and attn_mask.dtype != torch.float32:
            raise TypeError(f"attn_mask must be bool or a float mask of the query's dtype, got {attn_mask.dtype}")
        check_device(attn_mask, "attn_mask", query, "query")
        full = (*lead, H, Sq, Sk)
        stride0 = any(st == 0 and n > 1 for st, n in zip(attn_mask.stride(), attn_mask.shape, strict=True))
        if attn_mask.requires_grad and stride0:  # a stride-0 mask needing its own per-element gradient (see backward)
            attn_mask = attn_mask.contiguous()
        try:
            mask4 = attn_mask.expand(full).reshape(B, H, Sq, Sk)  # stride-0 broadcast dims: no copy
        except RuntimeError:
            raise ValueError(
                f"attn_mask of shape {list(attn_mask.shape)} is not broadcastable to {list(full)}"
            ) from None
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if backend == "cuda":
        check_cuda_case(q4, k4, v4)
    o, lse = call(
        ATTENTION_FWD[backend],
        q4,
        k4,
        v4,
        mask4,
        None,
        None,
        Sq,
        Sk,
        scale,
        mods.causal,
        float(dropout_p),
        rng_input(dropout_p, query.device),
        mods.window_left,
        mods.window_right,
        mods.softcap,
        mods.sinks,
        mods.alibi,
    )
    if o.shape != out_shape:
        o = o.reshape(out_shape)
    if return_lse:
        return o, lse.reshape(out_shape[:-1])
    return o


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over packed variable-length sequences (FlashAttention's varlen layout).

    Args:
        q: ``(total_q, H, D)``; k, v: ``(total_k, Hkv, D)`` with H a multiple of Hkv (GQA).
        cu_seqlens_q, cu_seqlens_k: int32 ``(n + 1,)``, 0 first, non-decreasing, last = total; sequence i is
            ``q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]]``. Their values are checked (ValueError) only where reading
            them costs no device sync: CPU tensors in eager mode. On CUDA tensors, and while torch.compile traces,
            nothing is read on the host (no sync: CUDA-graph capture and fullgraph compiles work, as with
            FlashAttention, which checks nothing); the offsets are then clamped into ``[0, total]`` and made
            non-decreasing on the device, so invalid offsets never cause an out-of-bounds access, but the results
            are then unspecified: garbage in the rows past a sequence's bound, and in dk/dv of a sequence that has
            such rows. Check offsets you did not build yourself on the host.
        max_seqlen_q, max_seqlen_k: upper bounds of the sequence lengths (ints >= 0; checked against the offsets
            where those are checked).
        is_causal: top-left aligned within each sequence (with a window: the window's bottom-right aligned edge).
        window, softcap, sinks: as :func:`scaled_dot_product_attention`, each sequence aligned on its own lengths.
        alibi_slopes: ``(H,)`` or ``(n, H)`` (one row per sequence).

    Returns:
        ``(total_q, H, D)``; with ``return_lse`` also ``(H, total_q)`` fp32.
    """
    check_call(None, dropout_p)
    feats = call_features(None, dropout_p, True, window, softcap, sinks, alibi_slopes)
    backend = resolve("varlen_attention", q, feats)
    if backend == "torch":
        from fastlm import reference

        if return_lse:
            raise ValueError("return_lse needs a fused backend (triton, cuda or cpu)")
        n = cu_seqlens_q.numel() - 1 if isinstance(cu_seqlens_q, Tensor) else 0
        modifiers(window, softcap, sinks, alibi_slopes, is_causal, False, (n,), q.shape[1], q)
        return reference.varlen_attention(
            q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, is_causal, scale,
            window=window, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
        )  # fmt: skip
    check_qkv(q, k, v, backend, 3)
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            f"varlen q must be (total_q, H, D) and k, v (total_k, Hkv, D); got {list(q.shape)}, "
            f"{list(k.shape)}, {list(v.shape)}"
        )
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    offsets = []
    for name, cu, total, mx in (
        ("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k),
    ):
        if isinstance(mx, bool) or not isinstance(mx, (int, torch.SymInt)) or mx < 0:
            raise ValueError(f"max_seqlen for {name} must be an int >= 0, got {mx!r}")
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise TypeError(
                f"{name} must be a 1-D int32 tensor of n + 1 >= 2 offsets, got "
                f"{getattr(cu, 'dtype', type(cu))} {list(getattr(cu, 'shape', []))}"
            )
        check_device(cu, name, q, "q")
        offsets.append(checked_offsets(cu, name, total, mx))
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    q, k, v = (unit_last(t) for t in (q, k, v))
    mods = modifiers(window, softcap, sinks, alibi_slopes, is_causal, False, (cu_seqlens_q.numel() - 1,), H, q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, lse = call(
        ATTENTION_FWD[backend],
        q,
        k,
        v,
        None,
        *offsets,
        int(max_seqlen_q),
        int(max_seqlen_k),
        scale,
        mods.causal,
        float(dropout_p),
        rng_input(dropout_p, q.device),
        mods.window_left,
        mods.window_right,
        mods.softcap,
        mods.sinks,
        mods.alibi,
    )
    return (o, lse) if return_lse else o
