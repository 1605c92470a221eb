"""pytest-benchmark view of the norm cases of ``fastlm bench`` (the cases live in fastlm/bench/norms.py).

    pytest benchmarks/bench_norms.py                      # time every case (GB/s in extra_info)
    pytest benchmarks/ --benchmark-disable                # smoke: run each case once
"""

import pytest
import torch

from fastlm.bench import norms

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = [
    pytest.param(case, provider, id=f"{case.kernel}-{case.shape}-{case.mode}-{provider}")
    for case in norms.cases(DEVICE, DTYPE, quick=True)
    for provider in norms.providers(DEVICE)
]


@pytest.mark.parametrize("case,provider", CASES)
def test_norms(benchmark, case, provider):
    fn = norms.runner(case, provider, DEVICE)()
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def timed():
        fn()
        sync()

    benchmark.extra_info["bytes"] = case.bytes()  # GB/s = bytes / median seconds / 1e9
    benchmark(timed)
    if benchmark.stats is not None and getattr(benchmark.stats, "stats", None) is not None:
        benchmark.extra_info["GB/s"] = case.bytes() / benchmark.stats.stats.median / 1e9
