"""The score modifiers of fastlm's attention (sliding window, soft-capping, sinks, ALiBi): their validation and the
op arguments they become. Shared by ``scaled_dot_product_attention``, ``varlen_attention`` and
``attention_with_kvcache`` (and the torch reference), so that every entry point reads them the same way.

Semantics, for query i and key j of a sequence with Sq queries and Sk keys (``off = Sk - Sq``, bottom-right
alignment as FlashAttention's):
    s = scale * q_i . k_j
    s = softcap * tanh(s / softcap)                     (softcap)
    s = s - slope[b, h] * |i + off - j|                  (alibi_slopes)
    s = s + mask (additive) / -inf where mask is False    (attn_mask)
    -inf where j > i                                      (is_causal, top-left as torch; without a window)
    -inf where j < i + off - left or j > i + off + right (window; with is_causal right = 0: bottom-right causal)
    p = exp(s) / (sum_j exp(s) + exp(sink[h]))            (sinks: a per-head logit in the denominator, unscaled)
"""

from typing import NamedTuple

import torch
from torch import Tensor


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
