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
