"""Plain-PyTorch references: the ``torch`` backend, the oracle of the tests and the eager baseline of the benchmarks.

Called with float64 tensors they are the tests' high-precision reference.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Unfused ``h = input + residual; (layer_norm(h), h)``."""
    h = input + residual
    return TF.layer_norm(h, normalized_shape, weight, bias, eps), h


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Unfused ``h = input + residual; (rms_norm(h), h)``."""
    h = input + residual
    return TF.rms_norm(h, normalized_shape, weight, eps), h


def scaled_masked_softmax(
    input: Tensor, mask: Tensor | None = None, scale: float = 1.0, is_causal: bool = False
) -> Tensor:
    """Unfused ``softmax(input * scale + mask)`` over the last dim, in float32 (float64 for float64 input); fully
    masked rows give zeros."""
    s = input.to(torch.promote_types(input.dtype, torch.float32)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    if is_causal:
        Sq, Sk = s.shape[-2:]
        keep = torch.ones(Sq, Sk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)
    return p.masked_fill(empty, 0.0).to(input.dtype)


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
    window=None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
) -> Tensor:
    """torch's SDPA, plus fastlm's score modifiers computed explicitly (fastlm/ops/attention_args.py has the
    semantics): scores, soft-cap, ALiBi bias, mask, causal/window band, softmax with the sink column, in the inputs'
    dtype (as torch's math SDPA; the tests' oracle with float64 inputs). With a modifier, queries that see no key
    (and have no sink) get zeros; without one (and without a mask together with ``is_causal``, which torch refuses)
    this is ``torch.nn.functional.scaled_dot_product_attention`` itself (NaN there)."""
    plain = window is None and softcap is None and sinks is None and alibi_slopes is None
    if plain and (attn_mask is None or not is_causal):  # (torch refuses a mask together with is_causal)
        return TF.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    from fastlm.ops.attention_args import check_softcap, window_sides

    cdt = query.dtype
    q, k, v = query, key, value
    if enable_gqa and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        k, v = (t.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3) for t in (k, v))
    Sq, Sk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    cap = check_softcap(softcap)
    if cap > 0.0:
        s = cap * torch.tanh(s / cap)
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    dist = (i + (Sk - Sq) - j).abs().to(cdt)  # bottom-right aligned
    if alibi_slopes is not None:
        s = s - alibi_slopes.to(cdt)[..., None, None] * dist
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(cdt)
    allowed = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if window is not None:
        left, right = window_sides(window, is_causal)
        if left >= 0:
            allowed &= j >= i + (Sk - Sq) - left
        if right >= 0:
            allowed &= j <= i + (Sk - Sq) + right
    elif is_causal:
        allowed &= j <= i
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        H = s.shape[-3]
        sink = sinks.to(cdt).view(H, 1, 1).expand(*s.shape[:-1], 1)
        p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
    else:
        empty = torch.isneginf(s).all(dim=-1, keepdim=True)
        p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        p = TF.dropout(p, dropout_p)
    return torch.matmul(p, v).to(query.dtype)


def varlen_attention(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    *,
    window=None,
    softcap=None,
    sinks=None,
    alibi_slopes=None,
) -> Tensor:
    """Packed-sequence attention as a loop of SDPA calls (the one above), one per sequence: q (total_q, H, D);
    ``alibi_slopes`` (H,) or (n_seq, H)."""
    outs = []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    gqa = q.shape[1] != k.shape[1]
    for i in range(len(cq) - 1):
        qi = q[cq[i] : cq[i + 1]].transpose(0, 1)  # (H, Sq, D)
        ki = k[ck[i] : ck[i + 1]].transpose(0, 1)
        vi = v[ck[i] : ck[i + 1]].transpose(0, 1)
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[i]
        oi = scaled_dot_product_attention(
            qi,
            ki,
            vi,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=gqa,
            window=window,
            softcap=softcap,
            sinks=sinks,
            alibi_slopes=slopes,
        )
        outs.append(oi.transpose(0, 1))
    return torch.cat(outs, 0)


def swiglu(gate: Tensor, up: Tensor | None = None) -> Tensor:
    """Unfused ``silu(gate) * up``; ``up=None``: ``gate`` is the merged ``[..., 2*I]`` tensor, split by ``chunk``."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return TF.silu(gate) * up


