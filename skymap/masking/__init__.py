"""Source maskers, True = excluded: threshold, multi-scale, ring-median, bright-source and
flag maskers (:mod:`~skymap.masking.maskers`), the default pipeline's multi-scale
hysteresis masker (:mod:`~skymap.masking.hysteresis`) and its bright-source halo masker
(:mod:`~skymap.masking.bright`)."""

from skymap.masking import bright as _bright
from skymap.masking import hysteresis as _hysteresis
from skymap.masking import maskers as _maskers
from skymap.masking.bright import *  # noqa: F403
from skymap.masking.hysteresis import *  # noqa: F403
from skymap.masking.maskers import *  # noqa: F403

__all__ = [*_maskers.__all__, *_hysteresis.__all__, *_bright.__all__]
