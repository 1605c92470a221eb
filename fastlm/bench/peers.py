"""Peer libraries timed beside fastlm when they are importable: Liger-Kernel (Triton kernels, CUDA tensors only).

Each entry has the call signature of the suite's case for that kernel (the same inputs as fastlm's provider), so the
numbers compare like for like. A kernel Liger has no counterpart for (add_layer_norm, log_softmax, the
scaled-masked softmax) raises SkipCase, which the suite reports. On the H200, which has no network, Liger comes from
its pure-Python wheel carried along (``scripts/gpu_check.sh --peer-wheel``).
"""

import importlib.util

import torch

from fastlm.bench.core import SkipCase

LIGER = "liger"  # the provider's name in the reports


def liger_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def liger_providers(device: torch.device) -> dict[str, None]:
    """{"liger": None} where Liger can run (CUDA tensors, importable), else {}: merged into a family's providers."""
    return {LIGER: None} if liger_available(device) else {}


# the suite's kernel -> Liger's function in liger_kernel.transformers.functional
LIGER_KERNELS = (
    "layer_norm",
    "rms_norm",
    "add_rms_norm",
    "softmax",
    "cross_entropy",
    "linear_cross_entropy",
    "rope",
    "kl_div",
)


def liger_fn(kernel: str):
    """Liger's function for ``kernel``, taking the suite's arguments for that case."""
    if kernel not in LIGER_KERNELS:
        raise SkipCase(f"Liger-Kernel has no {kernel}")
    from liger_kernel.transformers import functional as lf

    eps = 1e-5
    return {
        "layer_norm": lambda x, shape, w, b: lf.liger_layer_norm(x, w, b, eps),
        # in_place=False: the timed backward replays one graph, whose dy Liger would otherwise overwrite
        "rms_norm": lambda x, shape, w: lf.liger_rms_norm(x, w, eps, in_place=False),
        "add_rms_norm": lambda x, r, shape, w: lf.liger_fused_add_rms_norm(x, r, w, eps, in_place=False),
        "softmax": lambda x: lf.liger_softmax(x),
        "cross_entropy": lambda x, t: lf.liger_cross_entropy(x, t),
        "linear_cross_entropy": lambda x, w, t: lf.liger_fused_linear_cross_entropy(x, w, t),
        "rope": lambda q, k, cos, sin: lf.liger_rope(q, k, cos, sin),
        "kl_div": lambda x, t: lf.liger_kl_div(x, t, reduction="batchmean"),
    }[kernel]
