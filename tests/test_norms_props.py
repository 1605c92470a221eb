"""Property test of the norms over random shapes and flag combinations (hypothesis)."""

import pytest
from test_norms import KINDS, check_norm

import fastlm

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 3000),
    kind=st.sampled_from(KINDS),
    has_w=st.booleans(),
    has_b=st.booleans(),
)
def test_random_shapes(m, n, kind, has_w, has_b):
    with fastlm.backend("triton"):
        check_norm(kind, (m, n), has_w=has_w, has_b=has_b)
