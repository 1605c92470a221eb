"""Linear distillation for LM heads: the distillation loss between ``student_hidden @ student_weight.T`` and
``teacher_hidden @ teacher_weight.T`` (plus an optional hard-label cross-entropy) without ever materialising either
model's (tokens, vocab) logits.

    fastlm::linear_distillation_fwd(student_hidden, student_weight, teacher_hidden, teacher_weight, target?, kind,
                                    beta, temperature, hard_weight, ignore_index, compute_grad, weight_grad,
                                    chunk_size, backend)
        -> (loss, grad_student_hidden, grad_student_weight)

Tokens are processed in chunks (as the linear cross-entropy, linear_cross_entropy.py, with its chunk size rule): the
chunk's student and teacher logits (two matmuls into two (chunk, vocab) buffers that every chunk reuses) -> the fused
distillation row kernel (kernels/distillation.py, or the cpu backend's distillation_rows_cpu in
csrc/cpu/distillation.cpp) writes the chunk's losses and the student logits' gradient over the student's logits (or,
with hard_weight > 0, over the teacher's, since the fused cross-entropy kernel then still reads the student's and
writes its own gradient over them; the two are added) -> grad_student_hidden of the chunk and grad_student_weight
(two more matmuls; the first chunk writes it, the others accumulate). The forward does every matmul of forward +
backward; the backward only scales the two gradients by the incoming scalar (none for loss.backward()). Peak extra
memory: the two (chunk, vocab) buffers instead of both models' full logits, their softmaxes and gradients. fp16
forms the gradients in the backward instead (:func:`deferred`), with the incoming gradient folded into the row
kernels' fp32 gradient sweeps, as the linear cross-entropy does.

    loss = (1 - hard_weight) * distillation (batchmean over the counted rows)
           + hard_weight * cross_entropy(student logits, target, ignore_index, mean over the same rows)

Gradients are accumulated in student_weight's dtype (as the linear cross-entropy).
"""

import torch
from torch import Tensor

from fastlm import reference
from fastlm.dispatch import resolve
from fastlm.ops import sharded_params
from fastlm.ops.cross_entropy import check_target_range, first_backward, loss_dtype, scale_saved_grad
from fastlm.ops.distillation import (
    check_no_teacher_grad,
    check_options,
    check_target,
    counted_rows,
    distill_rows,
    kernel_kind,
)
from fastlm.ops.linear_cross_entropy import ce_rows, chunk_logits, chunk_size_for
from fastlm.ops.registry import autocast_dtype, check_tensor


def distill_chunks(sh, sw, th, tw, target, kind, beta, temperature, hard_weight, ignore_index, chunk_size, backend,
                   d_scale=None, ce_scale=None, weight_grad=False):  # fmt: skip
    """The chunk loop. Returns (losses of the distillation (N,), losses of the hard cross-entropy (N,), gx, gw):
    fp32 per-row losses; with ``d_scale`` / ``ce_scale`` ((1,) fp32: the factors of the two terms' gradients) also
    grad_student_hidden and, with ``weight_grad``, grad_student_weight (else None). Without scales: losses only."""
    N, V = sh.shape[0], sw.shape[0]
    dev = sh.device
    distill = hard_weight < 1.0
    hard = hard_weight > 0.0
    grads = d_scale is not None or ce_scale is not None
    loss_d = torch.zeros(N, dtype=torch.float32, device=dev)
    loss_ce = torch.zeros(N, dtype=torch.float32, device=dev)
    gx = torch.empty_like(sh) if grads else None
    # a frozen student head (LoRA, tied and frozen embeddings): no (V, H) gradient buffer, no per-chunk matmul
    gw = None
    if grads and weight_grad:
        gw = torch.empty_like(sw) if N > 0 else torch.zeros_like(sw)
    # Two (chunk, V) buffers reused by every chunk: the student's logits, which become their gradient in place, and
    # the teacher's (with the hard loss, the distillation's gradient is written over the teacher's logits, since
    # the cross-entropy kernel still reads the student's).
    rows = min(chunk_size, N)
    buf = sh.new_empty((rows, V))
    tbuf = sh.new_empty((rows, V)) if distill else None
    for s in range(0, N, chunk_size):
        e = min(s + chunk_size, N)
        logits = chunk_logits(buf[: e - s], sh[s:e], sw, None)  # (chunk, V)
        tgt = target[s:e] if target is not None else None
        if distill:
            t_logits = chunk_logits(tbuf[: e - s], th[s:e], tw, None)
            g_d = (t_logits if hard else logits) if grads else None
            loss_d[s:e], _ = distill_rows(
                logits, t_logits, tgt, kind, beta, temperature, ignore_index, d_scale if grads else None, backend, g_d
            )
        if hard:
            loss_ce[s:e] = ce_rows(logits, tgt, None, ignore_index, 0.0, backend, grads, ce_scale)
            if grads and distill:
                logits += t_logits  # the two gradients
        if grads:
            torch.mm(logits, sw, out=gx[s:e])
            if gw is not None:
                if s == 0:
                    torch.mm(logits.T, sh[s:e], out=gw)
                else:
                    gw.addmm_(logits.T, sh[s:e])
    return loss_d, loss_ce, gx, gw


