"""pytest-benchmark view of the cross_entropy cases of ``fastlm bench`` (cases: fastlm/bench/cross_entropy.py).

pytest benchmarks/bench_cross_entropy.py                 # time every case
pytest benchmarks/ --benchmark-disable          # smoke: run each case once
"""

import pytest
from common import params, run

from fastlm.bench import cross_entropy as family


@pytest.mark.parametrize("case,provider", params(family))
def test_cross_entropy(benchmark, case, provider):
    run(benchmark, family, case, provider)
