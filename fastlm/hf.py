"""Hugging Face integration: ``attn_implementation="fastlm"``, and the forwards that ``fastlm.patch`` gives
Llama-family modules (rotary application, gated MLP, the causal-LM loss).

Registers fastlm's attention with transformers' ``AttentionInterface`` and a mask builder with its
``AttentionMaskInterface``. The mask builder returns ``None`` whenever the kernel can produce the mask itself from
``is_causal`` and the layer's sliding window (causal or sliding-causal attention, no padding, no packed sequences,
keys ending at the last query: the kernel then skips the tiles outside the causal band / the window instead of
reading a dense mask), and otherwise HF's SDPA-style boolean (B, 1, Sq, Sk) mask (padding, packing, a static cache's
unfilled slots, Gemma 3's bidirectional image blocks: it holds the causal edge and the window too). Registration
happens when fastlm is imported after transformers, or, if transformers is imported later, right after its import
(an import hook): importing fastlm never imports transformers itself. transformers is optional
(``pip install fastlm[hf]``).
"""

import importlib.abc
import importlib.util
import inspect
import sys

import torch
from torch import Tensor, nn

NAME = "fastlm"
_registered = False


def _modifiers(module, kwargs: dict):
    """(sliding window W or None, softcap or None, sinks (H,) or None) of an attention call: transformers passes
    them as keywords (``sliding_window``, ``softcap``, ``s_aux``; the module's ``sliding_window`` / ``sinks`` when a
    model does not pass them). ``softcap`` is read from the keywords only, as HF's own attention functions do (Gemma
    3 keeps ``attn_logit_softcapping`` on its modules but never applies it)."""
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    if sinks is None and isinstance(getattr(module, "sinks", None), Tensor):
        sinks = module.sinks  # gpt-oss: its eager attention reads module.sinks
    return window, kwargs.get("softcap"), sinks


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention signature: query (B, H, Sq, D), key/value (B, Hkv, Sk, D) (GQA without
    ``repeat_kv``), attention_mask a bool (B, 1, Sq, Sk) mask (True = attend) or None. Returns ((B, Sq, H, D), None).

    The score modifiers come from the call (see ``_modifiers``): ``sliding_window=W`` (Mistral, Gemma 2/3, gpt-oss:
    key j visible from query i iff ``i - W < j <= i``) becomes ``window=(W - 1, 0)``; ``softcap`` (Gemma 2's
    ``attn_logit_softcapping``) and the sinks (gpt-oss's ``s_aux`` / ``module.sinks``, (H,), trained) pass through,
    as do ``scaling`` and ``dropout``. With a mask, HF's mask already holds the causal edge and the window (placed
    by absolute positions, which a static cache's unfilled slots need), so only the softcap and the sinks are added;
    without one (see :func:`mask_interface`) the causal edge and the window are the kernel's, bottom-right aligned
    (decoding: one query against the whole cache)."""
    from fastlm.ops.attention import scaled_dot_product_attention

    if kwargs.get("position_bias") is not None:
        raise ValueError("attn_implementation='fastlm' does not support position_bias (T5-style relative bias)")
    sliding_window, softcap, sinks = _modifiers(module, kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = None
    if attention_mask is not None:
        is_causal = False  # the mask has the causal edge (or Gemma 3's bidirectional blocks), and the window
        if attention_mask.dim() == 4 and attention_mask.shape[-1] != kv_len:
            attention_mask = attention_mask[..., :kv_len]
    elif is_causal:
        if sliding_window is not None and sliding_window < kv_len:  # else the window hides nothing causal shows
            window = (sliding_window - 1, 0)
        elif q_len == 1:
            is_causal = False  # one query (decoding): it sees the whole cache
        elif q_len != kv_len:
            window = (None, 0)  # a bottom-right causal edge (queries after a cache's keys); torch's is top-left
    out = scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
        window=window,
        softcap=softcap,
        sinks=sinks,
    )
    return out.transpose(1, 2).contiguous(), None


def _kernel_can_mask(q_length, kv_length, q_offset, kv_offset, attention_mask, local_size, config) -> bool:
    """True when a causal (or, with ``local_size``, sliding-causal) mask is exactly what :func:`attention_forward`
    computes from ``is_causal`` and the sliding window without a mask: no padding among the keys, the keys ending at
    the last query (absolute positions: a static cache's unfilled slots, or an offset a cache class reports, need the
    mask), and the local size being the config's sliding window (a chunked-attention mask, Llama 4's, also comes
    with ``local_size``: its chunks are not a window)."""
    if isinstance(q_offset, Tensor) or isinstance(kv_offset, Tensor):
        return False  # static caches: reading the offset would sync / break a compiled graph
    if q_offset + q_length != kv_offset + kv_length:
        return False
    if local_size is None:
        if q_length not in (1, kv_length):  # queries after cached keys: keep the mask (a window-free call)
            return False
    elif config is None or local_size != getattr(config, "sliding_window", None):
        return False
    elif local_size == getattr(config, "attention_chunk_size", None):
        return False
    if attention_mask is None:
        return True
    from fastlm.dispatch import tracing

    if attention_mask.dim() != 2 or tracing():
        return False  # no value reads while compiling (HF does the same)
    end = kv_offset + kv_length
    return attention_mask.shape[-1] >= end and bool(attention_mask[:, kv_offset:end].all())


def mask_interface(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    attention_mask=None,
    local_size=None,
    allow_is_causal_skip: bool = True,
    **kwargs,
):
    """transformers' ``AttentionMaskInterface`` signature (``sdpa_mask``'s): ``None`` when the kernel computes the
    mask itself (see ``_kernel_can_mask``; causal and sliding-causal masks that transformers allows to skip: no
    custom or/and mask functions, no packing), else HF's boolean (B, 1, q_length, kv_length) mask, never skipped for
    ``is_causal`` (torch's top-left rule, which HF relies on for a static cache's prefill, is not what the kernel
    does with Sq != Sk). A bidirectional mask without padding is ``None`` as with sdpa."""
    from transformers.masking_utils import sdpa_mask

    if allow_is_causal_skip and _kernel_can_mask(
        q_length, kv_length, q_offset, kv_offset, attention_mask, local_size, kwargs.get("config")
    ):
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=False,
        **kwargs,
    )


def register() -> bool:
    """Register ``"fastlm"`` with transformers (idempotent). Returns False when transformers is not installed."""
    global _registered
    if _registered:
        return True
    if importlib.util.find_spec("transformers") is None:
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_interface)
    _registered = True
    return True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs :func:`register` right after ``import transformers`` completes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # find the real spec with the other finders
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]
            register()

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    """Called by ``import fastlm``: register now if transformers is loaded, else when it gets imported."""
    if "transformers" in sys.modules:
        register()
    elif importlib.util.find_spec("transformers") is not None:
        if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterImport())


# ---------------------------------------------------------------------------------------------------------------
# Whole-model patching (fastlm.patch): the rotary application, the gated MLP and the causal-LM loss of Llama-family
# models. One table each; a model family whose modules match the table's shapes is handled without code of its own.

# Hugging Face modeling modules whose ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` fastlm's RoPE
# reproduces exactly, and whether their rotation is interleaved (GPT-J / Cohere pairs). Phi-3's rotates the first
# ``cos.shape[-1]`` dims only (partial rotary): fastlm's function does the same when cos is narrower than the head.
ROPE_MODULES = {
    f"transformers.models.{name}.modeling_{name}": False
    for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")
}

# Incremented while a patched attention module runs: the modeling module's ``apply_rotary_pos_emb`` is swapped once
# for a dispatcher that runs fastlm's kernel only then, so unpatched models in the same process keep HF's function.
# A module global (not a context variable) so that torch.compile reads it as a constant and guards on it.
_rope_depth = 0


def rope_globals(cls: type) -> dict | None:
    """The globals of ``cls.forward``'s module when it is one of ``ROPE_MODULES`` and the forward calls its
    ``apply_rotary_pos_emb``; else None."""
    forward = inspect.unwrap(getattr(cls, "forward", None) or (lambda: None))
    g = getattr(forward, "__globals__", {})
    if g.get("__name__") not in ROPE_MODULES or "apply_rotary_pos_emb" not in forward.__code__.co_names:
        return None
    return g


def install_rope(g: dict) -> None:
    """Swap the module's ``apply_rotary_pos_emb`` for a dispatcher (once per module; idempotent)."""
    original = g["apply_rotary_pos_emb"]
    if getattr(original, "_fastlm_original", None) is not None:
        return
    interleaved = ROPE_MODULES[g["__name__"]]

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if _rope_depth == 0:
            return original(q, k, cos, sin, *args, **kwargs)
        from fastlm.ops.rope import apply_rotary_pos_emb as fused

        return fused(q, k, cos, sin, *args, interleaved=interleaved, **kwargs)

    apply_rotary_pos_emb._fastlm_original = original
    apply_rotary_pos_emb.__doc__ = original.__doc__
    g["apply_rotary_pos_emb"] = apply_rotary_pos_emb


