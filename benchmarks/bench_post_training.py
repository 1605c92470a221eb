"""pytest-benchmark view of the post-training loss cases of ``fastlm bench`` (cases: fastlm/bench/post_training.py).

pytest benchmarks/bench_post_training.py                 # time every case
pytest benchmarks/ --benchmark-disable          # smoke: run each case once
"""

import pytest
from common import params, run

from fastlm.bench import post_training as family


@pytest.mark.parametrize("case,provider", params(family))
def test_post_training(benchmark, case, provider):
    run(benchmark, family, case, provider)
