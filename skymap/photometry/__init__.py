"""Local backgrounds for photometry: window and annulus backgrounds around many positions
(:mod:`~skymap.photometry.local`)."""

from skymap.photometry.local import *  # noqa: F403
from skymap.photometry.local import __all__  # noqa: F401
