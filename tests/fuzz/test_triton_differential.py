"""Differential fuzzing of attnkit's Triton kernels (the ``triton`` backend) against the float64
reference, with the other backends' grammar (tests/fuzz/grammar.py, drawn toward what the kernels
serve) and NaN policy (tests/fuzz/differential.py): each request is served exactly or refused
with a reason. Without a GPU the kernels run under
Triton's interpreter, so this is part of the long set (``python -m pytest -m interpreter``) with
``ATTNKIT_FUZZ_TRITON_EXAMPLES`` requests (default 150)."""

import os

import pytest
from hypothesis import HealthCheck, given, settings

from .differential import check
from .grammar import requests

pytest.importorskip("triton", reason='triton is not installed (pip install -e ".[gpu]")')
pytestmark = pytest.mark.interpreter
EXAMPLES = int(os.environ.get("ATTNKIT_FUZZ_TRITON_EXAMPLES", "150"))
SERVED = {"served": 0, "refused": 0}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
@given(requests(triton=True))
def test_the_triton_backend_agrees_with_the_float64_reference_or_refuses(req):
    outcome = check(req, {"triton": ("triton", None)})
    SERVED["served" if outcome.get("triton") == "served" else "refused"] += 1


def test_the_fuzzed_requests_reached_the_kernels():
    """Run after the fuzz test (file order): some requests were served, not all refused."""
    if SERVED["served"] + SERVED["refused"] == 0:
        pytest.skip("the fuzz test did not run in this session")
    assert SERVED["served"] >= SERVED["refused"], SERVED
