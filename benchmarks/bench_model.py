"""pytest-benchmark view of the model cases of ``fastlm bench`` (cases: fastlm/bench/model.py).

pytest benchmarks/bench_model.py                # time a training step per provider
pytest benchmarks/ --benchmark-disable          # smoke: run each case once
"""

import pytest
from common import params, run

from fastlm.bench import model as family


@pytest.mark.parametrize("case,provider", params(family))
def test_model(benchmark, case, provider):
    run(benchmark, family, case, provider)
