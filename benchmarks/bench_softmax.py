"""pytest-benchmark view of the softmax cases of ``fastlm bench`` (cases: fastlm/bench/softmax.py).

pytest benchmarks/bench_softmax.py                 # time every case
pytest benchmarks/ --benchmark-disable          # smoke: run each case once
"""

import pytest
from common import params, run

from fastlm.bench import softmax as family


@pytest.mark.parametrize("case,provider", params(family))
def test_softmax(benchmark, case, provider):
    run(benchmark, family, case, provider)
