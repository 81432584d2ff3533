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


class _RowSteps:
    """Rows masked from the top, ``steps[i]`` more at the i-th call (the last step
    repeats): a mask that grows by a set schedule whatever the residual."""

    def __init__(self, steps):
        self.steps, self.rows, self.calls = tuple(steps), 0, 0

    def __call__(self, residual, rms, mask):
        self.rows += self.steps[min(self.calls, len(self.steps) - 1)]
        self.calls += 1
        out = np.zeros(residual.shape, bool)
        out[: self.rows] = True
        return out


def _row_steps_case(steps):
    """(a factory of one-stage pipelines whose masker grows by ``steps`` rows, a 160^2
    float32 image of a curved sky)."""
    from skymap.background.pipeline import IterativeBackground, Stage
    from skymap.background.smooth import ThinPlateSmoother

    def make_pipeline():
        smoother = ThinPlateSmoother(smoothing=1e6, cell_size=8)
        stages = (Stage(masker=_RowSteps(steps), estimator=smoother),)
        return IterativeBackground(first_guess=smoother, stages=stages, max_iter=8)

    rng = np.random.default_rng(3)
    sky = np.add.outer(0.05 * (np.arange(160.0) - 80) ** 2 / 80.0, np.zeros(160))
    return make_pipeline, (sky + rng.normal(size=sky.shape)).astype(np.float32)


@pytest.fixture
def slow_then_fast():
    """A masker that runs away only after it has grown for a while (12 rows, then 2
    and 2 while the background nearly settles, then 12 at every call): a runaway caught
    late."""
    return _row_steps_case((12, 2, 2, 12))


@pytest.fixture
def converging_then_runaway():
    """A masker whose growth shrinks (12, 6, 2, 1 rows) before it quickens and runs
    away (10, 8, then 12 at every call): the stage was converging, then its growth
    turned."""
    return _row_steps_case((12, 6, 2, 1, 10, 8, 12))
