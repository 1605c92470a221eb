"""Shared pytest-benchmark driver: every ``benchmarks/bench_<family>.py`` times the cases of ``fastlm bench``."""

import pytest
import torch

from fastlm.bench.core import SkipCase
from fastlm.dispatch import UnsupportedCaseError

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def params(family) -> list:
    return [
        pytest.param(case, provider, id=f"{case.kernel}-{case.shape}-{case.mode}-{provider}")
        for case in family.cases(DEVICE, DTYPE, quick=True)
        for provider in family.providers(DEVICE)
    ]


def run(benchmark, family, case, provider) -> None:
    """Time one case. A torch baseline that cannot run it (e.g. an SDPA backend refusing a mask) is skipped;
    a fastlm provider must run, unless its family declares the case outside that backend (SkipCase, with the
    reason)."""
    try:
        fn = family.runner(case, provider, DEVICE)()
    except Exception as exc:
        if provider.startswith("fastlm-") and not isinstance(exc, (SkipCase, UnsupportedCaseError)):
            raise
        pytest.skip(f"{provider} cannot run this case: {type(exc).__name__}: {exc}")
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def timed():
        fn()
        sync()

    benchmark.extra_info["work"] = case.work  # bytes or FLOPs; throughput = work / median seconds
    benchmark.extra_info["unit"] = case.unit
    benchmark(timed)
