"""Per-token log-probabilities of selected tokens from an LM head's hidden states, without the (tokens, vocab) logits:
the primitive of the post-training losses (fastlm/ops/preference.py), TRL's ``selective_log_softmax`` of
``(hidden @ weight.T + bias) / temperature`` at ``target``.

    logps[*] = log softmax((hidden[*] @ weight.T + bias) / temperature)[target[*]]    (0 where target == ignore_index)

It is the linear cross-entropy's fused path with ``reduction="none"`` (fastlm/ops/linear_cross_entropy.py), negated:
the forward runs the chunks' logits matmul and the fused row kernel (the Triton cross-entropy kernel, or the cpu
backend's csrc/cpu/cross_entropy.cpp) and keeps only the per-token results; the backward takes the incoming per-token
gradients, whatever loss was computed on the log-probabilities, recomputes each chunk's logits and folds those
gradients into the row kernel's gradient sweep, then the grad_input / grad_weight matmuls (four matmuls in all, one
(chunk, V) buffer). The temperature divides the hidden states and the bias before the matmul (the same logits).
"""

import torch
import torch.nn.functional as TF
from torch import Tensor

from fastlm.dispatch import resolve
from fastlm.ops import sharded_params, vocab_parallel
from fastlm.ops.cross_entropy import check_target_range, first_backward, scale_saved_grad
from fastlm.ops.linear_cross_entropy import (
    ce_rows,
    check_head,
    chunk_grads,
    chunk_logits,
    chunk_size_for,
    fused_linear_cross_entropy,
    linear_cross_entropy,
)
from fastlm.ops.packed import RowLayout
from fastlm.ops.registry import autocast_dtype, register


