"""The lean eager host path (``fastlm.ops.registry.call``): in eager mode every family runs its registered op below
autograd, inside a lean ``torch.autograd.Function`` built from the op's own autograd formula. These tests hold it to
the registered op: the same outputs and gradients bit for bit (the registered path is what torch.compile records),
the lean Function actually taken in eager mode, and a compiled graph that still contains the registered ops."""

import sys

import pytest
import torch
from test_compile import CASES

import fastlm.functional as F
from fastlm.ops import registry

GRAD_CASES = sorted(n for n in CASES if n != "attention_with_kvcache")  # the kvcache call is inference only


def _registered_call(op, *args):
    """What ``call`` did before the lean path: the registered op through the dispatcher (its register_autograd
    Function, which is also what torch.compile traces)."""
    return op(*args)


def _run(fn, inputs):
    out = fn(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, leaves, g) if leaves else ()
    return out, grads


@pytest.mark.parametrize("name", GRAD_CASES)
def test_lean_path_equals_registered_op(backend, name, monkeypatch):
    fn, make = CASES[name]
    torch.manual_seed(0)
    inputs = make()
    torch.manual_seed(1)  # dropout-free cases; the seed pins any random draw the ops make all the same
    out, grads = _run(fn, inputs)
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("fastlm.ops.") and getattr(mod, "call", None) is registry.call:
            monkeypatch.setattr(mod, "call", _registered_call)
    torch.manual_seed(1)
    want, want_grads = _run(fn, inputs)
    assert torch.equal(out, want), f"{name}: the lean path's output differs from the registered op's"
    assert len(grads) == len(want_grads)
    for i, (a, b) in enumerate(zip(grads, want_grads, strict=True)):
        assert torch.equal(a, b), f"{name}: gradient {i} differs between the lean path and the registered op"


@pytest.mark.parametrize(
    "name, fn, make",
    [
        ("layer_norm", lambda x, w: F.layer_norm(x, (32,), w), lambda: (torch.randn(4, 32), torch.randn(32))),
        ("softmax", lambda x: F.softmax(x, -1), lambda: (torch.randn(4, 32),)),
        ("cross_entropy", lambda x: F.cross_entropy(x, torch.arange(4)), lambda: (torch.randn(4, 32),)),
        (
            "sdpa",
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            lambda: tuple(torch.randn(1, 2, 8, 16) for _ in range(3)),
        ),
    ],
)
def test_eager_takes_the_lean_function(backend, name, fn, make):
    """With inputs requiring grad the graph node is the lean Function (not the registered op's generated one); with
    none requiring grad no node at all (the op ran below autograd)."""
    inputs = [t.requires_grad_() for t in make()]
    out = fn(*inputs)
    nodes, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node.name() not in nodes:
            nodes.add(node.name())
            stack.extend(n for n, _ in node.next_functions)
    assert any(n.endswith("_leanBackward") for n in nodes), f"{name}: no lean Function in the graph: {sorted(nodes)}"
    with torch.no_grad():
        assert fn(*inputs).grad_fn is None


@pytest.mark.parametrize("name", ["layer_norm", "softmax", "cross_entropy", "scaled_dot_product_attention"])
def test_compiled_graph_contains_the_registered_ops(backend, name):
    """torch.compile still records the registered fastlm ops, forward and backward (never the lean Function). The
    cross-entropy's backward has no op: it scales the gradient its forward wrote."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    fn, make = CASES[name]
    inputs = make()
    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))(*inputs)
    leaves = [t for t in inputs if t.requires_grad]
    torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert len(graphs) == 2, "expected one forward and one backward graph"
    for kind, gm in zip(("forward", "backward"), graphs, strict=True):
        if kind == "backward" and name == "cross_entropy":
            continue
        ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        fused = [o for o in ops if o.startswith("fastlm.") and o.endswith(f"_{backend}.default")]
        assert fused, f"{name}: the compiled {kind} graph has no fastlm {backend} op: {sorted(ops)}"
        assert not any("lean" in o for o in ops)


def test_double_backward_raises_instead_of_a_wrong_result(backend):
    """create_graph=True through a fused op would differentiate its backward op, which has no derivative: a clear
    error (torch would only warn and return a gradient that is silently wrong)."""
    x = torch.randn(4, 32, requires_grad=True)
    y = F.softmax(x, -1)
    with pytest.raises(RuntimeError, match="double backward"):  # the backward op, recorded under create_graph
        torch.autograd.grad(y, x, torch.randn_like(y), create_graph=True)
    (g,) = torch.autograd.grad(F.softmax(x, -1), x, torch.randn_like(y))  # a plain backward still works
    assert g.shape == x.shape


def test_forward_mode_ad_raises_instead_of_a_zero_tangent(backend):
    """jvp / dual tensors through a fused op: a clear error (the op has no forward formula, and both the lean path and
    the dispatcher would drop the tangent silently); a plain call inside dual_level and vmap still work."""
    import torch.autograd.forward_ad as fwAD

    x, t = torch.randn(4, 32), torch.randn(4, 32)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda a: F.softmax(a, -1), (x,), (t,))
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="softmax_fwd"):
            F.softmax(fwAD.make_dual(x, t), -1)
        torch.testing.assert_close(F.softmax(x, -1), torch.softmax(x, -1))
    xb = x.reshape(2, 2, 32)
    torch.testing.assert_close(torch.func.vmap(lambda a: F.softmax(a, -1))(xb), torch.softmax(xb, -1))
