"""Shared test helpers: per-dtype tolerances and comparison against a float64 reference."""

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

# Fused backends under test (conftest's ``backend`` fixture): Triton everywhere (interpreted on CPU), CUDA C++ only on
# a GPU, the CPU C++ kernels only where the tests' tensors live on the CPU (on a GPU machine they are tested by the
# CPU-only CI).
BACKENDS = [
    pytest.param("triton", id="triton"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu]),
    pytest.param("cpu", id="cpu", marks=[pytest.mark.skipif(ON_GPU, reason="tests' tensors are on the GPU")]),
]

# torch.library.opcheck's tests for a Triton op: all four on a GPU; in the interpreter not test_aot_dispatch_dynamic,
# which fails there for trivially correct ops (an interpreter artefact). (test_utils=None is not "all": opcheck
# raises ValueError for it.)
OPCHECK_ALL = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
OPCHECK_TESTS = OPCHECK_ALL if ON_GPU else OPCHECK_ALL[:3]

# Tolerances of a fused kernel against the float64 reference, per dtype: (atol, rtol), atol relative to the
# reference's largest magnitude (gradients such as dW grow with the number of rows).
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close_ref(out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, name: str, torch_out=None):
    """``out`` (computed in ``dtype``) must match the float64 reference ``ref64`` within the dtype's tolerance, and,
    when ``torch_out`` (torch's own result in ``dtype``) is given, its max error may be at most twice torch's plus a
    rounding floor (FlashAttention's oracle)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert not out.isnan().any(), f"{name}: NaN in output (unwritten element or bad math)"
    atol, rtol = TOL[dtype]
    scale = max(ref64.abs().max().item(), 1.0) if ref64.numel() else 1.0
    torch.testing.assert_close(out.double(), ref64, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")
    if torch_out is not None and ref64.numel():
        err = (out.double() - ref64).abs().max().item()
        torch_err = (torch_out.double() - ref64).abs().max().item()
        floor = torch.finfo(dtype).eps * scale
        assert err <= 2 * torch_err + floor, f"{name}: error {err:.3g} > 2 x torch's {torch_err:.3g} + {floor:.3g}"


def compare_with_reference(fn, ref_fn, inputs: dict, dtype: torch.dtype, differentiable=None, two_x_rule=True):
    """Run ``fn(**inputs)`` (fastlm) and ``ref_fn`` on float64 copies (oracle) and on the same inputs (torch's own
    low-precision result); compare the output and the gradient of every floating input in ``differentiable``
    (default: all floating inputs) against the oracle with the dtype's tolerance and the 2x rule."""
    differentiable = (
        [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if differentiable is None
        else differentiable
    )

    def run(f, cast):
        leaves = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                v = cast(v).detach().clone()
                if k in differentiable:
                    v.requires_grad_()
            leaves[k] = v
        out = f(**leaves)
        return leaves, out

    leaves, out = run(fn, lambda t: t)
    g_out = torch.randn_like(out) if out.numel() else torch.ones_like(out)
    grads = torch.autograd.grad(out, [leaves[k] for k in differentiable], g_out) if differentiable else []
    leaves64, out64 = run(ref_fn, lambda t: t.double())
    grads64 = (
        torch.autograd.grad(out64, [leaves64[k] for k in differentiable], g_out.double()) if differentiable else []
    )
    torch_out, torch_grads = None, [None] * len(differentiable)
    if two_x_rule and dtype != torch.float32:
        leaves_t, torch_out = run(ref_fn, lambda t: t)
        if differentiable:
            torch_grads = torch.autograd.grad(torch_out, [leaves_t[k] for k in differentiable], g_out)
    assert_close_ref(out, out64, dtype, "out", torch_out)
    for k, g, g64, gt in zip(differentiable, grads, grads64, torch_grads, strict=True):
        assert_close_ref(g, g64, dtype, f"d{k}", gt)
    return out


def at_thread_counts(fn, counts) -> list:
    """``fn()`` run under each of torch's intra-op thread counts in ``counts`` (the CPU kernels' determinism tests),
    the process's thread count restored afterwards; returns the results in order."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
    finally:
        torch.set_num_threads(threads)
    return results


def largest_cpu_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) made through torch's allocator while ``fn()`` runs, from the
    profiler's memory events (deterministic, unlike the resident size): the chunked LM-head losses' bound on
    their buffers."""
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    sizes = [e["args"].get("Bytes", 0) for e in events if e.get("name") == "[memory]"]
    assert sizes, "the profiler recorded no allocation"
    return max(sizes)
