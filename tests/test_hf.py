"""fastlm.patch and attn_implementation="fastlm" on Hugging Face models built from tiny configs offline: the same
logits, losses and every parameter gradient as the unpatched model (transformers is an optional extra: skipped
without it)."""

import copy

import pytest
import torch
from helpers import DEVICE
from test_patch import _compare_models

import fastlm

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
)


def _hf_models():
    from transformers import BertConfig, GPT2Config, LlamaConfig, Qwen2Config

    return {
        "gpt2": (
            GPT2Config(
                vocab_size=97,
                n_embd=64,
                n_layer=2,
                n_head=4,
                n_positions=64,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            ),
            "causal",
        ),
        "bert": (BertConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), "masked"),
        "llama_gqa": (LlamaConfig(**TINY, num_key_value_heads=2), "causal"),
        "qwen2_gqa": (Qwen2Config(**TINY, num_key_value_heads=1), "causal"),
    }


def _build(cfg, kind, attn):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    torch.manual_seed(0)
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    return auto.from_config(cfg, attn_implementation=attn).to(DEVICE).train()


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama_gqa", "qwen2_gqa"])
def test_hf_patch_parity(backend, name, padding):
    cfg, kind = _hf_models()[name]
    ref = _build(cfg, kind, "sdpa")
    ours = copy.deepcopy(ref)
    fastlm.patch(ours)
    summary = fastlm.patch_summary(ours)
    assert summary.get("HF attention -> 'fastlm'") == 1
    assert any("Norm" in k for k in summary), summary
    if name == "bert":  # BertSelfOutput and BertOutput per layer: residual add fused into the LayerNorm
        assert summary.get("HF *Output (add + LayerNorm)") == 2 * TINY["num_hidden_layers"], summary
    assert ours.config._attn_implementation == "fastlm"
    ids = torch.randint(0, 97, (2, 12), device=DEVICE)
    mask = torch.ones(2, 12, dtype=torch.long, device=DEVICE)
    if padding:
        mask[1, 8:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)

    def run(m):
        # the loss (a patched causal LM in training computes it without logits), and the logits where the mask is on:
        # everything a padded position cannot influence
        loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
        return loss + (m(input_ids=ids, attention_mask=mask).logits * mask[..., None]).square().mean() * 1e-2

    _compare_models(ref, ours, run, atol=2e-4, rtol=2e-4)
    fastlm.unpatch(ours)
    assert ours.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama_gqa"])
def test_hf_attn_implementation_fastlm(backend, name):
    """AutoModel.from_config(cfg, attn_implementation="fastlm") matches "sdpa"; set_attn_implementation works."""
    cfg, kind = _hf_models()[name]
    ref = _build(cfg, kind, "sdpa")
    ours = _build(cfg, kind, "fastlm")
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 97, (2, 10), device=DEVICE)
    mask = torch.ones(2, 10, dtype=torch.long, device=DEVICE)
    mask[0, 6:] = 0
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask).logits
        b = ours(input_ids=ids, attention_mask=mask).logits
        keep = mask.bool()
        torch.testing.assert_close(b[keep], a[keep], atol=2e-4, rtol=2e-4)
        ref.set_attn_implementation("fastlm")
        torch.testing.assert_close(ref(input_ids=ids, attention_mask=mask).logits[keep], a[keep], atol=2e-4, rtol=2e-4)


def test_gemma_offset_rmsnorm(backend):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    ref = GemmaRMSNorm(32, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        ref.weight.normal_()
    ours = copy.deepcopy(ref)
    wrapper = torch.nn.Sequential(ours)
    fastlm.patch(wrapper)
    assert isinstance(ours, GemmaRMSNorm) and type(ours).__name__ == "FusedGemmaRMSNorm"
    x = torch.randn(3, 5, 32, device=DEVICE, requires_grad=True)
    _compare_models(ref, ours, lambda m: (m(x) * torch.arange(32, device=DEVICE)).sum())
