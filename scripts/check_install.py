"""Check an installed fastlm wheel under whatever torch this Python has (CI runs it under the oldest torch the wheel
supports, 2.10, and the newest on the package index; see scripts/torch_range.sh):

1. ``import fastlm`` works and ``fastlm._C`` loaded (its stable-ABI target is torch 2.10);
2. ``fastlm info`` runs and says the right things about this torch: the cpu backend available, and the CUDA backend
   either unavailable for the CUDA-major mismatch it names (a +cu13 wheel beside a CUDA 12 torch) or for the
   missing GPU;
3. every cpu-backend op, forward and backward, matches torch's own ops in float32.

``--expect-cuda-match`` (scripts/cuda_wheels.sh check: each CUDA wheel beside a torch of its CUDA major) also
requires that fastlm._C has CUDA kernels of this torch's CUDA major and that ``fastlm info`` reports them as matching:
no CUDA-major mismatch line, and the CUDA backend either available or unavailable only for want of a GPU.

Exits non-zero on the first failed check, printing what was expected and what came.
"""

import subprocess
import sys

import torch
import torch.nn.functional as TF

import fastlm
import fastlm.functional as F
from fastlm import extension


def check_info(expect_cuda_match: bool) -> None:
    out = subprocess.run([sys.executable, "-m", "fastlm", "info"], capture_output=True, text=True, check=True).stdout
    print(out)
    assert f"torch {torch.__version__}" in out, "fastlm info does not name this torch"
    assert "backend cpu    on cpu: available" in out, "the cpu backend is not available"
    cuda_line = next(line for line in out.splitlines() if line.startswith("backend cuda"))
    built = extension.build_info()
    if expect_cuda_match:
        assert built["with_cuda"], "fastlm._C has no CUDA kernels"
        assert torch.version.cuda, f"torch {torch.__version__} is a CPU build"
        majors = (built["cuda_version"].split(".")[0], torch.version.cuda.split(".")[0])
        assert majors[0] == majors[1], f"fastlm._C is for CUDA {built['cuda_version']}, torch {torch.version.cuda}"
        assert "built for CUDA" not in out, f"fastlm info reports a CUDA mismatch: {cuda_line}"
        want = "available" if torch.cuda.is_available() else "unavailable: no CUDA device is visible"
        assert cuda_line.endswith(want), f"expected the CUDA backend {want!r}, got: {cuda_line}"
        print(f"ok  CUDA {built['cuda_version']} kernels match torch's CUDA {torch.version.cuda}: {cuda_line}")
    if (
        built["with_cuda"]
        and torch.version.cuda
        and built["cuda_version"].split(".")[0] != torch.version.cuda.split(".")[0]
    ):
        want = f"built for CUDA {built['cuda_version']} but torch uses CUDA {torch.version.cuda}"
        assert want in cuda_line, f"expected the CUDA-major mismatch ({want}), got: {cuda_line}"
    elif not torch.cuda.is_available():
        assert "unavailable" in cuda_line, cuda_line


def _close(name: str, got, want) -> None:
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")


