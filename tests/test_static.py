"""Static checks of the shipped Triton kernels, compiled for sm_90 on CPU (no GPU): no register spills, and the
memory-bound kernels use 128-bit global accesses on the wide configs."""

import pytest

pytest.importorskip("triton")
from fastlm.bench import static  # noqa: E402


@pytest.fixture(scope="module")
def stats():
    return static.report((90,))


def test_every_shipped_config_compiles_without_spills(stats):
    assert stats, "no shipped configs found"
    spilled = [f"{s.kernel} [{s.config}]: stack {s.stack_bytes} B, local {s.local_bytes} B" for s in stats if s.spills]
    assert not spilled, "register spills on sm_90:\n" + "\n".join(spilled)


def test_wide_norm_configs_use_128_bit_accesses(stats):
    wide = [s for s in stats if "BLOCK_N=4096" in s.config or "BLOCK_N=8192" in s.config]
    assert wide
    for s in wide:
        assert s.ldg128 > 0 and s.stg128 > 0, f"{s.kernel} [{s.config}] has no 128-bit global loads/stores"
