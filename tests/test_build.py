"""The compiled extension: it loads, carries CUDA kernels for the default archs when the build could compile them
(CI compiles them on a machine without a GPU so that the CUDA code never rots), and fails cleanly on CPU tensors."""

import os
import subprocess

import pytest
import torch
from torch.utils import cpp_extension

import fastlm
from fastlm import extension

CUDA_BUILD_EXPECTED = (
    torch.version.cuda is not None
    and cpp_extension.CUDA_HOME is not None
    and os.environ.get("FASTLM_BUILD_CUDA", "1") != "0"
)


def test_extension_loads():
    assert extension.lib is not None, extension.LOAD_ERROR
    assert str(torch.ops.fastlm)  # the namespace exists
    assert hasattr(torch.ops.fastlm, "norm_fwd_cuda") and hasattr(torch.ops.fastlm, "norm_bwd_cuda")
    assert extension.build_info()["torch_build_version"]


@pytest.mark.skipif(not CUDA_BUILD_EXPECTED, reason="torch is a CPU build, nvcc is missing or FASTLM_BUILD_CUDA=0")
def test_cuda_kernels_compiled():
    info = extension.build_info()
    assert info["with_cuda"], "nvcc and a CUDA torch were available, but fastlm._C has no CUDA kernels"
    # the wheel's CUDA major is nvcc's and torch's alike (issue 20: +cu12 / +cu13 builds)
    nvcc_major, torch_major = info["nvcc_version"].split(".")[0], info["cuda_version"].split(".")[0]
    assert nvcc_major == torch_major, f"built by nvcc {info['nvcc_version']} for torch's CUDA {info['cuda_version']}"
    archs = info["cuda_archs"]
    so = extension.lib.__file__
    from fastlm.bench.static import _tool

    tool = _tool("cuobjdump")  # the one Triton ships (a CUDA toolkit without it is common)
    listing = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    for arch in archs.replace(" ", ";").split(";"):
        if arch:
            sm = "sm_" + arch.split("+")[0].replace(".", "")
            assert sm in listing, f"{sm} listed in TORCH_CUDA_ARCH_LIST={archs} but not in {so}:\n{listing}"
    if not torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        assert "sm_80" in listing and "sm_90" in listing, listing


def test_cuda_op_on_cpu_tensor_raises_cleanly():
    x = torch.randn(2, 8)
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.ops.fastlm.norm_fwd_cuda(x, None, None, None, 1e-5, False)


def test_import_and_info_cli():
    out = subprocess.run(
        [os.sys.executable, "-m", "fastlm", "info"], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    assert f"fastlm {fastlm.__version__}" in out and "backend cuda" in out
    assert "attention (Triton): TMA" in out and "autotuning" in out
