"""The CPU C++ rotary embedding (csrc/cpu/rope.cpp) at model sizes: Llama-3 heads (GQA 32 / 8, D 128) over many
token rows (several parallel chunks, the vectorised loops' tails), every dtype and variant against HF in float64;
results independent of the thread count; bad input on the raw ops."""

import pytest
import torch
from helpers import ON_GPU, at_thread_counts, compare_with_reference
from transformers.models.llama import modeling_llama

import fastlm
import fastlm.functional as F
from fastlm import reference

pytestmark = pytest.mark.skipif(ON_GPU, reason="the cpu kernels are tested on CPU tensors (CPU-only CI)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ops = torch.ops.fastlm


@pytest.fixture(autouse=True)
def _cpu():
    with fastlm.backend("cpu"):
        yield


@pytest.mark.parametrize("interleaved,rot", [(False, 128), (False, 64), (True, 128), (True, 96)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_rope_llama_sizes(dtype, interleaved, rot):
    B, S, Hq, Hk, D = 2, 67, 32, 8, 128
    q = torch.randn(B, S, Hq, D, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, S, Hk, D, dtype=dtype).transpose(1, 2)
    cos, sin = torch.randn(1, S, rot, dtype=dtype), torch.randn(1, S, rot, dtype=dtype)

    def ours(q, k, cos, sin):
        return torch.cat([t.flatten() for t in F.apply_rotary_pos_emb(q, k, cos, sin, interleaved=interleaved)])

    def ref(q, k, cos, sin):
        out = reference.apply_rotary_pos_emb(q, k, cos, sin, 1, interleaved)
        return torch.cat([t.flatten() for t in out])

    compare_with_reference(ours, ref, {"q": q, "k": k, "cos": cos, "sin": sin}, dtype, differentiable=["q", "k"])


def test_cpu_rope_thread_count_invariant():
    q = torch.randn(3, 50, 8, 64).transpose(1, 2)
    k = torch.randn(3, 50, 2, 64).transpose(1, 2)
    cos, sin = torch.randn(3, 50, 64), torch.randn(3, 50, 64)
    outs = at_thread_counts(lambda: F.apply_rotary_pos_emb(q, k, cos, sin), (1, max(2, torch.get_num_threads())))
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))


def test_cpu_rope_inplace_matches_out_of_place():
    q = torch.randn(2, 40, 4, 32, dtype=torch.bfloat16)
    k = torch.randn(2, 40, 2, 32, dtype=torch.bfloat16)
    cos, sin = torch.randn(40, 24, dtype=torch.bfloat16), torch.randn(40, 24, dtype=torch.bfloat16)
    want = F.apply_rotary_pos_emb(q, k, cos, sin, 1)
    qi, ki = q.clone(), k.clone()
    F.apply_rotary_pos_emb(qi, ki, cos, sin, 1, inplace=True)
    assert torch.equal(qi, want[0]) and torch.equal(ki, want[1])
    assert torch.equal(qi[..., 24:], q[..., 24:])  # pass-through dims untouched
    hf = modeling_llama.apply_rotary_pos_emb  # and HF on the rotated part, to the bf16 rounding of its three steps
    torch.testing.assert_close(qi[..., :24], hf(q[..., :24], k[..., :24], cos, sin, 1)[0], rtol=2e-2, atol=2e-2)


def _raw(q=(2, 3, 4, 8), k=(2, 3, 2, 8), cos=(1, 3, 8), sin=(1, 3, 8), head_axis=2):
    """Raw op arguments: q / k (B, S, H, D) with head_axis 2; a shape tuple becomes a random fp32 tensor."""
    t = [torch.randn(*a) if isinstance(a, tuple) else a for a in (q, k, cos, sin)]
    return (*t, head_axis)


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(q=(2, 3, 4)), "4-D"),
        (dict(k=(2, 5, 2, 8)), "k must"),
        (dict(cos=(1, 3, 6)), "same"),
        (dict(cos=(1, 4, 8), sin=(1, 4, 8)), "broad"),
        (dict(cos=(1, 3, 5), sin=(1, 3, 5)), "rotary"),
        (dict(head_axis=3), "axis"),
        (dict(q=torch.randn(2, 3, 4, 8).double()), "float32, float16 or bfloat16"),
        (dict(q=torch.randn(2, 3, 4, 16)[..., ::2]), "unit stride"),
    ],
)
def test_cpu_rope_raw_op_bad_input(over, match):
    args = _raw(**over)
    with pytest.raises(RuntimeError, match=match):
        ops.rope_fwd_cpu(*args, False, False)
    with pytest.raises(RuntimeError, match=match):
        ops.rope_inplace_cpu(*args, False)
