"""attn_implementation="fastlm" on today's Hugging Face attention variants, built from tiny configs offline: Mistral
(sliding window), Gemma 2 (logit soft-capping, final-logit soft-capping, alternating sliding/global layers), Gemma 3
(its sliding pattern) and gpt-oss (attention sinks, a tiny MoE). Against attn_implementation="eager": the logits,
the loss and every parameter gradient (the sinks' included), with and without left padding; greedy generate() with
the dynamic and the static cache giving the same tokens; and fastlm's attention reached with the modifiers as
keywords (a window, the softcap, the sinks) and without a dense mask where none is needed."""

import copy

import pytest
import torch
from helpers import BACKENDS, DEVICE, ON_GPU
from test_patch import _compare_models

import fastlm
import fastlm.ops.attention

transformers = pytest.importorskip("transformers")

W = 4  # sliding window: small, so that it matters at 12-16 tokens
VOCAB = 128
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
    max_position_embeddings=64,
)
LAYERS = ["sliding_attention", "full_attention"]
FAMILIES = ("mistral", "gemma2", "gemma3", "gpt_oss")
SOFTCAP = 2.0  # Gemma 2's attn_logit_softcapping: small, so that the tanh bends the scores of a tiny model
TOL = dict(atol=2e-4, rtol=2e-4)


@pytest.fixture(params=[pytest.param("torch", id="torch"), *BACKENDS])
def backend(request):
    """The reference ops ("torch") and every fused backend (conftest's list)."""
    with fastlm.backend(request.param):
        yield request.param


def _config(name: str):
    import transformers as t

    if name == "mistral":
        return t.MistralConfig(**TINY, sliding_window=W)
    if name == "gemma2":
        return t.Gemma2Config(
            **TINY,
            sliding_window=W,
            layer_types=LAYERS,
            attn_logit_softcapping=SOFTCAP,
            final_logit_softcapping=5.0,
            query_pre_attn_scalar=16,
        )
    if name == "gemma3":
        return t.Gemma3TextConfig(**TINY, sliding_window=W, layer_types=LAYERS, query_pre_attn_scalar=16)
    if name == "gpt_oss":
        kw = dict(TINY, intermediate_size=32)
        return t.GptOssConfig(**kw, sliding_window=W, layer_types=LAYERS, num_local_experts=4, num_experts_per_tok=2)
    raise ValueError(name)


def _models(name: str):
    """(eager reference, the same weights on attn_implementation="fastlm"), in training mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(_config(name), attn_implementation="eager")
    with torch.no_grad():  # zero-initialised norm offsets, tiny sinks and friends: make every weight matter
        for n, p in ref.named_parameters():
            p.add_(torch.randn_like(p) * (1.0 if n.endswith("sinks") else 0.02))
    ref = ref.to(DEVICE).train()
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("fastlm")
    assert ours.config._attn_implementation == "fastlm"
    return ref, ours


def _batch(padding: bool, length: int = 14):
    ids = torch.randint(0, VOCAB, (2, length), device=DEVICE)
    mask = torch.ones(2, length, dtype=torch.long, device=DEVICE)
    if padding:
        mask[1, :5] = 0  # left padding (generation's)
    return ids, mask


@pytest.fixture
def calls(monkeypatch):
    """Records the keywords of every call that fastlm's HF attention makes to the fused attention."""
    seen = []
    original = fastlm.ops.attention.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        seen.append(dict(kw, sq=query.shape[2], sk=key.shape[2], mask=attn_mask, is_causal=is_causal, scale=scale))
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale, **kw)

    monkeypatch.setattr(fastlm.ops.attention, "scaled_dot_product_attention", recording)
    return seen


def _attention_modules(model):
    return [m for n, m in model.named_modules() if n.endswith("self_attn")]


def _sliding(name: str, layer: int) -> bool:
    return name == "mistral" or LAYERS[layer] == "sliding_attention"  # Mistral: every layer


