"""Rotary position embedding of q and k (HF's ``apply_rotary_pos_emb``): registered ops, fake impls, autograd, the
public function.

Ops (for <backend> in {triton, cpu}; kernels: kernels/rope.py, csrc/cpu/rope.cpp):
    fastlm::rope_fwd_<backend>(q, k, cos, sin, head_axis, interleaved, backward) -> (q_out, k_out)
    fastlm::rope_inplace_<backend>(q!, k!, cos, sin, head_axis, interleaved) -> ()
q is (B, Hq, S, D) (head_axis 1) or (B, S, Hq, D) (head_axis 2), k the same with Hk heads (GQA), any strides with a
unit last stride, one dtype; cos / sin are (Bc, Sc, rot) with Bc in {1, B} and Sc in {1, S} (broadcast), a unit last
stride, q's dtype or float32. rot (even, <= D) dims rotate, the rest pass through. ``backward`` applies the
transposed rotation (the gradient; the backward of each direction is the other one). Outputs: dtype
promote_types(q, cos) (HF's formula under torch's promotion), in q's / k's layout (``empty_in_layout``). The in-place
op writes the result into q and k in their own dtype.

The math, its derivative and the bytes moved: kernels/rope.py's docstring.
"""

import torch
from torch import Tensor

from fastlm import reference
from fastlm.dispatch import FUSED_DTYPES, resolve, tracing
from fastlm.ops.registry import call, check_device, check_tensor, register

# ---------------------------------------------------------------------------------------------------------------
# Output allocation: one rule for the fake impl, the Triton op and (mirrored) csrc/cpu/rope.cpp


def empty_in_layout(t: Tensor, dtype: torch.dtype, alloc=None) -> Tensor:
    """An uninitialised tensor of ``t``'s shape in ``t``'s layout: its leading dims ordered by stride (largest
    first, ties in dim order), the last dim innermost, dense. A transposed (B, H, S, D) view of a (B, S, H, D)
    projection gives a transposed output (as ``torch.empty_like``), and a strided slice (e.g. of a fused qkv
    projection) a dense one in the same dim order. ``alloc(shape, dtype, device)``: fastlm.kernels.empty (NaN-poisoned
    in the tests) for real outputs, torch.empty by default."""
    lead = sorted(range(t.dim() - 1), key=lambda d: -t.stride(d))  # stable: ties keep the dim order
    order = [*lead, t.dim() - 1]
    shape = [t.shape[d] for d in order]
    out = alloc(shape, dtype, t.device) if alloc is not None else torch.empty(shape, dtype=dtype, device=t.device)
    return out.permute([order.index(d) for d in range(t.dim())])


def check_op_shapes(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, head_axis: int) -> None:
    """The Triton ops' contract on shapes (csrc/cpu/rope.cpp checks the same): what keeps the kernel's addressing
    inside the tensors when an op is called directly."""
    ok = head_axis in (1, 2) and q.dim() == k.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape
    if ok:
        B, S, D, rot = q.shape[0], q.shape[3 - head_axis], q.shape[3], cos.shape[2]
        ok = k.shape[0] == B and k.shape[3 - head_axis] == S and k.shape[3] == D and 2 <= rot <= D and rot % 2 == 0
        ok = ok and cos.shape[0] in (1, B) and cos.shape[1] in (1, S)
        ok = ok and all(t.shape[-1] <= 1 or t.stride(-1) == 1 for t in (q, k, cos, sin))
    if not ok:
        raise ValueError(
            f"rope op: q {list(q.shape)} / k {list(k.shape)} (head_axis {head_axis}) with tables cos "
            f"{list(cos.shape)} / sin {list(sin.shape)} break the op's contract (fastlm/ops/rope.py docstring)"
        )


# ---------------------------------------------------------------------------------------------------------------
# Triton ops


@torch.library.custom_op("fastlm::rope_fwd_triton", mutates_args=())
def rope_fwd_triton(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, head_axis: int, interleaved: bool, backward: bool
) -> tuple[Tensor, Tensor]:
    from fastlm.kernels import empty
    from fastlm.kernels import rope as kr

    check_op_shapes(q, k, cos, sin, head_axis)
    dt = torch.promote_types(q.dtype, cos.dtype)
    qo, ko = empty_in_layout(q, dt, empty), empty_in_layout(k, dt, empty)
    kr.rope(q, k, qo, ko, cos, sin, head_axis, interleaved, backward)
    return qo, ko


