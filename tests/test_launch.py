"""How the Triton launchers launch, checked without a GPU: every kernel object is replaced by a spy that records
its grid, the CUDA device current at launch and its arguments, and the inputs are fake CUDA tensors (FakeTensorMode
needs no GPU), so shapes far beyond what the interpreter could run cost nothing.

- Device: a Triton launch goes to the *current* CUDA device; with inputs on ``cuda:1`` while device 0 is current,
  every launch must happen with device 1 current (``torch.cuda.device`` is mocked to track the current device).
- Grid: CUDA allows 2**31 - 1 programs on axis x and 65535 on y and z; batch x heads beyond 65535 must launch.
- Dropout: the seed reaches the kernel as a device tensor (read on the device, so a CUDA-graph replay gets a fresh
  one), never as a host integer.
"""

import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

pytest.importorskip("triton")
from fastlm.kernels import MAX_GRID, cross_entropy, launch_grid, norms, softmax  # noqa: E402
from fastlm.kernels.attention import backward, forward  # noqa: E402

MODULES = (forward, backward, cross_entropy, norms, softmax)


class _Spy:
    """Stands in for a @triton.jit kernel (or its autotuner): ``kernel[grid](*args, **kw)`` records, runs nothing."""

    def __init__(self, name, log, current):
        self.name, self.log, self.current = name, log, current

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            g = grid(kwargs) if callable(grid) else grid
            self.log.append(types.SimpleNamespace(kernel=self.name, grid=tuple(g), device=self.current[0], args=args))

        return launch


@pytest.fixture
def fake_gpu(monkeypatch):
    """(log, make): kernels replaced by spies, ``torch.cuda.device`` tracking a mocked current device (0 at the start),
    and ``make(*shape, dtype=..., device="cuda:1")`` creating fake CUDA tensors."""
    log, current = [], [0]
    for mod in MODULES:
        for name, obj in vars(mod).items():
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction", "Autotuner"):
                monkeypatch.setattr(mod, name, _Spy(name, log, current))

    class _Device:  # torch.cuda.device(d) as a context manager over the mocked current device
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.previous

    monkeypatch.setattr(torch.cuda, "device", _Device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=132))
    monkeypatch.setenv("FASTLM_ATTENTION_TMA", "0")  # the TMA choice would query the (absent) GPU's capability
    mode = FakeTensorMode()

    def make(*shape, dtype=torch.float16, device="cuda:1"):
        with mode:
            if dtype in (torch.int32, torch.int64):
                return torch.zeros(shape, dtype=dtype, device=device)
            return torch.randn(shape, dtype=dtype, device=device)

    with mode:
        yield log, make


def _norms(make):
    x, w, b = make(64, 300), make(300, dtype=torch.float32), make(300, dtype=torch.float32)
    y, h, mean, rstd = norms.norm_fwd(x, None, w, b, 1e-5, False)
    norms.norm_bwd(make(64, 300), x, w, mean, rstd, None, False, True)


def _softmax(make):
    for R in (300, 100_000):  # one pass, and the split (statistics kernel + pass) path
        x = make(8, R)
        y = softmax.softmax_fwd(x, 1, False)
        softmax.softmax_bwd(make(8, R), y, 1, False)


def _cross_entropy(make):
    cross_entropy.cross_entropy_rows(make(8, 1000), make(8, dtype=torch.int64), None, None, -100, 0.1, True)


def _attention(make, B=2, H=4, Hkv=2, S=100, D=64, dropout_p=0.0, varlen=False):
    seed = make(1, dtype=torch.int64)
    if varlen:
        q, k, v = make(B * S, H, D), make(B * S, Hkv, D), make(B * S, Hkv, D)
        cu = make(B + 1, dtype=torch.int32)
        extra = (cu, cu, S, S)
    else:
        q, k, v = make(B, H, S, D), make(B, Hkv, S, D), make(B, Hkv, S, D)
        extra = ()
    o, lse = forward.attn_fwd(q, k, v, None, 0.125, True, dropout_p, seed, 0, *extra)
    backward.attn_bwd(make(*q.shape), q, k, v, o, lse, None, 0.125, True, dropout_p, seed, 0, *extra)
    return seed


@pytest.mark.parametrize("launcher", [_norms, _softmax, _cross_entropy, _attention])
def test_launches_on_the_tensors_device(fake_gpu, launcher):
    log, make = fake_gpu
    launcher(make)
    assert log, "no kernel was launched"
    for launch in log:
        assert launch.device == 1, f"{launch.kernel} launched with cuda:{launch.device} current, inputs on cuda:1"


