"""pytest-benchmark view of the decoding cases of ``fastlm bench`` (cases: fastlm/bench/decode.py).

pytest benchmarks/bench_decode.py               # time every case
pytest benchmarks/ --benchmark-disable          # smoke: run each case once
"""

import pytest
from common import params, run

from fastlm.bench import decode as family


@pytest.mark.parametrize("case,provider", params(family))
def test_decode(benchmark, case, provider):
    run(benchmark, family, case, provider)
