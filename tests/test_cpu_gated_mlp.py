"""SwiGLU / GeGLU on the cpu backend (csrc/cpu/gated_mlp.cpp) at sizes the Triton interpreter cannot afford (rows
wider than one work item of 4096 columns, with a tail), results independent of the thread count, and the raw ops'
input checks. CPU tensors: these run on every machine."""

import pytest
import torch
from helpers import at_thread_counts, compare_with_reference
from test_cpu_norms import _poison_heap
from test_gated_mlp import DTYPES, KINDS

import fastlm

ACTS = (0, 1, 2)  # silu, gelu tanh, gelu erf


@pytest.mark.parametrize("M,I", [(64, 9000), (300, 1000), (3, 14336)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_large(kind, dtype, M, I):
    _poison_heap(M * I * 8)
    ours, theirs = KINDS[kind]
    with fastlm.backend("cpu"):
        g, u = (torch.randn(M, I) * 2).to(dtype), torch.randn(M, I).to(dtype)
        compare_with_reference(ours, theirs, {"gate": g, "up": u}, dtype)
        gu = torch.randn(M, 2 * I).to(dtype)  # the merged form: gradient of one (M, 2I) tensor
        compare_with_reference(ours, theirs, {"gate": gu}, dtype)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_same_bits_for_any_thread_count(act, dtype):
    """Every output element is computed by one thread in a fixed way: bitwise equal under 1, 2 or 3 threads."""
    gu, dy = torch.randn(40, 2 * 5000).to(dtype), torch.randn(40, 5000).to(dtype)

    def run():
        y = torch.ops.fastlm.gated_mlp_fwd_cpu(gu, None, act)
        return y, torch.ops.fastlm.gated_mlp_bwd_cpu(dy, gu, None, act)[0]

    results = at_thread_counts(run, (1, 2, 3))
    for y, dgu in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(dgu, results[0][1])


def _m(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


fwd, bwd = torch.ops.fastlm.gated_mlp_fwd_cpu, torch.ops.fastlm.gated_mlp_bwd_cpu


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: fwd(_m(4, 8), _m(4, 8), 3), "act must be 0"),
        (lambda: fwd(_m(8), _m(8), 0), "gate must be 2-D"),
        (lambda: fwd(_m(4, 8), _m(4, 9), 0), "up must have gate's shape"),
        (lambda: fwd(_m(4, 8), _m(4, 8, dtype=torch.bfloat16), 0), "up must have gate's dtype"),
        (lambda: fwd(_m(4, 16)[:, ::2], None, 0), "gate must have unit stride"),
        (lambda: fwd(_m(4, 7), None, 1), "must be even"),
        (lambda: fwd(_m(4, 8, dtype=torch.float64), None, 0), "gate must be float32"),
        (lambda: bwd(_m(4, 5), _m(4, 8), None, 0), "dy must have the output's shape"),
        (lambda: bwd(_m(4, 4, dtype=torch.float16), _m(4, 8), None, 2), "dy must have gate's dtype"),
        (lambda: bwd(_m(4, 8)[:, ::2], _m(4, 8), None, 0), "dy must have unit stride"),
    ],
)
def test_cpu_raw_op_checks(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()
