"""pytest-benchmark view of the norms cases of ``fastlm bench`` (cases: fastlm/bench/norms.py).

pytest benchmarks/bench_norms.py                 # time every case
pytest benchmarks/ --benchmark-disable          # smoke: run each case once
"""

import pytest
from common import params, run

from fastlm.bench import norms as family


@pytest.mark.parametrize("case,provider", params(family))
def test_norms(benchmark, case, provider):
    run(benchmark, family, case, provider)