@torch.library.custom_op("fastlm::rope_inplace_triton", mutates_args=("q", "k"))
def rope_inplace_triton(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, head_axis: int, interleaved: bool) -> None:
    from fastlm.kernels import rope as kr

    check_op_shapes(q, k, cos, sin, head_axis)
    kr.rope(q, k, q, k, cos, sin, head_axis, interleaved, False)


# ---------------------------------------------------------------------------------------------------------------
# Fakes and autograd, shared by the backends


def _fwd_fake(q, k, cos, sin, head_axis, interleaved, backward):
    dt = torch.promote_types(q.dtype, cos.dtype)
    return empty_in_layout(q, dt), empty_in_layout(k, dt)


def _inplace_fake(q, k, cos, sin, head_axis, interleaved):
    return None


def _fwd_setup(ctx, inputs, output):
    q, k, cos, sin, head_axis, interleaved, backward = inputs
    ctx.save_for_backward(cos, sin)  # the rotation needs only the tables: q and k are not kept
    ctx.args = (head_axis, interleaved, not backward)
    ctx.dtypes = (q.dtype, k.dtype)


def unit_last(t: Tensor) -> Tensor:
    """``t``, copied only when its last dim is not unit-stride (the kernels take any other strides)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _fwd_backward(backend):
    def backward(ctx, dq, dk):
        """(dL/dq, dL/dk) in q's and k's dtypes: the transposed rotation of the incoming gradients, one launch."""
        cos, sin = ctx.saved_tensors
        head_axis, interleaved, direction = ctx.args
        gq, gk = call(ROPE_FWD[backend], unit_last(dq), unit_last(dk), cos, sin, head_axis, interleaved, direction)
        need_q, need_k = ctx.needs_input_grad[:2]
        gq = gq.to(ctx.dtypes[0]) if need_q else None
        gk = gk.to(ctx.dtypes[1]) if need_k else None
        return gq, gk, None, None, None, None, None

    return backward


ROPE_FWD = register("rope_fwd", _fwd_fake, _fwd_backward, _fwd_setup, backends=("triton", "cpu"))
ROPE_INPLACE = register("rope_inplace", _inplace_fake, backends=("triton", "cpu"))


def no_heads(x: Tensor, head_axis: int) -> Tensor:
    """A zero-head partner for ``x`` (the ops rotate a q and a k: this rotates x alone)."""
    shape = list(x.shape)
    shape[head_axis] = 0
    return x.new_empty(shape)


class RopeInplace(torch.autograd.Function):
    """The in-place rotation of one tensor (q or k) under autograd: it is marked dirty (its history now ends here);
    the backward is the out-of-place op's transposed rotation, from the saved tables only. One tensor per Function:
    autograd refuses a Function that modifies a view input in place (HF's q and k are transposed views) and
    returns more than one tensor, so under autograd q and k take one launch each (without autograd, one for both)."""

    @staticmethod
    def forward(ctx, x, cos, sin, head_axis, interleaved, backend):
        ROPE_INPLACE[backend](x, no_heads(x, head_axis), cos, sin, head_axis, interleaved)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        ctx.args = (head_axis, interleaved, backend, x.dtype)
        return x

    @staticmethod
    def backward(ctx, dx):
        cos, sin = ctx.saved_tensors
        head_axis, interleaved, backend, dtype = ctx.args
        dx = unit_last(dx)
        gx, _ = call(ROPE_FWD[backend], dx, no_heads(dx, head_axis), cos, sin, head_axis, interleaved, True)
        return gx.to(dtype), None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Input checks


def check_inputs(q, k, cos, sin, unsqueeze_dim, backend) -> tuple[int, Tensor, Tensor]:
    """Validate the arguments of the fused path; returns (head_axis, cos3, sin3): q's head dim (1 for (B, H, S, D),
    2 for (B, S, H, D)) and the tables as (Bc, Sc, rot) views (no copy unless the last dim is strided)."""
    for t, name in ((q, "q"), (k, "k"), (cos, "cos"), (sin, "sin")):
        check_tensor(t, name, backend)
    for t, name in ((k, "k"), (cos, "cos"), (sin, "sin")):
        check_device(t, name, q, "q")
    if q.dim() != 4 or k.dim() != 4:
        bad, t = ("q", q) if q.dim() != 4 else ("k", k)
        raise ValueError(
            f"{bad} must be 4-D, (batch, heads, seq, head_dim) or (batch, seq, heads, head_dim), got shape "
            f"{list(t.shape)}"
        )
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype ({q.dtype}) for the {backend} backend, got {k.dtype}")
    if cos.dtype != sin.dtype or cos.dtype not in (q.dtype, torch.float32):
        raise TypeError(
            f"cos and sin must both have q's dtype ({q.dtype}) or float32 for the {backend} backend, got cos "
            f"{cos.dtype} and sin {sin.dtype} (use fastlm.backend('torch') for other combinations)"
        )
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {list(cos.shape)} and {list(sin.shape)}")
    if not isinstance(unsqueeze_dim, int) or not -(cos.dim() + 1) <= unsqueeze_dim <= cos.dim():
        raise ValueError(
            f"unsqueeze_dim must be an int in [{-(cos.dim() + 1)}, {cos.dim()}] for cos of shape {list(cos.shape)}, "
            f"got {unsqueeze_dim!r}"
        )
    if not 1 <= cos.dim() <= 3:
        raise ValueError(
            f"cos and sin must be (batch, seq, rot), (seq, rot) or (rot,) tables (after unsqueeze(unsqueeze_dim) "
            f"they broadcast against q), got shape {list(cos.shape)}"
        )
    D, rot = q.shape[3], cos.shape[-1]
    if D % 2:
        raise ValueError(f"the head_dim of q and k (their last dim) must be even, got {D}")
    if k.shape[3] != D:
        raise ValueError(f"k must have q's head_dim {D} (last dim), got {k.shape[3]}")
    if rot % 2 or not 2 <= rot <= D:
        raise ValueError(
            f"the rotary dim (cos.shape[-1]) must be even and in [2, head_dim = {D}], got {rot} (a smaller rot "
            "rotates the first rot dims and passes the rest through)"
        )
    # HF: cos.unsqueeze(unsqueeze_dim) broadcasts against q; the unsqueezed (size-1) dim lands on q's head dim.
    u = unsqueeze_dim % (cos.dim() + 1)
    head_axis = u + 4 - (cos.dim() + 1)
    if head_axis not in (1, 2):
        raise ValueError(
            f"unsqueeze_dim={unsqueeze_dim} puts cos's broadcast dim on q's dim {head_axis}; it must be q's head dim: "
            "1 for q (batch, heads, seq, head_dim), 2 for q (batch, seq, heads, head_dim)"
        )
    seq_axis = 3 - head_axis
    if k.shape[0] != q.shape[0] or k.shape[seq_axis] != q.shape[seq_axis]:
        raise ValueError(
            f"q and k must have the same batch and seq sizes (dims 0 and {seq_axis} with unsqueeze_dim="
            f"{unsqueeze_dim}), got q {list(q.shape)} and k {list(k.shape)}"
        )
    tables = []
    for t in (cos, sin):
        t4 = t.unsqueeze(unsqueeze_dim)[(None,) * (3 - t.dim())]  # (1.., ) padded to q's rank
        t3 = t4.squeeze(head_axis)  # (Bc, Sc, rot)
        tables.append(unit_last(t3))
    Bc, Sc = tables[0].shape[:2]
    if Bc not in (1, q.shape[0]) or Sc not in (1, q.shape[seq_axis]):
        raise ValueError(
            f"cos and sin of shape {list(cos.shape)}, unsqueezed at dim {unsqueeze_dim}, do not broadcast against q "
            f"of shape {list(q.shape)} (batch {Bc} vs {q.shape[0]}, seq {Sc} vs {q.shape[seq_axis]})"
        )
    return head_axis, tables[0], tables[1]


def check_inplace(q: Tensor, k: Tensor) -> None:
    """What torch's own in-place ops refuse, refused before the kernel writes: a leaf that requires grad or a view
    of one, a strided last dim (the result would land in a copy), an expanded (stride-0) dim."""
    for t, name in ((q, "q"), (k, "k")):
        base = t._base if t._base is not None else t
        if torch.is_grad_enabled() and base.requires_grad and base.is_leaf:
            what = "a leaf Variable" if base is t else "a view of a leaf Variable"
            raise RuntimeError(
                f"{what} that requires grad ({name}) is being used in an in-place operation "
                "(apply_rotary_pos_emb(..., inplace=True)); use inplace=False"
            )
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"inplace=True needs {name} with a unit last stride, got strides {list(t.stride())}")
        if any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape, strict=True)):
            raise ValueError(
                f"inplace=True cannot write into {name}: it is expanded (stride 0) and several elements share memory"
            )


def may_overlap(q: Tensor, k: Tensor) -> bool:
    """Whether q's and k's memory may intersect (same storage, intersecting byte ranges: conservative for views
    that interleave without sharing elements, e.g. the q and k heads of one merged qkv projection). Not decidable
    while torch.compile traces (storage addresses), where torch's functionalization handles aliasing itself."""
    if tracing() or not (q.numel() and k.numel()):
        return False
    if q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr():
        return False

    def span(t: Tensor) -> tuple[int, int]:  # [first, past-the-last) element of t in its storage
        last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
        return t.storage_offset() * t.element_size(), (last + 1) * t.element_size()

    (q0, q1), (k0, k1) = span(q), span(k)
    return q0 < k1 and k0 < q1


