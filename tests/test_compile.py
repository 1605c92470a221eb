"""``torch.compile(fullgraph=True)`` over every public function of ``fastlm.functional``, forward and backward, on
every fused backend: no graph break (no host read of a tensor value, no data-dependent branch, also in the traced
backward) and the compiled result equals eager's. CI runs this file under the default torch and under the device's
torch 2.11 (the twin, ``make twin``), whose AOTAutograd traces backwards differently."""

import pytest
import torch
from helpers import DEVICE, ON_GPU

import fastlm.functional as F

COMPILER = "inductor" if ON_GPU else "aot_eager"  # inductor on CPU would compile C++ for minutes


def _x(*shape, grad=True):
    return torch.randn(*shape, device=DEVICE).requires_grad_(grad)


def _cu(*lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _targets(n, C):
    t = torch.randint(0, C, (n,), device=DEVICE)
    t[0] = -100  # one ignored row
    return t


_PREF4 = torch.tensor([True, False, False, True])  # KTO's preference: both classes (an empty one gives NaN metrics)

# name -> (function of the inputs, inputs); every floating input that requires grad gets its gradient compared
CASES = {
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (48,), w, b), lambda: (_x(3, 5, 48), _x(48), _x(48))),
    "rms_norm": (lambda x, w: F.rms_norm(x, (48,), w, eps=1e-6), lambda: (_x(3, 5, 48), _x(48))),
    "add_layer_norm": (
        lambda x, r, w, b: torch.cat(F.add_layer_norm(x, r, (48,), w, b), -1),
        lambda: (_x(4, 48), _x(4, 48), _x(48), _x(48)),
    ),
    "add_rms_norm": (
        lambda x, r, w: torch.cat(F.add_rms_norm(x, r, (48,), w), -1),
        lambda: (_x(4, 48), _x(4, 48), _x(48)),
    ),
    "geglu": (
        lambda g, u, gu: F.geglu(g, u, approximate="none") + F.geglu(gu),
        lambda: (_x(3, 5, 24), _x(3, 5, 24), _x(3, 5, 48)),
    ),
    "softmax": (lambda x: F.softmax(x, dim=1), lambda: (_x(4, 6, 5),)),
    "log_softmax": (lambda x: F.log_softmax(x, dim=-1), lambda: (_x(4, 37),)),
    "scaled_masked_softmax": (
        lambda x, m: F.scaled_masked_softmax(x, m, scale=0.5, is_causal=True),
        lambda: (_x(2, 2, 9, 9), torch.rand(2, 1, 9, 9, device=DEVICE) > 0.3),
    ),
    "apply_rotary_pos_emb": (
        lambda q, k, c, s: torch.cat([t.flatten() for t in F.apply_rotary_pos_emb(q, k, c, s)]),
        lambda: (_x(2, 4, 5, 16), _x(2, 2, 5, 16), _x(2, 5, 16, grad=False), _x(2, 5, 16, grad=False)),
    ),
    "cross_entropy": (
        lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1) + F.cross_entropy(x, t, reduction="none").sum(),
        lambda: (_x(6, 40), _targets(6, 40)),
    ),
    "linear_cross_entropy": (
        lambda h, w, t: F.linear_cross_entropy(h, w, t),
        lambda: (_x(10, 16), _x(40, 16), _targets(10, 40)),
    ),
    "linear_logprobs": (  # and with the entropy
        lambda h, w, b, t: torch.stack(
            [F.linear_logprobs(h, w, t, temperature=0.7, chunk_size=4)]
            + list(F.linear_logprobs(h, w, t, bias=b, chunk_size=4, return_entropy=True))
        ),
        lambda: (_x(2, 5, 16), _x(40, 16), _x(40), _targets(10, 40).view(2, 5)),
    ),
    "linear_dpo_loss": (
        lambda h, w, t, r: F.linear_dpo_loss(h, w, t, ref_logps=r, chunk_size=4)[0],
        lambda: (_x(4, 3, 16), _x(40, 16), _targets(12, 40).view(4, 3), _x(4, grad=False)),
    ),
    "linear_orpo_loss": (
        lambda h, w, t: F.linear_orpo_loss(h, w, t, chunk_size=4)[0],
        lambda: (_x(4, 3, 16), _x(40, 16), torch.randint(0, 40, (4, 3), device=DEVICE)),
    ),
    "linear_cpo_loss": (
        lambda h, w, t: F.linear_cpo_loss(h, w, t, loss_type="simpo", chunk_size=4)[0],
        lambda: (_x(4, 3, 16), _x(40, 16), _targets(12, 40).view(4, 3)),
    ),
    "linear_kto_loss": (
        lambda h, w, t, r: torch.stack(  # both classes present: a class without rows gives NaN metrics
            [F.linear_kto_loss(h, w, t, preference=_PREF4.to(r.device), ref_logps=r, kl=0.1, chunk_size=4)[0]]
            + list(
                F.linear_kto_loss(h, w, t, preference=_PREF4.to(r.device), ref_logps=r, kl=0.1, chunk_size=4)[
                    1
                ].values()
            )
        ),
        lambda: (_x(4, 3, 16), _x(40, 16), _targets(12, 40).view(4, 3), _x(4, grad=False)),
    ),
    "linear_grpo_loss": (
        lambda h, w, ids, old, ref, a: torch.stack(
            [
                F.linear_grpo_loss(h, w, ids, ids > 5, a, old_logps=old, ref_logps=ref, beta=0.1, chunk_size=4)[0],
                F.linear_grpo_loss(h, w, ids, ids > 5, a, loss_type="grpo", importance_sampling_level="sequence")[0],
            ]
        ),
        lambda: (
            _x(2, 5, 16),
            _x(40, 16),
            torch.randint(0, 40, (2, 5), device=DEVICE),
            -torch.rand(2, 5, device=DEVICE) * 4,
            -torch.rand(2, 5, device=DEVICE) * 4,
            _x(2, grad=False),
        ),  # fmt: skip
    ),
    "swiglu": (lambda x: F.swiglu(*x.chunk(2, dim=-1)) * F.swiglu(x), lambda: (_x(4, 2 * 40),)),
    "kl_div": (
        lambda x, t: F.kl_div(x, t, reduction="batchmean") + F.kl_div(x, t.log(), reduction="sum", log_target=True),
        lambda: (_x(6, 40).log_softmax(-1).detach().requires_grad_(), _x(6, 40, grad=False).softmax(-1)),
    ),
    "distillation_loss": (
        lambda s, t, y: (
            F.distillation_loss(s, t, kind="jsd", temperature=2.0, target=y)
            + F.distillation_loss(s, t, reduction="none").sum()
        ),
        lambda: (_x(6, 40), _x(6, 40, grad=False), _targets(6, 40)),
    ),
    "linear_distillation_loss": (
        lambda h, w, th, tw, y: F.linear_distillation_loss(h, w, th, tw, target=y, hard_weight=0.3, chunk_size=4),
        lambda: (_x(10, 16), _x(40, 16), _x(10, 8, grad=False), _x(40, 8, grad=False), _targets(10, 40)),
    ),
    "scaled_dot_product_attention": (
        lambda q, k, v, m: (
            F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        ),
        lambda: (_x(1, 2, 12, 16), _x(1, 2, 12, 16), _x(1, 2, 12, 16), torch.rand(12, 12, device=DEVICE) > 0.2),
    ),
    "varlen_attention": (
        lambda q, k, v, cu: F.varlen_attention(q, k, v, cu, cu, 7, 7, is_causal=True),
        lambda: (_x(12, 2, 16), _x(12, 2, 16), _x(12, 2, 16), _cu(5, 7)),
    ),
    # inference only (no gradient); appends k/v into the caches in place (the same positions each call)
    "attention_with_kvcache": (
        lambda q, kc, vc, k, v, lens: F.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, window=(4, None)),
        lambda: (
            _x(2, 2, 4, 16, grad=False),
            *(_x(2, 12, 2, 16, grad=False) for _ in range(2)),
            *(_x(2, 2, 2, 16, grad=False) for _ in range(2)),
            torch.tensor([3, 7], dtype=torch.int32, device=DEVICE),
        ),
    ),
}


