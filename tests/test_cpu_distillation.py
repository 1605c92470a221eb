"""The CPU C++ distillation kernel (csrc/cpu/distillation.cpp) at LM vocabularies: every kind and dtype against the
float64 reference, thread-count independence, and the full opcheck of the cpu ops (the interpreted Triton op skips
test_aot_dispatch_dynamic, tests/test_distillation.py)."""

import pytest
import torch
from helpers import ON_GPU, at_thread_counts, compare_with_reference

import fastlm
import fastlm.functional as F
from fastlm import reference as R

pytestmark = pytest.mark.skipif(ON_GPU, reason="the cpu kernels are tested on CPU tensors (CPU-only CI)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _cpu():
    with fastlm.backend("cpu"):
        yield


def _targets(n, V):
    t = torch.randint(0, V, (n,)).masked_fill(torch.rand(n) < 0.2, -100)
    t[0] = 0
    return t


@pytest.mark.parametrize("V,N", [(128256, 12), (262144, 4)])
@pytest.mark.parametrize("kind,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.4)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_distillation_vocab(dtype, kind, beta, V, N):
    s = (torch.randn(N, V) * 3).to(dtype)
    t = (torch.randn(N, V) * 3).to(dtype)
    tgt = _targets(N, V)
    kw = dict(kind=kind, beta=beta, temperature=2.0, target=tgt)
    compare_with_reference(
        lambda s: F.distillation_loss(s, t, **kw),
        lambda s: R.distillation_loss(s, t.to(s.dtype), **kw),
        {"s": s},
        dtype,
    )


def test_cpu_distillation_thread_count_independent():
    s, t = torch.randn(64, 5000, requires_grad=True), torch.randn(64, 5000)

    def run():
        loss = F.distillation_loss(s, t, kind="jsd")
        return loss, torch.autograd.grad(loss, s)[0]

    outs = at_thread_counts(run, (1, max(2, torch.get_num_threads())))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_cpu_opcheck_full():
    s = torch.randn(5, 40, requires_grad=True)
    t = torch.randn(5, 40)
    tgt = _targets(5, 40)
    for kind, red in ((0, 1), (1, 0), (2, 2)):
        torch.library.opcheck(torch.ops.fastlm.distillation_fwd_cpu, (s, t, tgt, kind, 0.3, 1.5, -100, red, True))
    x, w = torch.randn(7, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    xt, wt = torch.randn(7, 6), torch.randn(40, 6)
    for weight_grad in (True, False):  # False: a frozen student head, no (V, H) gradient
        args = (x, w, xt, wt, _targets(7, 40), 2, 0.5, 2.0, 0.3, -100, True, weight_grad, 3, "cpu")
        torch.library.opcheck(torch.ops.fastlm.linear_distillation_fwd, args)
