"""F.linear_logprobs (fastlm/ops/linear_logprobs.py): per-token log-probabilities of selected tokens from (hidden,
LM head) against a float64 log_softmax of the full logits: the output and the gradients of hidden, weight and bias
through an arbitrary downstream loss (a random incoming gradient per token), on the fused backends (cpu, Triton)."""

import pytest
import torch
import torch.nn.functional as TF
from helpers import DEVICE, ON_GPU, OPCHECK_TESTS, compare_with_reference

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


def _ref_entropy(h, w, t, b=None, temperature=1.0, ignore_index=-100):
    ls = (TF.linear(h, w, b) / temperature).log_softmax(-1)
    return torch.where(t != ignore_index, -(ls.exp() * ls).sum(-1), 0.0)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_entropy_matches_full_logits(be, chunk, bias):
    """return_entropy: the log-probabilities and the entropies, and the gradients of hidden, weight and bias through
    a loss on both (random incoming gradients per token), against float64 on the full logits."""
    B, T, H, V = 2, 5, 16, 300  # one block of classes in the Triton kernel; the wide vocabulary is below
    h = torch.randn(B, T, H, device=DEVICE)
    w = torch.randn(V, H, device=DEVICE) * 0.4
    b = torch.randn(V, device=DEVICE) if bias else None
    t = _targets((B, T), V)
    inputs = {"h": h, "w": w} | ({"b": b} if bias else {})
    with fastlm.backend(be):
        lp, ent = compare_with_reference(  # both outputs stacked: random incoming gradients on each
            lambda h, w, b=None: torch.stack(
                F.linear_logprobs(h, w, t, bias=b, temperature=0.9, chunk_size=chunk, return_entropy=True)),
            lambda h, w, b=None: torch.stack((_ref(h, w, t, b, 0.9), _ref_entropy(h, w, t, b, 0.9))),
            inputs,
            torch.float32,
        )  # fmt: skip
    assert lp.dtype == ent.dtype == torch.float32
    assert (ent[t == -100] == 0).all() and (ent[t != -100] > 0).all()


@pytest.mark.parametrize("be", BACKENDS)
def test_entropy_wide_vocabulary_and_large_logits(be):
    """A vocabulary over the Triton kernel's class block (several chunks of the online sweep) and logits of +-60,
    where a naive sum p z loses every digit; the entropy's gradient alone (the log-probabilities unused)."""
    V, H = 5000, 8
    g = torch.Generator().manual_seed(11)
    h = torch.randn(6, H, generator=g, dtype=torch.float64) * 3
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    w[:3] *= 20  # a few dominant classes: entropies near 0 for some rows
    t = torch.randint(0, V, (6,), generator=g)
    t[2] = -100
    hf, wf = h.float().to(DEVICE).requires_grad_(), w.float().to(DEVICE).requires_grad_()
    with fastlm.backend(be):
        _, ent = F.linear_logprobs(hf, wf, t.to(DEVICE), return_entropy=True, chunk_size=4)
    h64, w64 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = _ref_entropy(h64, w64, t)
    gout = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    (ent * gout.float().to(DEVICE)).sum().backward()
    (ref * gout).sum().backward()
    torch.testing.assert_close(ent.double().cpu(), ref.detach(), rtol=1e-4, atol=1e-4)
    for got, want in ((hf.grad, h64.grad), (wf.grad, w64.grad)):
        scale = want.abs().max().item()  # saturated rows (entropy ~0) have gradients near 0: an absolute floor
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-3, atol=1e-4 * scale + 1e-6)


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


@pytest.mark.parametrize("be", BACKENDS)
def test_entropy_opcheck(be):
    from fastlm.ops.linear_logprobs import linear_logprobs_entropy_bwd, linear_logprobs_entropy_fwd

    x, w, b = torch.randn(7, 8, device=DEVICE), torch.randn(30, 8, device=DEVICE), torch.randn(30, device=DEVICE)
    t = _targets((7,), 30)
    fwd_args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), t, -100, 3, be)
    torch.library.opcheck(linear_logprobs_entropy_fwd, fwd_args, test_utils=OPCHECK_TESTS)
    g = torch.randn(7, device=DEVICE)
    for weight_grad in (True, False):
        bwd_args = (x.detach(), w.detach(), b.detach(), t, g, g.clone(), -100, 3, be, weight_grad)
        torch.library.opcheck(linear_logprobs_entropy_bwd, bwd_args, test_utils=OPCHECK_TESTS)
    if be == "cpu":
        from fastlm.ops.linear_logprobs import LOGPROB_ENTROPY_ROWS

        lg = torch.randn(7, 30)
        torch.library.opcheck(LOGPROB_ENTROPY_ROWS["cpu"], (lg, t, -100, g, g.clone(), lg.clone()))
        with pytest.raises(RuntimeError, match="out of range"):
            LOGPROB_ENTROPY_ROWS["cpu"](lg, torch.full((7,), 30), -100, None, None, None)


