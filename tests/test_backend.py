"""Backend selection: context manager, environment variable, auto table, and clear errors (no silent fallback)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fastlm
from fastlm import auto_table
from fastlm import dispatch as B

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    # a family's name is also an op's for softmax: the measured table first, then the family default
    expected = B.auto_choice(family, "cpu", "small", False)[0]
    assert expected in ("torch", B.AUTO[(family, "cpu")])
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


def test_interpreter_with_numpy_it_cannot_read_raises(monkeypatch):
    """Triton 3.6's interpreter with numpy >= 2.4 failed in every kernel loop with a bare numpy TypeError: named."""
    fake = {"triton": "3.6.0", "numpy": "2.4.6"}
    monkeypatch.setattr(B.importlib.metadata, "version", lambda name: fake[name])
    reason = B.interpreter_problem()
    assert reason is not None and "numpy<2.4" in reason and "3.6.0" in reason, reason
    monkeypatch.setattr(B, "_INTERPRET", True)
    monkeypatch.setattr(B, "_INTERPRETER_PROBLEM", reason)
    assert B.unavailable_reason("triton", "norms", torch.device("cpu")) == reason
    assert B.unavailable_reason("triton", "norms", torch.device("cuda")) is None  # compiled kernels: no interpreter
    fake.update(numpy="2.3.5")
    assert B.interpreter_problem() is None
    fake.update(triton="3.8.0", numpy="2.5.5")
    assert B.interpreter_problem() is None


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


# ---------------------------------------------------------------------------------------------------------------
# auto's measured table (fastlm/auto_table.py, written by scripts/auto_table.py from fastlm bench reports)

SIZES = {"small": (4, 64), "large": (512, 256)}


def test_auto_table_names_only_backends_that_exist_for_the_op():
    assert auto_table.MEASURED, "the committed auto table is empty"
    for (op, device, size, mode), (backend, note) in auto_table.MEASURED.items():
        assert op in B.OP_FAMILY, f"{op}: not an op resolve knows"
        family = B.OP_FAMILY[op]
        assert device in ("cpu", "cuda") and size in ("small", "large", "decode") and mode in ("fwd", "fwd+bwd")
        assert backend == "torch" or family in B.IMPLEMENTED[backend], f"{op}: the {backend} backend has no {family}"
        assert backend in ("torch", "cpu") if device == "cpu" else backend in ("torch", "triton", "cuda")
        assert note, f"{op}: an entry without what was measured"


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_auto_follows_the_measured_table(size, mode):
    """resolve under auto gives the table's backend for each op it lists on CPU (the mode of the call: training when
    the input requires grad under grad mode), and the family default for what it does not list."""
    x = torch.randn(*SIZES[size], requires_grad=mode == "fwd+bwd")
    assert B.size_class(x) == size
    for op, family in B.OP_FAMILY.items():
        want, where = B.auto_choice(op, "cpu", size, mode == "fwd+bwd")
        if want == "cpu" and fastlm.extension.lib is None:
            continue
        if op == "linear_cross_entropy" or op == "linear_distillation_loss":
            assert want != "torch", f"{op}: a memory-saving op given to torch's ops ({where})"
        with torch.set_grad_enabled(True):
            assert B.resolve(op, x) == want, f"{op} {size} {mode}: resolve disagrees with {where}"
        other = "fwd" if mode == "fwd+bwd" else "fwd+bwd"
        if all((op, "cpu", size, m) not in auto_table.MEASURED for m in (mode, other)):
            assert want == B.AUTO[(family, "cpu")]


def _report(device: str, rows: list[tuple]) -> dict:
    return {
        "environment": {"device": device, "torch": "x", "timestamp": "t"},
        "results": [dict(kernel=k, provider=p, mode=m, shape=s, dtype="float32", ms=ms) for k, p, m, s, ms in rows],
    }


def test_auto_table_script_picks_the_measured_winner(tmp_path):
    """scripts/auto_table.py: the geometric mean of the time relative to torch's decides (every shape counts alike);
    torch.compile and peers are no candidates; the memory-saving losses never go to torch; on a GPU torch's SDPA is
    the fastest of its backends; the written module imports and holds the result."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("auto_table_script", os.path.join(ROOT, "scripts", "auto_table.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cpu = _report(
        "CPU (test)",
        [
            ("layer_norm", "fastlm-cpu", "fwd", "a", 1.0),  # 0.5x torch on a, 1.5x on b: geo-mean 0.87: cpu wins
            ("layer_norm", "torch-eager", "fwd", "a", 2.0),
            ("layer_norm", "fastlm-cpu", "fwd", "b", 30.0),
            ("layer_norm", "torch-eager", "fwd", "b", 20.0),
            ("layer_norm", "torch-compile", "fwd", "b", 1.0),  # not a backend
            ("softmax", "fastlm-cpu", "fwd+bwd", "a", 3.0),
            ("softmax", "torch-eager", "fwd+bwd", "a", 2.0),
            ("call_softmax", "fastlm-cpu", "fwd", "tiny", 1.0),
            ("call_softmax", "torch-eager", "fwd", "tiny", 0.5),
            ("linear_cross_entropy", "fastlm-cpu", "fwd+bwd", "a", 9.0),
            ("linear_cross_entropy", "torch-eager", "fwd+bwd", "a", 1.0),
            ("llama_train_step", "fastlm-auto", "fwd+bwd", "a", 1.0),  # whole models are not ops
        ],
    )
    gpu = _report(
        "NVIDIA H200",
        [
            ("sdpa", "fastlm-triton", "fwd", "a", 1.0),
            ("sdpa", "torch-sdpa-math", "fwd", "a", 0.1),  # not what torch's dispatcher would run
            ("sdpa", "torch-sdpa-flash", "fwd", "a", 1.5),
            ("sdpa", "torch-sdpa-cudnn", "fwd", "a", 0.9),
        ],
    )
    paths = []
    for i, report in enumerate((cpu, gpu)):
        paths.append(str(tmp_path / f"r{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(report, f)
    out = tmp_path / "table.py"
    assert script.main([*paths, "--out", str(out)]) == 0
    spec = importlib.util.spec_from_file_location("table", out)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    got = {k: v[0] for k, v in table.MEASURED.items()}
    assert got == {
        ("layer_norm", "cpu", "large", "fwd"): "cpu",
        ("softmax", "cpu", "large", "fwd+bwd"): "torch",
        ("softmax", "cpu", "small", "fwd"): "torch",
        ("linear_cross_entropy", "cpu", "large", "fwd+bwd"): "cpu",
        ("scaled_dot_product_attention", "cuda", "large", "fwd"): "torch",
    }
