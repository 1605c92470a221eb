"""fastlm.patch on torch and Hugging Face models: same outputs, losses and every parameter gradient as unpatched."""

import copy

import torch
from helpers import DEVICE

import fastlm
from fastlm import nn as fnn


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare_models(ref, ours, run, atol=1e-4, rtol=1e-4):
    """``run(model) -> loss``; compares the loss and every parameter gradient."""
    loss_ref = run(ref)
    loss_ref.backward()
    loss = run(ours)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, atol=atol, rtol=rtol)
    g_ref, g = _grads(ref), _grads(ours)
    assert g.keys() == g_ref.keys() and g
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def test_transformer_encoder(backend):
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    ref = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).to(DEVICE)
    ours = copy.deepcopy(ref)
    fastlm.patch(ours)
    summary = fastlm.patch_summary(ours)
    # the feed-forward's two Linear layers per layer: their inference calls of <= 16 rows on the CPU kernel
    linear = {"torch.nn.Linear (decode rows on CPU)": 4}
    assert summary == {"torch.nn.LayerNorm": 4, "torch.nn.MultiheadAttention": 2, **linear}
    assert isinstance(ours.layers[0].norm1, fnn.LayerNorm) and isinstance(ours.layers[0].norm1, torch.nn.LayerNorm)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 10, 64, device=DEVICE)
    pad = torch.zeros(3, 10, dtype=torch.bool, device=DEVICE)
    pad[1, 7:] = True
    mask = torch.ones(10, 10, dtype=torch.bool, device=DEVICE).triu(1)  # True = not allowed (torch MHA)
    _compare_models(ref, ours, lambda m: m(x, mask=mask, src_key_padding_mask=pad, is_causal=True).square().mean())
    fastlm.unpatch(ours)
    assert type(ours.layers[0].norm1) is torch.nn.LayerNorm
    assert type(ours.layers[0].self_attn) is torch.nn.MultiheadAttention


def test_patch_switches_and_softmax_modules(backend):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Softmax(-1)).to(DEVICE)
    fastlm.patch(model, norms=False)
    assert type(model[1]) is torch.nn.LayerNorm and type(model[2]) is fnn.Softmax
    fastlm.patch(model)
    assert type(model[1]) is fnn.LayerNorm
    x = torch.randn(2, 8, device=DEVICE)
    torch.testing.assert_close(
        model(x), torch.softmax(torch.nn.functional.layer_norm(model[0](x), (8,), model[1].weight, model[1].bias), -1)
    )


def test_verbose_summary(capsys):
    fastlm.patch(torch.nn.Sequential(torch.nn.RMSNorm(4), torch.nn.RMSNorm(4)), verbose=True)
    assert "2 x torch.nn.RMSNorm" in capsys.readouterr().out
