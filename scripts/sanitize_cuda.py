"""Call every CUDA C++ kernel of fastlm._C once, forward and backward, at small sizes with ragged edges: the workload
that ``scripts/gpu_check.sh`` runs under ``compute-sanitizer`` (memcheck, then racecheck). Small on purpose: the
sanitizer slows kernels 10-100x, and out-of-bounds accesses and shared-memory races show at any size that has a
partial tile, a partial warp and more than one block.

    python scripts/sanitize_cuda.py            # CUDA backend on the GPU (the cpu backend when there is none)

Without a GPU (``gpu_check.sh --dry-run``) the same calls run on the cpu backend, so that the script itself is
checked; the sanitizer needs a GPU. Prints one line per call and exits non-zero if a call raises.
"""

import sys

import torch

import fastlm
import fastlm.functional as F


def cases(dev: torch.device):
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32

    def t(*shape, dtype=dt):
        return torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True)

    N = 1000  # not a multiple of the 16-byte chunk: the scalar tail path
    yield "layer_norm", lambda: F.layer_norm(t(37, N), (N,), t(N), t(N))
    yield "rms_norm", lambda: F.rms_norm(t(37, N), (N,), t(N))
    yield "add_layer_norm", lambda: sum(o.float().sum() for o in F.add_layer_norm(t(5, 4096), t(5, 4096), (4096,)))
    yield "add_rms_norm", lambda: sum(o.float().sum() for o in F.add_rms_norm(t(5, 768), t(5, 768), (768,), t(768)))
    yield "softmax", lambda: F.softmax(t(19, 3000), dim=-1)
    yield "log_softmax (wide rows)", lambda: F.log_softmax(t(3, 70000), dim=-1)
    mask = torch.rand(2, 1, 45, 45, device=dev) > 0.3
    yield "scaled_masked_softmax", lambda: F.scaled_masked_softmax(t(2, 3, 45, 45), mask, 0.5, True)
    target = torch.randint(0, 5003, (29,), device=dev)
    target[3] = -100
    yield "cross_entropy", lambda: F.cross_entropy(t(29, 5003), target, label_smoothing=0.1)
    for D in (64, 128):
        for causal in (False, True):
            q, k, v = t(2, 4, 77, D), t(2, 2, 93, D), t(2, 2, 93, D)  # GQA, ragged query and key tiles
            yield (
                f"attention D={D} causal={causal}",
                lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c, enable_gqa=True),
            )


def main() -> int:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "cuda" if dev.type == "cuda" else "cpu"
    if dev.type != "cuda":
        print("no GPU: the calls run on the cpu backend (compute-sanitizer needs a GPU)")
    failed = 0
    with fastlm.backend(backend):
        for name, call in cases(dev):
            try:
                out = call()
                out.float().sum().backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                print(f"ok      {name}", flush=True)
            except Exception as exc:  # report every call, then fail
                failed += 1
                print(f"FAILED  {name}: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
