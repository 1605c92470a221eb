"""pytest-benchmark view of the overhead cases of ``fastlm bench`` (cases: fastlm/bench/overhead.py).

pytest benchmarks/bench_overhead.py                 # time every case
pytest benchmarks/ --benchmark-disable          # smoke: run each case once
"""

import pytest
from common import params, run

from fastlm.bench import overhead as family


@pytest.mark.parametrize("case,provider", params(family))
def test_overhead(benchmark, case, provider):
    run(benchmark, family, case, provider)
