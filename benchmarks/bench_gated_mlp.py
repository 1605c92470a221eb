"""pytest-benchmark view of the gated MLP cases of ``fastlm bench`` (cases: fastlm/bench/gated_mlp.py).

pytest benchmarks/bench_gated_mlp.py                 # time every case
pytest benchmarks/ --benchmark-disable              # smoke: run each case once
"""

import pytest
from common import params, run

from fastlm.bench import gated_mlp as family


@pytest.mark.parametrize("case,provider", params(family))
def test_gated_mlp(benchmark, case, provider):
    run(benchmark, family, case, provider)
