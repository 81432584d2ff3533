"""The working noise: what the pipeline hands its maskers as the pixel noise, and how it
measures the change of the background and the fit's typical noise with it.

:class:`NoiseModel` is the one place that knows the three forms the noise takes:

* a scalar, when the model's RMS is constant to 5%;
* a :class:`~skymap.masking.CoarseRMS` (one value per block of pixels), when every
  masker reads it as it is and the model's RMS is smooth over blocks (a thin-plate
  model: its noise varies over many cells, so no full-resolution map is made);
* else the model's full RMS map, floored at half its median (the back end makes it:
  an ndarray in memory, a recipe for any window when tiled).

Maps are floored at half their median: the smoothed variance can undershoot to zero
where few pixels are left (masked crowds, the rims of blank regions), and a near-zero
noise there would turn every fluctuation into a detection and every background change
into an enormous one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from skymap.backends.memory import floor_at_half_median
from skymap.masking.hysteresis import CoarseRMS, noise_grid

__all__ = ["CoarseNoiseReader", "NoiseModel"]


@runtime_checkable
class CoarseNoiseReader(Protocol):
    """A masker that reads a :class:`~skymap.masking.CoarseRMS` as it is (any other
    masker is given a full-resolution map)."""

    def reads_coarse_noise(self) -> bool: ...


@dataclass(frozen=True, kw_only=True)
class NoiseModel:
    """The working noise of a fit (see the module docstring).

    Parameters
    ----------
    coarse : bool
        Whether the maskers read a :class:`~skymap.masking.CoarseRMS`.

    Examples
    --------
    >>> from skymap.backends.memory import MemoryBackend
    >>> from skymap.background.model import MapModel
    >>> be = MemoryBackend(np.zeros((4, 4)))
    >>> rms = np.array([[0.0, 2.0], [2.0, 4.0]]).repeat(2, 0).repeat(2, 1)
    >>> noise = NoiseModel(coarse=True).working(MapModel(background=rms, rms=rms), be)
    >>> noise[0]  # floored at half the median of the positive values
    array([1., 1., 2., 2.])
    >>> NoiseModel.typical(noise, be)
    2.0
    """

    coarse: bool = False

    @classmethod
    def for_maskers(cls, maskers) -> NoiseModel:
        """The noise model for a pipeline with ``maskers``: coarse when all read it."""
        return cls(
            coarse=all(
                isinstance(m, CoarseNoiseReader) and m.reads_coarse_noise() for m in maskers
            )
        )

    def working(self, model: Any, backend: Any) -> Any:
        """The noise handed to the maskers for ``model``: a scalar, a CoarseRMS or the
        floored map (see the module docstring)."""
        constant = model.constant_rms()
        if constant is not None:
            return float(constant)
        if self.coarse:
            coarse = model.coarse_rms()
            if coarse is not None:
                values = coarse.values
                floor_at_half_median(values)
                return coarse
        return backend.noise_map(model)

    @staticmethod
    def grid(noise: Any) -> tuple[np.ndarray, int]:
        """(float32 values, block) of ``noise`` as the compiled kernels read it."""
        return noise_grid(noise)

    @staticmethod
    def window(noise: Any, window, step: int = 1) -> Any:
        """The working noise over ``window`` = ((y0, y1), (x0, x1)) (which starts on a
        block of a CoarseRMS): at ``step`` 1 what a masker takes for that window (the
        scalar, a CoarseRMS of the window, the window of the map); with ``step`` > 1,
        the noise at every ``step``-th pixel as an array (a CoarseRMS read at
        ``[y // q, x // q]``, edge-clamped), or the scalar."""
        (y0, y1), (x0, x1) = window
        if isinstance(noise, CoarseRMS):
            q, (gy, gx) = noise.step, noise.values.shape
            if step == 1:
                values = noise.values[y0 // q : -(-y1 // q), x0 // q : -(-x1 // q)]
                return CoarseRMS(values=values, step=q, shape=(y1 - y0, x1 - x0))
            rows = np.minimum(np.arange(y0, y1, step) // q, gy - 1)
            cols = np.minimum(np.arange(x0, x1, step) // q, gx - 1)
            return noise.values[np.ix_(rows, cols)]
        if np.ndim(noise) == 0 and not hasattr(noise, "window"):
            return noise
        if isinstance(noise, np.ndarray):
            return noise[y0:y1:step, x0:x1:step]
        return noise.window(window, step)

    @staticmethod
    def typical(noise: Any, backend: Any) -> float:
        """Median of the noise over the valid pixels (over the valid blocks for a
        CoarseRMS, so that no full-resolution map is made)."""
        if np.ndim(noise) == 0 and not hasattr(noise, "window"):
            return float(noise)
        if isinstance(noise, CoarseRMS):
            valid = backend.valid_blocks(noise.step)
            return float(np.median(noise.values[valid]))
        return backend.median_where(noise, backend.bad)
