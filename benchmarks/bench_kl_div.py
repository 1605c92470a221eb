"""pytest-benchmark view of the kl_div cases of ``fastlm bench`` (cases: fastlm/bench/kl_div.py).

pytest benchmarks/bench_kl_div.py                 # time every case
pytest benchmarks/ --benchmark-disable          # smoke: run each case once
"""

import pytest
from common import params, run

from fastlm.bench import kl_div as family


@pytest.mark.parametrize("case,provider", params(family))
def test_kl_div(benchmark, case, provider):
    run(benchmark, family, case, provider)
