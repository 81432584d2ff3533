"""The working noise: what the pipeline hands its maskers as the pixel noise, and how it
measures the change of the background and the fit's typical noise with it.

:class:`NoiseModel` is the one place that knows the three forms the noise takes:

* a scalar, when the model's RMS is constant to 5%;
* a :class:`~skymap.masking.CoarseRMS` (one value per block of pixels), when every
  masker reads it as it is and the model's RMS is smooth over blocks (a thin-plate
  model: its noise varies over many cells, so no full-resolution map is made);
* else the model's full RMS map, floored at half its median (the back end makes it:
  an ndarray in memory, a recipe for any window when tiled).

A user's error map (``fit(error=...)``) replaces it: :func:`use_error` turns the map into
the maskers' noise and the smoother's relative weights, through the back end.

Maps are floored at half their median: the smoothed variance can undershoot to zero
where few pixels are left (masked crowds, the rims of blank regions), and a near-zero
noise there would turn every fluctuation into a detection and every background change
into an enormous one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from skymap._util import pow2_at_most
from skymap.backends.base import ERROR_BLOCK, block_sums
from skymap.backends.memory import floor_at_half_median
from skymap.masking.hysteresis import CoarseRMS, noise_grid

__all__ = ["CoarseNoiseReader", "NoiseModel", "use_error"]


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
        # CoarseRMS first: np.ndim would expand it to a full-resolution map (an image
        # of memory in the driver of a tiled fit).
        if isinstance(noise, CoarseRMS):
            valid = backend.valid_blocks(noise.step)
            return float(np.median(noise.values[valid]))
        if np.ndim(noise) == 0 and not hasattr(noise, "window"):
            return float(noise)
        return backend.median_where(noise, backend.bad)


def use_error(be, norm) -> CoarseRMS:
    """Set ``be.weight`` from the back end's error map and return the maskers' noise.

    The maskers' noise is the error map's RMS over the valid pixels of blocks of 4 x 4
    pixels, in normalised units (a :class:`CoarseRMS`; blocks with no valid pixel take
    the median of the others). The smoother's weight is the inverse variance relative
    to its mean over the valid pixels (float32, 0 where excluded). Both come from
    per-block sums (:func:`~skymap.backends.base.block_sums`, the tiles aligned to the
    blocks), so every back end finds the same numbers bit for bit."""
    q = _error_block(be.shape)
    var, count, wsum = be.cell_grid(_error_sums, [be.error, be.bad], (q, q), 3, q=q,
                                    scale=norm.scale)  # fmt: skip
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.sqrt(var / count)
    good = np.isfinite(values) & (values > 0)
    values[~good] = np.median(values[good]) if good.any() else 1.0
    total = float(count.sum())
    mean = float(wsum.sum()) / total if total else 0.0
    be.weight = be.map_tiles(_relative_weight, [be.error, be.bad], halo=0, dtype=np.float32,
                             mean=mean)  # fmt: skip
    return CoarseRMS(values=values.astype(np.float32), step=q, shape=be.shape)


def _error_block(shape) -> int:
    """The block (pixels) of the maskers' noise from an error map (divides
    :data:`~skymap.backends.base.ERROR_BLOCK`, which tiled back ends align to)."""
    return pow2_at_most(ERROR_BLOCK, *shape)


def _inverse_variance(error: np.ndarray, bad: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        w = 1.0 / np.square(error)
    w[bad | ~np.isfinite(w)] = 0.0
    return w


def _error_sums(error, bad, *, origin, q, scale):
    """Per ``q`` x ``q`` block of a tile: the sum of the squared normalised errors, the
    count and the sum of the inverse variances of the valid pixels (3, gy, gx)."""
    var = block_sums(np.where(bad, 0.0, error / scale) ** 2, bad, q, origin)
    return np.concatenate([var, block_sums(_inverse_variance(error, bad), bad, q)[:1]])


def _relative_weight(error, bad, *, window, core, mean):
    """A tile of the inverse variance relative to ``mean`` (float32; 0 where excluded)."""
    w = _inverse_variance(error, bad)
    return (w / mean if mean > 0 else w).astype(np.float32)