# ---------------------------------------------------------------------------------------------------------------
# Public function


def apply_rotary_pos_emb(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    unsqueeze_dim: int = 1,
    *,
    interleaved: bool = False,
    inplace: bool = False,
) -> tuple[Tensor, Tensor]:
    """Rotary position embedding of q and k, fused; the semantics of Hugging Face transformers' Llama
    ``apply_rotary_pos_emb`` (``cos = cos.unsqueeze(unsqueeze_dim)``; ``q * cos + rotate_half(q) * sin``).

    Args:
        q: ``(B, Hq, S, D)`` (``unsqueeze_dim=1``) or ``(B, S, Hq, D)`` (``unsqueeze_dim=2``); any strides (HF's
            ``view(B, S, H, D).transpose(1, 2)`` is read without a copy; a copy only if the last dim is strided).
        k: the same layout with Hk heads (GQA: Hk may differ from Hq); same dtype, batch, seq and D as q.
        cos, sin: ``(B, S, rot)``, ``(1, S, rot)`` or ``(S, rot)`` tables as HF's rotary modules return them
            (anything that broadcasts against q over batch and seq after ``unsqueeze(unsqueeze_dim)``), used per
            element. ``rot < D``: only the first rot dims rotate, the rest pass through (Phi-3's partial rotary).
            The fused kernels give the tables no gradient: if they require one, a ValueError (use
            ``fastlm.backend('torch')``).
        unsqueeze_dim: the tables' dim that broadcasts over q's heads (HF's argument).
        interleaved: rotate adjacent pairs (2j, 2j + 1) (GPT-J / Cohere's ``rotate_half``, tables repeat-interleaved)
            instead of (j, j + rot/2).
        inplace: write the result into q and k (their own dtype) and return them: no new memory. Autograd handles
            it (q and k are marked dirty); a leaf that requires grad raises, as torch's in-place ops do.

    Returns:
        ``(q_embed, k_embed)``: dtype as HF's formula gives under torch's type promotion (q's dtype with tables of
        q's dtype; float32 for float32 tables and 16-bit q), in q's and k's layout; fp32 math inside.
    """
    for t, name in ((q, "q"), (k, "k"), (cos, "cos"), (sin, "sin")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    # auto: a dtype outside the fused kernels' (fp64, ...) anywhere goes to torch's ops
    odd = next((t for t in (q, k, cos, sin) if t.dtype not in FUSED_DTYPES), q)
    backend = resolve("apply_rotary_pos_emb", odd)
    if backend == "torch":
        q_out, k_out = reference.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim, interleaved=interleaved)
        if not inplace:
            return q_out, k_out
        return q.copy_(q_out), k.copy_(k_out)
    head_axis, cos3, sin3 = check_inputs(q, k, cos, sin, unsqueeze_dim, backend)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError(
            "cos and sin require grad, but the fused rotary kernel gives the tables no gradient (it would be silently "
            "dropped); use fastlm.backend('torch') for trainable tables, or detach them"
        )
    if inplace:
        check_inplace(q, k)
        grads = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        if may_overlap(q, k) or (grads and tracing()):
            # Out of place, then written back: where q and k share memory (the in-place kernel would read what it
            # already rotated), and under torch.compile with autograd, where torch 2.11's AOTAutograd traces the
            # in-place Function on views (mark_dirty) into wrong gradients (seen in the device's twin; 2.14 is right)
            out = call(ROPE_FWD[backend], unit_last(q), unit_last(k), cos3, sin3, head_axis, interleaved, False)
            return q.copy_(out[0]), k.copy_(out[1])
        if grads:
            for t in (q, k):
                if t.requires_grad:
                    RopeInplace.apply(t, cos3, sin3, head_axis, interleaved, backend)
                else:
                    ROPE_INPLACE[backend](t, no_heads(t, head_axis), cos3, sin3, head_axis, interleaved)
        else:
            ROPE_INPLACE[backend](q, k, cos3, sin3, head_axis, interleaved)
        return q, k
    return call(ROPE_FWD[backend], unit_last(q), unit_last(k), cos3, sin3, head_axis, interleaved, False)
