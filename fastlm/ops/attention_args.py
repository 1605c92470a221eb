"""The arguments of fastlm's attention entry points (``scaled_dot_product_attention``, ``varlen_attention``,
``attention_with_kvcache``): their checks, torch's broadcasting of leading dims, the ops' ``rng`` input, and the
score modifiers (sliding window, soft-capping, sinks, ALiBi) with the op arguments they become, so that every entry
point (and the torch reference) reads them the same way.

The modifiers' semantics, for query i and key j of a sequence with Sq queries and Sk keys (``off = Sk - Sq``,
bottom-right alignment as FlashAttention's):
    s = scale * q_i . k_j
    s = softcap * tanh(s / softcap)                     (softcap)
    s = s - slope[b, h] * |i + off - j|                  (alibi_slopes)
    s = s + mask (additive) / -inf where mask is False    (attn_mask)
    -inf where j > i                                      (is_causal, top-left as torch; without a window)
    -inf where j < i + off - left or j > i + off + right (window; with is_causal right = 0: bottom-right causal)
    p = exp(s) / (sum_j exp(s) + exp(sink[h]))            (sinks: a per-head logit in the denominator, unscaled)
"""

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastlm.dispatch import UnsupportedCaseError, host_readable, size_class, tracing
from fastlm.ops.registry import check_tensor

MAX_HEAD_DIM = 256


class Modifiers(NamedTuple):
    """The op arguments of the modifiers: window sides (-1 = unbounded), softcap (0.0 = none), sinks (H,) and alibi
    slopes (B, H) as float32 tensors (or None), and the op's top-left ``causal`` flag."""

    window_left: int
    window_right: int
    softcap: float
    sinks: Tensor | None
    alibi: Tensor | None
    causal: bool


def window_sides(window, is_causal: bool) -> tuple[int, int]:
    """``window`` = (left, right), each side an int >= 0 or None (unbounded) -> (left, right) with -1 for unbounded.
    With ``is_causal`` the right side is 0 (a window given with is_causal must have right None or 0)."""
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be None or a (left, right) pair of ints >= 0 or None, got {window!r}")
    sides = []
    for name, w in zip(("left", "right"), window, strict=True):
        if w is None:
            sides.append(-1)
        elif isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(f"window {name} size must be an int >= 0 or None (unbounded), got {w!r}")
        else:
            sides.append(int(w))
    left, right = sides
    if is_causal:
        if right > 0:
            raise ValueError(f"window={tuple(window)} with is_causal=True: the right size must be 0 or None")
        right = 0
    return left, right


def check_softcap(softcap) -> float:
    """None -> 0.0 (off); else a finite float > 0."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0.0 < float(softcap) < float("inf"):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    return float(softcap)


def check_sinks(sinks, H: int, ref: Tensor) -> Tensor | None:
    """``sinks`` (H,) floating tensor on ``ref``'s device -> float32 (differentiable cast), or None."""
    if sinks is None:
        return None
    if not isinstance(sinks, Tensor) or not sinks.is_floating_point():
        raise TypeError(f"sinks must be a floating-point Tensor of shape ({H},), got {getattr(sinks, 'dtype', sinks)}")
    if tuple(sinks.shape) != (H,):
        raise ValueError(f"sinks must have shape ({H},) (one logit per query head), got {list(sinks.shape)}")
    if sinks.device != ref.device:
        raise ValueError(f"sinks is on {sinks.device} but query is on {ref.device}")
    return sinks.float()


def check_alibi(slopes, lead: tuple, H: int, ref: Tensor) -> Tensor | None:
    """``slopes`` broadcastable to ``(*lead, H)`` ((H,) or (B, H) for a 4-D query) -> (prod(lead), H) float32
    contiguous, or None. Slopes are not trainable."""
    if slopes is None:
        return None
    if not isinstance(slopes, Tensor) or not slopes.is_floating_point():
        raise TypeError(f"alibi_slopes must be a floating-point Tensor, got {getattr(slopes, 'dtype', slopes)}")
    if slopes.device != ref.device:
        raise ValueError(f"alibi_slopes is on {slopes.device} but query is on {ref.device}")
    if slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError("alibi_slopes requires grad, but the fused attention gives the slopes no gradient")
    full = (*lead, H)
    try:
        expanded = slopes.detach().expand(full)
    except RuntimeError:
        raise ValueError(
            f"alibi_slopes must be ({H},) or broadcastable to {list(full)} (batch, heads), got {list(slopes.shape)}"
        ) from None
    n = 1
    for d in lead:
        n *= d
    return expanded.reshape(n, H).float().contiguous()


