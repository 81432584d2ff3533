"""The scale that separates sky from sources: :func:`source_scale` measures it from an
image, and :func:`max_source_size` resolves the user's ``max_source_size`` option.

An object up to ``max_source_size`` pixels across counts as a source and is kept out of
the background; anything broader is sky and is followed. The pipeline turns the size
into a floor on the thin-plate smoothing length (``max_source_size / 2``): a Gaussian
bump of that FWHM is then followed by at most ~1/3 of its height, one four times
broader by more than 90%, and masked holes of that size are bridged, never bent round.

The default is measured from the image (:func:`source_scale`): the point-spread
function's FWHM from the half-maximum areas of its isolated bright peaks, and the sizes
of the sources detected above 5 sigma, bounded by the image size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from skymap._select_kernels import exact_median
from skymap._util import MAD_TO_STD, nanmedian_rows
from skymap.background._scale_kernels import box3_mean, component_areas
from skymap.masking._bright_kernels import block_rows
from skymap.stats.filters import upsample_linear

__all__ = [
    "SourceScale",
    "central_window",
    "max_source_size",
    "release_broad",
    "smoothing_floor",
    "source_scale",
]

log = logging.getLogger(__name__)

#: Side of the central window the scale is measured on (pixels): enough stars on any
#: real frame, and a fixed cost.
WINDOW = 1024
#: Block size of the coarse median background subtracted before detection (pixels).
_BLOCK = 32


@dataclass(frozen=True, kw_only=True)
class SourceScale:
    """What :func:`source_scale` measured.

    Attributes
    ----------
    fwhm : float
        Median FWHM (pixels) of isolated bright peaks (NaN when none was found).
    source_size : float
        90th percentile of the diameters (``2 sqrt(area / pi)``, pixels) of the sources
        detected above 5 sigma of the pixel noise (NaN when none was).
    max_source_size : float
        The default ``max_source_size`` (pixels): ``max(8 fwhm, 2 source_size, 16)``,
        at most an eighth of the longer side of ``shape`` (the pipeline passes its
        valid pixels' bounding box) and at least 16 px.
    n_peaks, n_sources : int
        How many peaks and sources the two numbers come from.
    """

    fwhm: float
    source_size: float
    max_source_size: float
    n_peaks: int
    n_sources: int


def smoothing_floor(size: float) -> float:
    """The thin-plate smoothing length (pixels) that keeps sources up to ``size``
    pixels out of the background: half of it (see the module docstring)."""
    return 0.5 * float(size)


def central_window(shape) -> tuple[slice, slice]:
    """The central (at most :data:`WINDOW` square) window of an image of ``shape``
    that :func:`source_scale` reads."""
    return tuple(
        slice(max(0, (n - WINDOW) // 2), max(0, (n - WINDOW) // 2) + min(n, WINDOW)) for n in shape
    )


def source_scale(image, bad=None, shape=None) -> SourceScale:
    """Measure the scale that separates sources from sky on (a central window of) an
    image.

    Parameters
    ----------
    image : ndarray (ny, nx)
        The image, or a window of it; at most its central 1024 x 1024 pixels are read.
    bad : ndarray of bool, optional
        Pixels to ignore (True = excluded); non-finite pixels are ignored anyway.
    shape : tuple of int, optional
        Shape of the whole image, when ``image`` is a window of it (the upper bound on
        the size follows the whole image).

    Returns
    -------
    SourceScale

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> yy, xx = np.mgrid[:256, :256]
    >>> img = rng.normal(size=(256, 256))
    >>> for y, x in rng.uniform(20, 236, (30, 2)):
    ...     img += 200 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.5**2))
    >>> s = source_scale(img)
    >>> bool(3.0 < s.fwhm < 4.5), s.max_source_size >= 8 * s.fwhm
    (True, True)
    """
    img = np.asarray(image)
    shape = img.shape if shape is None else tuple(shape)
    win = central_window(img.shape)
    # a copy of our own: the residual is made in it (one map fewer at the peak)
    data = np.array(img[win], dtype=np.float64)
    ok = np.isfinite(data)
    if bad is not None:
        ok &= ~np.asarray(bad)[win]
    longest = float(max(shape))
    upper = max(16.0, longest / 8.0)
    if ok.sum() < 64:
        return SourceScale(
            fwhm=float("nan"),
            source_size=float("nan"),
            max_source_size=min(16.0, upper),
            n_peaks=0,
            n_sources=0,
        )
    # np.where(ok, data - coarse, 0.0), in place
    resid = np.subtract(data, _coarse_median(data, ok), out=data)
    resid[~ok] = 0.0
    # Pixel noise from neighbour differences: blind to sky structure and sources.
    d = np.diff(resid, axis=1)[ok[:, 1:] & ok[:, :-1]]
    # numpy's medians bit for bit, by selection (~1e6 values)
    d -= exact_median(d)
    sigma = MAD_TO_STD * exact_median(np.abs(d, out=d)) / math.sqrt(2.0)
    del d
    fwhm, n_peaks = _peak_fwhm(resid, ok, sigma)
    size, n_sources = _source_size(resid, ok, sigma)
    wanted = max(
        16.0,
        8.0 * fwhm if math.isfinite(fwhm) else 0.0,
        2.0 * size if math.isfinite(size) else 0.0,
    )
    return SourceScale(
        fwhm=fwhm,
        source_size=size,
        max_source_size=float(min(wanted, upper)),
        n_peaks=n_peaks,
        n_sources=n_sources,
    )


def _coarse_median(data, ok):
    """Median of 32-px blocks, bilinearly interpolated: the sky under the sources."""
    b = _BLOCK
    ny, nx = data.shape
    gy, gx = max(1, -(-ny // b)), max(1, -(-nx // b))
    # each block's pixels as one row, NaN where not ok or beyond the image
    blocks = block_rows(data, ~ok, b, np.empty((gy * gx, b * b)), step=1)
    grid = nanmedian_rows(blocks, overwrite=True).reshape(gy, gx)
    del blocks
    fill = np.nanmedian(grid) if np.isfinite(grid).any() else 0.0
    grid = np.where(np.isfinite(grid), grid, fill)
    # Bilinear, separable: along y, then along x (two small passes).
    return upsample_linear(upsample_linear(grid, ny, b, axis=0), nx, b, axis=1)


def _peak_fwhm(resid, ok, sigma) -> tuple[float, int]:
    """Median FWHM of isolated, unsaturated peaks above 20 sigma: the area above half
    of each peak, as a circle's diameter."""
    if not sigma > 0:
        return float("nan"), 0
    lab, n = ndimage.label(resid > 10.0 * sigma)
    if n == 0:
        return float("nan"), 0
    # Per-label maxima over the labelled pixels only (ndimage.maximum sorts the image).
    sel = lab > 0
    lv, rv = lab[sel], resid[sel]
    peak = np.full(n + 1, -np.inf)
    np.maximum.at(peak, lv, rv)
    # The areas over the labelled pixels only (the others belong to no peak).
    pv = peak[lv]
    area = np.bincount(lv[rv >= 0.5 * pv], minlength=n + 1)[1:]
    # A saturated core is flat: more than two pixels within 0.5% of its maximum (a
    # Gaussian core that flat would be over 20 px wide), and far wider at half its
    # clipped height than the PSF.
    flat = np.bincount(lv[rv >= 0.995 * pv], minlength=n + 1)[1:] > 2
    peak = peak[1:]
    use = (peak > 20.0 * sigma) & ~flat
    if not use.any():
        return float("nan"), 0
    # A component holding two peaks (a blend) has one maximum; its half area is the
    # brighter one's only if the other is fainter, so blends inflate few values and
    # the median ignores them. Components touching invalid pixels are dropped.
    edge = np.bincount(lv, ~ok[sel], minlength=n + 1)[1:] > 0
    use &= ~edge
    if not use.any():
        return float("nan"), 0
    fwhm = 2.0 * np.sqrt(area[use] / np.pi)
    return float(np.median(fwhm)), int(use.sum())