def geglu(gate: Tensor, up: Tensor | None = None, approximate: str = "tanh") -> Tensor:
    """Unfused ``gelu(gate, approximate) * up``; ``up=None`` as in :func:`swiglu`."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return TF.gelu(gate, approximate=approximate) * up


def apply_rotary_pos_emb(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1, interleaved: bool = False
) -> tuple[Tensor, Tensor]:
    """HF transformers' rotary embedding, unfused: ``x * cos + rotate_half(x) * sin`` with the tables unsqueezed at
    ``unsqueeze_dim`` (Llama); partial rotary when ``cos.shape[-1] < head_dim`` (Phi-3: the first rot dims rotate,
    the rest pass through); ``interleaved``: Cohere's ``rotate_half`` on adjacent pairs. Dtypes follow torch's
    promotion, as in Llama's (no cast back)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]

    def rotate_half(x):
        if interleaved:
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    def embed(x):
        if rot == x.shape[-1]:
            return x * cos + rotate_half(x) * sin
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)

    return embed(q), embed(k)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    target: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> Tensor:
    """Unfused distillation loss (fastlm.functional.distillation_loss's semantics) from log_softmax, in float32 (float64
    for float64 input): per-row divergence times T^2, ignored rows left out, batchmean over the counted rows."""
    V = student_logits.shape[-1]
    ct = torch.promote_types(student_logits.dtype, torch.float32)
    lps = TF.log_softmax(student_logits.reshape(-1, V).to(ct) / temperature, dim=-1)
    lpt = TF.log_softmax(teacher_logits.reshape(-1, V).to(ct) / temperature, dim=-1)
    if kind == "jsd" and beta in (0.0, 1.0):  # the end points: the limits (forward / reverse KL), as Liger and TRL
        kind = "kl" if beta == 0.0 else "reverse_kl"
    if kind == "kl":
        rows = (lpt.exp() * (lpt - lps)).sum(-1)
    elif kind == "reverse_kl":
        rows = (lps.exp() * (lps - lpt)).sum(-1)
    else:
        ps, pt = lps.exp(), lpt.exp()
        lm = (beta * pt + (1 - beta) * ps).log()
        rows = beta * (pt * (lpt - lm)).sum(-1) + (1 - beta) * (ps * (lps - lm)).sum(-1)
    rows = rows * temperature**2
    count = torch.tensor(float(rows.shape[0]), dtype=rows.dtype, device=rows.device)
    if target is not None:
        keep = target.reshape(-1) != ignore_index
        rows = torch.where(keep, rows, torch.zeros_like(rows))
        count = keep.sum().to(rows.dtype)
    if reduction == "none":
        out = rows.reshape(student_logits.shape[:-1])
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows.sum() / count
    return out.to(student_logits.dtype)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Unfused linear cross-entropy (fastlm.functional.linear_cross_entropy's semantics): the full (tokens, V)
    logits, then torch's cross-entropy; the loss has ``target``'s shape for reduction "none"."""
    V = linear_weight.shape[0]
    logits = TF.linear(input, linear_weight, linear_bias).reshape(-1, V)
    w = weight.to(logits.dtype) if weight is not None else None
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    loss = TF.cross_entropy(logits, target.reshape(-1), w, **kw)
    return loss.reshape(target.shape) if reduction == "none" else loss


def linear_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    target: Tensor | None = None,
    kind: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    """Unfused linear distillation: both models' full logits, then (1 - hard_weight) * batchmean distillation +
    hard_weight * mean cross-entropy over the same (not ignored) rows."""
    V = student_weight.shape[0]
    s = TF.linear(student_hidden, student_weight).reshape(-1, V)
    t = TF.linear(teacher_hidden, teacher_weight).reshape(-1, V)
    tgt = target.reshape(-1) if target is not None else None
    kw = dict(kind=kind, beta=beta, temperature=temperature, target=tgt, ignore_index=ignore_index)
    loss = distillation_loss(s, t, **kw) if hard_weight < 1.0 else s.new_zeros(())
    if hard_weight > 0.0:
        loss = (1.0 - hard_weight) * loss + hard_weight * TF.cross_entropy(s, tgt, ignore_index=ignore_index)
    return loss