def _check_modifiers(name, ours, seen):
    """Every attention call carried its layer's modifiers; the causal edge and the window are the kernel's unless a
    mask came, which then has them. Returns the calls, per layer."""
    modules = _attention_modules(ours)
    assert len(modules) == 2 and len(seen) % 2 == 0 and seen
    masks = ([], [])
    for i, c in enumerate(seen):
        layer = i % 2
        masks[layer].append(c)
        sliding = _sliding(name, layer)
        assert c["softcap"] == (SOFTCAP if name == "gemma2" else None), c
        if name == "gpt_oss":
            assert c["sinks"] is modules[layer].sinks
        else:
            assert c["sinks"] is None
        assert c["scale"] == modules[layer].scaling
        if c["mask"] is not None:
            assert c["window"] is None and not c["is_causal"], c
            continue
        assert c["is_causal"] == (c["sq"] > 1), c
        if sliding and c["sk"] > W:
            assert c["window"] == (W - 1, 0), c
        elif c["sq"] not in (1, c["sk"]):
            assert c["window"] == (None, 0), c  # bottom-right causal (queries after cached keys)
        else:
            assert c["window"] is None, c
    return masks


@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("name", FAMILIES)
def test_training_parity(backend, calls, name, padding):
    """Logits (where the mask is on), the loss, and every parameter gradient: fastlm against eager."""
    ref, ours = _models(name)
    ids, mask = _batch(padding)
    # no loss on the pads, nor on the first token after them (a pad predicts it: a query that sees no key, zeros in
    # fastlm, uniform weights in eager)
    after_pad = torch.nn.functional.pad(mask, (1, 0), value=1)[:, :-1] == 0
    labels = ids.masked_fill((mask == 0) | after_pad, -100)

    def run(m):
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        return out.loss + (out.logits * mask[..., None]).square().mean() * 1e-2

    _compare_models(ref, ours, run, **TOL)
    per_layer = _check_modifiers(name, ours, calls)
    # a dense mask only with padding
    assert all((c["mask"] is not None) == padding for cs in per_layer for c in cs), "a dense mask where none is needed"
    with torch.no_grad():
        keep = mask.bool()
        a, b = ref(input_ids=ids, attention_mask=mask).logits, ours(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(b[keep], a[keep], **TOL)
    if name == "gpt_oss":
        assert all(m.sinks.grad is not None and m.sinks.grad.abs().sum() > 0 for m in _attention_modules(ours))


GENERATE = [(name, "dynamic") for name in FAMILIES] + [("gemma2", "static"), ("gpt_oss", "static")]
# Triton's interpreter (no GPU) runs a subset: every family without padding, and the masks of padding and of a static
# cache on the families with global layers
INTERPRETED_GENERATE = {(n, "dynamic", False) for n in FAMILIES} | {
    ("gpt_oss", "dynamic", True),
    ("gemma2", "static", True),
    ("gpt_oss", "static", True),
}


@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("name, cache", GENERATE)
def test_generate_parity(backend, calls, monkeypatch, name, cache, padding):
    """Greedy generate() of 8 tokens: the same tokens as eager (the prompt longer than the window; decode steps of
    one query against the cache). On the Triton backend every call (Sq <= 16) takes the split-KV decode kernel, as
    decoding against a long cache does on a GPU."""
    if backend == "triton" and not ON_GPU and (name, cache, padding) not in INTERPRETED_GENERATE:
        pytest.skip("Triton's interpreter: a subset of the generate cases (INTERPRETED_GENERATE)")
    split_kv = []
    if backend == "triton":
        from fastlm.kernels.attention import decode

        monkeypatch.setenv("FASTLM_SPLIT_KV", "1")
        original = decode.decode_fwd
        monkeypatch.setattr(decode, "decode_fwd", lambda *a, **kw: split_kv.append(1) or original(*a, **kw))
    ref, ours = _models(name)
    ref.eval(), ours.eval()
    ids, mask = _batch(padding, length=9)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        a = ref.generate(ids, **kw)
        b = ours.generate(ids, **kw)
    assert a.shape == (2, 17)
    assert torch.equal(b, a), f"fastlm {b[:, 9:].tolist()} != eager {a[:, 9:].tolist()}"
    assert len(split_kv) == (len(calls) if backend == "triton" else 0)
    assert any(c["sq"] == 1 for c in calls) and any(c["sq"] == 9 for c in calls)
    for layer, cs in enumerate(_check_modifiers(name, ours, calls)):
        with_mask = [c["mask"] is not None for c in cs]
        if cache == "static":
            # decoding on a static cache: HF's mask builders never skip the mask there (compiled decode graphs);
            # the prefill: a global layer's unfilled cache slots need the mask, a sliding layer's window does not
            prefill, decode = with_mask[0], with_mask[1:]
            assert all(decode) and prefill == (padding or not _sliding(name, layer)), with_mask
        elif not padding:
            assert not any(with_mask), "a dense mask where none is needed"
        elif _sliding(name, layer):  # masks while the pads are in the window's view, none after
            assert with_mask[0] and not with_mask[-1], with_mask
        else:
            assert all(with_mask), with_mask


def test_mask_interface_skips_only_what_the_kernel_computes():
    """The registered mask builder: None for causal / sliding-causal masks without padding whose keys end at the
    last query; HF's boolean mask otherwise (padding, a static cache's unfilled slots, chunked attention)."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

    from fastlm import hf

    cfg = _config("mistral")
    sliding = sliding_window_causal_mask_function(W)
    ones = torch.ones(2, 10, dtype=torch.bool)
    pad = ones.clone()
    pad[0, :2] = False
    base = dict(batch_size=2, config=cfg, device="cpu")

    def check(expect_none, q, kv, q_off=0, kv_off=0, fn=causal_mask_function, attention_mask=None, local=None):
        got = hf.mask_interface(
            **base, q_length=q, kv_length=kv, q_offset=q_off, kv_offset=kv_off, mask_function=fn,
            attention_mask=attention_mask, local_size=local,
        )  # fmt: skip
        if expect_none:
            assert got is None
            return
        want = sdpa_mask(
            **base, q_length=q, kv_length=kv, q_offset=q_off, kv_offset=kv_off, mask_function=fn,
            attention_mask=attention_mask, local_size=local, allow_is_causal_skip=False,
        )  # fmt: skip
        assert got is not None and torch.equal(got, want)

    check(True, 10, 10)  # training / prefill
    check(True, 10, 10, attention_mask=ones)
    check(True, 1, 10, q_off=9)  # decoding, dynamic cache
    check(True, 10, 10, fn=sliding, local=W)
    check(True, 1, W, q_off=9, kv_off=6, fn=sliding, local=W)  # decoding with a full sliding-window cache
    check(True, 3, 10, q_off=7, fn=sliding, local=W, attention_mask=ones)  # chunked prefill: kernel's window
    check(False, 3, 10, q_off=7)  # queries after cached keys, no window: the mask (a window-free kernel call)
    check(False, 10, 10, attention_mask=pad)  # padding
    check(False, 10, 10, fn=sliding, local=W, attention_mask=pad)
    check(False, 4, 10, q_off=0)  # prefill into a static cache of 10 slots
    check(False, 1, 10, q_off=torch.tensor(3))  # a static cache's tensor offset
    check(False, 10, 10, fn=sliding, local=W + 1)  # a local size that is not the config's window (chunked)


def test_unsupported_bias_is_refused():
    from fastlm import hf

    q = torch.randn(1, 4, 3, 16)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="position_bias"):
        hf.attention_forward(module, q, q, q, None, position_bias=torch.zeros(1, 4, 3, 3))
