"""Attention against a KV cache (decode / chunked prefill): append the new keys and values, then attend. Inference only.

Op: ``fastlm::attention_decode_triton(q, k_cache, v_cache, seqlens_k, block_table?, scale, window_left,
window_right, softcap, sinks?, alibi?) -> (o, lse)``: the split-KV kernel of kernels/attention/decode.py on
FlashAttention's layouts (q/o (B, Sq, H, D); cache (B, S_max, Hkv, D) or paged (num_blocks, block_size, Hkv, D)
with block_table (B, max_blocks) int32), L_b = seqlens_k[b] keys per batch, lse (B, H, Sq) fp32. It does not
write the cache: the append is ``index_put_`` on the cache tensors (no host sync, traced by torch.compile).
The cpu backend loops over the batch calling the fused cpu attention on each sequence's gathered keys; the torch
backend is ``reference_attention_with_kvcache`` (float64, explicit bias).
"""

import math

import torch
from torch import Tensor

from fastlm.dispatch import FUSED_DTYPES, UnsupportedCaseError, host_readable, resolve
from fastlm.ops.attention_args import check_alibi, check_sinks, check_softcap, window_sides
from fastlm.ops.registry import check_device, check_tensor

MAX_HEAD_DIM = 256
PAGE_MULTIPLE = 16  # a paged cache's block_size must be a multiple of this (vLLM's smallest page)


# ---------------------------------------------------------------------------------------------------------------
# Registered op (triton)


def _dense_view(cache: Tensor, paged: bool) -> Tensor:
    """The kernel's view of a cache: dense (B, S_max, Hkv, D) -> (B, Hkv, S_max, D) (no copy); paged as is."""
    return cache if paged else cache.transpose(1, 2)


@torch.library.custom_op("fastlm::attention_decode_triton", mutates_args=())
def attention_decode_triton(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    block_table: Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    sinks: Tensor | None,
    alibi: Tensor | None,
) -> tuple[Tensor, Tensor]:
    from fastlm.kernels.attention.decode import decode_fwd

    paged = block_table is not None
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    _, lse = decode_fwd(
        q.transpose(1, 2),
        _dense_view(k_cache, paged),
        _dense_view(v_cache, paged),
        None,
        scale,
        False,
        window=(window_left, window_right),
        softcap=softcap,
        sinks=sinks,
        alibi=alibi,
        seqlens=seqlens_k,
        block_table=block_table,
        out=o.transpose(1, 2),
    )
    return o, lse


@attention_decode_triton.register_fake
def _decode_fake(q, k_cache, v_cache, seqlens_k, block_table, scale, window_left, window_right, softcap, sinks, alibi):
    B, Sq, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, Sq), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# References (the torch backend) and the cpu backend


