"""Decode-sized linear layers on the CPU (fastlm/ops/linear_rows.py, csrc/cpu/linear_rows.cpp): the kernel against
a float64 reference (and within twice torch's own error), every dtype, ragged shapes, strides and bias; which calls
run the kernel and which stay F.linear; the op's input errors; fastlm.patch routing nn.Linear and the LM head."""

import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close_ref

import fastlm
from fastlm import extension
from fastlm.ops import linear_rows

pytestmark = pytest.mark.skipif(extension.lib is None, reason="fastlm._C (the cpu kernels) is not built")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OP = torch.ops.fastlm.linear_rows_cpu.default


def _inputs(M, K, N, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / max(K, 1) ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, w, b


def _ref(x, w, b):
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(1, 64, 1000), (3, 37, 7), (4, 512, 1031), (16, 200, 65), (8, 1, 5), (2, 0, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_reference(dtype, M, K, N, bias):
    """Every output element (N not a multiple of the kernel's 4-row blocks, K of 0 and 1 included) against float64,
    and within twice the error of torch's own F.linear in the same dtype."""
    x, w, b = _inputs(M, K, N, dtype, bias)
    y = OP(x, w, b)
    assert y.dtype == dtype and y.shape == (M, N) and y.is_contiguous()
    assert_close_ref(y, _ref(x, w, b), dtype, f"linear_rows {dtype} {M}x{K}->{N}", torch_out=TF.linear(x, w, b))


def test_kernel_reads_strided_rows_and_weight_rows():
    """x and weight with row strides larger than K (slices of wider tensors): read through their strides."""
    x_wide, w_wide = torch.randn(5, 80), torch.randn(33, 100)
    x, w, b = x_wide[:, 10:74], w_wide[:, 3:67], torch.randn(33)
    assert x.stride(0) == 80 and w.stride(0) == 100
    assert_close_ref(OP(x, w, b), _ref(x, w, b), torch.float32, "strided")


def test_kernel_results_do_not_depend_on_the_thread_count():
    x, w, b = _inputs(4, 300, 4099, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OP(x, w, b)
        torch.set_num_threads(max(2, threads))
        many = OP(x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize(
    "args,match",
    [
        (lambda x, w, b: (x.double(), w, b), "float32, float16 or bfloat16|dtype"),
        (lambda x, w, b: (x, w.half(), b), "weight must have x's dtype"),
        (lambda x, w, b: (x, w, b.half()), "bias must have x's dtype"),
        (lambda x, w, b: (x, w[:, :5], b), r"weight must be \(N, K\)"),
        (lambda x, w, b: (x, w, b[:3]), r"bias must be a contiguous \(N,\)"),
        (lambda x, w, b: (x[None], w, b), "x must be 2-D"),
        (lambda x, w, b: (x.t().contiguous().t(), w, b), "x must have unit stride"),
        (lambda x, w, b: (x, w.t().contiguous().t(), b), "weight must have unit stride"),
    ],
)
def test_kernel_input_errors(args, match):
    x, w, b = _inputs(4, 8, 6, torch.float32)
    with pytest.raises(RuntimeError, match=match):
        OP(*args(x, w, b))


def test_opcheck():
    x, w, b = _inputs(3, 16, 9, torch.float32)
    for args in ((x, w, b), (x, w, None)):
        torch.library.opcheck(OP, args, test_utils=("test_schema", "test_faketensor"))


@pytest.fixture
def kernel_calls(monkeypatch):
    """The row shapes of every kernel call linear() makes; any weight size qualifies (MIN_WEIGHT_BYTES 0)."""
    calls = []
    real = linear_rows.LINEAR_ROWS["cpu"]
    monkeypatch.setitem(linear_rows.LINEAR_ROWS, "cpu", lambda *a: calls.append(tuple(a[0].shape)) or real(*a))
    monkeypatch.setattr(linear_rows, "MIN_WEIGHT_BYTES", 0)
    return calls


def test_linear_routes_decode_rows_to_the_kernel_and_the_rest_to_f_linear(kernel_calls):
    """linear() runs the kernel exactly for CPU inference calls of <= MAX_ROWS rows of one float dtype; a training
    call, more rows, mixed dtypes or a tensor subclass are F.linear (autograd, MKL's GEMM) with F.linear's results."""
    calls = kernel_calls
    w = torch.randn(40, 24, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    x = torch.randn(2, 3, 24)  # 6 rows, 3-D
    with torch.no_grad():
        y = linear_rows.linear(x, w, b)
    assert calls == [(6, 24)] and y.shape == (2, 3, 40)
    assert_close_ref(y, _ref(x.reshape(6, 24), w.detach(), b.detach()).reshape(2, 3, 40), torch.float32, "3-D")
    calls.clear()
    y = linear_rows.linear(x, w, b)  # gradients wanted: F.linear under autograd
    assert calls == [] and y.requires_grad
    y.sum().backward()
    assert w.grad is not None and b.grad is not None
    with torch.inference_mode():
        many = torch.randn(linear_rows.MAX_ROWS + 1, 24)
        assert torch.equal(linear_rows.linear(many, w, b), TF.linear(many, w, b)) and calls == []
        linear_rows.linear(torch.randn(linear_rows.MAX_ROWS, 24), w, b)
        assert calls == [(linear_rows.MAX_ROWS, 24)]
        calls.clear()
        with pytest.raises(RuntimeError):  # mixed dtypes: F.linear's own error, not the kernel's
            linear_rows.linear(x.half(), w, b)
    assert calls == []


def _same_as_f_linear(x, w, b=None):
    with torch.no_grad():
        torch.testing.assert_close(linear_rows.linear(x, w, b), TF.linear(x, w, b), atol=0, rtol=0)


def test_linear_leaves_every_other_case_to_f_linear(kernel_calls):
    """Cases the kernel does not take, each F.linear's result (or error) exactly, no kernel call: an empty width,
    a transposed weight, a broadcast (1,) bias, a bias on another device, autocast, a weight below
    MIN_WEIGHT_BYTES."""
    w, b = torch.randn(6, 5), torch.randn(6)
    _same_as_f_linear(torch.randn(3, 0), torch.randn(6, 0), b)  # K = 0: the bias
    x1 = torch.randn(5)  # 1-D x: one row, the kernel's (within fp32 rounding of F.linear)
    with torch.no_grad():
        torch.testing.assert_close(linear_rows.linear(x1, w, b), TF.linear(x1, w, b))
    assert kernel_calls == [(1, 5)]
    kernel_calls.clear()
    _same_as_f_linear(torch.randn(2, 5), torch.randn(5, 6).t(), b)  # transposed weight: MKL reads it in place
    _same_as_f_linear(torch.randn(2, 5), w, torch.randn(1))  # a (1,) bias broadcasts in F.linear
    with torch.no_grad(), pytest.raises(RuntimeError):  # F.linear's error for a bias on the meta device
        linear_rows.linear(torch.randn(2, 5), w, torch.randn(6, device="meta"))
    with torch.no_grad(), pytest.raises(RuntimeError, match="shape|size"):  # a wrong width: F.linear's error
        linear_rows.linear(torch.randn(2, 4), w)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear_rows.linear(torch.randn(2, 5), w, b)
    assert y.dtype == torch.bfloat16  # autocast's dtype, as F.linear
    assert kernel_calls == []


def test_linear_small_weights_stay_f_linear():
    w = torch.randn(8, 8)
    assert w.numel() * 4 < linear_rows.MIN_WEIGHT_BYTES
    with torch.no_grad():
        assert not linear_rows.uses_kernel(torch.randn(2, 8), w)
        assert linear_rows.uses_kernel(torch.randn(2, 512), torch.randn(512, 512))


def test_linear_forward_ad_and_func_transforms_keep_their_tangents(kernel_calls):
    """jvp (torch.func and forward-mode AD dual tensors) and vmap: F.linear's rules, the tangent kept."""
    import torch.autograd.forward_ad as fwAD

    w, x, t = torch.randn(7, 5), torch.randn(3, 5), torch.randn(3, 5)
    expected = TF.linear(t, w)
    _, tangent = torch.func.jvp(lambda a: linear_rows.linear(a, w), (x,), (t,))
    torch.testing.assert_close(tangent, expected)
    with fwAD.dual_level():
        out = linear_rows.linear(fwAD.make_dual(x, t), w)
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, expected)
    got = torch.func.vmap(lambda a: linear_rows.linear(a, w))(x)
    torch.testing.assert_close(got, TF.linear(x, w))
    assert kernel_calls == []


def test_linear_under_compile_is_f_linear(kernel_calls):
    w, x = torch.randn(12, 8), torch.randn(2, 8)
    f = torch.compile(lambda a: linear_rows.linear(a, w), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(f(x), TF.linear(x, w))
    assert kernel_calls == []


def test_patched_model_pickles_traces_and_keeps_signatures(tmp_path, kernel_calls):
    """torch.save / load of a patched model (in this process: the derived classes found again by name),
    torch.jit.trace and torch.fx.symbolic_trace of it, and the patched modules' forward signatures."""
    import inspect

    model = fastlm.patch(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)))
    assert str(inspect.signature(model[0].forward)) == str(inspect.signature(torch.nn.Linear(2, 2).forward))
    x = torch.randn(3, 8)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert type(loaded[0]) is type(model[0]) and type(loaded[0]).__name__ == "FusedLinear"
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), model(x))
    gm = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(gm(x), model(x))


def test_16_bit_layers_stay_f_linear(kernel_calls):
    """bf16 / fp16 inference calls are F.linear's (oneDNN's 16-bit GEMM: level with the kernel or faster)."""
    for dtype in (torch.bfloat16, torch.float16):
        _same_as_f_linear(torch.randn(2, 8, dtype=dtype), torch.randn(16, 8, dtype=dtype))
    assert kernel_calls == []


@pytest.mark.parametrize("dtype", [torch.float32])
def test_patch_routes_nn_linear_in_inference_only(dtype, kernel_calls):
    """fastlm.patch swaps nn.Linear (exactly that class); its inference calls of a few rows give the kernel's result,
    its training calls F.linear's (same gradients); unpatch restores the class."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 16)).to(dtype)
    ref = [m for m in model if isinstance(m, torch.nn.Linear)]
    fastlm.patch(model)
    assert all(type(m) is not torch.nn.Linear and isinstance(m, torch.nn.Linear) for m in ref)
    assert fastlm.patch_summary(model)["torch.nn.Linear (decode rows on CPU)"] == 2
    x = torch.randn(3, 32, dtype=dtype)
    with torch.no_grad():
        got = model(x)
        h = TF.gelu(OP(x, ref[0].weight, ref[0].bias))
        assert torch.equal(got, OP(h, ref[1].weight, ref[1].bias))
        h64 = TF.gelu(_ref(x, ref[0].weight, ref[0].bias))
        assert_close_ref(got, _ref(h64.to(dtype), ref[1].weight, ref[1].bias), dtype, "patched MLP")
    xg = torch.randn(3, 32, dtype=dtype)
    model(xg).float().square().sum().backward()
    grads = [m.weight.grad.clone() for m in ref]
    fastlm.unpatch(model)
    assert all(type(m) is torch.nn.Linear for m in ref)
    model.zero_grad()
    model(xg).float().square().sum().backward()
    for g, m in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, m.weight.grad, atol=0, rtol=0)


def test_patch_linear_false_keeps_f_linear_in_the_lm_head(kernel_calls):
    """fastlm.patch(model, linear=False): neither nn.Linear modules nor a patched causal LM's head run the kernel."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
    )
    ids = torch.randint(0, 64, (2, 5))
    for linear, expect_calls in ((False, False), (True, True)):
        torch.manual_seed(0)
        model = fastlm.patch(transformers.LlamaForCausalLM(cfg).eval(), linear=linear)
        kernel_calls.clear()
        with torch.no_grad():
            model(input_ids=ids, logits_to_keep=1)
        assert bool(kernel_calls) == expect_calls, kernel_calls
        assert (2, 32) in kernel_calls or not expect_calls  # the head's (B * 1 kept position, hidden) rows
