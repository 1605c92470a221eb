"""pytest-benchmark view of the rope cases of ``fastlm bench`` (cases: fastlm/bench/rope.py).

pytest benchmarks/bench_rope.py                 # time every case
pytest benchmarks/ --benchmark-disable          # smoke: run each case once
"""

import pytest
from common import params, run

from fastlm.bench import rope as family


@pytest.mark.parametrize("case,provider", params(family))
def test_rope(benchmark, case, provider):
    run(benchmark, family, case, provider)