def _keys_of(cache: Tensor, b: int, L: int, block_table: Tensor | None) -> Tensor:
    """(L, Hkv, D): the first L cached rows of sequence b (gathered from its pages when paged)."""
    if block_table is None:
        return cache[b, :L]
    bs = cache.shape[1]
    pages = block_table[b, : -(-L // bs)].long()
    return cache[pages].reshape(-1, *cache.shape[2:])[:L]


def reference_attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    block_table: Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    sinks: Tensor | None,
    alibi: Tensor | None,
) -> Tensor:
    """The attention step of ``attention_with_kvcache`` (after the append) in float64 with an explicit bias, a
    Python loop over the batch (reads seqlens_k on the host): q (B, Sq, H, D), keys k_cache[b, :seqlens_k[b]]
    (or its pages), window bottom-right (-1 unbounded), softcap 0 = none, sinks (H,), alibi (B, H). Returns
    (B, Sq, H, D) in q's dtype; rows with no visible key are zero."""
    from fastlm import reference

    B, Sq, H, D = q.shape
    kw = _cpu_modifiers(window_left, window_right, softcap, sinks, alibi)
    kw["sinks"] = sinks.double() if sinks is not None else None
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for b in range(B):
        L = int(seqlens_k[b])
        if L == 0:
            continue  # no key: zeros
        k, v = (_keys_of(c, b, L, block_table).double().transpose(0, 1) for c in (k_cache, v_cache))  # (Hkv, L, D)
        if alibi is not None:
            kw["alibi_slopes"] = alibi[b].double()
        o = reference.scaled_dot_product_attention(
            q[b].double().transpose(0, 1), k, v, scale=scale, enable_gqa=k.shape[0] != H, **kw
        )  # (H, Sq, D), windows and ALiBi bottom-right aligned on L
        out[b] = o.transpose(0, 1)
    return out.to(q.dtype)


def _cpu_modifiers(window_left, window_right, softcap, sinks, alibi) -> dict:
    """The modifier keywords of a cpu-backend call (window as fastlm's (left, right) with None for unbounded)."""
    kw = {}
    if window_left >= 0 or window_right >= 0:
        kw["window"] = (None if window_left < 0 else window_left, None if window_right < 0 else window_right)
    if softcap:
        kw["softcap"] = softcap
    if sinks is not None:
        kw["sinks"] = sinks
    if alibi is not None:
        kw["alibi_slopes"] = alibi
    return kw


def cpu_attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    block_table: Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    sinks: Tensor | None,
    alibi: Tensor | None,
) -> Tensor:
    """The cpu backend: per batch element, the fused cpu attention (fastlm's scaled_dot_product_attention under
    ``fastlm.backend("cpu")``) on the gathered keys k_cache[b, :L_b] / the pages of block_table[b]. A loop on the
    host over the lengths' values: not traceable by torch.compile (raises there; the triton backend compiles)."""
    import fastlm
    from fastlm.dispatch import tracing
    from fastlm.ops.attention import scaled_dot_product_attention

    if tracing():
        raise UnsupportedCaseError(
            "the cpu backend's attention_with_kvcache under torch.compile (it loops over the cached lengths on the "
            "host); call it outside the compiled region, or use the triton backend"
        )

    B, Sq, H, D = q.shape
    kw = _cpu_modifiers(window_left, window_right, softcap, sinks, alibi)
    out = torch.empty(q.shape, dtype=q.dtype)
    with fastlm.backend("cpu"):
        for b in range(B):
            L = int(seqlens_k[b])
            if L == 0:
                out[b] = 0
                continue
            k, v = (_keys_of(c, b, L, block_table).transpose(0, 1)[None] for c in (k_cache, v_cache))  # (1,Hkv,L,D)
            bkw = dict(kw)
            if "alibi_slopes" in bkw:
                bkw["alibi_slopes"] = alibi[b : b + 1]
            o = scaled_dot_product_attention(
                q[b].transpose(0, 1)[None], k, v, scale=scale, enable_gqa=k.shape[1] != H, **bkw
            )
            out[b] = o[0].transpose(0, 1)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Validation and the append


def _check_int32(t, name: str, dims: int, ref: Tensor) -> None:
    if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.dim() != dims:
        raise TypeError(
            f"{name} must be a {dims}-D int32 tensor, got {getattr(t, 'dtype', type(t).__name__)} "
            f"{list(getattr(t, 'shape', []))}"
        )
    check_device(t, name, ref, "q")


