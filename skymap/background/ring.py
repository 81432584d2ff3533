"""A ring-median first guess for the pipeline (:class:`RingMedianGuess`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from skymap._util import MAD_TO_STD, cut_window
from skymap._validate import check_positive
from skymap.stats.filters import ring_footprint, ring_median

__all__ = ["RingMedianGuess", "RingResult"]


@dataclass(frozen=True, kw_only=True)
class RingMedianGuess:
    """A ring-median first guess: each pixel's background is the median of the valid
    pixels in a ring around it (:func:`skymap.stats.filters.ring_median`), so sources
    smaller than ``radius`` do not pull it up. Pixels whose ring holds no valid pixel
    take the median of all valid pixels. The RMS is the MAD-based sigma of the
    residual, one number.

    Parameters
    ----------
    radius, width : float
        Inner radius and width of the ring in pixels.

    Examples
    --------
    >>> img = np.ones((40, 40)); img[20, 20] = 100.0
    >>> res = RingMedianGuess(radius=4, width=2).fit(img)
    >>> float(res.background[20, 20]), float(res.sigma)
    (1.0, 0.0)
    """

    radius: float = 15.0
    width: float = 5.0

    def __post_init__(self):
        check_positive("radius", self.radius, allow_zero=True)
        check_positive("width", self.width)

    def halo(self) -> int:
        """The ring's reach in pixels."""
        return ring_footprint(self.radius, self.width).shape[0] // 2

    def fit(self, image, mask=None) -> RingResult:
        """Ring-median background of ``image`` ignoring ``mask`` (True = excluded)."""
        from skymap.backends.memory import MemoryBackend

        backend = MemoryBackend(image, mask)
        return self.fit_on(backend, backend.bad)

    def fit_on(self, backend, mask, *, start_scale=None, min_scale=None) -> RingResult:
        """:meth:`fit` through an array back end (the ring per tile, with a halo of
        its reach; the hole fill and the MAD are exact medians over the tiles);
        ``start_scale`` and ``min_scale`` do not apply."""
        image, dtype = backend.image, backend.dtype
        bkg = backend.map_tiles(
            _ring_tile, [image, mask], halo=self.halo(), dtype=dtype,
            radius=self.radius, width=self.width,
        )  # fmt: skip
        if backend.any_nonfinite(bkg):
            fill = backend.median(_valid_values, [image, mask])
            bkg = backend.map_tiles(_fill_holes, [bkg], halo=0, dtype=dtype, fill=fill)
        centre = backend.median(_residual_values, [image, bkg, mask])
        mad = backend.median(_residual_values, [image, bkg, mask], centre=centre)
        return RingResult(background=bkg, sigma=np.dtype(dtype).type(MAD_TO_STD * mad))


@dataclass(frozen=True, kw_only=True, eq=False)
class RingResult:
    """What :class:`RingMedianGuess` fitted: the background map (an ndarray, or the
    back end's array of a tiled fit) and one RMS, ``sigma``; follows
    :class:`~skymap.background.model.BackgroundModel`."""

    background: Any
    sigma: Any
    scale = None
    error = float("nan")
    grid = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(n) for n in self.background.shape)

    @property
    def rms(self) -> np.ndarray:
        """The RMS as a full map (sigma everywhere)."""
        return self.rms_map()

    def native_background(self) -> Any:
        """The background map as fitted: an ndarray, or the tiled back end's array
        (:class:`~skymap.backends.base.NativeMaps`)."""
        return self.background

    def background_map(self, step: int = 1, window=None) -> np.ndarray:
        return np.asarray(cut_window(self.background, step, window))

    def rms_map(self, window=None) -> np.ndarray:
        shape = self.shape if window is None else tuple(b - a for a, b in window)
        return np.full(shape, self.sigma, dtype=np.asarray(self.sigma).dtype)

    def constant_rms(self) -> float:
        return float(self.sigma)

    def coarse_rms(self) -> None:
        return None

    def asymmetry(self, stiffer: float = 4.0) -> float:
        return float("nan")


def _core(window, core) -> tuple[slice, slice]:
    return tuple(slice(c0 - w0, c1 - w0) for (w0, _), (c0, c1) in zip(window, core, strict=True))


def _ring_tile(img, bad, *, window, core, radius, width):
    bkg = np.asarray(ring_median(img, radius, width, mask=bad), dtype=img.dtype)
    return np.ascontiguousarray(bkg[_core(window, core)])


def _fill_holes(bkg, *, window, core, fill):
    # pixels whose ring holds no valid pixel take the global median
    return np.where(np.isfinite(bkg), bkg, bkg.dtype.type(fill))


def _valid_values(img, bad, *, window):
    return img[~bad]


def _residual_values(img, bkg, bad, *, window, centre=None):
    r = (img - bkg)[~bad]
    return r if centre is None else np.abs(r - centre)
