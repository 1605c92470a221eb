"""The CPU C++ distillation kernel (csrc/cpu/distillation.cpp) at LM vocabularies: every kind and dtype against the
float64 reference, thread-count independence, and the full opcheck of the cpu ops (the interpreted Triton op skips
test_aot_dispatch_dynamic, tests/test_distillation.py). The linear distillation's chunked cpu path (its row kernel
distillation_rows_cpu writes the gradient over the chunk's student or teacher logits): chunk boundaries, every
kind, hard-label weight and dtype, its memory bound."""

import pytest
import torch
from helpers import ON_GPU, at_thread_counts, compare_with_reference, largest_cpu_allocation

import fastlm
import fastlm.functional as F
from fastlm import reference as R
from fastlm.ops.linear_cross_entropy import chunk_size_for

pytestmark = pytest.mark.skipif(ON_GPU, reason="the cpu kernels are tested on CPU tensors (CPU-only CI)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ops = torch.ops.fastlm


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


@pytest.mark.parametrize("chunk", [1, 7, 26, None])  # one token per chunk, a ragged last chunk, one chunk, the rule
@pytest.mark.parametrize("kind,hard_weight", [("kl", 0.0), ("reverse_kl", 0.4), ("jsd", 1.0), ("jsd", 0.3)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_linear_distillation_chunks(dtype, kind, hard_weight, chunk):
    """The loss and the gradients of student_hidden and student_weight against the float64 reference; 26 tokens in
    (2, 13), ignored rows; with 0 < hard_weight < 1 the distillation's gradient goes over the teacher's logits."""
    V, Hs, Ht = 300, 16, 24
    x = torch.randn(2, 13, Hs).to(dtype)
    w = (torch.randn(V, Hs) * 0.3).to(dtype)
    xt = torch.randn(2, 13, Ht).to(dtype)
    wt = (torch.randn(V, Ht) * 0.3).to(dtype)
    kw = dict(target=_targets(26, V).view(2, 13), kind=kind, beta=0.3, temperature=2.0, hard_weight=hard_weight)
    compare_with_reference(
        lambda x, w: F.linear_distillation_loss(x, w, xt.to(x.dtype), wt.to(x.dtype), chunk_size=chunk, **kw),
        lambda x, w: R.linear_distillation_loss(x, w, xt.to(x.dtype), wt.to(x.dtype), **kw),
        {"x": x, "w": w},
        dtype,
    )


@pytest.mark.parametrize("hard_weight", [0.0, 0.5])
def test_cpu_linear_distillation_never_allocates_the_logits(hard_weight):
    """Forward + backward allocate (chunk, V) buffers (the student's and the teacher's logits), never (T, V)."""
    T, V, H = 300, 2000, 16
    x, w = torch.randn(T, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    xt, wt = torch.randn(T, H), torch.randn(V, H)
    tgt = _targets(T, V)
    chunk = chunk_size_for(T, V, H, "cpu")

    def step():
        loss = F.linear_distillation_loss(x, w, xt, wt, target=tgt, hard_weight=hard_weight)
        torch.autograd.grad(loss, (x, w))

    largest = largest_cpu_allocation(step)
    assert largest <= max(chunk * V * 4, V * H * 4), (largest, chunk)
    with fastlm.backend("torch"):
        assert largest_cpu_allocation(step) >= T * V * 4  # the measurement sees the unfused path's logits


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_cpu_distillation_rows_op(kind):
    """The row kernel: the gradient written over the student's or the teacher's logits equals the one written into
    a separate buffer and distillation_fwd_cpu's, times the batch scale or per-row scales."""
    s, t = torch.randn(9, 3000) * 2, torch.randn(9, 3000) * 2
    tgt = _targets(9, 3000)
    losses, grad = ops.distillation_fwd_cpu(s, t, tgt, kind, 0.3, 2.0, -100, 0, True)
    for scale in (None, torch.tensor([0.25]), torch.rand(9)):
        want = grad if scale is None else grad * (scale.view(-1, 1) if scale.numel() > 1 else scale)
        sep = torch.empty_like(s)
        torch.testing.assert_close(ops.distillation_rows_cpu(s, t, tgt, kind, 0.3, 2.0, -100, scale, sep), losses)
        torch.testing.assert_close(sep, want)
        for over_student in (True, False):
            s2, t2 = s.clone(), t.clone()
            ops.distillation_rows_cpu(s2, t2, tgt, kind, 0.3, 2.0, -100, scale, s2 if over_student else t2)
            assert torch.equal(s2 if over_student else t2, sep)
    torch.library.opcheck(ops.distillation_rows_cpu, (s, t, tgt, kind, 0.3, 2.0, -100, torch.rand(9), sep))
    with pytest.raises(RuntimeError, match="grad_scale must be"):
        ops.distillation_rows_cpu(s, t, tgt, kind, 0.3, 2.0, -100, torch.rand(3), sep)
    with pytest.raises(RuntimeError, match="grad must have student's"):
        ops.distillation_rows_cpu(s, t, tgt, kind, 0.3, 2.0, -100, None, sep[:4])