def rope_attention_forward(self, *args, **kwargs):
    """A patched attention module: HF's own forward, with its rotary application on fastlm's kernel."""
    global _rope_depth
    _rope_depth += 1
    try:
        return self._fastlm_original_class.forward(self, *args, **kwargs)
    finally:
        _rope_depth -= 1


def is_rope_attention(m: nn.Module) -> bool:
    cls = type(m)
    return cls.__name__.endswith("Attention") and rope_globals(cls) is not None


# HF activation classes -> (fused function, its keyword arguments)
def _gated_activation(act: nn.Module):
    from transformers import activations

    kinds = {
        activations.SiLUActivation: ("swiglu", {}),
        nn.SiLU: ("swiglu", {}),
        activations.GELUTanh: ("geglu", {"approximate": "tanh"}),
        activations.GELUActivation: ("geglu", {"approximate": "none"}),
    }
    for cls in ("PytorchGELUTanh",):  # older transformers name of GELUTanh
        if hasattr(activations, cls):
            kinds[getattr(activations, cls)] = ("geglu", {"approximate": "tanh"})
    kind = kinds.get(type(act))
    if kind is None or (
        type(act) is activations.GELUActivation and getattr(act, "act", None) is not nn.functional.gelu
    ):
        return None
    return kind


def _mlp_parts(m: nn.Module):
    """(projections, activation) of an HF gated MLP: Llama's gate_proj / up_proj / down_proj + act_fn, or Phi-3's
    merged gate_up_proj (first half gate) + down_proj + activation_fn; None for anything else."""
    cls = getattr(m, "_fastlm_original_class", None) or type(m)
    if not cls.__name__.endswith("MLP") or not cls.__module__.startswith("transformers.models."):
        return None
    linear = lambda n: isinstance(getattr(m, n, None), nn.Linear)  # noqa: E731
    if all(linear(n) for n in ("gate_proj", "up_proj", "down_proj")) and hasattr(m, "act_fn"):
        return ("gate_proj", "up_proj"), m.act_fn
    if all(linear(n) for n in ("gate_up_proj", "down_proj")) and hasattr(m, "activation_fn"):
        return ("gate_up_proj",), m.activation_fn
    return None


