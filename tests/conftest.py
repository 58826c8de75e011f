import os

import pytest
import torch
from hypothesis import settings

# attnkit's Triton kernels (tests/backends/test_triton.py) run on CPU tensors under Triton's
# interpreter when there is no GPU; triton reads the switch when a kernel is defined, so it is set
# before any test imports one
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The suite is thousands of tiny ops: one thread avoids OpenMP start-up and spinning,
    # which dominate them (and collapse under load on a 2-core machine).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
