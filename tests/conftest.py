"""Test set-up: Triton runs through its interpreter on CPU-only machines, and kernel outputs are poisoned.

Both variables must be set before triton / fastlm are imported (triton.jit reads TRITON_INTERPRET at decoration
time), which is why this happens at the top of conftest.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTLM_POISON", "1")  # NaN-fill kernel outputs so unwritten elements fail the comparison

import pytest  # noqa: E402
import triton  # noqa: E402
from helpers import BACKENDS, ON_GPU  # noqa: E402


def _patch_triton36_interpreter() -> None:
    """Triton 3.6's interpreter (the H200's version) gives its tensors ``__index__ = int(self.handle.data)``
    (triton/runtime/interpreter.py, ``_patch_lang_tensor``), and a scalar derived from ``tl.program_id`` is a
    1-element 1-D array there: ``range(0, hi)`` over such a bound raises "only 0-dimensional arrays can be
    converted to Python scalars" under NumPy >= 2.5 (the deprecation of NumPy 1.25 expired). Triton 3.7+ squeeze
    first (``int(self.handle.data.squeeze())``); this makes 3.6's interpreter do the same. Test harness only: the
    compiled kernels are not affected."""
    if os.environ.get("TRITON_INTERPRET") != "1" or not triton.__version__.startswith("3.6."):
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


_patch_triton36_interpreter()
if os.environ.get("FASTLM_COMPILE_CENSUS") and os.environ.get("TRITON_INTERPRET") == "1":
    from compile_census import install  # noqa: E402

    install(os.environ["FASTLM_COMPILE_CENSUS"])

import fastlm  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs each test, but reproducible from the test id when one fails."""
    seed = zlib.crc32(request.node.nodeid.encode())  # not hash(): that one changes with PYTHONHASHSEED
    torch.manual_seed(seed)
    yield


@pytest.fixture(params=BACKENDS)
def backend(request):
    with fastlm.backend(request.param):
        yield request.param


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """A generic kernel test run on the cuda or cpu backend skips (with the reason) the cases those C++ kernels do
    not implement: they raise UnsupportedCaseError, which names the case (and is tested on its own)."""
    outcome = yield
    params = getattr(getattr(item, "callspec", None), "params", {})
    exc = outcome.excinfo
    if exc is not None and params.get("backend") in ("cuda", "cpu"):
        from fastlm.dispatch import UnsupportedCaseError

        if issubclass(exc[0], UnsupportedCaseError):
            outcome.force_exception(
                pytest.skip.Exception(f"not in the {params['backend']} kernels: {exc[1]}", _use_item_location=True)
            )