def _append(cache: Tensor, new: Tensor, pos: Tensor, block_table: Tensor | None) -> None:
    """cache[b, pos[b, t]] = new[b, t] in place (paged: row pos % bs of page block_table[b, pos // bs]); no host
    sync. Positions and pages are clamped into the cache (valid inputs are unchanged; see the docstring of
    attention_with_kvcache)."""
    B = new.shape[0]
    bidx = torch.arange(B, device=new.device)[:, None].expand_as(pos)
    if block_table is None:
        cache.index_put_((bidx, pos.clamp(0, cache.shape[1] - 1)), new)
        return
    bs = cache.shape[1]
    pos = pos.clamp(0, block_table.shape[1] * bs - 1)
    page = block_table.long()[bidx, pos // bs].clamp(0, cache.shape[0] - 1)
    cache.index_put_((page, pos % bs), new)


# ---------------------------------------------------------------------------------------------------------------
# Public function


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    *,
    cache_seqlens: Tensor,
    block_table: Tensor | None = None,
    is_causal: bool = True,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Append ``k``/``v`` to a KV cache in place and attend to the cache: FlashAttention's ``flash_attn_with_kvcache``.
    Inference only (no autograd: raises if an input requires grad under grad mode).

    Args:
        q: ``(B, Sq, H, D)`` queries (Sq small for decode; any Sq works); fp16/bf16/fp32, D <= 256, unit last stride.
        k_cache, v_cache: ``(B, S_max, Hkv, D)``, or paged ``(num_blocks, block_size, Hkv, D)`` with
            ``block_table`` (block_size a multiple of 16); q's dtype and device, unit last stride, H % Hkv == 0.
        k, v: ``(B, S_new, Hkv, D)`` new keys/values (both or neither): written into the cache at positions
            ``cache_seqlens[b] .. cache_seqlens[b] + S_new - 1`` (in place; ``cache_seqlens`` is not advanced: the
            caller does that, as with FlashAttention).
        cache_seqlens: ``(B,)`` int32, the tokens already cached per sequence.
        block_table: ``(B, max_blocks)`` int32 page indices: position p of sequence b is row ``p % block_size``
            of page ``block_table[b, p // block_size]``. Pages may be shared for reading (a common prefix), but a
            page that an append writes into must belong to one sequence (as in FlashAttention: two sequences
            appending into one page overwrite each other).
        is_causal: query i sees keys j <= i + L_b - Sq, bottom-right aligned, with L_b = cache_seqlens[b] + S_new
            the keys of sequence b (the last query sees every key)::

                keys ->      Sq = 2, L_b = 5
                q0  x x x x .
                q1  x x x x x

        window: ``(left, right)`` (None = unbounded on that side): query i sees keys i + off - left .. i + off +
            right, off = L_b - Sq; with ``is_causal`` right = 0.
        softcap: scores become ``softcap * tanh(s / softcap)``. sinks: ``(H,)`` per-head sink logits joining each
            row's softmax denominator (natural units, not scaled). alibi_slopes: ``(H,)`` or ``(B, H)``, bias
            ``-slope * |i + off - j|``. scale: defaults to ``1 / sqrt(D)``.

    Values of cache_seqlens and block_table are checked (ValueError) where that costs no device sync: CPU tensors in
    eager mode. On CUDA (and while torch.compile traces) nothing is read on the host; positions, lengths and page
    indices are clamped into the cache on the device, so bad values give unspecified results (wrong rows written
    and read), never an out-of-bounds access.

    Returns:
        ``(B, Sq, H, D)`` in q's dtype. A query with no visible key gets zeros.
    """
    if not isinstance(q, Tensor):
        raise TypeError(f"q must be a Tensor, got {type(q).__name__}")
    backend = resolve("attention_with_kvcache", q, size="decode")
    dtypes = (*FUSED_DTYPES, torch.float64) if backend == "torch" else FUSED_DTYPES
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(t, name, backend, dtypes)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {list(t.shape)}")
        check_device(t, name, q, "q")
        if name != "q" and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit last stride (the cache is written in place), got {t.stride()}")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise TypeError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have one shape, got {list(k_cache.shape)}, {list(v_cache.shape)}")
    B, Sq, H, D = q.shape
    Hkv = k_cache.shape[2]
    if k_cache.shape[3] != D or not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q and the cache must share a head dim in [1, {MAX_HEAD_DIM}], got {D}, {k_cache.shape[3]}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q's heads ({H}) must be a multiple of the cache's kv heads ({Hkv})")
    paged = block_table is not None
    if paged:
        _check_int32(block_table, "block_table", 2, q)
        if block_table.shape[0] != B:
            raise ValueError(f"block_table must have B = {B} rows, got {list(block_table.shape)}")
        if k_cache.shape[1] % PAGE_MULTIPLE or k_cache.shape[1] == 0:
            raise ValueError(
                f"a paged cache's block_size must be a multiple of {PAGE_MULTIPLE}, got {k_cache.shape[1]}"
            )
        if k_cache.shape[0] == 0:
            raise ValueError("a paged cache must have at least one block (k_cache.shape[0] == 0)")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        if k_cache.shape[0] != B:
            raise ValueError(
                f"k_cache must be (B = {B}, S_max, Hkv, D) without a block_table, got {list(k_cache.shape)}"
            )
        capacity = k_cache.shape[1]
    _check_int32(cache_seqlens, "cache_seqlens", 1, q)
    if cache_seqlens.shape[0] != B:
        raise ValueError(f"cache_seqlens must have B = {B} entries, got {list(cache_seqlens.shape)}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or both None)")
    S_new = 0
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            check_tensor(t, name, backend, dtypes)
            check_device(t, name, q, "q")
            if t.dtype != q.dtype:
                raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
            if t.dim() != 4 or t.shape[0] != B or t.shape[2:] != k_cache.shape[2:] or t.shape != k.shape:
                raise ValueError(
                    f"k and v must be (B, S_new, Hkv, D) = ({B}, S_new, {Hkv}, {D}), got {list(k.shape)}, "
                    f"{list(v.shape)}"
                )
        S_new = k.shape[1]
    if torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in (q, k_cache, v_cache, k, v, sinks, alibi_slopes)
    ):
        raise RuntimeError(
            "attention_with_kvcache is inference only (no backward): an input requires grad; call it under "
            "torch.no_grad() / torch.inference_mode() or detach the inputs"
        )
    left, right = (-1, 0 if is_causal else -1) if window is None else window_sides(window, bool(is_causal))
    softcap = check_softcap(softcap)
    sinks = check_sinks(sinks, H, q)
    sinks = None if sinks is None else sinks.contiguous()
    alibi_slopes = check_alibi(alibi_slopes, (B,), H, q)  # (B, H) fp32
    if host_readable(cache_seqlens) and B:
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0 or hi + S_new > capacity:
            raise ValueError(
                f"cache_seqlens + S_new must be in [0, {capacity}] (the cache's capacity), got cache_seqlens in "
                f"[{lo}, {hi}] and S_new = {S_new}"
            )
        if paged and host_readable(block_table):
            bs = k_cache.shape[1]
            used = torch.arange(block_table.shape[1])[None, :] < ((cache_seqlens + S_new + bs - 1) // bs)[:, None]
            bad = used & ((block_table < 0) | (block_table >= k_cache.shape[0]))
            if bool(bad.any()):
                b, j = (int(x) for x in bad.nonzero()[0])
                raise ValueError(
                    f"block_table[{b}, {j}] = {int(block_table[b, j])} points outside the cache's "
                    f"{k_cache.shape[0]} blocks"
                )
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if backend == "cuda":  # (auto picks triton on CUDA)
        raise UnsupportedCaseError(
            "the cuda backend has no attention_with_kvcache (the split-KV kernel is Triton's); use "
            "fastlm.backend('triton') or 'auto'"
        )
    if S_new:
        pos = cache_seqlens[:, None].long() + torch.arange(S_new, device=q.device)  # (B, S_new)
        _append(k_cache, k, pos, block_table)
        _append(v_cache, v, pos, block_table)
    seqlens_k = cache_seqlens + S_new if S_new else cache_seqlens
    if q.numel() == 0:
        return torch.empty_like(q)
    modifiers = (left, right, softcap, sinks, alibi_slopes)
    args = (q, k_cache, v_cache, seqlens_k, block_table, scale, *modifiers)
    if backend == "triton":
        return attention_decode_triton(q if q.stride(-1) == 1 else q.contiguous(), *args[1:])[0]
    if backend == "cpu":  # both loop over the batch reading the lengths on the host
        return cpu_attention_with_kvcache(*args)
    return reference_attention_with_kvcache(*args)
