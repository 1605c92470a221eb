"""The benchmark suite behind ``fastlm bench`` and ``pytest benchmarks/`` (cases live here, once)."""

from fastlm.bench.core import Result, quantiles_ms  # noqa: F401