def is_gated_mlp(m: nn.Module) -> bool:
    parts = _mlp_parts(m)
    return parts is not None and _gated_activation(parts[1]) is not None


def prepare_gated_mlp(m: nn.Module) -> None:
    """Read the MLP's layout and activation once, at patch time (not on every forward)."""
    projections, act = _mlp_parts(m)
    m._fastlm_gated = (len(projections) == 2, *_gated_activation(act))


def gated_mlp_forward(self, hidden_states: Tensor) -> Tensor:
    """down_proj(act(gate_proj(x)) * up_proj(x)) with the activation and the product in one fused kernel (the
    backward recomputes the activation instead of saving it)."""
    from fastlm.ops import gated_mlp

    separate, kind, kwargs = self._fastlm_gated
    fn = getattr(gated_mlp, kind)
    if separate:
        h = fn(self.gate_proj(hidden_states), self.up_proj(hidden_states), **kwargs)
    else:  # Phi-3: one [..., 2 * I] projection, split in the kernel
        h = fn(self.gate_up_proj(hidden_states), **kwargs)
    return self.down_proj(h)


def is_causal_lm(m: nn.Module) -> bool:
    """An HF ``*ForCausalLM`` of one of ``ROPE_MODULES``' families (whose forward is ``logits = lm_head(h)`` then
    ``ForCausalLMLoss``: other families scale the logits after the head (Granite, Cohere) or do not shift the labels
    (Bart-style decoders), so a name rule would give them a wrong loss), with a linear ``lm_head`` and no final
    logit soft-capping (Gemma 2's tanh on the logits cannot be folded into the linear cross-entropy: HF's loss)."""
    cls = type(m)
    config = getattr(m, "config", None)
    return (
        cls.__name__.endswith("ForCausalLM")
        and cls.__module__ in ROPE_MODULES
        and type(getattr(m, "lm_head", None)) is nn.Linear
        and getattr(config, "final_logit_softcapping", None) is None
    )


