"""Vocab-parallel cross-entropy and linear cross-entropy over DTensors: the logits (or the LM head's weight) split
over the ranks of a 1-D device mesh by vocabulary, as Megatron's and torchtitan's tensor parallelism leave them, and
the loss computed without ever gathering the vocabulary.

Entered from ``F.cross_entropy`` / ``F.linear_cross_entropy`` when an argument is a DTensor. Megatron's math, per
row of logits x (C classes over the ranks; rank r holds classes [off_r, off_r + C_r)), target t (a global id),
class weights w (1 without), label smoothing eps, W = sum_c w_c:

    rank r:     lse_r = log sum_{c in r} exp(x_c),  x_t if r owns t else 0,  s_r = sum_{c in r} w_c x_c   (fused)
    all-reduce: M = MAX_r lse_r;  then SUM_r of (exp(lse_r - M), x_t, s_r)  -> lse = M + log(sum), x_t, s
    loss        = (1 - eps) * w_t * (lse - x_t) + eps / C * (W * lse - s)                 (every rank, O(rows))
    rank r:     dloss/dx_c = a * (p_c - [c == t]) + b * (W * p_c - w_c),  p_c = exp(x_c - lse)            (fused)
                with a = (1 - eps) * w_t * scale, b = eps / C * scale, scale = 1 / denominator for the mean

Two all-reduces per row block (a MAX of N floats, a SUM of 3N floats): Megatron's three (max, target logit,
sum-exp) with the last two in one message. The gradient of a rank's logits is formed from its own shard and the
global lse: it keeps the logits' sharding and is never exchanged.

What runs where: the per-shard statistics and the gradient are fastlm's fused cross-entropy kernels (the Triton
kernel's STATS / EXT_GRAD modes in kernels/cross_entropy.py, csrc/cpu/vocab_parallel.cpp on the cpu backend); the
backend is the one ``F.cross_entropy`` (``F.linear_cross_entropy``) resolves to for the local shard, except that
the CUDA C++ backend has none of these kernels (under ``auto`` the Triton ones run on CUDA tensors; asked for by
name, ``cuda`` raises). With the ``torch`` backend (and for fp64 under ``auto``) the per-shard pieces are plain
torch ops. The combination of the statistics, the per-row losses and the reductions are plain torch ops on
(rows,)-sized vectors; the collectives are ``torch.distributed.all_reduce`` on the mesh's process group (any backend:
gloo, nccl). Eager mode only (not tested under torch.compile).

The linear cross-entropy is chunked over tokens like the single-rank one (fastlm/ops/linear_cross_entropy.py): per
chunk each rank multiplies the hidden states by its (V_r, H) weight shard, runs the statistics kernel, joins the two
all-reduces, and writes the chunk's gradient over its logits; grad_input's partial sums (one per rank) are
all-reduced once at the end, grad_weight (and grad_bias) stay local. Peak extra memory per rank: one
(chunk, V_r) logits buffer and the (V_r, H) weight gradient, 1/world of the single-rank path, plus the (tokens, H)
input gradient and O(tokens) statistics (scripts/vocab_parallel_memory.py measures it).
"""

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from fastlm.dispatch import UnsupportedCaseError, current_backend, host_readable, resolve
from fastlm.ops import cross_entropy as ce  # a module: cross_entropy.py imports this one (its DTensor hook)
from fastlm.ops.registry import autocast_dtype, check_device, check_tensor

_PLAIN = (Tensor, torch.nn.Parameter)


def is_dtensor(t) -> bool:
    """True for a DTensor (without importing torch.distributed.tensor, ~1 s, when nothing has made one)."""
    if t is None or type(t) in _PLAIN:
        return False
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


# ---------------------------------------------------------------------------------------------------------------
# The layout: which classes this rank holds


