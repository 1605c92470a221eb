"""fastlm.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same weights."""

import pytest
import torch
from helpers import DEVICE

from fastlm import nn as fnn


def _pair(**kw):
    ref = torch.nn.MultiheadAttention(**kw).to(DEVICE)
    ours = fnn.MultiheadAttention(**kw).to(DEVICE)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("masks", ["none", "padding", "attn_bool", "attn_float", "both", "causal", "per_head"])
def test_matches_torch(backend, batch_first, masks):
    E, H, N, L, S = 64, 4, 3, 9, 13
    ours, ref = _pair(embed_dim=E, num_heads=H, batch_first=batch_first)
    shape = lambda n, s: (n, s, E) if batch_first else (s, n, E)  # noqa: E731
    q = torch.randn(shape(N, L), device=DEVICE, requires_grad=True)
    kv = torch.randn(shape(N, S), device=DEVICE, requires_grad=True)
    kw = {}
    if masks in ("padding", "both"):
        kw["key_padding_mask"] = (
            torch.arange(S, device=DEVICE)[None, :] >= torch.tensor([13, 7, 10], device=DEVICE)[:, None]
        )
    if masks in ("attn_bool", "both"):
        kw["attn_mask"] = (torch.rand(L, S, device=DEVICE) > 0.7) & ~torch.eye(L, S, dtype=torch.bool, device=DEVICE)
    if masks == "attn_float":
        kw["attn_mask"] = torch.randn(L, S, device=DEVICE)
    if masks == "per_head":
        kw["attn_mask"] = torch.randn(N * H, L, S, device=DEVICE)
    if masks == "causal":
        kv = q
        kw["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE)
        kw["is_causal"] = True
    out, w = ours(q, kv, kv, need_weights=False, **kw)
    want, _ = ref(q, kv, kv, need_weights=False, **kw)
    assert w is None
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    ours_grads = torch.autograd.grad(out, [q, *ours.parameters()], g, allow_unused=True)
    ref_grads = torch.autograd.grad(want, [q, *ref.parameters()], g, allow_unused=True)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_kdim_vdim_unbatched_and_need_weights(backend):
    ours, ref = _pair(embed_dim=32, num_heads=2, kdim=20, vdim=24)
    q, k, v = torch.randn(5, 32, device=DEVICE), torch.randn(7, 20, device=DEVICE), torch.randn(7, 24, device=DEVICE)
    torch.testing.assert_close(
        ours(q, k, v, need_weights=False)[0], ref(q, k, v, need_weights=False)[0], atol=1e-5, rtol=1e-5
    )
    a, wa = ours(q, k, v)  # need_weights=True: torch's unfused path, weights returned
    b, wb = ref(q, k, v)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(wa, wb)