def deferred(student_hidden: Tensor) -> bool:
    """fp16: the gradients are formed in the backward (the chunks' logits recomputed, 2 + 2 matmuls more), with the
    incoming gradient (a GradScaler's factor) times 1 / the counted rows folded into the row kernels' fp32 gradient
    sweeps before the rounding to fp16 (see fastlm.ops.linear_cross_entropy.deferred: a 1/N-scaled fp16 gradient
    underflows, an unscaled one summed over the tokens into grad_student_weight may overflow)."""
    return student_hidden.dtype == torch.float16


@torch.library.custom_op("fastlm::linear_distillation_fwd", mutates_args=())
def linear_distillation_fwd(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    target: Tensor | None,
    kind: int,
    beta: float,
    temperature: float,
    hard_weight: float,
    ignore_index: int,
    compute_grad: bool,
    weight_grad: bool,
    chunk_size: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    N = student_hidden.shape[0]
    count = counted_rows(target, N, ignore_index, student_hidden.device)
    now = compute_grad and not deferred(student_hidden)
    d_scale = (1.0 - hard_weight) / count if now else None  # the distillation's share of the gradient
    ce_scale = hard_weight / count if now else None
    args = (teacher_hidden, teacher_weight, target, kind, beta, temperature, hard_weight, ignore_index, chunk_size)
    loss_d, loss_ce, gx, gw = distill_chunks(
        student_hidden, student_weight, *args, backend, d_scale, ce_scale, now and weight_grad
    )
    loss = (1.0 - hard_weight) * loss_d.sum() / count[0] + hard_weight * loss_ce.sum() / count[0]
    empty = student_hidden.new_empty((0,))
    return loss, (gx if gx is not None else empty), (gw if gw is not None else empty.clone())


@linear_distillation_fwd.register_fake
def _fake(
    sh, sw, th, tw, target, kind, beta, temp, hard_weight, ignore_index, compute_grad, weight_grad, chunk, backend
):
    loss = sh.new_empty((), dtype=torch.float32)
    now = compute_grad and not deferred(sh)
    gw_shape = sw.shape if now and weight_grad else (0,)
    return loss, sh.new_empty(sh.shape if now else (0,)), sw.new_empty(gw_shape)


def _setup(ctx, inputs, output):
    sh, sw, th, tw, target, *args = inputs
    ctx.weight_grad, ctx.deferred = inputs[11], deferred(sh)
    if ctx.deferred:  # recomputed in the backward
        ctx.args = args
        ctx.save_for_backward(sh, sw, th, tw, target)
    else:
        ctx.save_for_backward(output[1], output[2])
    # The gradient outputs are never differentiated: no zero-filled incoming gradients of their sizes.
    ctx.set_materialize_grads(False)


def _backward(ctx, dloss, *_):
    if dloss is None:
        return (None,) * 14
    if ctx.deferred:
        sh, sw, th, tw, target = ctx.saved_tensors
        kind, beta, temperature, hard_weight, ignore_index, _, weight_grad, chunk, backend = ctx.args
        scale = dloss.float().reshape(1) / counted_rows(target, sh.shape[0], ignore_index, sh.device)
        *_, gx, gw = distill_chunks(
            sh, sw, th, tw, target, kind, beta, temperature, hard_weight, ignore_index, chunk, backend,
            (1.0 - hard_weight) * scale, hard_weight * scale, weight_grad,
        )  # fmt: skip
        return (gx, gw) + (None,) * 12
    gx, gw = ctx.saved_tensors
    # a scalar loss: loss.backward() on CPU hands the gradients on without a copy (a whole grad_weight more at the
    # peak otherwise; see cross_entropy.scale_saved_grad)
    first = first_backward(ctx)
    gw = scale_saved_grad(gw, dloss, 1, first) if ctx.weight_grad else None
    return (scale_saved_grad(gx, dloss, 1, first), gw) + (None,) * 12


torch.library.register_autograd("fastlm::linear_distillation_fwd", _backward, setup_context=_setup)


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
    chunk_size: int | None = None,
) -> Tensor:
    """Distillation through both LM heads without materialising either model's logits:
    ``(1 - hard_weight) * distillation_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T,
    kind=kind, beta=beta, temperature=temperature, target=target, reduction="batchmean") + hard_weight *
    cross_entropy(student_hidden @ student_weight.T, target)`` (see :func:`fastlm.functional.distillation_loss` for
    the kinds, beta and T^2). Reduction: batchmean only (sum over the counted rows / their number, for both terms).

    Args:
        student_hidden: ``(..., Hs)`` student hidden states.
        student_weight: ``(V, Hs)`` student LM-head weight; student_hidden's dtype and device.
        teacher_hidden: ``(..., Ht)`` teacher hidden states (student_hidden's leading dims and dtype).
        teacher_weight: ``(V, Ht)``. Teacher tensors get no gradient: one that requires grad raises (detach it).
        target: ``(...)`` class indices: rows equal to ``ignore_index`` are left out of both terms; required when
            ``hard_weight > 0``.
        hard_weight: weight of the hard-label cross-entropy, in [0, 1].
        chunk_size: tokens per chunk (default :func:`fastlm.ops.linear_cross_entropy.chunk_size_for`).

    Returns:
        The scalar loss in student_hidden's dtype (float32 under autocast). Gradients to student_hidden and
        student_weight are computed in the forward; the backward only scales them (fp16: formed in the backward
        instead, the incoming gradient folded into the kernels' fp32 gradient sweeps; see :func:`deferred`).

    FSDP2 / ZeRO-3: either weight may be an FSDP2 module's sharded parameter or a partitioned ZeRO-3 one, passed
    outside its module's forward: gathered once for the call (fastlm/ops/sharded_params.py; a frozen teacher's by a
    plain all-gather in the compute dtype, the student's through FSDP2's hooks so that its gradient is
    reduce-scattered).
    """
    if sharded_params.needs_gather(student_weight, teacher_weight):

        def loss_fn(sh, th, sw, tw):
            return linear_distillation_loss(
                sh, sw, th, tw, target=target, kind=kind, beta=beta, temperature=temperature,
                hard_weight=hard_weight, ignore_index=ignore_index, chunk_size=chunk_size,
            )  # fmt: skip

        return sharded_params.call(loss_fn, (student_hidden, teacher_hidden), (student_weight, teacher_weight))
    check_options(kind, beta, temperature)
    if not 0.0 <= hard_weight <= 1.0:
        raise ValueError(f"hard_weight must be in [0, 1], got {hard_weight}")
    if hard_weight > 0.0 and target is None:
        raise ValueError("hard_weight > 0 needs target (the class indices of the hard-label cross-entropy)")
    names = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")
    tensors = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    for t, name in zip(tensors, names, strict=True):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    check_no_teacher_grad((teacher_hidden, "teacher_hidden"), (teacher_weight, "teacher_weight"))
    amp = autocast_dtype(student_hidden)
    if amp is not None:  # as F.linear under autocast: the matmuls in the autocast dtype (autograd casts grads back)
        tensors = tuple(t.to(amp) for t in tensors)
    sh, sw, th, tw = tensors
    if sh.dim() < 1 or sw.dim() != 2 or sh.shape[-1] != sw.shape[1]:
        raise ValueError(
            f"student_hidden (..., Hs) and student_weight (V, Hs) must share Hs: got {list(sh.shape)} and "
            f"{list(sw.shape)}"
        )
    if th.dim() < 1 or tw.dim() != 2 or th.shape[-1] != tw.shape[1]:
        raise ValueError(
            f"teacher_hidden (..., Ht) and teacher_weight (V, Ht) must share Ht: got {list(th.shape)} and "
            f"{list(tw.shape)}"
        )
    if tw.shape[0] != sw.shape[0]:
        raise ValueError(
            f"student_weight and teacher_weight must have the same vocabulary V: {sw.shape[0]} vs {tw.shape[0]}"
        )
    if th.shape[:-1] != sh.shape[:-1]:
        raise ValueError(
            f"teacher_hidden must have student_hidden's leading dims {list(sh.shape[:-1])}, got {list(th.shape[:-1])}"
        )
    for t, name in zip(tensors[1:], names[1:], strict=True):
        if t.dtype != sh.dtype or t.device != sh.device:
            raise TypeError(
                f"{name} must match student_hidden's dtype and device ({sh.dtype}, {sh.device}), got {t.dtype} on "
                f"{t.device}"
            )
    check_target(target, sh.shape[:-1], sh, "student_hidden")
    V = sw.shape[0]
    backend = resolve("linear_distillation_loss", sh)
    if backend == "torch":
        return reference.linear_distillation_loss(
            sh,
            sw,
            th,
            tw,
            target=target,
            kind=kind,
            beta=beta,
            temperature=temperature,
            hard_weight=hard_weight,
            ignore_index=ignore_index,
        )
    check_tensor(sh, "student_hidden", backend)
    x, xt = sh.reshape(-1, sh.shape[-1]), th.reshape(-1, th.shape[-1])
    tgt = target.reshape(-1).to(torch.int64) if target is not None else None
    if tgt is not None and hard_weight > 0.0:
        check_target_range(tgt, V, ignore_index)
    chunk = chunk_size or chunk_size_for(x.shape[0], V, x.shape[1], x.device)
    if chunk < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    needs_grad = torch.is_grad_enabled() and (sh.requires_grad or sw.requires_grad)
    with torch.autocast(sh.device.type, enabled=False):  # the op's matmuls and gradients in the inputs' dtype
        loss, *_ = linear_distillation_fwd(
            x.contiguous(),
            sw.contiguous(),
            xt.contiguous(),
            tw.contiguous(),
            tgt,
            kernel_kind(kind, beta),
            float(beta),
            float(temperature),
            float(hard_weight),
            int(ignore_index),
            needs_grad,
            needs_grad and sw.requires_grad,
            int(chunk),
            backend,
        )
    return loss.to(loss_dtype(sh))
