"""Hugging Face integration: ``attn_implementation="fastlm"``.

Registers fastlm's attention with transformers' ``AttentionInterface`` and the SDPA-style boolean mask builder with
its ``AttentionMaskInterface`` (so the causal/padding mask reaches the kernel as a (B, 1, Sq, Sk) bool mask, or as
``None`` plus ``is_causal`` when it is purely causal). Registration happens when fastlm is imported after
transformers, or, if transformers is imported later, right after its import (an import hook): importing fastlm
never imports transformers itself. transformers is optional (``pip install fastlm[hf]``).
"""

import importlib.abc
import importlib.util
import sys

NAME = "fastlm"
_registered = False


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention signature: query (B, H, Sq, D), key/value (B, Hkv, Sk, D) (GQA without
    ``repeat_kv``), attention_mask a bool (B, 1, Sq, Sk) mask (True = attend; sliding windows and padding are
    already in it) or None. Returns (B, Sq, H, D)."""
    from fastlm.ops.attention import scaled_dot_product_attention

    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='fastlm' does not support logit softcapping (Gemma-2 style)")
    if kwargs.get("position_bias") is not None:
        raise ValueError("attn_implementation='fastlm' does not support position_bias (T5-style relative bias)")
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # as transformers' sdpa path: the causal flag only without a mask and outside decoding
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and kv_len > q_len:  # prefill into an empty static cache: keys past the queries are unused
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-1] != key.shape[2]:
        attention_mask = attention_mask[..., : key.shape[2]]
    out = scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> bool:
    """Register ``"fastlm"`` with transformers (idempotent). Returns False when transformers is not installed."""
    global _registered
    if _registered:
        return True
    if importlib.util.find_spec("transformers") is None:
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
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
