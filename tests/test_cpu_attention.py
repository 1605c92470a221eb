"""The CPU C++ attention kernel (csrc/cpu/attention.cpp) at realistic sizes: forward (and lse) against the float64
reference in all three dtypes (its backward is torch ops, covered by test_attention.py's generic tests), head dims,
decoding, GQA with strided inputs, masks, fully masked tiles, thread-count invariance, the cases it lacks, and the raw
op's input checks. Always on CPU tensors, whatever the machine."""

import math

import pytest
import torch
import torch.nn.functional as TF
from test_attention import DTYPES, _fold_causal

import fastlm
import fastlm.functional as F

CPU = torch.device("cpu")
CPU_DTYPES = DTYPES


def _cpu_forward_check(B, H, Hkv, Sq, Sk, D, dtype, causal=False, mask=None, layout=None):
    """fastlm's cpu forward (and lse) against float64 within the dtype's tolerance and the 2x oracle."""
    from helpers import assert_close_ref

    if layout == "bshd":
        mk = lambda s: torch.randn(s[0], s[2], s[1], s[3]).to(dtype).transpose(1, 2)  # noqa: E731
    else:
        mk = lambda s: torch.randn(s).to(dtype)  # noqa: E731
    q, k, v = mk((B, H, Sq, D)), mk((B, Hkv, Sk, D)), mk((B, Hkv, Sk, D))
    gqa = H != Hkv
    m = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    with fastlm.backend("cpu"):
        out, lse = F.scaled_dot_product_attention(
            q, k, v, attn_mask=m, is_causal=causal, enable_gqa=gqa, return_lse=True
        )
    full = _fold_causal(m, Sq, Sk, CPU) if causal else m
    allowed = None
    if full is not None:
        allowed = (full if full.dtype == torch.bool else full > float("-inf")).expand(B, H, Sq, Sk)
    empty = None if allowed is None else ~allowed.any(-1, keepdim=True)
    ref_mask = full if empty is None else full.masked_fill(empty, True if full.dtype == torch.bool else 0.0)

    def ref(cast):
        mm = ref_mask if ref_mask is None or ref_mask.dtype == torch.bool else cast(ref_mask)
        o = TF.scaled_dot_product_attention(cast(q), cast(k), cast(v), attn_mask=mm, enable_gqa=gqa)
        return o if empty is None else o.masked_fill(empty, 0.0)

    assert_close_ref(out, ref(lambda t: t.double()), dtype, "out", None if dtype == torch.float32 else ref(lambda t: t))
    # lse: natural log of the sum of exp of the scaled (masked) scores; -inf on rows with no visible key
    kk = k.double().repeat_interleave(H // Hkv, 1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(D)
    if full is not None:
        s = s.masked_fill(~full, float("-inf")) if full.dtype == torch.bool else s + full.double()
    want = torch.logsumexp(s, -1)
    lse_tol = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-3}[dtype]
    torch.testing.assert_close(lse.double(), want, atol=lse_tol, rtol=lse_tol)
    return out, lse


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_bert_sizes(dtype, causal):
    _cpu_forward_check(2, 12, 12, 512, 512, 64, dtype, causal)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("D", [1, 7, 16, 80, 96, 128, 160, 192, 256])
def test_cpu_head_dims(dtype, D):
    _cpu_forward_check(1, 3, 3, 77, 150, D, dtype, causal=D % 2 == 0)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(
    "Sq,Sk,causal",
    [
        (1, 1024, False),
        (1, 1, True),
        (3, 700, False),
        (5, 300, True),
        (300, 70, True),
        (200, 333, False),
        (33, 65, True),
    ],
)
def test_cpu_decoding_and_ragged(dtype, Sq, Sk, causal):
    """Sq = 1 (decoding), blocks of a few rows (the row-at-a-time path), Sq > Sk with causal (rows beyond Sk see all
    keys), ragged last tiles."""
    _cpu_forward_check(2, 4, 2, Sq, Sk, 128, dtype, causal)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H,Hkv", [(32, 8), (8, 1)])
def test_cpu_gqa_strided(dtype, causal, H, Hkv):
    _cpu_forward_check(1, H, Hkv, 300, 300, 128, dtype, causal, layout="bshd")


