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


class _SlowThenFast:
    """Rows masked from the top: 12 more at the first call, 2 more at the next two
    (still growing while the background nearly settles), then 12 more at every call."""

    def __init__(self):
        self.rows = self.calls = 0

    def __call__(self, residual, rms, mask):
        self.calls += 1
        self.rows += 2 if self.calls in (2, 3) else 12
        out = np.zeros(residual.shape, bool)
        out[: self.rows] = True
        return out


@pytest.fixture
def slow_then_fast():
    """(a factory of one-stage pipelines whose masker runs away only after it has grown
    for a while, a 160^2 float32 image of a curved sky): a runaway caught late."""
    from skymap.background.pipeline import IterativeBackground, Stage
    from skymap.background.smooth import ThinPlateSmoother

    def make_pipeline():
        smoother = ThinPlateSmoother(smoothing=1e6, cell_size=8)
        stages = (Stage(masker=_SlowThenFast(), estimator=smoother),)
        return IterativeBackground(first_guess=smoother, stages=stages, max_iter=8)

    rng = np.random.default_rng(3)
    sky = np.add.outer(0.05 * (np.arange(160.0) - 80) ** 2 / 80.0, np.zeros(160))
    return make_pipeline, (sky + rng.normal(size=sky.shape)).astype(np.float32)