@pytest.mark.parametrize(
    "case",
    [
        dict(B=4097, H=16, Hkv=16, S=1),  # batch x heads = 65552: decoding with a large batch
        dict(B=4096, H=32, Hkv=8, S=3, varlen=True),  # 4096 packed sequences x 32 heads
        dict(B=1, H=1, Hkv=1, S=2_000_000),  # one long sequence: many query blocks
    ],
    ids=["dense-BH65552", "varlen-4096x32", "long-sequence"],
)
def test_attention_grids_within_cuda_limits(fake_gpu, case):
    log, make = fake_gpu
    _attention(make, **case)
    assert {launch.kernel for launch in log} >= {"attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"}
    for launch in log:
        assert len(launch.grid) <= 3
        for axis, (n, limit) in enumerate(zip(launch.grid, MAX_GRID, strict=False)):
            assert 1 <= n <= limit, f"{launch.kernel}: grid {launch.grid} axis {axis} beyond CUDA's {limit}"


def test_oversized_grid_raises_clearly(fake_gpu):
    _, make = fake_gpu
    with pytest.raises(ValueError, match="grid axis x"):
        cross_entropy.cross_entropy_rows(make(2**31, 2), make(2**31, dtype=torch.int64), None, None, -100, 0.0, False)
    with pytest.raises(ValueError, match="grid axis y"):
        launch_grid(1, 65536)


def test_dropout_seed_reaches_the_kernel_as_a_device_tensor(monkeypatch):
    """Through the public function (real CPU tensors, kernels spied): forward and backward kernels get the op's seed
    tensor, an int64 (1,) tensor on the query's device drawn from torch's generator, not a host integer (a host
    value would be baked into a captured CUDA graph and replayed with the same dropout mask every time)."""
    import fastlm
    import fastlm.functional as F

    names = {k: getattr(forward, k).arg_names for k in ("attn_fwd_kernel",)}
    names |= {k: getattr(backward, k).arg_names for k in ("attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel")}
    log, current = [], [0]
    for mod in (forward, backward):
        for name in names:
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, _Spy(name, log, current))
    monkeypatch.setattr(backward, "attn_bwd_preprocess_kernel", _Spy("pre", [], current))
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    with fastlm.backend("triton"):
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.3).sum().backward()
    assert sorted(launch.kernel for launch in log) == sorted(names)
    for launch in log:
        arg_names = names[launch.kernel]
        seed = launch.args[arg_names.index("Seed" if "Seed" in arg_names else "seed")]
        assert isinstance(seed, torch.Tensor), f"{launch.kernel}: the seed is a host {type(seed).__name__}"
        assert seed.dtype == torch.int64 and seed.shape == (1,) and seed.device == q.device


def test_cuda_backward_copies_grad_out_only_when_its_rows_are_misaligned():
    """The CUDA C++ backward reads 16-byte aligned rows: dO is copied only when its layout lacks them (the unit last
    stride is not a row stride), and every backend copies a dO whose last stride is not 1."""
    from fastlm.ops.attention import grad_out_layout

    do = torch.randn(2, 3, 16, 64, dtype=torch.float16)
    for aligned in (do, do.transpose(1, 2), do[:, :1]):
        assert grad_out_layout(aligned, "cuda") is aligned
    for misaligned in (torch.randn(2, 3, 16, 68, dtype=torch.float16)[..., :64], do.flatten()[1:1025].view(16, 64)):
        out = grad_out_layout(misaligned, "cuda")
        assert out is not misaligned and out.is_contiguous() and torch.equal(out, misaligned)
        assert grad_out_layout(misaligned, "triton") is misaligned
    strided = do.transpose(-1, -2)
    assert grad_out_layout(strided, "triton").stride(-1) == 1


@pytest.mark.gpu
def test_dropout_is_fresh_on_every_cuda_graph_replay():
    import fastlm
    import fastlm.functional as F

    q = torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.float16)
    with fastlm.backend("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compiles) outside the capture
            F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
        graph.replay()
        first = out.clone()
        graph.replay()
    assert not torch.equal(first, out), "every replay of the captured graph applied the same dropout mask"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_kernels_run_on_the_inputs_gpu():
    import fastlm
    import fastlm.functional as F

    x = torch.randn(64, 256, device="cuda:1")
    with fastlm.backend("triton"), torch.cuda.device(0):
        y = F.layer_norm(x, (256,))
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (256,)))


def test_varlen_offsets_unread_on_the_host_are_made_memory_safe(monkeypatch):
    """Where the offsets cannot be read on the host (CUDA tensors, tracing), they are clamped into [0, total] and made
    non-decreasing on the device: valid offsets pass unchanged, invalid ones cannot address rows outside q / k."""
    from fastlm.ops import attention_args as ops

    monkeypatch.setattr(ops, "host_readable", lambda *t: False)
    valid = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    assert torch.equal(ops.checked_offsets(valid, "cu_seqlens_q", 10, 7), valid)
    bad = torch.tensor([-4, 12, 5, 99], dtype=torch.int32)
    safe = ops.checked_offsets(bad, "cu_seqlens_q", 10, 7)
    assert safe.dtype == torch.int32 and safe.tolist() == [0, 10, 10, 10]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.checked_offsets(bad, "cu_seqlens_q", 10, 7)