def test_every_public_function_is_covered():
    assert sorted(CASES) == sorted(F.__all__), "add a compile case for each new public function"


@pytest.mark.parametrize("name", sorted(CASES))
def test_compile_fullgraph(backend, name):
    fn, make = CASES[name]
    inputs = make()
    want = fn(*inputs)  # first: a case the backend lacks raises UnsupportedCaseError here (a skip, see conftest)
    torch._dynamo.reset()  # a fresh compile per backend (the backend is a guarded global)
    if backend == "cpu" and name == "attention_with_kvcache":  # a host loop over the lengths: a clear refusal
        with pytest.raises(Exception, match="attention_with_kvcache under torch.compile"):
            torch.compile(fn, fullgraph=True, backend=COMPILER)(*inputs)
        return
    got = torch.compile(fn, fullgraph=True, backend=COMPILER)(*inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    leaves = [t for t in inputs if t.requires_grad]
    if not leaves:
        return
    g_out = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, leaves, g_out), torch.autograd.grad(want, leaves, g_out), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_attention_dropout():
    """Dropout's seed is drawn on the device inside the compiled graph (no host value): compiles without a break,
    and the same torch seed gives the same result as eager (inductor draws random numbers its own way unless told
    to fall back to torch's generator: fallback_random)."""
    import torch._inductor.config

    import fastlm

    q, k, v = (_x(1, 2, 12, 16) for _ in range(3))

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.25)

    with fastlm.backend("triton"), torch._inductor.config.patch(fallback_random=True):
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend=COMPILER)
        torch.manual_seed(0)
        got = compiled(q, k, v)
        torch.manual_seed(0)
        want = fn(q, k, v)
    torch.testing.assert_close(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compile_fullgraph_16bit_attention(backend, dtype):
    """Attention in the dtypes every GPU backend takes (the CUDA C++ kernels have no fp32): fullgraph through the
    Python checks of the inputs' layout and of the incoming gradient's (no data_ptr() read while tracing)."""
    q, k, v = (torch.randn(2, 4, 64, 64, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    want = fn(q, k, v)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(q, k, v)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g), strict=True):
        torch.testing.assert_close(a, b)
