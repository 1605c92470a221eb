"""Static checks of the shipped Triton kernels, compiled for sm_90 on CPU (no GPU): no register spills, and the
memory-bound kernels use 128-bit global accesses on the wide configs."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from fastlm.bench.static import KernelStat  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """``fastlm bench --static`` as CI runs it (sm_90 here, to keep CI short; the command's default adds sm_80),
    without the interpreter; its printed table and its static.json."""
    out = tmp_path_factory.mktemp("static")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "fastlm", "bench", "--static", "--archs", "90", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out / "static.json") as f:
        return run.stdout, json.load(f)


@pytest.fixture(scope="module")
def stats(report):
    return [KernelStat(**d) for d in report[1]["triton"] if d["arch"] == 90]


def test_cli_prints_the_sm90_table(report):
    stdout, data = report
    assert "| kernel | config | sm | regs |" in stdout and "HGMMA" in stdout
    assert {d["arch"] for d in data["triton"]} == {90}


def test_cuda_kernels_do_not_spill(report):
    rows = report[1]["cuda"]
    spilled = [r for r in rows if r.get("stack", 0) or r.get("local", 0)]
    assert not spilled, spilled


# The one documented exception (kernels/attention/configs.py, FWD_FP32 / DQ_FP32): float32 attention at D = 256 with
# a mask or dropout, where no FMA tiling of the forward or dQ is spill-free (~300 B at 16x16).
SPILL_EXCEPTIONS = {("attn_fwd", "D=256", "fp32", "mask+dropout"), ("attn_bwd_dq", "D=256", "fp32", "mask+dropout")}


def _excepted(s) -> bool:
    return any(s.kernel == k and all(part in s.config for part in parts) for k, *parts in SPILL_EXCEPTIONS)


def test_every_shipped_config_compiles_without_spills(stats):
    assert stats, "no shipped configs found"
    spilled = [
        f"{s.kernel} [{s.config}]: stack {s.stack_bytes} B, local {s.local_bytes} B"
        for s in stats
        if s.spills and not _excepted(s)
    ]
    assert not spilled, "register spills on sm_90:\n" + "\n".join(spilled)
    excepted = [s for s in stats if _excepted(s)]
    assert excepted and all(s.stack_bytes + s.local_bytes <= 512 for s in excepted), [
        (s.kernel, s.config, s.stack_bytes) for s in excepted
    ]


def test_every_op_family_is_in_the_report(stats):
    """Norms, the softmax family, cross-entropy and attention: each shipped Triton kernel is compiled."""
    kernels = {s.kernel for s in stats}
    want = {"norm_fwd_kernel", "norm_bwd_kernel", "softmax_fwd", "softmax_bwd", "log_softmax_bwd", "softmax_stats"}
    want |= {"softmax_bwd_stats", "cross_entropy", "attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"}
    want |= {"attn_decode_split", "attn_decode_combine"}
    assert want <= kernels, want - kernels


def test_softmax_and_cross_entropy_use_128_bit_accesses(stats):
    """Row widths a multiple of 16 (as compiled here): the logits / rows are read with 128-bit loads."""
    rows = [s for s in stats if s.kernel.startswith(("softmax", "log_softmax", "cross_entropy"))]
    assert rows
    for s in rows:
        assert s.ldg128 > 0, f"{s.kernel} [{s.config}] has no 128-bit global loads"


def test_wide_norm_configs_use_128_bit_accesses(stats):
    wide = [
        s for s in stats if s.kernel.startswith("norm") and ("BLOCK_N=4096" in s.config or "BLOCK_N=8192" in s.config)
    ]
    assert wide
    for s in wide:
        assert s.ldg128 > 0 and s.stg128 > 0, f"{s.kernel} [{s.config}] has no 128-bit global loads/stores"


def test_gated_mlp_uses_128_bit_accesses(stats):
    """Every block-size class of the elementwise SwiGLU / GeGLU kernels reads and writes with 128-bit accesses."""
    rows = [s for s in stats if s.kernel.startswith("gated_mlp")]
    assert {s.kernel for s in rows} == {"gated_mlp_fwd", "gated_mlp_bwd"}
    for s in rows:
        assert s.ldg128 > 0 and s.stg128 > 0, f"{s.kernel} [{s.config}] has no 128-bit global loads/stores"


def test_attention_uses_wgmma_on_sm90(stats):
    """Forward at every head dim, backward up to D = 128 and dQ at D = 256 with TMA run their dots on wgmma (HGMMA).
    At D = 256 no wgmma tiling of dK/dV (nor of the pointer-load dQ) is spill-free on sm_90, so those use mma.sync
    (HMMA): checked too, so a change shows. The lean configs (a mask and/or dropout) use wgmma in the forward up to
    D = 128 and tensor cores everywhere."""
    from fastlm.bench.shipped import attention_configs

    attn = [s for s in stats if s.kernel.startswith("attn") and not s.kernel.startswith("attn_decode")]
    assert len(attn) == len(list(attention_configs()))
    for s in attn:
        d256_bwd = "D=256" in s.config and "bwd" in s.kernel
        if " fp32" in s.config:  # true fp32 dots: FMA on the CUDA cores (tensor cores have no IEEE fp32 mode)
            assert s.hmma == 0 and s.hgmma == 0, f"{s.kernel} [{s.config}] uses tensor cores for fp32"
        elif "mask+dropout" in s.config:
            if s.kernel == "attn_fwd" and "D=256" not in s.config:
                assert s.hgmma > 0, f"{s.kernel} [{s.config}] has no HGMMA (wgmma) on sm_90"
            assert s.hmma > 0 or s.hgmma > 0, f"{s.kernel} [{s.config}] uses no tensor cores"
        elif d256_bwd and s.kernel == "attn_bwd_dq" and " tma" in s.config and "M=64" in s.config:
            assert s.hgmma > 0, f"{s.kernel} [{s.config}] has no HGMMA (wgmma) on sm_90"
        elif d256_bwd:
            assert s.hmma > 0 or s.hgmma > 0, f"{s.kernel} [{s.config}] uses no tensor cores"
        else:
            assert s.hgmma > 0, f"{s.kernel} [{s.config}] has no HGMMA (wgmma) on sm_90"


def test_attention_hopper_configs(stats):
    """Every attention config fits sm_90's 227 KiB of shared memory; the TMA configs load through the copy engine
    (UTMALDG); the warp-specialised ones (Triton 3.6) really split into producer / consumer warp groups (USETMAXREG)."""
    from fastlm.kernels.attention import configs

    attn = [s for s in stats if s.kernel.startswith("attn") and not s.kernel.startswith("attn_decode")]
    for s in attn:
        assert s.shared_bytes <= configs.SM90_SMEM, f"{s.kernel} [{s.config}]: {s.shared_bytes} B of shared memory"
        if " tma" in s.config:
            assert s.utmaldg > 0, f"{s.kernel} [{s.config}] has no TMA loads"
        if " ws" in s.config:
            assert s.setmaxreg > 0, f"{s.kernel} [{s.config}] is not warp-specialised"
    assert any(" tma" in s.config for s in attn)
    assert any(" ws" in s.config for s in attn) == configs.WS_TRITON