@dataclass
class VocabShard:
    """One rank's slice [offset, offset + size) of C classes on a 1-D mesh (torch's Shard placement: chunks of
    ceil(C / world), the last ones shorter or empty)."""

    mesh: object
    group: object
    offset: int
    size: int
    classes: int


def _shard_of(t, name: str, dim: int) -> VocabShard:
    """The vocabulary shard of DTensor ``t`` sharded on ``dim`` (clear errors for anything else)."""
    from torch.distributed.tensor import Shard

    mesh = t.device_mesh
    if mesh.ndim != 1:
        raise ValueError(
            f"{name} must be a DTensor on a 1-D device mesh (the ranks that split the vocabulary), got a "
            f"{mesh.ndim}-D mesh of shape {tuple(mesh.shape)}; pass the tensor-parallel sub-mesh's DTensor "
            "(e.g. distribute over mesh['tp'])"
        )
    (p,) = t.placements
    if not (isinstance(p, Shard) and p.dim % t.dim() == dim):
        raise ValueError(
            f"{name} must be sharded on its vocabulary dim (placements (Shard({dim}),)), got {t.placements}"
        )
    classes, world, rank = t.shape[dim], mesh.size(), mesh.get_local_rank()
    chunk = -(-classes // world)
    offset = min(rank * chunk, classes)
    size = max(0, min(chunk, classes - offset))
    local = t.to_local().shape[dim]
    if local != size:
        raise ValueError(
            f"{name}'s local shard has {local} classes on mesh rank {rank}, but a Shard({dim}) of {classes} classes "
            f"over {world} ranks gives it {size} (torch's chunks of ceil(C / world)); build the DTensor with "
            "distribute_tensor or from_local with torch's even chunks"
        )
    return VocabShard(mesh, mesh.get_group(), offset, size, classes)


class _ToLocal(torch.autograd.Function):
    """``DTensor.to_local()`` whose backward gives the gradient the DTensor's own global shape and stride. torch
    2.11's ``to_local`` backward derives the global stride from the local gradient: for an uneven split of the last
    dim (37 classes over 2 ranks: local 19 and 18) that is (38, 1) on one rank and (36, 1) on the other, not the
    logits' (37, 1), and the gradient accumulated into the logits' ``.grad`` then came back ``Replicate()``, a
    full-size gradient on every rank (torch 2.14 keeps the input's stride)."""

    @staticmethod
    def forward(ctx, t):
        ctx.meta = (t.device_mesh, t.placements, t.shape, t.stride())
        return t.to_local().view_as(t.to_local())

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor import DTensor

        mesh, placements, shape, stride = ctx.meta
        return DTensor.from_local(grad, mesh, placements, run_check=False, shape=shape, stride=stride)


def to_local(t) -> Tensor:
    """The local shard of DTensor ``t``, differentiable, its gradient a DTensor laid out as ``t`` (``_ToLocal``)."""
    return _ToLocal.apply(t) if t.requires_grad and torch.is_grad_enabled() else t.to_local()


def _global(t, name: str, shard: VocabShard):
    """A plain tensor, or the local value of a replicated DTensor on ``shard``'s mesh; sharded: an error."""
    if not is_dtensor(t):
        return t
    from torch.distributed.tensor import Replicate

    if t.device_mesh != shard.mesh or any(not isinstance(p, Replicate) for p in t.placements):
        raise ValueError(
            f"{name} must be a plain tensor or a DTensor replicated on the vocabulary's mesh (every rank holds all "
            f"of it, e.g. global class ids), got placements {t.placements} on mesh {tuple(t.device_mesh.shape)}"
        )
    return to_local(t)


def _backend(op: str, x: Tensor) -> str:
    """The backend of the per-shard kernels: the one ``op`` resolves to for the local shard; the CUDA C++ backend
    has no vocab-parallel kernels (auto: Triton on CUDA tensors; by name: an error)."""
    name = resolve(op, x)
    if name == "cuda":
        if current_backend() != "auto":
            raise UnsupportedCaseError(
                "the cuda backend has no vocab-parallel cross-entropy kernels; use fastlm.backend('triton') or 'auto'"
            )
        name = "triton"
    return name


# ---------------------------------------------------------------------------------------------------------------
# Per-shard row work (fused kernels, or torch ops for the torch backend)


def local_stats(x: Tensor, t_local: Tensor, w_local: Tensor | None, smooth: bool, backend: str) -> Tensor:
    """(3, N) statistics of the shard x (N, C_r): local lse, owned target logit (else 0), sum_c w_c x_c (smooth,
    else 0); float32 on the fused backends, fp64 for fp64 on torch's."""
    if backend == "triton":
        from fastlm.kernels import cross_entropy as k

        return k.vocab_parallel_stats(x, t_local, w_local, smooth)
    if backend == "cpu":
        return torch.ops.fastlm.vocab_parallel_ce_stats_cpu(x, t_local, w_local, smooth)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    owned = (t_local >= 0) & (t_local < x.shape[1])
    x_t = xf.gather(1, torch.where(owned, t_local, 0)[:, None])[:, 0] if x.shape[1] else xf.new_zeros(x.shape[0])
    sx = (xf * w_local if w_local is not None else xf).sum(1) if smooth else xf.new_zeros(x.shape[0])
    return torch.stack([torch.logsumexp(xf, 1), torch.where(owned, x_t, 0.0), sx])


def local_grad(
    x: Tensor,
    t_local: Tensor,
    row_stats: Tensor,
    w_local: Tensor | None,
    w_sum: Tensor,
    smooth: bool,
    backend: str,
    out: Tensor | None = None,
) -> Tensor:
    """d loss / d x of the shard from ``row_stats`` (3, N) = (global lse, a, b) and the global weight sum ``w_sum``
    (a (1,) tensor); into ``out`` (may be x itself) or a new contiguous tensor of x's shape and dtype."""
    if backend == "triton":
        from fastlm.kernels import cross_entropy as k

        return k.vocab_parallel_grad(x, t_local, row_stats, w_local, w_sum, smooth, out)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if backend == "cpu":
        torch.ops.fastlm.vocab_parallel_ce_grad_cpu(
            x, t_local, row_stats.float().contiguous(), w_local, float(w_sum), smooth, out
        )
        return out
    lse, a, b = (r[:, None] for r in row_stats)
    p = torch.exp(x.to(row_stats.dtype) - lse)
    g = a * p
    if smooth:
        g = g + b * (w_sum * p - (w_local if w_local is not None else 1.0))
    owned = (t_local >= 0) & (t_local < x.shape[1])
    rows = owned.nonzero()[:, 0]
    g[rows, t_local[rows]] -= a[rows, 0]
    return out.copy_(g)


def global_stats(stats: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    """(lse, x_t, s) per row from every rank's (3, N) local statistics: an all-reduce MAX of the local lse, then one
    all-reduce SUM of (exp(lse_r - M), x_t, s_r). ``stats`` is overwritten."""
    m = stats[0].clone()
    dist.all_reduce(m, dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isinf(m), 0.0, m)  # rows of -inf logits everywhere: exp(-inf - 0) = 0, never NaN
    stats[0] = torch.exp(stats[0] - m)
    dist.all_reduce(stats, dist.ReduceOp.SUM, group=group)
    return m + torch.log(stats[0]), stats[1], stats[2]


# ---------------------------------------------------------------------------------------------------------------
# The per-row terms every rank computes alike from the global targets (O(rows), torch ops)


class Rows:
    """The rows' target terms: local ids, w_t, which rows are ignored or out of range, the mean's denominator."""

    def __init__(self, t: Tensor, weight: Tensor | None, ignore_index: int, eps: float, shard: VocabShard):
        C = shard.classes
        self.ignored = t == ignore_index
        self.invalid = ~self.ignored & ((t < 0) | (t >= C))  # NaN loss and gradient (GPU; CPU raised before)
        mine = ~self.ignored & (t >= shard.offset) & (t < shard.offset + shard.size)
        self.local = torch.where(mine, t - shard.offset, -1)
        safe = torch.where(self.ignored | self.invalid, 0, t)
        self.w_t = weight[safe] if weight is not None else None
        self.w_local = weight[shard.offset : shard.offset + shard.size].contiguous() if weight is not None else None
        self.w_sum = weight.sum().reshape(1) if weight is not None else torch.full((1,), float(C), device=t.device)
        self.eps, self.C = eps, C

    def denominator(self, dtype: torch.dtype) -> Tensor:
        """The mean's denominator: sum of w_t over the rows not ignored (their count without weights)."""
        keep = ~self.ignored
        if self.w_t is None:
            return keep.sum(dtype=dtype)
        return (self.w_t * keep).sum(dtype=dtype)

    def losses(self, lse: Tensor, x_t: Tensor, s: Tensor, sl=slice(None)) -> Tensor:
        eps = self.eps
        loss = (1.0 - eps) * (lse - x_t)
        if self.w_t is not None:
            loss = loss * self.w_t[sl]
        if eps > 0:
            loss = loss + eps / self.C * (self.w_sum.to(lse.dtype) * lse - s)
        loss = torch.where(self.invalid[sl], float("nan"), loss)
        return torch.where(self.ignored[sl], 0.0, loss)

    def grad_stats(self, lse: Tensor, scale, sl=slice(None)) -> Tensor:
        """(3, rows) = (lse, a, b) for local_grad; ``scale`` a scalar or a per-row tensor (the incoming gradient)."""
        a = (1.0 - self.eps) * scale * torch.ones_like(lse)
        if self.w_t is not None:
            a = a * self.w_t[sl]
        b = self.eps / self.C * scale * torch.ones_like(lse)
        a = torch.where(self.invalid[sl], float("nan"), a)
        a, b = (torch.where(self.ignored[sl], 0.0, v) for v in (a, b))
        return torch.stack([lse, a, b])


def _reduce(losses: Tensor, reduction: int, rows: Rows) -> tuple[Tensor, Tensor | float]:
    """The reduced loss and the gradient's scale (1 / denominator for the mean)."""
    if reduction == 0:
        return losses, 1.0
    if reduction == 2:
        return losses.sum(), 1.0
    denom = rows.denominator(losses.dtype)
    return losses.sum() / denom, 1.0 / denom


# ---------------------------------------------------------------------------------------------------------------
# Autograd


class _CrossEntropy(torch.autograd.Function):
    """Vocab-parallel cross-entropy of one rank's (N, C_r) logits; the gradient (for an incoming gradient of 1) is
    written in the forward, as the single-rank fused loss does, and the backward scales it."""

    @staticmethod
    def forward(ctx, x, t, weight, ignore_index, eps, reduction, shard, backend, compute_grad):
        rows = Rows(t, weight, ignore_index, eps, shard)
        stats = local_stats(x, rows.local, rows.w_local, eps > 0, backend)
        lse, x_t, s = global_stats(stats, shard.group)
        loss, scale = _reduce(rows.losses(lse, x_t, s), reduction, rows)
        ctx.reduction = reduction
        if compute_grad:
            grad = local_grad(x, rows.local, rows.grad_stats(lse, scale), rows.w_local, rows.w_sum, eps > 0, backend)
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        (grad,) = ctx.saved_tensors
        first = ce.first_backward(ctx)
        return ce.scale_saved_grad(grad, dloss, ctx.reduction, first), None, None, None, None, None, None, None, None


def _acc(b: Tensor | None) -> torch.dtype:
    """The bias gradient's accumulation dtype: float32, float64 for a float64 bias."""
    return torch.promote_types(b.dtype, torch.float32) if b is not None else torch.float32


def _chunk_logits(x: Tensor, w: Tensor, b: Tensor | None, s: int, e: int) -> Tensor:
    logits = x[s:e] @ w.T  # (chunk, V_r)
    if b is not None:
        logits += b
    return logits


class _LinearCrossEntropy(torch.autograd.Function):
    """Vocab-parallel linear cross-entropy: x (T, H) (the same on every rank), w (V_r, H) and b (V_r,) this rank's
    shards. Mean / sum: all three gradients in the forward (the backward scales them); none: the losses and the
    global lse per token in the forward, the gradients recomputed chunk by chunk in the backward."""

    @staticmethod
    def forward(ctx, x, w, b, t, weight, ignore_index, eps, reduction, shard, backend, chunk, compute_grad):
        T = x.shape[0]
        rows = Rows(t, weight, ignore_index, eps, shard)
        stats_dtype = torch.promote_types(x.dtype, torch.float32)
        losses = torch.empty(T, dtype=stats_dtype, device=x.device)
        grads_now = compute_grad and reduction != 0
        scale = 1.0 / rows.denominator(stats_dtype) if reduction == 1 else 1.0
        lse_all = torch.empty(T, dtype=stats_dtype, device=x.device) if compute_grad and not grads_now else None
        if grads_now:
            gx = torch.empty_like(x)
            gw = torch.zeros_like(w)
            gb = torch.zeros(w.shape[0], dtype=_acc(b), device=x.device) if b is not None else None
        for s in range(0, T, chunk):
            e = min(s + chunk, T)
            logits = _chunk_logits(x, w, b, s, e)
            stats = local_stats(logits, rows.local[s:e], rows.w_local, eps > 0, backend)
            lse, x_t, sx = global_stats(stats, shard.group)
            losses[s:e] = rows.losses(lse, x_t, sx, slice(s, e))
            if grads_now:
                g = local_grad(
                    logits, rows.local[s:e], rows.grad_stats(lse, scale, slice(s, e)), rows.w_local, rows.w_sum,
                    eps > 0, backend, out=logits,
                )  # fmt: skip
                torch.mm(g, w, out=gx[s:e])  # this rank's part of grad_input
                gw.addmm_(g.T, x[s:e])
                if gb is not None:
                    gb += g.sum(0, dtype=gb.dtype)
            elif lse_all is not None:
                lse_all[s:e] = lse
        loss, _ = _reduce(losses, reduction, rows)
        ctx.reduction, ctx.has_bias = reduction, b is not None
        if grads_now:
            dist.all_reduce(gx, dist.ReduceOp.SUM, group=shard.group)  # the partial sums of the ranks' classes
            ctx.save_for_backward(gx, gw, gb.to(b.dtype) if gb is not None else None)
        elif compute_grad:
            ctx.rows, ctx.args = rows, (shard, backend, chunk, eps)
            ctx.save_for_backward(x, w, b, lse_all)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        nones = (None,) * 9
        if ctx.reduction != 0:  # the saved gradients times the scalar (themselves for a CPU dloss of 1)
            first = ce.first_backward(ctx)
            gx, gw, gb = (
                ce.scale_saved_grad(g, dloss, ctx.reduction, first) if g is not None else None
                for g in ctx.saved_tensors
            )
            return gx, gw, gb if ctx.has_bias else None, *nones
        x, w, b, lse_all = ctx.saved_tensors
        rows, (shard, backend, chunk, eps) = ctx.rows, ctx.args
        gx, gw = torch.empty_like(x), torch.zeros_like(w)
        gb = torch.zeros(w.shape[0], dtype=_acc(b), device=x.device) if b is not None else None
        dl = dloss.to(lse_all.dtype)
        for s in range(0, x.shape[0], chunk):
            e = min(s + chunk, x.shape[0])
            logits = _chunk_logits(x, w, b, s, e)
            st = rows.grad_stats(lse_all[s:e], dl[s:e], slice(s, e))
            g = local_grad(logits, rows.local[s:e], st, rows.w_local, rows.w_sum, eps > 0, backend, out=logits)
            torch.mm(g, w, out=gx[s:e])
            gw.addmm_(g.T, x[s:e])
            if gb is not None:
                gb += g.sum(0, dtype=gb.dtype)
        dist.all_reduce(gx, dist.ReduceOp.SUM, group=shard.group)
        return gx, gw, gb.to(b.dtype) if gb is not None else None, *nones


# ---------------------------------------------------------------------------------------------------------------
# Entry points (from F.cross_entropy / F.linear_cross_entropy)


def _check_common(
    x: Tensor, t: Tensor, weight, reduction: str, label_smoothing: float, ignore_index: int, C: int
) -> None:
    if not isinstance(t, Tensor) or t.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            "target must hold global class indices as int64 (or int32) for the vocab-parallel cross-entropy, got "
            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}"
        )
    check_device(t, "target", x, "input")
    check_device(weight, "weight", x, "input")
    if reduction not in ce.REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(ce.REDUCTIONS)}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if weight is not None:
        if not isinstance(weight, Tensor) or weight.shape != (C,) or not weight.is_floating_point():
            raise ValueError(f"weight must be a floating-point ({C},) tensor of class weights (all {C} classes)")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "weight requires grad, but the vocab-parallel cross-entropy gives the class weights no gradient; "
                "detach it"
            )
    if t.numel() and host_readable(t):
        bad = (t != ignore_index) & ((t < 0) | (t >= C))
        if bool(bad.any()):
            raise ValueError(
                f"target has class indices outside [0, {C}) that are not ignore_index={ignore_index}: "
                f"{t[bad][:5].tolist()}"
            )


