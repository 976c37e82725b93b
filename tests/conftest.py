"""Test setup: on machines without a GPU the Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is decided here, before any
test module imports wz_kernels. Set WZ_TEST_NO_INTERPRET=1 to keep it off.
"""

import os
import random
import zlib

import numpy as np
import torch

if not torch.cuda.is_available() and os.environ.get("WZ_TEST_NO_INTERPRET") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (seeded from the test), so a failure reproduces.
# HYPOTHESIS_PROFILE=explore draws fresh examples each run.
settings.register_profile("reproducible", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _global_seeds_from_the_test_id(request):
    """Every test starts from global RNG states fixed by its own id (python, numpy, torch): a failure
    reproduces whatever ran before it. Tests draw their inputs from explicit generators anyway
    (tests/test_seeds.py checks that); this covers library code that draws from the global RNGs
    (e.g. a model's weight initialisation)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
