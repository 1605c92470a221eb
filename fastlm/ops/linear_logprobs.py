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
from fastlm.ops.cross_entropy import check_target_range
from fastlm.ops.linear_cross_entropy import fused_linear_cross_entropy, linear_cross_entropy


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
        return_entropy: not implemented yet (raises NotImplementedError).
        chunk_size: tokens per chunk (default: the linear cross-entropy's rule for the device).

    Returns:
        ``(*)`` float32 log-probabilities (float64 for float64 inputs on the ``torch`` backend), whatever the input
        dtype: per-sequence sums of bf16 log-probabilities lose about three significant digits.

    Backends: ``cpu`` and ``triton`` (fused, as ``linear_cross_entropy``), ``torch`` (full logits, log_softmax,
    gather: the reference); the CUDA C++ backend has no linear kernels (``auto`` takes Triton's). FSDP2 / ZeRO-3
    sharded weights are gathered once per call, and a vocab-sharded DTensor weight runs the vocab-parallel linear
    cross-entropy, as :func:`fastlm.functional.linear_cross_entropy` (a plain tensor on every rank; computed in
    float32 but rounded to the input's dtype on those two paths before the cast back to float32).
    """
    if return_entropy:
        raise NotImplementedError(
            "linear_logprobs(return_entropy=True) is not implemented yet: the per-token entropy needs a mode of the "
            "fused row kernels that fastlm does not have yet (issue 27)"
        )
    if not (isinstance(hidden, Tensor) and isinstance(weight, Tensor) and isinstance(target, Tensor)):
        raise TypeError("hidden, weight and target must be tensors")
    _check(hidden, weight, target, temperature)
    if temperature != 1.0:
        hidden = hidden / temperature
        bias = bias / temperature if bias is not None else None
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
