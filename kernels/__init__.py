"""Triton kernels and their launchers, one module per op family (installed as ``fastlm.kernels``).

Shared launch helpers, used by every launcher:

- ``empty`` allocates kernel outputs; with ``FASTLM_POISON=1`` (set by the test suite) it fills them with NaN first,
  so an element a kernel forgets to write shows up in the comparison with the reference.
- ``on_tensor_device`` runs a launcher with the CUDA device of its first tensor argument current: a Triton launch
  goes to the *current* device and its current stream, not to the tensors' device, so without it a tensor on
  ``cuda:1`` while device 0 is current would be processed on the wrong GPU.
- ``launch_grid`` checks a grid against CUDA's limits (x < 2**31, y and z <= 65535) and raises a clear error
  instead of a failed launch; kernels put the large dimension (rows, or tiles x batch x heads) on axis x.

Constants shared by the kernels: the mask kinds of the softmax and attention kernels (their MASK_KIND constexpr; the
launchers pass these ints) with their twins for kernel code (``KIND_*``: Triton kernels read only globals that are
``tl.constexpr`` instances), and log2(e) / ln(2) for the base-2 exponentials (kernel code; ``.value`` on the host).
"""

import functools
import os

import torch
import triton.language as tl

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2  # no mask; bool (True = keep); additive float
KIND_NONE, KIND_BOOL, KIND_ADD = tl.constexpr(MASK_NONE), tl.constexpr(MASK_BOOL), tl.constexpr(MASK_ADD)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

POISON = os.environ.get("FASTLM_POISON", "0") == "1"
MAX_GRID = (2**31 - 1, 65535, 65535)  # CUDA's grid limits per axis (x, y, z)


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, NaN-filled when ``FASTLM_POISON=1``."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def launch_grid(*dims: int) -> tuple:
    """The grid ``dims`` as a tuple, after checking each axis against CUDA's limits (ValueError naming the axis)."""
    for axis, (n, limit) in enumerate(zip(dims, MAX_GRID, strict=False)):
        if n < 0:
            raise ValueError(f"grid axis {'xyz'[axis]} has a negative size ({n}): a size argument is negative")
        if n > limit:
            raise ValueError(
                f"the launch needs {n} programs on grid axis {'xyz'[axis]} (CUDA's limit is {limit}): the input is "
                "too large for one launch of this kernel; split it into smaller calls"
            )
    return tuple(dims)


def on_tensor_device(launcher):
    """Decorator: run ``launcher`` with the CUDA device of its first tensor argument made current (so Triton
    launches on that device and its current stream). CPU tensors (the interpreter) pass through."""

    @functools.wraps(launcher)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None or t.device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(t.device):
            return launcher(*args, **kwargs)

    return wrapper
