"""``fastlm.patch(model)``: swap a model's norms, attention and softmax modules for fused ones, in place.

One table of adapters, no per-model-family functions. Each adapter matches a module and names the class it becomes:
the swap changes the module's ``__class__`` in place, so parameters, buffers, hooks, ``state_dict`` keys and even
``isinstance`` checks against the original class keep working, and :func:`unpatch` swaps the class back.

- ``torch.nn.LayerNorm`` / ``RMSNorm`` / ``MultiheadAttention`` / ``Softmax`` / ``LogSoftmax`` /
  ``CrossEntropyLoss`` -> fastlm.nn's subclasses of them;
- Hugging Face norms: any module whose class name ends in ``LayerNorm`` or ``RMSNorm`` and has a ``weight`` and an
  ``eps`` or ``variance_epsilon`` -> a subclass of that class whose forward is the fused kernel (Gemma's
  ``x * (1 + weight)`` RMSNorm included);
- Hugging Face post-norm residual blocks (BERT's ``BertSelfOutput`` / ``BertOutput`` and their RoBERTa, ELECTRA,
  ... copies: a class named ``*Output`` with ``dense``, ``dropout`` and a ``LayerNorm`` whose forward is
  ``LayerNorm(dropout(dense(h)) + input_tensor)``) -> the same with the residual add fused into the LayerNorm
  (``add_layer_norm``: one pass over memory instead of an add and a norm);
- Hugging Face Llama-family models (Llama, Mistral, Qwen2/Qwen3, Gemma/Gemma2/Gemma3, Phi-3; see fastlm/hf.py):
  the attention modules' rotary application (``apply_rotary_pos_emb`` -> fastlm's fused RoPE, only inside the
  patched modules), the gated MLPs (``down(act(gate(x)) * up(x))`` -> ``swiglu`` / ``geglu``, Phi-3's merged
  ``gate_up_proj`` included), and the ``*ForCausalLM`` loss (in training with labels: the fused linear
  cross-entropy on the LM head's input, logits never materialised, ``outputs.logits`` None);
- ``torch.nn.Linear`` (exactly that class) -> the same layer whose fp32 inference calls with at most 16 rows on the CPU
  (decoding) run fastlm's ``linear_rows`` kernel (fastlm/ops/linear_rows.py); every other call is ``F.linear``;
- Hugging Face models (``PreTrainedModel``): ``set_attn_implementation("fastlm")`` (see fastlm/hf.py).
"""

import base64
import dataclasses
import importlib
import inspect
from collections.abc import Callable

from torch import Tensor, nn

from fastlm import hf
from fastlm import nn as fnn
from fastlm.ops import linear_rows, norms


def _eps(m: nn.Module) -> float | None:
    return getattr(m, "variance_epsilon", getattr(m, "eps", None))


def _hf_rms_forward(self, hidden_states: Tensor) -> Tensor:
    weight = self.weight + 1.0 if self._fastlm_offset else self.weight  # Gemma: x * (1 + w)
    return norms.rms_norm(hidden_states, weight.shape, weight, _eps(self))


def _hf_ln_forward(self, hidden_states: Tensor) -> Tensor:
    return norms.layer_norm(hidden_states, self.weight.shape, self.weight, getattr(self, "bias", None), _eps(self))


def _hf_output_forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
    ln = self.LayerNorm
    out, _ = norms.add_layer_norm(
        self.dropout(self.dense(hidden_states)), input_tensor, ln.weight.shape, ln.weight, ln.bias, ln.eps
    )
    return out


def _linear_forward(self, input: Tensor) -> Tensor:
    """torch.nn.Linear's forward; decoding's few rows on the CPU on fastlm's kernel (fastlm/ops/linear_rows.py)."""
    return linear_rows.linear(input, self.weight, self.bias)


