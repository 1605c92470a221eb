"""pytest-benchmark view of the attention cases of ``fastlm bench`` (cases: fastlm/bench/attention.py).

pytest benchmarks/bench_attention.py            # time every case
pytest benchmarks/ --benchmark-disable          # smoke: run each case once
"""

import pytest
from common import params, run

from fastlm.bench import attention as family


@pytest.mark.parametrize("case,provider", params(family))
def test_attention(benchmark, case, provider):
    run(benchmark, family, case, provider)