def modifiers(window, softcap, sinks, alibi_slopes, is_causal: bool, equal_lengths: bool, lead: tuple, H: int, ref):
    """Validate the modifier keywords of one call and return its :class:`Modifiers` (``lead``: the batch dims the
    slopes broadcast over; ``ref``: the query). With a window, the op's top-left ``causal`` flag stays on only where
    it equals the window's bottom-right causal edge (``equal_lengths``: Sq == Sk; False for varlen, where each
    sequence's alignment comes from the window)."""
    if window is None:
        left, right, causal = -1, -1, bool(is_causal)
    else:
        left, right = window_sides(window, is_causal)
        causal = bool(is_causal) and equal_lengths
    return Modifiers(
        left,
        right,
        check_softcap(softcap),
        check_sinks(sinks, H, ref),
        check_alibi(alibi_slopes, lead, H, ref),
        causal,
    )


def check_qkv(q: Tensor, k: Tensor, v: Tensor, backend: str, min_dim: int) -> None:
    for name, t in (("query", q), ("key", k), ("value", v)):
        check_tensor(t, name, backend)
        if t.dim() < min_dim:
            raise ValueError(f"{name} must have at least {min_dim} dims, got shape {list(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"query, key and value must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"query, key and value must be on one device, got {q.device}, {k.device}, {v.device}")
    D = q.shape[-1]
    if k.shape[-1] != D or v.shape[-1] != D:
        raise ValueError(
            f"query, key and value must share the head dim, got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}"
        )
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got {D}")


def rows_16b_aligned(t: Tensor) -> bool:
    """Every row of ``t`` (its last dim, unit stride) starts on a 16-byte boundary: the stride of every other dim of
    size > 1 is a multiple of 16 bytes, and so is the base address (what the CUDA C++ attention kernels read). While
    torch.compile traces, the address is unknown (fake tensors) and only the strides are checked; the C++ ops check
    the address again and raise a clear error."""
    strides_ok = all(
        (st * t.element_size()) % 16 == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1], strict=True) if n > 1
    )
    return strides_ok and (tracing() or t.data_ptr() % 16 == 0)


CUDA_HEAD_DIMS = (64, 128)


def check_cuda_case(q: Tensor, k: Tensor, v: Tensor) -> None:
    """The CUDA C++ kernels cover dense fp16/bf16 attention with head dims 64 and 128, causal or not, GQA, rows
    aligned to 16 bytes (varlen, masks and dropout: ``dispatch.LACKS``); other inputs raise, naming the case (use
    the triton backend or auto for them)."""
    case = None
    if q.dtype not in (torch.float16, torch.bfloat16):
        case = f"dtype {q.dtype}"
    elif q.shape[-1] not in CUDA_HEAD_DIMS:
        case = f"head dim {q.shape[-1]} (has {CUDA_HEAD_DIMS})"
    else:
        for name, t in (("query", q), ("key", k), ("value", v)):
            if not rows_16b_aligned(t):
                case = f"{name} rows not 16-byte aligned (strides {t.stride()})"
    if case is not None:
        raise UnsupportedCaseError(
            f"the cuda backend's attention does not support {case}; use fastlm.backend('triton') or 'auto'"
        )


