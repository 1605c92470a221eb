"""Backend selection: context manager, environment variable, auto table, and clear errors (no silent fallback)."""

import os
import subprocess
import sys

import pytest
import torch

import fastlm
from fastlm import dispatch as B


def test_context_nests_and_restores():
    assert fastlm.current_backend() == "auto"
    with fastlm.backend("torch"):
        with fastlm.backend("triton"):
            assert fastlm.current_backend() == "triton"
        assert fastlm.current_backend() == "torch"
    assert fastlm.current_backend() == "auto"


def test_restores_after_exception():
    with pytest.raises(KeyError), fastlm.backend("torch"):
        raise KeyError
    assert fastlm.current_backend() == "auto"


def test_unknown_name():
    with pytest.raises(ValueError, match="backend must be one of"), fastlm.backend("cudnn"):
        pass


@pytest.mark.parametrize("family", ["norms", "softmax", "linear_ce", "attention"])
def test_auto_on_cpu_follows_the_table(family):
    expected = B.AUTO[(family, "cpu")]
    if expected == "cpu" and fastlm.extension.lib is None:
        pytest.skip("fastlm._C is not built")
    assert B.resolve(family, torch.randn(2, 2)) == expected
    assert B.resolve(family, torch.randn(2, 2, dtype=torch.float64)) == "torch"  # fp64: no fused kernel


def test_cpu_backend_needs_cpu_tensors_and_the_extension(monkeypatch):
    reason = B.unavailable_reason("cpu", "norms", torch.device("cuda"))
    assert reason is not None and "CPU tensors" in reason
    monkeypatch.setattr(fastlm.extension, "lib", None)
    monkeypatch.setattr(fastlm.extension, "LOAD_ERROR", "fastlm._C could not be loaded: test")
    with fastlm.backend("cpu"), pytest.raises(fastlm.BackendUnavailableError, match="could not be loaded: test"):
        fastlm.functional.layer_norm(torch.randn(2, 4), (4,))


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(B, "_INTERPRET", False)
    with fastlm.backend("triton"), pytest.raises(fastlm.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        fastlm.functional.layer_norm(torch.randn(2, 4), (4,))


def test_missing_triton_raises(monkeypatch):
    monkeypatch.setattr(B, "_TRITON_FOUND", False)
    with fastlm.backend("triton"), pytest.raises(fastlm.BackendUnavailableError, match="triton is not installed"):
        fastlm.functional.rms_norm(torch.randn(2, 4), (4,))


def test_cuda_reason_is_specific():
    reason = B.unavailable_reason("cuda", "norms", torch.device("cpu"))
    assert reason is not None and ("CUDA" in reason or "fastlm._C" in reason)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


def test_env_variable():
    out = _run("import fastlm; print(fastlm.current_backend())", FASTLM_BACKEND="torch")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"
    bad = _run("import fastlm", FASTLM_BACKEND="nope")
    assert bad.returncode != 0 and "backend must be one of" in bad.stderr


def test_named_backend_lacking_a_feature_names_it_and_the_alternative():
    with (
        fastlm.backend("cpu"),
        pytest.raises(
            B.UnsupportedCaseError,
            match=r"cpu backend's attention does not support varlen \(packed\) sequences; use fastlm.backend\('torch'\)"
            r" or 'auto'",
        ),
    ):
        cu = torch.tensor([0, 3, 8], dtype=torch.int32)
        fastlm.functional.varlen_attention(*(torch.randn(8, 2, 16) for _ in range(3)), cu, cu, 5, 5)


def test_backend_without_the_family_raises_unsupported():
    x, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with (
        fastlm.backend("cuda"),
        pytest.raises(B.UnsupportedCaseError, match="the cuda backend has no linear_ce kernels"),
    ):
        fastlm.functional.linear_cross_entropy(x, w, t)


def test_bad_arguments_are_checked_before_the_backend_choice():
    """A bad argument is a ValueError / TypeError on every backend, not an UnsupportedCaseError (which tests and the
    bench treat as a skip)."""
    q = torch.randn(1, 2, 8, 16)
    for name in ("cpu", "cuda", "triton"):
        with fastlm.backend(name):
            with pytest.raises(ValueError, match="dropout_p must be in"):
                fastlm.functional.scaled_dot_product_attention(q, q, q, dropout_p=1.5)
            with pytest.raises(TypeError, match="attn_mask must be a Tensor"):
                fastlm.functional.scaled_dot_product_attention(q, q, q, attn_mask=[[True]], dropout_p=0.1)
