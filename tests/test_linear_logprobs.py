"""F.linear_logprobs (fastlm/ops/linear_logprobs.py): per-token log-probabilities of selected tokens from (hidden,
LM head) against a float64 log_softmax of the full logits: the output and the gradients of hidden, weight and bias
through an arbitrary downstream loss (a random incoming gradient per token), on the fused backends (cpu, Triton)."""

import pytest
import torch
import torch.nn.functional as TF
from helpers import DEVICE, ON_GPU, compare_with_reference

import fastlm
import fastlm.functional as F

BACKENDS = ["triton"] + ([] if ON_GPU else ["cpu"])


def _targets(shape, V, ignore_index=-100):
    t = torch.randint(0, V, shape, device=DEVICE)
    t = t.masked_fill(torch.rand(shape, device=DEVICE) < 0.25, ignore_index)
    t[-1] = ignore_index  # a row with no token at all
    return t


def _ref(h, w, t, b=None, temperature=1.0, ignore_index=-100):
    logits = TF.linear(h, w, b) / temperature
    keep = t != ignore_index
    lp = logits.log_softmax(-1).gather(-1, torch.where(keep, t, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, lp, 0.0)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_full_logits(be, chunk, bias, temperature):
    B, T, H, V = 3, 7, 16, 90
    h = torch.randn(B, T, H, device=DEVICE)
    w = torch.randn(V, H, device=DEVICE) * 0.3
    b = torch.randn(V, device=DEVICE) if bias else None
    t = _targets((B, T), V)
    inputs = {"h": h, "w": w} | ({"b": b} if bias else {})
    with fastlm.backend(be):
        out = compare_with_reference(
            lambda h, w, b=None: F.linear_logprobs(h, w, t, bias=b, temperature=temperature, chunk_size=chunk),
            lambda h, w, b=None: _ref(h, w, t, b, temperature),
            inputs,
            torch.float32,
        )
    assert out.dtype == torch.float32
    assert (out[t == -100] == 0).all() and (out[t != -100] < 0).all()


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_inputs_give_float32(be, dtype):
    if be == "triton" and dtype == torch.bfloat16 and not ON_GPU:
        pytest.skip("the Triton interpreter truncates fp32 -> bf16 casts (a known interpreter trap)")
    h = torch.randn(24, 32, device=DEVICE).to(dtype)
    w = (torch.randn(300, 32, device=DEVICE) * 0.2).to(dtype)
    t = _targets((24,), 300)
    with fastlm.backend(be):
        out = compare_with_reference(
            lambda h, w: F.linear_logprobs(h, w, t, chunk_size=8), lambda h, w: _ref(h, w, t), {"h": h, "w": w}, dtype
        )
    assert out.dtype == torch.float32


def test_torch_backend_is_the_float64_reference():
    h, w = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    t = _targets((2, 5), 20).cpu()
    with fastlm.backend("torch"):
        out = F.linear_logprobs(h, w, t, temperature=1.5)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _ref(h, w, t, temperature=1.5))  # the hidden states divided: ulps apart


@pytest.mark.parametrize("be", BACKENDS)
def test_bad_input(be):
    h, w = torch.randn(4, 8, device=DEVICE), torch.randn(20, 8, device=DEVICE)
    t = torch.randint(0, 20, (4,), device=DEVICE)
    with fastlm.backend(be):
        with pytest.raises(ValueError, match="temperature"):
            F.linear_logprobs(h, w, t, temperature=0.0)
        with pytest.raises(ValueError, match="share H"):
            F.linear_logprobs(h, torch.randn(20, 9, device=DEVICE), t)
        with pytest.raises(ValueError, match="target must have shape"):
            F.linear_logprobs(h, w, t[:3])
        with pytest.raises(TypeError, match="class indices"):
            F.linear_logprobs(h, w, t.float())
        with pytest.raises(NotImplementedError, match="entropy"):
            F.linear_logprobs(h, w, t, return_entropy=True)
        if not ON_GPU:  # on CPU the range check is free (on GPU: NaN, as the cross-entropy documents)
            with pytest.raises(ValueError, match="outside"):
                F.linear_logprobs(h, w, torch.full((4,), 20, device=DEVICE))