def _source_size(resid, ok, sigma) -> tuple[float, int]:
    """90th percentile of the diameters of the sources above 5 sigma (3x3 smoothed)."""
    if not sigma > 0:
        return float("nan"), 0
    sm = box3_mean(resid)  # scipy's uniform_filter(resid, 3) bit for bit
    # the areas of scipy's (4-connected) labels, without the labels
    area = component_areas((sm > 5.0 * sigma / 3.0) & ok)
    if area.size == 0:
        return float("nan"), 0
    area = area[area >= 5]
    if area.size == 0:
        return float("nan"), 0
    return float(np.percentile(2.0 * np.sqrt(area / np.pi), 90)), int(area.size)


def max_source_size(value, image=None, bad=None, shape=None) -> float | None:
    """Resolve a ``max_source_size`` option to pixels.

    ``None`` stays None (no floor); a positive number is taken as pixels; ``"auto"``
    is measured from ``image`` by :func:`source_scale`.

    Raises
    ------
    ValueError
        For anything else, naming ``max_source_size``.

    Examples
    --------
    >>> max_source_size(40), max_source_size(None)
    (40.0, None)
    """
    if value is None:
        return None
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(
                f"max_source_size must be 'auto', None or a number of pixels > 0, got {value!r}"
            )
        if image is None:
            raise ValueError("max_source_size='auto' needs the image to measure it from")
        return source_scale(image, bad, shape).max_source_size
    try:
        size = float(value)
    except (TypeError, ValueError):
        size = float("nan")
    if isinstance(value, bool) or not math.isfinite(size) or size <= 0:
        raise ValueError(
            f"max_source_size must be 'auto', None or a number of pixels > 0, got {value!r}"
        )
    return size


def release_broad(detections: np.ndarray, size: float) -> np.ndarray:
    """The detections without the regions broader than ``size`` pixels: those into
    which a disc ``size`` across fits (a morphological opening, on blocks of
    ``size / 8`` pixels that are more than half detected). By the definition of
    ``max_source_size`` such regions are sky the background must follow, not sources;
    a detection mask left to hold them runs away (the fit cannot follow what is
    masked, so the residual keeps it, so more of it is masked).

    Examples
    --------
    >>> det = np.zeros((200, 200), bool)
    >>> det[20:30, 20:30] = True      # a 10-px source
    >>> det[80:180, 60:190] = True    # a 100-px region of sky
    >>> out = release_broad(det, 32)
    >>> bool(out[25, 25]), bool(out[130, 120])
    (True, False)
    """
    det = np.asarray(detections, dtype=bool)
    b = max(1, int(size // 8))
    ny, nx = det.shape
    gy, gx = -(-ny // b), -(-nx // b)
    if b > 1:
        padded = np.zeros((gy * b, gx * b), np.uint16)
        padded[:ny, :nx] = det
        frac = padded.reshape(gy, b, gx, b).sum(axis=(1, 3)) / float(b * b)
        blocks = frac > 0.5
    else:
        blocks = det
    r = size / (2.0 * b)
    k = int(math.ceil(r))
    yy, xx = np.mgrid[-k : k + 1, -k : k + 1]
    disc = (yy * yy + xx * xx) <= r * r
    broad = ndimage.binary_opening(blocks, structure=disc)
    if not broad.any():
        return det
    if b > 1:
        broad = np.repeat(np.repeat(broad, b, axis=0), b, axis=1)[:ny, :nx]
    return det & ~broad
