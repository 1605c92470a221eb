"""The peer baselines of the benchmark suite (fastlm/bench/peers.py) compute what the case computes: Liger-Kernel's
function for each kernel, fed the suite's arguments, matches torch. Runs where Liger can (a GPU with liger_kernel
importable: scripts/gpu_check.sh carries its wheel); the mapping of kernels without a Liger counterpart everywhere."""

import importlib.util

import pytest
import torch
import torch.nn.functional as TF

from fastlm.bench import peers
from fastlm.bench.core import SkipCase


def test_kernels_without_a_liger_counterpart_skip():
    for kernel in ("add_layer_norm", "log_softmax", "scaled_masked_softmax", "scaled_dot_product_attention"):
        with pytest.raises(SkipCase, match="Liger-Kernel has no"):
            peers.liger_fn(kernel)
    assert peers.liger_providers(torch.device("cpu")) == {}


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger_kernel is not installed")
def test_liger_functions_match_torch():
    dev, dt = torch.device("cuda"), torch.bfloat16
    x, r = (torch.randn(64, 512, device=dev, dtype=dt) for _ in range(2))
    w, b = torch.randn(512, device=dev, dtype=dt), torch.randn(512, device=dev, dtype=dt)
    t = torch.randint(0, 512, (64,), device=dev)
    lin = torch.randn(1000, 512, device=dev, dtype=dt) * 0.05
    tl = torch.randint(0, 1000, (64,), device=dev)
    cases = {
        "layer_norm": ((x, (512,), w, b), TF.layer_norm(x, (512,), w, b)),
        "rms_norm": ((x, (512,), w), TF.rms_norm(x, (512,), w, 1e-5)),
        "add_rms_norm": ((x, r, (512,), w), TF.rms_norm(x + r, (512,), w, 1e-5)),
        "softmax": ((x,), TF.softmax(x, -1)),
        "cross_entropy": ((x, t), TF.cross_entropy(x.float(), t)),
        "linear_cross_entropy": ((x, lin, tl), TF.cross_entropy((x @ lin.T).float(), tl)),
    }
    for kernel, (args, want) in cases.items():
        got = peers.liger_fn(kernel)(*args)
        got = got[0] if isinstance(got, tuple) else got
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2, msg=lambda m, k=kernel: f"{k}: {m}")