CPU_MASKS = {
    # (B, 1, 1, Sk) key padding: one bias per key (stride 0 over queries); batch 1 has whole tiles masked
    "bool_padding": lambda B, H, Sq, Sk: (torch.arange(Sk) < torch.tensor([Sk, 37])[:, None]).view(B, 1, 1, Sk),
    "bool_full": lambda B, H, Sq, Sk: torch.rand(B, H, Sq, Sk) > 0.5,
    "float_per_batch": lambda B, H, Sq, Sk: torch.randn(B, 1, Sq, Sk),
    "float_2d_inf": lambda B, H, Sq, Sk: torch.randn(Sq, Sk).masked_fill(torch.rand(Sq, Sk) < 0.4, float("-inf")),
    "float_padding_inf": lambda B, H, Sq, Sk: torch.zeros(B, 1, 1, Sk).masked_fill(
        torch.arange(Sk) >= torch.tensor([Sk // 3, Sk])[:, None, None, None], float("-inf")
    ),
}


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", list(CPU_MASKS))
def test_cpu_masks(dtype, causal, kind):
    B, H, Sq, Sk = 2, 6, 130, 260
    _cpu_forward_check(B, H, 3, Sq, Sk, 64, dtype, causal, mask=CPU_MASKS[kind](B, H, Sq, Sk))


def test_cpu_fully_masked_rows_and_tiles():
    B, H, Sq, Sk = 2, 4, 100, 300
    mask = torch.rand(B, H, Sq, Sk) > 0.2
    mask[:, :, :, 64:256] = False  # whole key tiles
    mask[1, 2, 7] = False  # whole rows
    mask[0, :, 40:80] = False  # a whole query block's rows
    out, lse = _cpu_forward_check(B, H, H, Sq, Sk, 64, torch.float32, mask=mask)
    assert torch.equal(out[1, 2, 7], torch.zeros(64)) and lse[1, 2, 7] == float("-inf")
    assert torch.equal(out[0, :, 40:80], torch.zeros(H, 40, 64)) and bool((lse[0, :, 40:80] == float("-inf")).all())


def test_cpu_thread_count_invariant():
    """Every row is computed by one thread in a fixed order: the result does not depend on the thread count."""
    from helpers import at_thread_counts

    q, k, v = (torch.randn(2, 4, 150, 64) for _ in range(3))
    with fastlm.backend("cpu"):
        outs = at_thread_counts(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), (1, max(torch.get_num_threads(), 2))
        )
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("case", ["dropout", "varlen"])
def test_cpu_unsupported_cases_raise(case):
    from fastlm.dispatch import UnsupportedCaseError

    with (
        fastlm.backend("cpu"),
        pytest.raises(UnsupportedCaseError, match=f"cpu backend's attention does not support {case}"),
    ):
        if case == "dropout":
            F.scaled_dot_product_attention(*(torch.randn(1, 2, 8, 16) for _ in range(3)), dropout_p=0.1)
        else:
            cu = torch.tensor([0, 3, 8], dtype=torch.int32)
            F.varlen_attention(*(torch.randn(8, 2, 16) for _ in range(3)), cu, cu, 5, 5)


def _raw(q=None, k=None, v=None, mask=None, cu=None, dropout_p=0.0, dtype=torch.float32):
    q = torch.randn(1, 2, 8, 16, dtype=dtype) if q is None else q
    k = torch.randn(1, 2, 8, 16, dtype=dtype) if k is None else k
    v = torch.randn(1, 2, 8, 16, dtype=dtype) if v is None else v
    rng = torch.zeros(1, dtype=torch.int64)
    return torch.ops.fastlm.attention_fwd_cpu(q, k, v, mask, cu, cu, 8, 8, 0.25, False, dropout_p, rng)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(cu=torch.tensor([0, 8], dtype=torch.int32)), "varlen"),
        (dict(dropout_p=0.5), "dropout"),
        (dict(q=torch.randn(1, 2, 8, 16, dtype=torch.float64)), "float32, float16 or bfloat16"),
        (dict(k=torch.randn(1, 2, 8, 16, dtype=torch.float16)), "must have q's dtype"),
        (dict(q=torch.randn(1, 2, 16, 8).transpose(-1, -2)), "unit stride"),
        (dict(q=torch.randn(2, 8, 16)), "4-D"),
        (dict(q=torch.randn(1, 3, 8, 16)), "multiple"),
        (dict(k=torch.randn(1, 2, 8, 32), v=torch.randn(1, 2, 8, 32)), "head dim"),
        (dict(v=torch.randn(1, 2, 9, 16)), "same shape"),
        (dict(mask=torch.ones(1, 2, 8, 9, dtype=torch.bool)), r"mask must be a \(B, H, Sq, Sk\)"),
        (dict(mask=torch.ones(1, 2, 8, 8, dtype=torch.int32)), "mask must be bool"),
        # expanded (stride-0) keys of any claimed length: a size check, not a wrapped-around scratch allocation
        (
            dict(
                k=torch.randn(1, 1, 1, 16).expand(1, 1, 1 << 40, 16),
                v=torch.randn(1, 1, 1, 16).expand(1, 1, 1 << 40, 16),
            ),
            "sequence lengths up to",
        ),
    ],
)
def test_cpu_raw_op_bad_input(kw, match):
    with pytest.raises(RuntimeError, match=match):
        _raw(**kw)


def test_cpu_raw_op_no_keys():
    o, lse = _raw(k=torch.randn(1, 2, 0, 16), v=torch.randn(1, 2, 0, 16))
    assert torch.equal(o, torch.zeros(1, 2, 8, 16)) and bool((lse == float("-inf")).all())