def check_call(mask, dropout_p: float) -> None:
    """The arguments the backend choice reads, checked before it (a bad one is a bad argument on every backend)."""
    if mask is not None and not isinstance(mask, Tensor):
        raise TypeError(f"attn_mask must be a Tensor or None, got {type(mask).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def call_features(mask, dropout_p: float, varlen: bool, window=None, softcap=None, sinks=None, alibi=None) -> tuple:
    """The call's features that some backends lack (``dispatch.LACKS``): the backend choice is dispatch's."""
    mask_grad = isinstance(mask, Tensor) and mask.dtype != torch.bool and mask.requires_grad and torch.is_grad_enabled()
    on = (
        ("mask", mask is not None),
        ("dropout", dropout_p > 0),
        ("varlen", varlen),
        ("window", window is not None),
        ("softcap", softcap is not None),
        ("sinks", sinks is not None),
        ("alibi", alibi is not None),
        ("mask_grad", mask_grad),
    )
    return tuple(f for f, flag in on if flag)


_UNUSED_RNG: dict = {}  # device -> a (1,) int64 zero, the ``rng`` input of calls without dropout


def rng_input(dropout_p: float, device: torch.device) -> Tensor:
    """The ``rng`` input of the ops, on ``device``: dropout's seed drawn there from its default generator (no host
    value, so CUDA graphs and torch.compile keep it fresh per call); without dropout an unused zero, made once per
    device in eager mode (no allocation per call, and no CPU tensor in a compiled CUDA graph)."""
    if dropout_p > 0.0:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    if tracing():
        return torch.zeros(1, dtype=torch.int64, device=device)
    unused = _UNUSED_RNG.get(device)
    if unused is None:
        unused = _UNUSED_RNG[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return unused


def checked_offsets(cu: Tensor, name: str, total: int, max_len: int) -> Tensor:
    """``cu`` (varlen offsets) checked on the host where that costs no sync (CPU, eager: ValueError naming what is
    wrong), else made memory-safe on the device: clamped into [0, total] and non-decreasing (unchanged when valid)."""
    if host_readable(cu):
        d = cu[1:] - cu[:-1]
        if cu[0] != 0 or cu[-1] != total or bool((d < 0).any()):
            raise ValueError(f"{name} must start at 0, be non-decreasing and end at {total}; got {cu.tolist()[:8]}")
        if int(d.max()) > max_len:
            raise ValueError(f"a sequence in {name} has length {int(d.max())} > max_seqlen {max_len}")
        return cu
    return torch.cummax(cu.clamp(0, total), 0).values


DECODE_MAX_Q, DECODE_MIN_K = 16, 256  # a call with few queries against many keys: auto's size class "decode"


def attention_size(query: Tensor, key: Tensor) -> str:
    """auto's size class of an SDPA call (fastlm.dispatch.resolve): ``decode`` for at most 16 queries against at
    least 256 keys, else by the query's element count (``small`` / ``large``)."""
    if not (isinstance(query, Tensor) and isinstance(key, Tensor) and query.dim() >= 2 and key.dim() >= 2):
        return "large"  # not tensors: the checks after the backend choice raise
    if query.shape[-2] <= DECODE_MAX_Q and key.shape[-2] >= DECODE_MIN_K:
        return "decode"
    return size_class(query)


def unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()  # a non-unit last stride: one copy


def broadcast_qkv(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool):
    """torch SDPA's broadcasting: the dims before the head dim (-3) broadcast across query, key and value; heads
    broadcast when one side has 1 (a 1-head query against H kv heads gives H output heads; 1 kv head serves every
    query head), else H % Hkv == 0 needs ``enable_gqa``. Returns (q, k, v) as (B, heads, S, D) views (no copy where
    the expanded dims merge), the broadcast leading shape, the query head count, and the output shape."""
    qs, ks, vs = query.shape, key.shape, value.shape
    if (  # the common case, (B, H, S, D) with equal batch, as the kernels take it: no broadcasting work at all
        len(qs) == 4
        and len(ks) == 4
        and ks == vs
        and qs[0] == ks[0]
        and qs[3] == ks[3]
        and (qs[1] == ks[1] or (enable_gqa and qs[1] % ks[1] == 0))
        and query.stride(-1) == 1
        and key.stride(-1) == 1
        and value.stride(-1) == 1
    ):
        return query, key, value, (qs[0],), qs[1], qs
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"key and value must have the same sequence length, got key {list(key.shape)}, value {list(value.shape)}"
        )
    q3, k3, v3 = (t.reshape(1, *t.shape) if t.dim() == 2 else t for t in (query, key, value))
    try:
        lead = torch.broadcast_shapes(q3.shape[:-3], k3.shape[:-3], v3.shape[:-3])
    except RuntimeError:
        raise ValueError(
            f"the batch dims of query {list(query.shape)}, key {list(key.shape)} and value {list(value.shape)} do not "
            "broadcast"
        ) from None
    Hq, Hk, Hv = q3.shape[-3], k3.shape[-3], v3.shape[-3]
    if Hk != Hv:
        if min(Hk, Hv) != 1:
            raise ValueError(f"key has {Hk} heads and value {Hv}: they must be equal (or one of them 1)")
        Hk = Hv = max(Hk, Hv)
    H = Hq
    if Hq != Hk:
        if Hq == 1:  # one query head against Hk kv heads: the query broadcasts
            H = Hk
        elif not (Hk == 1 or (enable_gqa and Hq % Hk == 0)):
            raise ValueError(
                f"query has {Hq} heads and key/value {Hk}: they must be equal, or enable_gqa=True with H a multiple "
                "of Hkv"
            )
    B = math.prod(lead)
    Sq, Sk, D = q3.shape[-2], k3.shape[-2], q3.shape[-1]
    q4 = unit_last(q3).expand(*lead, H, Sq, D).reshape(B, H, Sq, D)
    k4, v4 = (unit_last(t).expand(*lead, Hk, Sk, D).reshape(B, Hk, Sk, D) for t in (k3, v3))
    out_shape = (*lead, H, Sq, D)[-max(query.dim(), key.dim(), value.dim()) :]
    return q4, k4, v4, tuple(lead), H, out_shape