def test_entropy_bad_input_and_torch_backend():
    h, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    t = torch.randint(0, 20, (4,))
    with fastlm.backend("torch"):
        lp, ent = F.linear_logprobs(h, w, t, return_entropy=True)
    torch.testing.assert_close(ent, _ref_entropy(h, w, t))
    torch.testing.assert_close(lp, _ref(h, w, t))


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
        if not ON_GPU:  # on CPU the range check is free (on GPU: NaN, as the cross-entropy documents)
            with pytest.raises(ValueError, match="outside"):
                F.linear_logprobs(h, w, torch.full((4,), 20, device=DEVICE))


# ---- the one-pass mode of the post-training losses (logprob_loss): the same loss, metrics and gradients as the
# two-pass mode, whatever the row grouping; and the loss in low precision against float64


def _loss_cases(B, T, V, dev, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, V, (B, T), generator=g).to(dev)
    t[:, :2] = -100
    t[1, 4:] = -100
    pref = torch.tensor([True, False] * (B // 2), device=dev)
    adv = torch.randn(B, generator=g).to(dev)
    old = (-torch.rand(B, T, generator=g) * 6).to(dev)
    return {
        "dpo_sigmoid": lambda h, w, b, rh, rw, c: F.linear_dpo_loss(
            h, w, t, bias=b, ref_hidden=rh, ref_weight=rw, nll_weight=0.3, chunk_size=c),
        "dpo_sft_average": lambda h, w, b, rh, rw, c: F.linear_dpo_loss(
            h, w, t, bias=b, ref_hidden=rh, ref_weight=rw, loss_type="sft", average_log_prob=True, chunk_size=c),
        "dpo_ipo": lambda h, w, b, rh, rw, c: F.linear_dpo_loss(h, w, t, bias=b, loss_type="ipo", chunk_size=c),
        "orpo": lambda h, w, b, rh, rw, c: F.linear_orpo_loss(h, w, t, bias=b, chunk_size=c),
        "cpo_simpo": lambda h, w, b, rh, rw, c: F.linear_cpo_loss(h, w, t, bias=b, loss_type="simpo", chunk_size=c),
        "kto": lambda h, w, b, rh, rw, c: F.linear_kto_loss(
            h, w, t, preference=pref, kl=0.05, bias=b, ref_hidden=rh, ref_weight=rw, desirable_weight=1.3,
            chunk_size=c),
        "grpo_dapo": lambda h, w, b, rh, rw, c: F.linear_grpo_loss(
            h, w, t.clamp(min=0), t != -100, adv, bias=b, old_logps=old, chunk_size=c, temperature=0.8),
        "grpo_sequence": lambda h, w, b, rh, rw, c: F.linear_grpo_loss(
            h, w, t.clamp(min=0), t != -100, adv, bias=b, loss_type="grpo", importance_sampling_level="sequence",
            chunk_size=c),
    }  # fmt: skip


def _run(fn, h, w, b, rh, rw, chunk):
    hh, ww, bb = (x.detach().clone().requires_grad_() for x in (h, w, b))
    loss, metrics = fn(hh, ww, bb, rh, rw, chunk)
    (loss * 1.7).backward()  # an incoming gradient other than 1
    return loss.detach(), metrics, (hh.grad, ww.grad, bb.grad)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize(
    "case", ["dpo_sigmoid", "dpo_sft_average", "dpo_ipo", "orpo", "cpo_simpo", "kto", "grpo_dapo", "grpo_sequence"]
)
def test_one_pass_matches_two_pass(be, case, monkeypatch):
    import fastlm.ops.linear_logprobs as ll

    B, T, H, V = 6, 7, 16, 80
    fns = _loss_cases(B, T, V, DEVICE)
    fn = fns[case]
    h, rh = torch.randn(B, T, H, device=DEVICE), torch.randn(B, T, H, device=DEVICE)
    w, rw = torch.randn(V, H, device=DEVICE) * 0.3, torch.randn(V, H, device=DEVICE) * 0.3
    b = torch.randn(V, device=DEVICE)
    calls = []
    apply = ll._OnePass.apply
    monkeypatch.setattr(ll._OnePass, "apply", lambda *a: calls.append(len(a[5])) or apply(*a))
    with fastlm.backend(be):
        one = _run(fn, h, w, b, rh, rw, 1 << 20)  # one group
        per_unit = _run(fn, h, w, b, rh, rw, 1)  # a group per row / pair
        assert len(calls) == 2 and calls[0] == 1 and calls[1] == (B if case[:3] in ("kto", "grp") else B // 2), calls
        monkeypatch.setattr(ll, "ONE_PASS_MAX_BYTES", 0)
        two = _run(fn, h, w, b, rh, rw, 1 << 20)
        assert len(calls) == 2  # the two-pass mode
    for other in (per_unit, two):
        torch.testing.assert_close(other[0], one[0], rtol=1e-5, atol=1e-6)
        assert other[1].keys() == one[1].keys()
        for k in one[1]:
            torch.testing.assert_close(other[1][k], one[1][k], rtol=1e-5, atol=1e-6, equal_nan=True, msg=k)
        for g_other, g_one, name in zip(other[2], one[2], ("hidden", "weight", "bias"), strict=True):
            torch.testing.assert_close(g_other, g_one, rtol=1e-4, atol=1e-5, msg=name)
    assert one[2][0].abs().sum() > 0 and one[2][1].abs().sum() > 0


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["dpo_sigmoid", "kto", "grpo_dapo"])
def test_losses_in_low_precision(be, dtype, case):
    """The losses on fp16 / bf16 hidden states and heads against the same losses in float64 (torch backend): the
    error of the loss and of every gradient within twice that of the unfused computation in the same dtype (plus two
    ulps of the gradient's largest element)."""
    if be == "triton" and dtype == torch.bfloat16 and not ON_GPU:
        pytest.skip("the Triton interpreter truncates fp32 -> bf16 casts (a known interpreter trap)")
    B, T, H, V = 4, 6, 32, 96
    fns = _loss_cases(B, T, V, DEVICE)
    fn = fns[case]
    h, rh = torch.randn(B, T, H, device=DEVICE), torch.randn(B, T, H, device=DEVICE)
    w, rw = torch.randn(V, H, device=DEVICE) * 0.2, torch.randn(V, H, device=DEVICE) * 0.2
    b = torch.randn(V, device=DEVICE) * 0.5
    low = [x.to(dtype) for x in (h, w, b, rh, rw)]
    with fastlm.backend("torch"):
        ref = _run(fn, *[x.double() for x in low], None)
        unfused = _run(fn, *low, None)
    with fastlm.backend(be):
        out = _run(fn, *low, None)
    assert out[0].dtype == torch.float32

    def err(a, r):
        return (a.double() - r.double()).abs().max().item()

    for i, name in ((0, "loss"),):
        assert err(out[i], ref[i]) <= 2 * err(unfused[i], ref[i]) + 1e-5, name
    for got, base, r, name in zip(out[2], unfused[2], ref[2], ("hidden", "weight", "bias"), strict=True):
        assert got.dtype == dtype
        # the fused path rounds each logit's gradient to the dtype before the matmuls: two ulps of the largest
        assert err(got, r) <= 2 * err(base, r) + 2 * torch.finfo(dtype).eps * r.abs().max().item(), name


# ---- packed (padding-free) batches: the same sequences packed (cu_seqlens, position_ids) and padded give the same
# loss, metrics and gradients


def _packed_cases(lengths, V, dev):
    B = len(lengths)
    g = torch.Generator().manual_seed(5)
    T = max(lengths)
    t = torch.randint(0, V, (B, T), generator=g).to(dev)
    t[:, :2] = -100  # prompts
    for i, n in enumerate(lengths):
        t[i, n:] = -100  # padding
    pref = torch.tensor([True, False] * (B // 2), device=dev)
    adv = torch.randn(B, generator=g).to(dev)
    old = (-torch.rand(B, T, generator=g) * 6).to(dev)
    return t, {
        "dpo": lambda h, w, t, b, rh, extra, **k: F.linear_dpo_loss(
            h, w, t, bias=b, ref_hidden=rh, nll_weight=0.5, **k),
        "dpo_aot": lambda h, w, t, b, rh, extra, **k: F.linear_dpo_loss(h, w, t, bias=b, loss_type="aot", **k),
        "orpo": lambda h, w, t, b, rh, extra, **k: F.linear_orpo_loss(h, w, t, bias=b, **k),
        "cpo": lambda h, w, t, b, rh, extra, **k: F.linear_cpo_loss(h, w, t, bias=b, loss_type="ipo", **k),
        "kto": lambda h, w, t, b, rh, extra, **k: F.linear_kto_loss(
            h, w, t, preference=pref, kl=0.02, bias=b, ref_hidden=rh, **k),
        "grpo": lambda h, w, t, b, rh, extra, **k: F.linear_grpo_loss(
            h, w, t.clamp(min=0), t != -100, adv, bias=b, old_logps=extra(old), loss_type="grpo", **k),
    }  # fmt: skip


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("case", ["dpo", "dpo_aot", "orpo", "cpo", "kto", "grpo"])
@pytest.mark.parametrize("how", ["cu_seqlens", "position_ids"])
def test_packed_matches_padded(be, case, how):
    lengths = [7, 4, 6, 5]
    V, H = 70, 16
    t, fns = _packed_cases(lengths, V, DEVICE)
    fn = fns[case]
    B, T = t.shape
    h, rh = torch.randn(B, T, H, device=DEVICE), torch.randn(B, T, H, device=DEVICE)
    w, b = torch.randn(V, H, device=DEVICE) * 0.3, torch.randn(V, device=DEVICE)
    real = torch.arange(T, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]

    def pack(x):
        return x[real].unsqueeze(0)  # (1, N, ...)

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(DEVICE)
    kw = {"cu_seqlens": cu} if how == "cu_seqlens" else {"position_ids": pos}
    with fastlm.backend(be):
        hp, wp, bp = (x.clone().requires_grad_() for x in (h, w, b))
        loss_p, met_p = fn(hp, wp, t, bp, rh, lambda x: x)
        loss_p.backward()
        hk, wk, bk = (x.clone().requires_grad_() for x in (h, w, b))
        loss_k, met_k = fn(pack(hk), wk, pack(t), bk, pack(rh), pack, **kw)
        loss_k.backward()
    torch.testing.assert_close(loss_k, loss_p, rtol=1e-5, atol=1e-6)
    assert met_k.keys() == met_p.keys()
    for k in met_p:
        if case in ("orpo", "cpo") and k.startswith("logits/"):
            continue  # the mean logit over every position: padding counts in the padded batch only (documented)
        torch.testing.assert_close(met_k[k], met_p[k], rtol=1e-5, atol=1e-6, equal_nan=True, msg=k)
    torch.testing.assert_close(hk.grad[real], hp.grad[real], rtol=1e-4, atol=1e-5)
    assert (hk.grad[~real] == 0).all()  # not in the packed batch
    torch.testing.assert_close(wk.grad, wp.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bk.grad, bp.grad, rtol=1e-4, atol=1e-5)


def test_packed_bad_input():
    h, w = torch.randn(1, 10, 8, device=DEVICE), torch.randn(20, 8, device=DEVICE)
    t = torch.randint(0, 20, (1, 10), device=DEVICE)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        F.linear_dpo_loss(h, w, t, cu_seqlens=torch.tensor([0, 4, 9], device=DEVICE))
    with pytest.raises(ValueError, match="odd batch"):
        F.linear_dpo_loss(h, w, t, cu_seqlens=torch.tensor([0, 4, 6, 10], device=DEVICE))
    with pytest.raises(ValueError, match="not both"):
        F.linear_orpo_loss(h, w, t, cu_seqlens=torch.tensor([0, 5, 10]), position_ids=torch.zeros(1, 10))
    with pytest.raises(ValueError, match="position_ids must start at 0"):
        F.linear_kto_loss(h, w, t, preference=torch.tensor([True]), position_ids=torch.arange(1, 11)[None])
    with pytest.raises(ValueError, match="packed old_logps"):
        F.linear_grpo_loss(h, w, t, t >= 0, torch.ones(2), old_logps=torch.zeros(1, 9),
                           cu_seqlens=torch.tensor([0, 5, 10]))  # fmt: skip


# ---- edge cases from the kernels' review: banned tokens (-inf logits), fp16 under a GradScaler, a frozen head,
# double backward, an odd paired batch


@pytest.mark.parametrize("be", BACKENDS + ["torch"])
def test_entropy_with_banned_tokens(be):
    """A -inf bias entry (a banned token): its p log p counts 0 in the entropy and every gradient stays finite, on
    every backend, whether the entropy is used or not."""
    V, H = 300, 8
    h = torch.randn(3, 4, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) * 0.5
    b = torch.randn(V, dtype=torch.float64)
    b[[7, 150]] = float("-inf")
    t = torch.randint(0, V, (3, 4))
    t[t == 7] = 8
    t[t == 150] = 151
    t[0, 0] = -100
    keep = t != -100
    ls = TF.linear(h, w, b).log_softmax(-1)
    ref_lp = torch.where(keep, ls.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    ref_ent = torch.where(keep, -torch.where(ls > float("-inf"), ls.exp() * ls, 0.0).sum(-1), 0.0)
    for use_entropy in (False, True):
        hf, wf = h.float().to(DEVICE).requires_grad_(), w.float().to(DEVICE).requires_grad_()
        with fastlm.backend(be):
            lp, ent = F.linear_logprobs(hf, wf, t.to(DEVICE), bias=b.float().to(DEVICE), return_entropy=True)
        torch.testing.assert_close(lp.double().cpu(), ref_lp, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ent.double().cpu(), ref_ent, rtol=1e-4, atol=1e-4)
        (lp.sum() + (ent.sum() if use_entropy else 0)).backward()
        assert hf.grad.isfinite().all() and wf.grad.isfinite().all()
        assert (wf.grad[[7, 150]] == 0).all()


@pytest.mark.parametrize("be", BACKENDS)
def test_fp16_runs_two_passes_and_keeps_small_gradients(be, monkeypatch):
    """fp16: the losses take the two-pass mode (the incoming gradient, a GradScaler's factor, is folded into the row
    kernel's fp32 gradient sweep before the one rounding to fp16; per-token factors too, ROW_SCALE on Triton): under
    a loss scale of 65536 the weight's gradient keeps its small entries."""
    import fastlm.ops.linear_logprobs as ll

    calls = []
    apply = ll._OnePass.apply
    monkeypatch.setattr(ll._OnePass, "apply", lambda *a: calls.append(1) or apply(*a))
    B, T, H, V = 4, 6, 16, 2000
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(B, T, H, generator=g) * 0.5).to(DEVICE)
    w = (torch.randn(V, H, generator=g) * 0.05).to(DEVICE)
    t = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    adv = torch.randn(B, generator=g).to(DEVICE)

    def run(h, w, be_):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        with fastlm.backend(be_):
            loss, _ = F.linear_grpo_loss(h, w, t, t >= 0, adv, num_items_in_batch=4096)
        (loss * 65536).backward()
        return w.grad.double() / 65536

    got = run(h.half(), w.half(), be)
    assert not calls
    ref = run(h.half().double(), w.half().double(), "torch")
    assert (got == 0).float().mean() < 0.01  # one pass: ~70% of the entries flushed to 0
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-3 * ref.abs().max().item())


@pytest.mark.parametrize("be", BACKENDS)
def test_one_pass_frozen_head_double_backward_odd_batch(be):
    from fastlm.ops.linear_logprobs import logprob_loss

    h = torch.randn(4, 5, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(30, 8, device=DEVICE)  # frozen (LoRA): no grad_weight
    t = torch.randint(0, 30, (4, 5), device=DEVICE)
    with fastlm.backend(be):
        loss, _ = F.linear_dpo_loss(h, w, t)
        with pytest.raises(RuntimeError, match="no double backward"):
            torch.autograd.grad(loss, h, create_graph=True)
        (gh,) = torch.autograd.grad(loss, h)
        h2 = h.detach().clone().requires_grad_()
        with fastlm.backend("torch"):
            ref, _ = F.linear_dpo_loss(h2.double(), w.double(), t)
        ref.backward()
        torch.testing.assert_close(gh.double(), h2.grad.double(), rtol=1e-4, atol=1e-6)
        with pytest.raises(ValueError, match="odd batch"):
            logprob_loss(h[:3], w, t[:3], lambda lp, rows: lp.sum(), paired=True)
        # the entropy's backward with a frozen head: grad_input only (no grad_weight matmul)
        h3 = h.detach().clone().requires_grad_()
        lp, ent = F.linear_logprobs(h3, w, t, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
        h4 = h.detach().double().requires_grad_()
        with fastlm.backend("torch"):
            lp4, ent4 = F.linear_logprobs(h4, w.double(), t, return_entropy=True)
        (lp4.sum() + ent4.sum()).backward()
        torch.testing.assert_close(h3.grad.double(), h4.grad, rtol=1e-4, atol=1e-5)
        assert w.grad is None
