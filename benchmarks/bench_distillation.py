"""pytest-benchmark view of the distillation cases of ``fastlm bench`` (cases: fastlm/bench/distillation.py).

pytest benchmarks/bench_distillation.py                 # time every case
pytest benchmarks/ --benchmark-disable          # smoke: run each case once
"""

import pytest
from common import params, run

from fastlm.bench import distillation as family


@pytest.mark.parametrize("case,provider", params(family))
def test_distillation(benchmark, case, provider):
    run(benchmark, family, case, provider)
