import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Every test starts from the same global RNG state: an unseeded draw cannot make a test flaky."""
    torch.manual_seed(0)