def check_cpu_ops() -> None:
    torch.manual_seed(0)
    x = torch.randn(7, 300, requires_grad=True)
    r = torch.randn(7, 300)
    w, b = torch.randn(300, requires_grad=True), torch.randn(300, requires_grad=True)
    scores = torch.randn(2, 3, 17, 17, requires_grad=True)
    mask = torch.rand(2, 1, 17, 17) > 0.2
    mask[..., 0] = True
    t = torch.randint(0, 300, (7,))
    head = torch.randn(50, 300, requires_grad=True)
    q, k, v = (torch.randn(2, 4, 33, 64, requires_grad=True) for _ in range(3))
    cos, sin = torch.randn(1, 33, 64), torch.randn(1, 33, 64)  # rotary tables (any values: exact formula)
    p = torch.randn(7, 300).softmax(-1)  # class probabilities / a teacher's distribution
    y = torch.randn(7, 300)  # teacher logits
    xt, head_t = torch.randn(7, 40), torch.randn(50, 40)  # teacher hidden states and LM head

    def rotate(t):  # HF Llama's rotate_half, then x * cos + rotate_half(x) * sin
        return t * cos[:, None] + torch.cat((-t[..., 32:], t[..., :32]), -1) * sin[:, None]

    def kl(s, t_logits, temp):  # T^2 * KL(teacher || student), batchmean
        ls, lt = TF.log_softmax(s / temp, -1), TF.log_softmax(t_logits / temp, -1)
        return (lt.exp() * (lt - ls)).sum(-1).mean() * temp**2

    cases = {
        "layer_norm": (lambda: F.layer_norm(x, (300,), w, b), lambda: TF.layer_norm(x, (300,), w, b)),
        "rms_norm": (lambda: F.rms_norm(x, (300,), w, 1e-6), lambda: TF.rms_norm(x, (300,), w, 1e-6)),
        "add_layer_norm": (lambda: F.add_layer_norm(x, r, (300,), w, b)[0], lambda: TF.layer_norm(x + r, (300,), w, b)),
        "add_rms_norm": (lambda: F.add_rms_norm(x, r, (300,), w, 1e-6)[0], lambda: TF.rms_norm(x + r, (300,), w, 1e-6)),
        "softmax": (lambda: F.softmax(x, dim=0), lambda: TF.softmax(x, dim=0)),
        "log_softmax": (lambda: F.log_softmax(x, dim=-1), lambda: TF.log_softmax(x, dim=-1)),
        "scaled_masked_softmax": (
            lambda: F.scaled_masked_softmax(scores, mask, 0.5),
            lambda: TF.softmax((scores * 0.5).masked_fill(~mask, float("-inf")), -1),
        ),
        "cross_entropy": (
            lambda: F.cross_entropy(x, t, label_smoothing=0.1),
            lambda: TF.cross_entropy(x, t, label_smoothing=0.1),
        ),
        "linear_cross_entropy": (
            lambda: F.linear_cross_entropy(x, head, t % 50),
            lambda: TF.cross_entropy(x @ head.T, t % 50),
        ),
        "scaled_dot_product_attention": (
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            lambda: TF.scaled_dot_product_attention(q, k, v, is_causal=True),
        ),
        "apply_rotary_pos_emb": (
            lambda: torch.cat([t.flatten() for t in F.apply_rotary_pos_emb(q, k, cos, sin)]),
            lambda: torch.cat([rotate(q).flatten(), rotate(k).flatten()]),
        ),
        "swiglu": (lambda: F.swiglu(x[:, :150], x[:, 150:]), lambda: TF.silu(x[:, :150]) * x[:, 150:]),
        "geglu": (lambda: F.geglu(x), lambda: TF.gelu(x[:, :150], approximate="tanh") * x[:, 150:]),
        "cross_entropy (probabilities)": (lambda: F.cross_entropy(x, p), lambda: TF.cross_entropy(x, p)),
        "kl_div": (
            lambda: F.kl_div(x.log_softmax(-1), p, reduction="batchmean"),
            lambda: TF.kl_div(x.log_softmax(-1), p, reduction="batchmean"),
        ),
        "distillation_loss": (lambda: F.distillation_loss(x, y, temperature=2.0), lambda: kl(x, y, 2.0)),
        "linear_distillation_loss": (
            lambda: F.linear_distillation_loss(x, head, xt, head_t, target=t % 50, hard_weight=0.3),
            lambda: 0.7 * kl(x @ head.T, xt @ head_t.T, 1.0) + 0.3 * TF.cross_entropy(x @ head.T, t % 50),
        ),
    }
    leaves = [x, w, b, scores, head, q, k, v]
    with fastlm.backend("cpu"):
        for name, (ours, ref) in cases.items():
            got, want = ours(), ref()
            _close(name, got, want)
            g = torch.randn_like(want)
            used = [p for p in leaves if p.requires_grad]
            ga = torch.autograd.grad(got, used, g, allow_unused=True)
            gb = torch.autograd.grad(want, used, g, allow_unused=True)
            for a, c in zip(ga, gb, strict=True):
                if c is not None:
                    _close(f"{name} (gradient)", a, c)
            print(f"ok  cpu {name}: forward and gradients match torch {torch.__version__}")


def main() -> int:
    expect_cuda_match = "--expect-cuda-match" in sys.argv[1:]
    print(f"fastlm {fastlm.__version__} under torch {torch.__version__} (CUDA {torch.version.cuda})")
    assert extension.lib is not None, f"fastlm._C did not load: {extension.LOAD_ERROR}"
    check_info(expect_cuda_match)
    check_cpu_ops()
    return 0


if __name__ == "__main__":
    sys.exit(main())
