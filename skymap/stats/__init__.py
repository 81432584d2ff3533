"""Pixel statistics: sigma clipping, location and scale estimators vectorised over rows
(:mod:`~skymap.stats.estimators`), and the exact ring median / percentile filters
(:mod:`~skymap.stats.filters`)."""

from skymap.stats.estimators import *  # noqa: F403
from skymap.stats.estimators import __all__  # noqa: F401