def _is_hf_post_norm_output(m: nn.Module) -> bool:
    """BERT-style ``*Output``: dense -> dropout -> LayerNorm(h + input_tensor), recognised by its parts and its
    forward's signature (the source of the forward is not inspected; a class that merely shares the names would
    have to share the signature too)."""
    cls = type(m)
    if not cls.__name__.endswith("Output") or cls.__module__.startswith(("torch.", "fastlm.")):
        return False
    ln = getattr(m, "LayerNorm", None)
    if not (
        isinstance(getattr(m, "dense", None), nn.Linear)
        and isinstance(getattr(m, "dropout", None), nn.Dropout)
        and isinstance(ln, nn.LayerNorm)
        and ln.elementwise_affine
        and len(ln.normalized_shape) == 1
    ):
        return False
    try:
        params = list(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return False
    return params == ["self", "hidden_states", "input_tensor"]


def _is_hf_norm(m: nn.Module, suffix: str) -> bool:
    cls = type(m)
    return (
        cls.__name__.endswith(suffix)
        and not cls.__module__.startswith(("torch.", "fastlm."))
        and isinstance(getattr(m, "weight", None), Tensor)
        and isinstance(_eps(m), float)
    )


@dataclasses.dataclass(frozen=True)
class Adapter:
    name: str
    group: str  # "norms", "attention", "softmax", "rope", "mlp", "loss" or "linear": fastlm.patch's switch for it
    matches: Callable[[nn.Module], bool]
    fused_class: Callable[[type], type]  # original class -> the class to swap in
    prepare: Callable[[nn.Module], None] | None = None  # what else the swap needs, run once per swapped module


_derived: dict = {}
_TOKEN = "_fastlm_class_"  # derived classes are module attributes of this name + base32 of what defines them


def _derive(forward: Callable, keep_name: bool = False) -> Callable[[type], type]:
    """A subclass of the module's own class whose forward is ``forward`` (cached per class), named ``Fused<Name>``,
    or ``<Name>`` with ``keep_name`` (an HF model: ``save_pretrained`` writes the class name into the config's
    ``architectures``, which loaders such as vLLM read).

    Pickling (``torch.save`` of a patched model) finds the class again by its ``__qualname__``: a token naming the
    original class and ``forward``, which this module's ``__getattr__`` turns back into the same derived class (in
    another process too, as long as both can be imported)."""

    def make(cls: type) -> type:
        key = (cls, forward)
        if key not in _derived:
            name = cls.__name__ if keep_name else f"Fused{cls.__name__}"
            spec = "|".join(
                (cls.__module__, cls.__qualname__, forward.__module__, forward.__qualname__, str(+keep_name))
            )
            token = _TOKEN + base64.b32encode(spec.encode()).decode().rstrip("=")
            body = {"forward": _with_signature(forward, cls.forward), "__module__": __name__, "__qualname__": token}
            _derived[key] = type(name, (cls,), body)
        return _derived[key]

    return make


def __getattr__(name: str):
    """The derived class a pickle names (see :func:`_derive`)."""
    if not name.startswith(_TOKEN):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    raw = name[len(_TOKEN) :]
    cls_module, cls_name, fwd_module, fwd_name, keep = base64.b32decode(raw + "=" * (-len(raw) % 8)).decode().split("|")

    def find(module: str, qualname: str):
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj

    return _derive(find(fwd_module, fwd_name), keep == "1")(find(cls_module, cls_name))


def _with_signature(forward: Callable, original: Callable) -> Callable:
    """``forward``, or for a generic ``forward(self, *args, **kwargs)`` a wrapper that presents ``original``'s
    signature to ``inspect`` (through ``__wrapped__``, which accelerate's hooks and ``functools`` keep right):
    transformers reads a model's forward signature to decide what to pass it (``generate`` asks for
    ``logits_to_keep`` only when the forward names it: without it a patched causal LM computed the logits of every
    prompt position at prefill, 110 ms of a 0.9 s decode run). A forward with its own parameters keeps its own."""
    params = list(inspect.signature(forward).parameters.values())
    kinds = [p.kind for p in params[1:]]
    if kinds != [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]:
        return forward

    def patched_forward(self, *args, **kwargs):
        return forward(self, *args, **kwargs)

    patched_forward.__name__ = patched_forward.__qualname__ = "forward"
    patched_forward.__doc__ = forward.__doc__
    patched_forward.__wrapped__ = original
    return patched_forward


def _exact(cls: type) -> Callable[[nn.Module], bool]:
    return lambda m: type(m) is cls


def _swap(module: nn.Module, cls: type) -> None:
    original = type(module)
    module._fastlm_offset = "Gemma" in original.__name__
    module.__class__ = cls
    module._fastlm_original_class = original


def _prepare_rope(module: nn.Module) -> None:
    hf.install_rope(hf.rope_globals(module._fastlm_original_class))


def _prepare_causal_lm(module: nn.Module) -> None:
    """The LM head computes the fused loss of its input during the model's training forward (hf.lm_head_forward)."""
    head = module.lm_head
    if getattr(head, "_fastlm_original_class", None) is None:
        _swap(head, _derive(hf.lm_head_forward)(type(head)))
    head._fastlm_loss = None


ADAPTERS = [
    Adapter("torch.nn.LayerNorm", "norms", _exact(nn.LayerNorm), lambda cls: fnn.LayerNorm),
    Adapter("torch.nn.RMSNorm", "norms", _exact(nn.RMSNorm), lambda cls: fnn.RMSNorm),
    Adapter("HF *RMSNorm", "norms", lambda m: _is_hf_norm(m, "RMSNorm"), _derive(_hf_rms_forward)),
    Adapter("HF *LayerNorm", "norms", lambda m: _is_hf_norm(m, "LayerNorm"), _derive(_hf_ln_forward)),
    Adapter("HF *Output (add + LayerNorm)", "norms", _is_hf_post_norm_output, _derive(_hf_output_forward)),
    Adapter(
        "torch.nn.MultiheadAttention", "attention", _exact(nn.MultiheadAttention), lambda cls: fnn.MultiheadAttention
    ),
    Adapter("torch.nn.Softmax", "softmax", _exact(nn.Softmax), lambda cls: fnn.Softmax),
    Adapter("torch.nn.LogSoftmax", "softmax", _exact(nn.LogSoftmax), lambda cls: fnn.LogSoftmax),
    Adapter("torch.nn.CrossEntropyLoss", "softmax", _exact(nn.CrossEntropyLoss), lambda cls: fnn.CrossEntropyLoss),
    Adapter(
        "HF rotary embedding (in *Attention)",
        "rope",
        hf.is_rope_attention,
        _derive(hf.rope_attention_forward),
        _prepare_rope,
    ),
    Adapter(
        "HF gated MLP (swiglu / geglu)",
        "mlp",
        hf.is_gated_mlp,
        _derive(hf.gated_mlp_forward),
        hf.prepare_gated_mlp,
    ),
    Adapter(
        "HF *ForCausalLM loss (linear cross-entropy)",
        "loss",
        hf.is_causal_lm,
        _derive(hf.causal_lm_forward, keep_name=True),
        _prepare_causal_lm,
    ),
    Adapter("torch.nn.Linear (decode rows on CPU)", "linear", _exact(nn.Linear), _derive(_linear_forward)),
]


def patch(
    model: nn.Module,
    *,
    norms: bool = True,
    attention: bool = True,
    softmax: bool = True,
    rope: bool = True,
    mlp: bool = True,
    loss: bool = True,
    linear: bool = True,
    verbose: bool = False,
) -> nn.Module:
    """Swap, in place, the modules of ``model`` that fastlm has fused versions of; returns ``model``.

    Each switch turns one group of swaps off: ``norms``, ``attention`` (torch's MultiheadAttention and HF's
    ``attn_implementation``), ``softmax`` (softmax / log-softmax / cross-entropy modules), ``rope`` (HF rotary
    application), ``mlp`` (HF gated MLPs), ``loss`` (HF causal-LM loss on the fused linear cross-entropy),
    ``linear`` (``torch.nn.Linear``: fp32 inference calls of at most 16 rows on the CPU, decoding's, run fastlm's
    ``linear_rows`` kernel; every other call stays ``F.linear``).
    ``fastlm.patch_summary(model)`` (or ``verbose=True``) reports what was replaced; :func:`unpatch` restores it.
    """
    groups = dict(norms=norms, attention=attention, softmax=softmax, rope=rope, mlp=mlp, loss=loss, linear=linear)
    summary: dict[str, int] = {}
    for module in model.modules():
        if getattr(module, "_fastlm_original_class", None) is not None:
            continue  # already patched
        for a in ADAPTERS:
            if groups[a.group] and a.matches(module):
                _swap(module, a.fused_class(type(module)))
                if a.prepare is not None:
                    a.prepare(module)
                summary[a.name] = summary.get(a.name, 0) + 1
                break
    if attention and _is_hf_model(model):
        from fastlm import hf

        hf.register()
        model._fastlm_previous_attn = model.config._attn_implementation
        model.set_attn_implementation(hf.NAME)
        summary["HF attention -> 'fastlm'"] = 1
    for module in model.modules():  # the LM heads of patched causal LMs follow `linear` too (hf.lm_head_forward)
        if getattr(module, "_fastlm_loss", False) is None:
            module._fastlm_linear = linear
    model._fastlm_patch_summary = summary
    if verbose:
        print(format_summary(summary))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: every swapped module gets its original class back (and an HF model its previous
    attention implementation)."""
    for module in model.modules():
        original = getattr(module, "_fastlm_original_class", None)
        if original is not None:
            module.__class__ = original
            del module._fastlm_original_class
    previous = getattr(model, "_fastlm_previous_attn", None)
    if previous is not None:
        model.set_attn_implementation(previous)
        del model._fastlm_previous_attn
    model._fastlm_patch_summary = {}
    return model


def patch_summary(model: nn.Module) -> dict[str, int]:
    """What the last :func:`patch` replaced: adapter name -> number of modules."""
    return dict(getattr(model, "_fastlm_patch_summary", {}))


def format_summary(summary: dict[str, int]) -> str:
    if not summary:
        return "fastlm.patch: nothing to replace"
    return "fastlm.patch replaced:\n" + "\n".join(f"  {n:>4} x {name}" for name, n in summary.items())


def _is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "set_attn_implementation") and hasattr(getattr(model, "config", None), "_attn_implementation")


__all__ = ["ADAPTERS", "Adapter", "format_summary", "patch", "patch_summary", "unpatch"]