class LossRequest:
    """What a patched causal LM's forward hands its LM head for one training call: the labels and HF's loss keywords
    (``num_items_in_batch``, ``ignore_index``, ``shift_labels``); the head's forward sets ``loss``."""

    __slots__ = ("labels", "kwargs", "loss")

    def __init__(self, labels: Tensor, kwargs: dict):
        self.labels, self.kwargs, self.loss = labels, kwargs, None


def lm_head_forward(self, hidden_states: Tensor) -> Tensor:
    """The LM head of a patched causal LM: the ordinary linear layer (:func:`fastlm.ops.linear_rows.linear`: decoding's
    few rows on fastlm's CPU kernel), except while its model's training forward asks for the loss
    (``self._fastlm_loss``, a :class:`LossRequest`): then it returns the loss of the fused linear cross-entropy of its
    input instead of the logits (which are never computed).

    The loss is computed here, inside the head module's own forward, so that whatever wraps that forward sees the
    weight in use and the loss as the module's output: FSDP2 has the weight gathered (in its mixed-precision
    ``param_dtype``) and registers its pre-/post-backward hooks on this output and input (the gradient reaches the
    sharded parameter; ``reshard_after_forward=True`` included), DeepSpeed ZeRO-3 has it gathered likewise (outside
    the forward it is a ``numel() == 0`` placeholder). Reading ``lm_head.weight`` after the head returned would give
    a shard or a resharded weight (pytorch#153354, TRL #3368)."""
    request = self._fastlm_loss
    if request is None:  # decoding's few rows on the CPU: fastlm's kernel (fastlm/ops/linear_rows.py; patch(linear=))
        if not getattr(self, "_fastlm_linear", True):
            return nn.functional.linear(hidden_states, self.weight, self.bias)
        from fastlm.ops import linear_rows

        return linear_rows.linear(hidden_states, self.weight, self.bias)
    request.loss = causal_lm_loss(hidden_states, self.weight, self.bias, request.labels, **request.kwargs)
    return request.loss