def _replicated(loss: Tensor, shard: VocabShard):
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(loss, shard.mesh, [Replicate()], run_check=False)


def cross_entropy(input, target, weight, ignore_index: int, reduction: str, label_smoothing: float):
    """``F.cross_entropy`` of (N, C) logits sharded on the classes: a DTensor with placements ``(Shard(1),)``
    (``Shard(-1)`` alike) on a 1-D mesh, any split (uneven ones included). ``target``: (N,) global class ids, a plain
    tensor or a replicated DTensor; ``weight``: (C,) class weights, plain or replicated. Label smoothing,
    ignore_index and every reduction as torch. Returns the loss as a DTensor replicated on the mesh (a scalar, or
    (N,) for ``reduction="none"``), in the logits' dtype; the logits' gradient is a DTensor with their sharding."""
    if not is_dtensor(input):
        raise TypeError(
            "the vocab-parallel cross-entropy needs the logits as a DTensor sharded on the classes; got a plain input "
            f"with a {type(target).__name__} target: pass plain tensors everywhere, or shard the logits"
        )
    if input.dim() != 2:
        raise ValueError(f"vocab-parallel cross_entropy takes (N, C) logits, got shape {list(input.shape)}")
    shard = _shard_of(input, "input", 1)
    x = to_local(input)
    t = _global(target, "target", shard)
    w = _global(weight, "weight", shard)
    backend = _backend("cross_entropy", x)
    check_tensor(x, "input", backend, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
    if backend != "torch":
        check_tensor(x, "input", backend)
    N, C = input.shape
    _check_common(x, t, w, reduction, label_smoothing, ignore_index, C)
    if t.shape != (N,):
        raise ValueError(f"target must have shape [{N}] for input {list(input.shape)}, got {list(t.shape)}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    loss = _CrossEntropy.apply(
        x,
        t.to(torch.int64),
        w.float() if w is not None and backend != "torch" else w,
        int(ignore_index),
        float(label_smoothing),
        ce.REDUCTIONS[reduction],
        shard,
        backend,
        torch.is_grad_enabled() and x.requires_grad,
    )
    return _replicated(loss.to(ce.loss_dtype(x)), shard)


def linear_cross_entropy(
    input, linear_weight, target, linear_bias, weight, reduction: str, ignore_index: int, label_smoothing: float,
    chunk_size: int | None,
):  # fmt: skip
    """``F.linear_cross_entropy`` with the LM head split on the vocabulary: ``linear_weight`` a (V, H) DTensor with
    placements ``(Shard(0),)`` on a 1-D mesh (any split), ``linear_bias`` None or a (V,) ``Shard(0)`` DTensor on the
    same mesh; ``input`` (*, H) hidden states the same on every rank (a plain tensor, or a replicated DTensor);
    ``target`` (*) global class ids (plain or replicated). Returns the loss as a DTensor replicated on the mesh (a
    scalar, or target's shape for ``reduction="none"``). Gradients: the weight's and bias's keep their sharding;
    the input's is the full sum over the ranks (all-reduced), a replicated DTensor when the input is one."""
    from fastlm.ops.linear_cross_entropy import chunk_size_for

    ignore_index = -100 if ignore_index is None else ignore_index
    if not is_dtensor(linear_weight):
        raise TypeError(
            "the vocab-parallel linear cross-entropy needs linear_weight as a DTensor sharded on the vocabulary "
            "(Shard(0) of (V, H)); got a plain weight with a DTensor input or target: pass plain tensors everywhere"
        )
    if linear_weight.dim() != 2:
        raise ValueError(f"linear_weight must be (V, H), got shape {list(linear_weight.shape)}")
    shard = _shard_of(linear_weight, "linear_weight", 0)
    w = to_local(linear_weight)
    b = None
    if linear_bias is not None:
        if not is_dtensor(linear_bias) or linear_bias.device_mesh != shard.mesh:
            raise ValueError("linear_bias must be a (V,) DTensor sharded like linear_weight (Shard(0), same mesh)")
        _shard_of(linear_bias, "linear_bias", 0)
        b = to_local(linear_bias)
    x = _global(input, "input", shard)
    t = _global(target, "target", shard)
    cw = _global(weight, "weight", shard)
    amp = autocast_dtype(x)
    if amp is not None:  # as F.linear under autocast (see fastlm/ops/linear_cross_entropy.py)
        x, w = x.to(amp), w.to(amp)
        b = b.to(amp) if b is not None else None
    backend = resolve("linear_cross_entropy", x)
    check_tensor(x, "input", backend, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
    if backend != "torch":
        check_tensor(x, "input", backend)
    V, H = linear_weight.shape
    if x.dim() < 1 or x.shape[-1] != H:
        raise ValueError(f"input (*, H) and linear_weight (V, H) must share H: got {list(x.shape)} and [{V}, {H}]")
    if w.dtype != x.dtype or w.device != x.device or (b is not None and b.dtype != x.dtype):
        raise TypeError(
            f"linear_weight (and linear_bias) must match input's dtype and device ({x.dtype}, {x.device}), got "
            f"{w.dtype} on {w.device}"
        )
    _check_common(x, t, cw, reduction, label_smoothing, ignore_index, V)
    if t.shape != x.shape[:-1]:
        raise ValueError(f"target must have shape {list(x.shape[:-1])}, got {list(t.shape)}")
    x2 = x.reshape(-1, H)
    chunk = chunk_size or chunk_size_for(x2.shape[0], V, H)  # the single-rank chunk: (chunk, V / world) logits
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))
    with torch.autocast(x.device.type, enabled=False):
        loss = _LinearCrossEntropy.apply(
            x2.contiguous(),
            w.contiguous(),
            b,
            t.reshape(-1).to(torch.int64),
            cw.float() if cw is not None and backend != "torch" else cw,
            int(ignore_index),
            float(label_smoothing),
            ce.REDUCTIONS[reduction],
            shard,
            backend,
            int(chunk),
            needs_grad,
        )
    loss = loss.view(t.shape) if reduction == "none" else loss
    return _replicated(loss.to(ce.loss_dtype(x)), shard)
