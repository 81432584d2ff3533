"""Sky levels across overlapping images (:mod:`~skymap.mosaic.skymatch`)."""

from skymap.mosaic.skymatch import *  # noqa: F403
from skymap.mosaic.skymatch import __all__  # noqa: F401