def _check(hidden: Tensor, weight: Tensor, target: Tensor, temperature: float) -> None:
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden (*, H) and weight (V, H) must share H: got {list(hidden.shape)} and {list(weight.shape)}"
        )
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target must have shape {list(hidden.shape[:-1])} (hidden's leading dims), got "
                         f"{list(target.shape)}")  # fmt: skip
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold class indices (int64 or int32), got {target.dtype}")


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Log-probability of each ``target`` token under ``softmax((hidden @ weight.T + bias) / temperature)``, the
    logits never materialised (chunked over tokens); differentiable with respect to ``hidden``, ``weight`` and
    ``bias`` through any loss computed on the result.

    Args:
        hidden: ``(*, H)`` hidden states (e.g. ``(B, T, H)``: shift them yourself, ``hidden[:, :-1]`` against
            ``labels[:, 1:]``, as TRL does).
        weight: ``(V, H)`` LM-head weight; bias: ``(V,)`` or None.
        target: ``(*)`` token ids (int64 / int32), ``hidden``'s leading shape; ``ignore_index`` marks positions
            without a token (prompt, padding): their log-probability is 0 and they get no gradient.
        temperature: divides the logits (GRPO's sampling temperature); > 0.
        return_entropy: also return the per-token entropy of the softmax, ``-sum_v p_v log p_v`` ((*) float32; 0
            where target is ignore_index), differentiable like the log-probabilities (fused: one more row kernel,
            fastlm/kernels/linear_logprobs.py and csrc/cpu/linear_logprobs.cpp; not for sharded or vocab-parallel
            weights: NotImplementedError).
        chunk_size: tokens per chunk (default: the linear cross-entropy's rule for the device).

    Returns:
        ``(*)`` float32 log-probabilities (float64 for float64 inputs on the ``torch`` backend), whatever the input
        dtype: per-sequence sums of bf16 log-probabilities lose about three significant digits. With
        ``return_entropy``: ``(logps, entropy)``.

    Backends: ``cpu`` and ``triton`` (fused, as ``linear_cross_entropy``), ``torch`` (full logits, log_softmax,
    gather: the reference); the CUDA C++ backend has no linear kernels (``auto`` takes Triton's). FSDP2 / ZeRO-3
    sharded weights are gathered once per call, and a vocab-sharded DTensor weight runs the vocab-parallel linear
    cross-entropy, as :func:`fastlm.functional.linear_cross_entropy` (a plain tensor on every rank; computed in
    float32 but rounded to the input's dtype on those two paths before the cast back to float32).
    """
    if not (isinstance(hidden, Tensor) and isinstance(weight, Tensor) and isinstance(target, Tensor)):
        raise TypeError("hidden, weight and target must be tensors")
    _check(hidden, weight, target, temperature)
    if temperature != 1.0:
        hidden = hidden / temperature
        bias = bias / temperature if bias is not None else None
    if return_entropy:
        return _with_entropy(hidden, weight, target, bias, ignore_index, chunk_size)
    if (
        sharded_params.needs_gather(weight, bias)
        or vocab_parallel.is_dtensor(weight)
        or vocab_parallel.is_dtensor(hidden)
    ):
        nll = linear_cross_entropy(
            hidden, weight, target, linear_bias=bias, reduction="none", ignore_index=ignore_index, chunk_size=chunk_size
        )
        if vocab_parallel.is_dtensor(nll):  # the replicated loss: every rank's local value is all of it
            nll = vocab_parallel.to_local(nll)
        return -nll.to(torch.promote_types(nll.dtype, torch.float32))
    backend = resolve("linear_cross_entropy", hidden)
    if backend == "torch":
        check_target_range(target, weight.shape[0], ignore_index)
        logits = TF.linear(hidden, weight, bias)
        lp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
        keep = target != ignore_index
        picked = lp.gather(-1, torch.where(keep, target, 0).unsqueeze(-1).to(torch.int64)).squeeze(-1)
        return torch.where(keep, picked, 0.0)
    nll = fused_linear_cross_entropy(
        hidden, weight, target, bias, None, "none", int(ignore_index), 0.0, chunk_size, backend
    )
    return -nll


# One-pass mode of the post-training losses: the most logits (in the input's dtype) one group of rows may take;
# a group is at least one unit (a preference pair, a row), and larger units run the two-pass mode.
ONE_PASS_MAX_BYTES = 1 << 30


class _OnePass(torch.autograd.Function):
    """The loss and its gradients in one sweep over row groups (see :func:`logprob_loss`); the backward only scales
    the gradients prepared in the forward."""

    @staticmethod
    def forward(ctx, x, w, b, t, layout, groups, group_loss, ignore_index, backend):
        V, B, T = w.shape[0], layout.B, layout.T
        x, w = x.contiguous(), w.contiguous()
        lp = torch.zeros(B * T, dtype=torch.float32, device=x.device)  # the (B, T) grid
        need_x, need_w, need_b = ctx.needs_input_grad[:3]  # a frozen head (LoRA): no grad_weight matmul, no (V, H)
        gx = torch.zeros_like(x) if need_x else None
        gw = None
        gb = torch.zeros(V, dtype=torch.float32, device=x.device) if b is not None and need_b else None
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        cols = torch.arange(T, device=x.device)
        parts = [(rows.to(x.device, non_blocking=True), *layout.tokens(rows, x.device)) for rows in groups]
        buf = x.new_empty((max((p[1].numel() for p in parts), default=0), V))
        for rows, toks, local in parts:
            k, n = rows.numel(), toks.numel()
            xg = x.index_select(0, toks)
            tg = t.index_select(0, toks)
            logits = chunk_logits(buf[:n], xg, w, b)
            lp_tok = ce_rows(logits, tg, None, ignore_index, 0.0, backend, False).neg_()
            lpg = lp_tok.new_zeros(k * T).index_put_((local,), lp_tok).view(k, T).requires_grad_()
            with torch.enable_grad():
                lg = group_loss(lpg, rows)
            dlp = torch.autograd.grad(lg, lpg, allow_unused=True)[0] if lg.requires_grad else None
            # d loss / d nll = -d loss / d logp, per token
            scale = torch.zeros_like(lp_tok) if dlp is None else dlp.reshape(-1).index_select(0, local).neg_()
            ce_rows(logits, tg, None, ignore_index, 0.0, backend, True, scale.float().contiguous())
            if gx is not None:
                gx.index_copy_(0, toks, torch.mm(logits, w))
            if need_w:
                gw = torch.mm(logits.T, xg) if gw is None else gw.addmm_(logits.T, xg)
            if gb is not None:
                gb += logits.sum(0, dtype=torch.float32)
            loss += lg.detach().float()
            lp.index_copy_(0, (rows[:, None] * T + cols).reshape(-1), lpg.detach().reshape(-1))
        if gw is None and need_w:
            gw = torch.zeros_like(w)
        ctx.save_for_backward(gx, gw, gb.to(b.dtype) if gb is not None else None)
        lp = lp.view(B, T)
        ctx.mark_non_differentiable(lp)
        return loss, lp

    @staticmethod
    def backward(ctx, dloss, _dlp):
        if torch.is_grad_enabled():  # create_graph=True: the gradients were formed in the forward, as constants
            raise RuntimeError(
                "the post-training losses' one-pass mode has no double backward (the gradients are formed in the "
                "forward): use fastlm.backend('torch') for a gradient penalty through them"
            )
        first = first_backward(ctx)  # dloss 1 on the CPU: the saved gradients themselves, no copy at the peak
        gx, gw, gb = (scale_saved_grad(g, dloss, 1, first) if g is not None else None for g in ctx.saved_tensors)
        return gx, gw, gb, None, None, None, None, None, None


def _groups(
    layout: RowLayout, V: int, paired: bool, chunk_size: int | None, x: Tensor, dtype: torch.dtype
) -> list[Tensor] | None:
    """Row groups of the one-pass mode (index tensors; a pair's group holds its chosen rows, then the same pairs'
    rejected rows), as many rows per group as the linear cross-entropy's chunk rule gives tokens (rows counted at the
    longest row's length); None when one unit's logits may exceed :data:`ONE_PASS_MAX_BYTES`."""
    unit, B, T = (2 if paired else 1), layout.B, layout.T
    if unit * T * V * dtype.itemsize > ONE_PASS_MAX_BYTES or T == 0:
        return None
    chunk = chunk_size or chunk_size_for(x.shape[0], V, x.shape[1], x.device)
    per = max(1, chunk // (unit * T))  # units per group
    units = B // unit
    out = []
    for u0 in range(0, units, per):
        r = torch.arange(u0, min(units, u0 + per))  # on the host: RowLayout.tokens builds the token indices there
        out.append(torch.cat([r, r + units]) if paired else r)
    return out


def logprob_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    group_loss,
    *,
    layout: RowLayout | None = None,
    bias: Tensor | None = None,
    paired: bool = False,
    separable: bool = True,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """A loss of the per-token log-probabilities ``lp = linear_logprobs(hidden, weight, target)`` laid out as
    ``(B, T)`` rows ((B, T) fp32, 0 at ignored and padding positions), and ``lp`` detached (for metrics):
    ``(group_loss(lp, rows), lp)`` with ``rows`` all the batch's rows.

    ``hidden`` ``(B, T, H)`` and ``target`` ``(B, T)``; or flat ``(N, H)`` and ``(N,)`` with ``layout``
    (fastlm/ops/packed.py: padded or packed rows).

    ``group_loss(lp_rows, rows)`` returns the scalar loss of the rows ``rows`` (an index tensor; ``lp_rows`` their
    log-probabilities): with ``separable``, the loss of the batch is the sum of those of disjoint row groups (units:
    a row, or with ``paired`` a preference pair, its rows ``i`` and ``i + B/2``; a group's ``rows`` are its chosen
    rows then the same pairs' rejected rows). Then the fused backends run it in one pass (three matmuls instead of
    four): for each group of rows (about a linear cross-entropy chunk of tokens), its logits -> the fused row
    kernel's log-probabilities -> the group's loss and its gradient with respect to the log-probabilities (autograd
    on (rows, T) values) -> the row kernel's gradient sweep scaled by it -> grad_input rows and the grad_weight
    accumulation; the backward only scales them. Else (a loss that couples all rows, torch.compile, the torch
    backend, sharded weights, fp16 matmuls, a unit over :data:`ONE_PASS_MAX_BYTES` of logits, no gradient
    needed): two passes,
    ``group_loss(linear_logprobs(...), all rows)`` and the backward of ``linear_logprobs``.
    """
    if not (isinstance(hidden, Tensor) and isinstance(weight, Tensor) and isinstance(target, Tensor)):
        raise TypeError("hidden, weight and target must be tensors")
    _check(hidden, weight, target, temperature)
    if layout is None:
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be (B, T, H) without a layout, got {list(hidden.shape)}")
        layout = RowLayout(hidden.shape[0], hidden.shape[1], None)
        hidden, target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    groups = None
    backend = None
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    plain = not (
        sharded_params.needs_gather(weight, bias)
        or vocab_parallel.is_dtensor(weight)
        or vocab_parallel.is_dtensor(hidden)
    )
    if paired and layout.B % 2:
        raise ValueError(f"a paired loss needs chosen then rejected rows (2P rows), got an odd batch of {layout.B}")
    # the matmuls' dtype: fp16 runs the two passes, whose backward folds the incoming gradient (a GradScaler's
    # factor) into the row kernel's fp32 gradient sweep before the one rounding to fp16 (linear_cross_entropy's
    # `deferred`); one pass would round unscaled gradients (p / N underflows fp16)
    dtype = autocast_dtype(hidden) or hidden.dtype
    one_pass = separable and needs_grad and plain and dtype != torch.float16 and not torch.compiler.is_compiling()
    if one_pass:
        backend = resolve("linear_cross_entropy", hidden)
        if backend in ("cpu", "triton"):
            groups = _groups(layout, weight.shape[0], paired, chunk_size, hidden, dtype)
    if groups is None:
        lp = linear_logprobs(hidden, weight, target, bias=bias, temperature=temperature, ignore_index=ignore_index,
                             chunk_size=chunk_size)  # fmt: skip
        lp = layout.pad(lp, 0.0)
        return group_loss(lp, torch.arange(layout.B, device=hidden.device)), lp.detach()
    if temperature != 1.0:
        hidden = hidden / temperature
        bias = bias / temperature if bias is not None else None
    x, w, b = check_head(hidden, weight, bias)
    check_target_range(target, w.shape[0], ignore_index)
    with torch.autocast(x.device.type, enabled=False):
        return _OnePass.apply(x, w, b, target.to(torch.int64), layout, groups, group_loss, int(ignore_index), backend)


# ---- return_entropy=True: the log-probabilities and the entropies from one more row kernel (the fused linear
# cross-entropy's chunk loop, with fastlm/kernels/linear_logprobs.py or csrc/cpu/linear_logprobs.cpp per chunk), as a
# registered op pair (forward; backward recomputing each chunk's logits) so that torch.compile traces it.


def _rows_fake(input, target, ignore_index, grad_lp, grad_ent, grad):
    rows = input.new_empty((input.shape[0],), dtype=torch.float32)
    return rows, rows.clone()


# fastlm::logprob_entropy_rows_cpu (schema and contract in csrc/ops.cpp)
LOGPROB_ENTROPY_ROWS = register("logprob_entropy_rows", _rows_fake, backends=("cpu",))


def entropy_rows(logits, t, ignore_index, backend, grad_lp=None, grad_ent=None):
    """(lp, entropy) fp32 per row of a chunk's logits; with the incoming gradients ((rows,) fp32 each), the
    gradient of ``sum(grad_lp * lp + grad_ent * entropy)`` written over ``logits``."""
    if backend == "triton":
        from fastlm.kernels import linear_logprobs as k

        return k.logprob_entropy_rows(logits, t, ignore_index, grad_lp, grad_ent)
    grad = logits if grad_lp is not None else None
    return LOGPROB_ENTROPY_ROWS["cpu"](logits, t, ignore_index, grad_lp, grad_ent, grad)


@torch.library.custom_op("fastlm::linear_logprobs_entropy_fwd", mutates_args=())
def linear_logprobs_entropy_fwd(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, ignore_index: int,
    chunk_size: int, backend: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per token (fp32): the target's log-probability and the softmax's entropy; input (T, H), target (T,) int64."""
    T, V = input.shape[0], linear_weight.shape[0]
    lp = torch.empty(T, dtype=torch.float32, device=input.device)
    ent = torch.empty(T, dtype=torch.float32, device=input.device)
    buf = input.new_empty((min(chunk_size, T), V))
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        logits = chunk_logits(buf[: e - s], input[s:e], linear_weight, linear_bias)
        lp[s:e], ent[s:e] = entropy_rows(logits, target[s:e], ignore_index, backend)
    return lp, ent


@linear_logprobs_entropy_fwd.register_fake
def _fwd_fake(input, linear_weight, linear_bias, target, ignore_index, chunk_size, backend):
    lp = input.new_empty((input.shape[0],), dtype=torch.float32)
    return lp, lp.clone()


@torch.library.custom_op("fastlm::linear_logprobs_entropy_bwd", mutates_args=())
def linear_logprobs_entropy_bwd(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, grad_lp: Tensor,
    grad_ent: Tensor, ignore_index: int, chunk_size: int, backend: str, weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The backward: each chunk's logits recomputed, the row kernel writes the gradient of ``grad_lp * lp +
    grad_ent * entropy`` over them, then the grad_input / grad_weight matmuls and the bias's column sums. Without
    ``weight_grad`` (a frozen head) no grad_weight matmul and an empty (0,) grad_weight."""

    def rows(g, s, e):
        entropy_rows(g, target[s:e], ignore_index, backend, grad_lp[s:e], grad_ent[s:e])

    gx, gw, gb = chunk_grads(input, linear_weight, linear_bias, chunk_size, rows, weight_grad)
    return gx, gw, (gb if gb is not None else input.new_empty((0,)))


@linear_logprobs_entropy_bwd.register_fake
def _bwd_fake(
    input, linear_weight, linear_bias, target, grad_lp, grad_ent, ignore_index, chunk_size, backend, weight_grad
):
    gb = linear_bias.new_empty(linear_bias.shape) if linear_bias is not None else input.new_empty((0,))
    gw = linear_weight.new_empty(linear_weight.shape if weight_grad else (0,))
    return input.new_empty(input.shape), gw, gb


def _ent_setup(ctx, inputs, output):
    x, w, b, t, ignore_index, chunk, backend = inputs
    ctx.save_for_backward(x, w, b, t)
    ctx.args = (ignore_index, chunk, backend)


def _ent_backward(ctx, dlp, dent):
    x, w, b, t = ctx.saved_tensors
    ignore_index, chunk, backend = ctx.args
    zeros = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    dlp = zeros if dlp is None else dlp.float().contiguous()
    dent = zeros if dent is None else dent.float().contiguous()
    need_w = ctx.needs_input_grad[1]
    gx, gw, gb = linear_logprobs_entropy_bwd(x, w, b, t, dlp, dent, ignore_index, chunk, backend, need_w)
    return gx, (gw if need_w else None), (gb if b is not None else None), None, None, None, None


torch.library.register_autograd("fastlm::linear_logprobs_entropy_fwd", _ent_backward, setup_context=_ent_setup)


def _with_entropy(hidden, weight, target, bias, ignore_index, chunk_size) -> tuple[Tensor, Tensor]:
    """linear_logprobs(..., return_entropy=True) once the temperature is applied."""
    if (
        sharded_params.needs_gather(weight, bias)
        or vocab_parallel.is_dtensor(weight)
        or vocab_parallel.is_dtensor(hidden)
    ):
        raise NotImplementedError(
            "linear_logprobs(return_entropy=True) takes plain tensors: not FSDP2 / ZeRO-3 sharded or vocab-parallel "
            "DTensor weights (the entropy needs statistics combined over the vocabulary shards)"
        )
    backend = resolve("linear_cross_entropy", hidden)
    keep = target != ignore_index
    if backend == "torch":
        check_target_range(target, weight.shape[0], ignore_index)
        logits = TF.linear(hidden, weight, bias)
        ls = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
        picked = ls.gather(-1, torch.where(keep, target, 0).unsqueeze(-1).to(torch.int64)).squeeze(-1)
        # p log p -> 0 for a -inf logit (log p masked before the product: a where after it has NaN gradients)
        ent = -(ls.exp() * torch.where(ls > float("-inf"), ls, 0.0)).sum(-1)
        return torch.where(keep, picked, 0.0), torch.where(keep, ent, 0.0)
    x, w, b = check_head(hidden, weight, bias)
    check_target_range(target, w.shape[0], ignore_index)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    chunk = chunk_size or chunk_size_for(x2.shape[0], w.shape[0], x2.shape[1], x2.device)
    if chunk < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    with torch.autocast(x.device.type, enabled=False):
        lp, ent = linear_logprobs_entropy_fwd(
            x2, w.contiguous(), b, target.reshape(-1).to(torch.int64), int(ignore_index), int(chunk), backend
        )
    return lp.view(target.shape), ent.view(target.shape)