def causal_lm_forward(self, *args, **kwargs):
    """A patched ``*ForCausalLM``: in training with ``labels``, the loss by the fused linear
    cross-entropy on the LM head's input, computed inside the LM head's forward (:func:`lm_head_forward`: safe under
    FSDP2 and ZeRO-3; under DDP, call the wrapped model, whose forward this is), so the (tokens, vocab) logits are
    never materialised and ``outputs.logits`` is None; otherwise (evaluation, generation, no labels) HF's own
    forward, logits included.

    Same loss as HF's ``ForCausalLMLoss``: labels shifted by one (or ``shift_labels`` as given), ``ignore_index``,
    a mean over the tokens not ignored, or a sum divided by ``num_items_in_batch`` when given (gradient
    accumulation); ``logits_to_keep`` selects the positions exactly as HF does (the loss covers the kept ones)."""
    original = self._fastlm_original_class.forward
    bound = inspect.signature(original).bind(self, *args, **kwargs)
    extra = dict(bound.arguments.get("kwargs", {}))
    labels = bound.arguments.get("labels")
    if not self.training or labels is None:  # HF computes a loss only when labels are given
        return original(self, *args, **kwargs)
    bound.arguments["labels"] = None
    # a ModelOutput to set the loss on; a tuple afterwards if one was asked for (return_dict=False / the config's)
    if "return_dict" in bound.arguments:  # an explicit parameter of this forward
        return_dict, bound.arguments["return_dict"] = bound.arguments["return_dict"], True
    else:  # through **kwargs (transformers 5's can_return_tuple)
        return_dict = extra.pop("return_dict", None)
        bound.arguments["kwargs"] = {**extra, "return_dict": True}
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    head = self.lm_head
    if getattr(head, "_fastlm_loss", False) is not None:
        raise RuntimeError(
            f"fastlm.patch's fused loss cannot find the LM head it patched: {type(self).__name__}.lm_head is now "
            f"{type(head).__name__} (replaced or wrapped after fastlm.patch, e.g. by PEFT); patch after wrapping, "
            "or use fastlm.patch(model, loss=False)"
        )
    request = LossRequest(labels, extra)
    head._fastlm_loss = request
    try:
        out = original(*bound.args, **bound.kwargs)
    finally:
        head._fastlm_loss = None
    # The head's output, as its forward hooks returned it (FSDP2 / ZeRO-3 attach their backward hooks there, and
    # ZeRO-3 may return a new tensor object): the loss, passed through unchanged by the ROPE_MODULES families.
    loss = out.logits
    if request.loss is None or not isinstance(loss, Tensor) or loss.shape != request.loss.shape:
        raise RuntimeError(
            f"fastlm.patch's fused loss: {type(self).__name__}.forward did not return its LM head's output as the "
            "logits unchanged (the head's loss was not found); use fastlm.patch(model, loss=False)"
        )
    # a new output: a ModelOutput keeps its keys (what to_tuple() and out["..."] see) from construction
    out = type(out)(loss=loss, **{k: v for k, v in out.items() if k not in ("loss", "logits")})
    return out if return_dict else out.to_tuple()


def causal_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor | None,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
    **_,
) -> Tensor:
    """HF's ``ForCausalLMLoss`` on ``linear(hidden, weight, bias)`` without materialising the logits (float32 loss,
    as HF upcasts the logits).

    bf16 / fp16 hidden states (FSDP2's mixed precision, a half-precision model) run the fused loss under autocast in
    their own dtype, which is how F.linear_cross_entropy returns its float32 loss: rounding it to the input's dtype
    and back would cost the loss value 3 digits (bf16) and, in fp16, turn a GradScaler's 65536 into inf on its way
    back through the cast."""
    from fastlm.ops.linear_cross_entropy import linear_cross_entropy

    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    reduction = "sum" if num_items_in_batch is not None else "mean"
    device = h.device.type
    half = h.dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(device)
    with torch.autocast(device, dtype=h.dtype, enabled=half):
        loss = linear_cross_entropy(h, weight, target, linear_bias=bias, reduction=reduction, ignore_index=ignore_index)
    loss = loss.float()
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
