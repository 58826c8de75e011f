"""Differential fuzzing: every backend agrees with a float64 reference, or refuses and says why.

The default run draws ``ATTNKIT_FUZZ_EXAMPLES`` requests (default 1000, about 45 s on two cores);
the long profile (see the README) is::

    ATTNKIT_FUZZ_EXAMPLES=20000 python -m pytest tests/fuzz/test_differential.py --hypothesis-show-statistics
 A failing request is printed by hypothesis as a :class:`Request` literal: paste
it into ``tests/fuzz/test_regressions.py``.
"""

import os

from hypothesis import HealthCheck, given, settings

from .differential import check
from .grammar import requests

EXAMPLES = int(os.environ.get("ATTNKIT_FUZZ_EXAMPLES", "1000"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
@given(requests())
def test_every_backend_agrees_with_the_float64_reference_or_refuses(req):
    check(req)
