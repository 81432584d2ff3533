"""Shared test configuration.

Hypothesis runs a modest number of examples with no deadline: numba kernels compile on
first call, and the suite must stay within CI's budget on 2 cores.
"""

import os

# photutils leaves OpenMP threads spin-waiting after each call; on 2 cores they starve
# numba's threads (README, "Running next to photutils"). Set before any runtime loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("SKYMAP_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")

DATA = Path(__file__).parent / "data"


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
