"""Transformer models built only on fastlm.functional / fastlm.nn: a GPT (causal LM) and a BERT (masked LM)."""

from fastlm.models.bert import BERT, BERTConfig, mask_tokens
from fastlm.models.gpt import GPT, GPTConfig

__all__ = ["BERT", "BERTConfig", "GPT", "GPTConfig", "mask_tokens"]
