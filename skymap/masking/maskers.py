"""Source maskers: threshold (smoothing, n-sigma, minimum area, dilation), multi-scale,
ring-median first cut, and data-quality flags.

A masker is any callable ``masker(residual, rms, mask) -> ndarray of bool`` (the
:class:`Masker` protocol):

- ``residual``: image minus the current background estimate, shape (ny, nx);
- ``rms``: the background noise, a scalar or a (ny, nx) map, or None to estimate it from
  ``residual`` (MAD of the valid pixels);
- ``mask``: pixels already excluded (True = excluded), or None.

It returns the pixels it marks as sources (True = excluded). The input ``mask`` is NOT
OR-ed into the result, so that the caller can tell detections from pixels that were
excluded before (``MultiScaleMasker`` keeps one bit per scale for that reason); use
``result | mask`` for everything excluded. Inputs are never modified. NaN and inf
pixels of ``residual`` are excluded from smoothing and detection.

:class:`FlagMasker` is the exception in what it reads: its ``mask`` argument is the
integer data-quality (DQ / FLAGS) array, which it turns into a boolean mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.ndimage as ndi

from skymap._util import MAD_TO_STD
from skymap._validate import as_image, as_mask, check_choice, check_positive, combine_masks
from skymap.stats.filters import ring_median

__all__ = [
    "JWST_DQ_BITS",
    "BrightSourceMasker",
    "SPHEREX_FLAG_BITS",
    "FlagMasker",
    "Masker",
    "MultiScaleMask",
    "MultiScaleMasker",
    "RingMedianMasker",
    "ThresholdMasker",
    "disk_footprint",
    "grow_mask",
    "segment",
    "smooth_masked",
]

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
# Gaussian smoothing kernels are cut at 4 sigma, where they fall below 3.4e-4 of the peak.
_TRUNCATE = 4.0
# MAD of a Gaussian sample -> its standard deviation.


@runtime_checkable
class Masker(Protocol):
    """Anything that turns a residual image into a source mask (True = excluded)."""

    def __call__(self, residual: Any, rms: Any, mask: Any = None) -> np.ndarray: ...


def disk_footprint(radius: float) -> np.ndarray:
    """Boolean disk of the offsets (dy, dx) with ``dy**2 + dx**2 <= radius**2``.

    Examples
    --------
    >>> disk_footprint(1).astype(int)
    array([[0, 1, 0],
           [1, 1, 1],
           [0, 1, 0]])
    """
    check_positive("radius", radius, allow_zero=True)
    half = int(math.floor(radius))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    return (yy * yy + xx * xx) <= radius * radius


def grow_mask(mask: Any, radius: float) -> np.ndarray:
    """Dilate ``mask`` by a disk of ``radius`` pixels (a true binary dilation).

    Every pixel within Euclidean distance ``radius`` of a True pixel becomes True: the
    same set as ``scipy.ndimage.binary_dilation(mask, disk_footprint(radius))``, computed
    through an exact Euclidean distance transform so that the cost does not grow with
    the radius. Isolated pixels grow into disks; nothing is ever removed (unlike
    thresholding a top-hat convolution, which deletes isolated pixels for radii 1-2).

    Parameters
    ----------
    mask : array_like of bool, shape (ny, nx)
    radius : float
        >= 0; 0 returns a copy of ``mask``.

    Returns
    -------
    ndarray of bool

    Examples
    --------
    >>> m = np.zeros((5, 5), bool); m[2, 2] = True
    >>> grow_mask(m, 1).astype(int)
    array([[0, 0, 0, 0, 0],
           [0, 0, 1, 0, 0],
           [0, 1, 1, 1, 0],
           [0, 0, 1, 0, 0],
           [0, 0, 0, 0, 0]])
    """
    check_positive("radius", radius, allow_zero=True)
    m = np.asarray(mask, dtype=bool)
    if radius == 0 or not m.any():
        return m.copy()
    if m.all():
        return m.copy()
    # Distances to the nearest True pixel: sqrt of an integer, correctly rounded, so the
    # comparison with the radius is exact at integer radii.
    dist = ndi.distance_transform_edt(~m)
    return dist <= radius


def smooth_masked(image: Any, fwhm: float, mask: Any = None) -> np.ndarray:
    """Gaussian smoothing that ignores masked and non-finite pixels.

    Normalised convolution: ``G * (image * w) / G * w`` with ``w`` = 1 on valid pixels
    and 0 elsewhere, so excluded pixels never feed the result and the edges are not
    pulled towards zero. Pixels whose kernel covers no valid pixel come out NaN.

    Parameters
    ----------
    image : array_like, shape (ny, nx)
    fwhm : float
        FWHM of the Gaussian in pixels; 0 returns the image with excluded pixels as NaN.
    mask : array_like of bool, optional
        True = excluded.

    Returns
    -------
    ndarray, the image's float dtype

    Examples
    --------
    >>> img = np.ones((5, 5)); img[2, 2] = 1e9
    >>> m = np.zeros((5, 5), bool); m[2, 2] = True
    >>> float(smooth_masked(img, 2.0, m)[2, 1])
    1.0
    """
    img = as_image(image)
    check_positive("fwhm", fwhm, allow_zero=True)
    invalid = combine_masks(img, as_mask(mask, img.shape))
    if fwhm == 0:
        return np.where(invalid, np.nan, img).astype(img.dtype, copy=False)
    sigma = fwhm / _FWHM_PER_SIGMA
    weight = (~invalid).astype(img.dtype)
    filled = np.where(invalid, 0, img).astype(img.dtype, copy=False)
    num = ndi.gaussian_filter(filled, sigma, mode="constant", cval=0.0, truncate=_TRUNCATE)
    den = ndi.gaussian_filter(weight, sigma, mode="constant", cval=0.0, truncate=_TRUNCATE)
    # Weights below ~1e-6 of a full kernel are round-off, not data.
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-6, num / den, np.nan).astype(img.dtype, copy=False)


def segment(
    data: Any, threshold: Any, *, npixels: int, connectivity: int = 8, mask: Any = None
) -> np.ndarray:
    """Label connected regions of at least ``npixels`` pixels above ``threshold``.

    Pixels strictly above ``threshold`` (a scalar or a map) and not masked are joined
    along edges (``connectivity=4``) or edges and corners (8) by
    ``scipy.ndimage.label``; regions smaller than ``npixels`` are dropped and the rest
    numbered 1, 2, ... in raster order of their first pixel. This is the segmentation of
    ``photutils.segmentation.detect_sources`` with the same arguments.

    Returns
    -------
    labels : ndarray of int32, shape (ny, nx), 0 = background

    Examples
    --------
    >>> d = np.array([[5, 5, 0, 0], [0, 0, 0, 5], [0, 0, 0, 0]])
    >>> segment(d, 1, npixels=2).tolist()
    [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    """
    arr = np.asarray(data)
    check_positive("npixels", npixels)
    if int(npixels) != npixels:
        raise ValueError(f"npixels must be a positive integer, got {npixels!r}")
    check_choice("connectivity", connectivity, (4, 8))
    with np.errstate(invalid="ignore"):
        above = arr > threshold
    m = as_mask(mask, arr.shape)
    if m is not None:
        above &= ~m
    structure = ndi.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels, nlab = ndi.label(above, structure=structure, output=np.int32)
    if nlab == 0:
        return labels
    sizes = np.bincount(labels.ravel(), minlength=nlab + 1)
    keep = sizes >= npixels
    keep[0] = False
    # Renumber the surviving regions 1..k in their original (raster) order.
    new = np.zeros(nlab + 1, dtype=np.int32)
    new[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new[labels]


def _robust_rms(residual: np.ndarray, invalid: np.ndarray) -> float:
    """MAD-based standard deviation of the valid residual pixels."""
    v = residual[~invalid]
    if v.size == 0:
        return float("nan")
    return float(MAD_TO_STD * np.median(np.abs(v - np.median(v))))


def _as_rms(rms: Any, residual: np.ndarray, invalid: np.ndarray) -> np.ndarray | float:
    if rms is None:
        return _robust_rms(residual, invalid)
    r = np.asarray(rms, dtype=float)
    if r.ndim == 0:
        return float(r)
    if r.shape != residual.shape:
        raise ValueError(
            f"rms must be a scalar or a map of the residual's shape {residual.shape}, "
            f"got shape {r.shape}"
        )
    return r


@dataclass(frozen=True, kw_only=True)
class ThresholdMasker:
    """Smooth, threshold at ``nsigma * rms``, keep regions >= ``npixels``, dilate.

    Parameters
    ----------
    nsigma : float
        Detection threshold in units of ``rms``, applied to the smoothed residual
        (photutils' convention: the rms of the unsmoothed image).
    fwhm : float
        FWHM in pixels of the Gaussian smoothing before thresholding; 0 = none.
        Masked and non-finite pixels do not feed the smoothing (see
        :func:`smooth_masked`).
    npixels : int
        Minimum number of connected pixels above threshold for a detection.
    dilate : float
        Radius in pixels of the disk by which detections are grown (:func:`grow_mask`).
    connectivity : {4, 8}
        Pixel connectivity of a region.

    Notes
    -----
    Pixels already masked are neither smoothed in nor detected, so a region's size
    counts unmasked pixels only; dilation may cover masked pixels.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img = rng.normal(size=(64, 64))
    >>> img[30:33, 30:33] += 20.0
    >>> m = ThresholdMasker(nsigma=3.0, fwhm=2.0, npixels=5, dilate=2.0)(img, 1.0)
    >>> bool(m[31, 31]), bool(m[31, 34]), bool(m[5, 5])
    (True, True, False)
    """

    nsigma: float = 3.0
    fwhm: float = 3.0
    npixels: int = 5
    dilate: float = 3.0
    connectivity: int = 8

    def __post_init__(self):
        check_positive("nsigma", self.nsigma)
        check_positive("fwhm", self.fwhm, allow_zero=True)
        check_positive("npixels", self.npixels)
        if int(self.npixels) != self.npixels:
            raise ValueError(f"npixels must be a positive integer, got {self.npixels!r}")
        check_positive("dilate", self.dilate, allow_zero=True)
        check_choice("connectivity", self.connectivity, (4, 8))

    def segment(self, residual: Any, rms: Any = None, mask: Any = None) -> np.ndarray:
        """Labels of the detected regions before dilation (int32, 0 = background)."""
        res = as_image(residual, "residual")
        invalid = combine_masks(res, as_mask(mask, res.shape))
        sigma = _as_rms(rms, res, invalid)
        smoothed = smooth_masked(res, self.fwhm, invalid)
        return segment(
            smoothed,
            self.nsigma * sigma,
            npixels=self.npixels,
            connectivity=self.connectivity,
            mask=invalid,
        )

    def __call__(self, residual: Any, rms: Any = None, mask: Any = None) -> np.ndarray:
        """Source mask (True = excluded) of ``residual``; see the module docstring."""
        return grow_mask(self.segment(residual, rms, mask) > 0, self.dilate)


@dataclass(frozen=True, kw_only=True)
class MultiScaleMask:
    """Result of :meth:`MultiScaleMasker.apply`.

    Attributes
    ----------
    mask : ndarray of bool
        OR of every scale's mask (True = excluded); the input mask is not included.
    bits : ndarray of uint32
        Bit ``k`` is set where scale ``k`` (0-based, in the masker's order) masked the
        pixel.
    """

    mask: np.ndarray
    bits: np.ndarray

    @property
    def tier(self) -> np.ndarray:
        """1-based index of the first scale that masked each pixel (0 = none), uint8."""
        b = self.bits
        lowest = b & (~b + np.uint32(1))  # isolate the lowest set bit
        tier = np.zeros(b.shape, dtype=np.uint8)
        nz = lowest != 0
        tier[nz] = np.log2(lowest[nz]).astype(np.uint8) + 1
        return tier


@dataclass(frozen=True, kw_only=True)
class MultiScaleMasker:
    """Several maskers applied in turn, each with the earlier masks in place.

    Pass ``k`` sees the input mask OR-ed with the masks of passes ``0..k-1``, so that a
    large-scale pass (broad smoothing) is not dominated by the cores already found at
    small scales. The result is the OR of all passes; :meth:`apply` also returns which
    scale masked each pixel.

    Parameters
    ----------
    maskers : sequence of Masker
        Usually :class:`ThresholdMasker` instances from small to large ``fwhm``; at most 32.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> img = rng.normal(size=(96, 96))
    >>> yy, xx = np.mgrid[:96, :96]
    >>> img += 30 * np.exp(-((yy - 48) ** 2 + (xx - 48) ** 2) / 2.0)  # compact core
    >>> img += 3.0 * np.exp(-((yy - 48) ** 2 + (xx - 48) ** 2) / 200.0)  # faint halo
    >>> msm = MultiScaleMasker(maskers=(
    ...     ThresholdMasker(nsigma=3, fwhm=1.5, npixels=5, dilate=1),
    ...     ThresholdMasker(nsigma=1.5, fwhm=8, npixels=50, dilate=2)))
    >>> res = msm.apply(img, 1.0)
    >>> int(res.tier[48, 48]), int(res.tier[48, 58]), int(res.tier[5, 5])
    (1, 2, 0)
    """

    maskers: Sequence[Masker]

    def __post_init__(self):
        maskers = tuple(self.maskers)
        if not 1 <= len(maskers) <= 32:
            raise ValueError(f"maskers must hold 1 to 32 maskers, got {len(maskers)}")
        for i, m in enumerate(maskers):
            if not callable(m):
                raise ValueError(f"maskers[{i}] must be a Masker (callable), got {m!r}")
        object.__setattr__(self, "maskers", maskers)

    def apply(self, residual: Any, rms: Any = None, mask: Any = None) -> MultiScaleMask:
        """Run every pass; return the OR'ed mask and the per-scale bit map."""
        res = as_image(residual, "residual")
        m0 = as_mask(mask, res.shape)
        excluded = np.zeros(res.shape, bool) if m0 is None else m0.copy()
        bits = np.zeros(res.shape, dtype=np.uint32)
        for k, masker in enumerate(self.maskers):
            mk = np.asarray(masker(res, rms, excluded), dtype=bool)
            bits[mk] |= np.uint32(1 << k)
            excluded |= mk
        return MultiScaleMask(mask=bits != 0, bits=bits)

    def __call__(self, residual: Any, rms: Any = None, mask: Any = None) -> np.ndarray:
        """OR of every pass's mask (True = excluded)."""
        return self.apply(residual, rms, mask).mask


@dataclass(frozen=True, kw_only=True)
class RingMedianMasker:
    """Mask sources in ``residual - ring_median(residual)``: the notebook's first cut.

    The ring median (see :func:`skymap.filters.ring_median`, which ignores masked
    pixels) removes structure larger than the ring, leaving sources smaller than
    ``radius``; the difference is then smoothed, thresholded and dilated as by
    :class:`ThresholdMasker`. With ``rms=None`` the noise is the MAD-based standard
    deviation of the difference image.

    Parameters
    ----------
    radius, width : float
        Ring inner radius and width in pixels; ``radius`` should exceed the sources.
    nsigma, fwhm, npixels, dilate, connectivity
        As for :class:`ThresholdMasker`.

    Examples
    --------
    >>> rng = np.random.default_rng(2)
    >>> yy, xx = np.mgrid[:80, :80]
    >>> img = 50 + 0.2 * xx + rng.normal(size=(80, 80))  # sloped sky
    >>> img[40:43, 20:23] += 25.0
    >>> m = RingMedianMasker(radius=6, width=3, nsigma=3, fwhm=2, dilate=1)(img, None)
    >>> bool(m[41, 21]), bool(m[10, 70])
    (True, False)
    """

    radius: float = 15.0
    width: float = 5.0
    nsigma: float = 3.0
    fwhm: float = 3.0
    npixels: int = 5
    dilate: float = 3.0
    connectivity: int = 8

    def __post_init__(self):
        check_positive("radius", self.radius, allow_zero=True)
        check_positive("width", self.width)
        # Validate the threshold fields once, through the masker that applies them.
        self._threshold()

    def _threshold(self) -> ThresholdMasker:
        return ThresholdMasker(
            nsigma=self.nsigma,
            fwhm=self.fwhm,
            npixels=self.npixels,
            dilate=self.dilate,
            connectivity=self.connectivity,
        )

    def __call__(self, residual: Any, rms: Any = None, mask: Any = None) -> np.ndarray:
        """Source mask (True = excluded) of ``residual``; see the class docstring."""
        res = as_image(residual, "residual")
        m = as_mask(mask, res.shape)
        diff = res - ring_median(res, self.radius, self.width, mask=m)
        return self._threshold()(diff, rms, m)


# Growth radii are rounded UP to this ladder (a ~1.5x geometric series), so that a whole
# image needs one distance transform per rung rather than one per source.
_RADIUS_LADDER = np.array(
    [0, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
)


@dataclass(frozen=True, kw_only=True)
class BrightSourceMasker:
    """Detect as :class:`ThresholdMasker`, then grow each source by a flux-scaled radius.

    A bright star's wings and halo stay above the noise far beyond its detected
    footprint; a fixed dilation radius either misses them or swallows the faint sources.
    Here each detected region of flux ``F`` (sum of the residual over the region) is
    grown by ``radius_ref * (F / flux_ref) ** power``, at least ``detect.dilate`` and
    at most ``max_radius`` pixels, rounded up to the next rung of
    ``0, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, ...`` (one distance transform per rung).

    Parameters
    ----------
    detect : ThresholdMasker
        Detection settings; its ``dilate`` is the minimum growth radius.
    flux_ref : float
        Flux (residual units x pixels) at which the growth radius is ``radius_ref``.
    radius_ref : float
        Growth radius in pixels of a source of flux ``flux_ref``.
    power : float
        Exponent of the flux scaling (0.5: radius grows as the square root of flux).
    max_radius : float
        Largest growth radius in pixels.

    Examples
    --------
    >>> rng = np.random.default_rng(3)
    >>> yy, xx = np.mgrid[:120, :120]
    >>> img = rng.normal(size=(120, 120))
    >>> for y0, x0, amp in [(30, 30, 10.0), (80, 80, 1000.0)]:
    ...     img += amp * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / 4.0)
    >>> bsm = BrightSourceMasker(detect=ThresholdMasker(nsigma=3, fwhm=2, npixels=3,
    ...     dilate=1), flux_ref=100.0, radius_ref=2.0)
    >>> m = bsm(img, 1.0)
    >>> bool(m[30, 36]), bool(m[80, 95])  # faint source: small; bright: grown far
    (False, True)
    """

    detect: ThresholdMasker = ThresholdMasker()
    flux_ref: float
    radius_ref: float = 3.0
    power: float = 0.5
    max_radius: float = 64.0

    def __post_init__(self):
        if not isinstance(self.detect, ThresholdMasker):
            raise ValueError(f"detect must be a ThresholdMasker, got {self.detect!r}")
        check_positive("flux_ref", self.flux_ref)
        check_positive("radius_ref", self.radius_ref)
        check_positive("power", self.power, allow_zero=True)
        check_positive("max_radius", self.max_radius)

    def radii(self, residual: Any, rms: Any = None, mask: Any = None):
        """Labels (int32) and the growth radius of each label 1..n (index 0 unused)."""
        res = as_image(residual, "residual")
        invalid = combine_masks(res, as_mask(mask, res.shape))
        labels = self.detect.segment(res, rms, invalid)
        nlab = int(labels.max())
        flux = ndi.sum_labels(np.where(invalid, 0.0, res), labels, np.arange(nlab + 1))
        with np.errstate(invalid="ignore"):
            radius = self.radius_ref * np.clip(flux / self.flux_ref, 0.0, None) ** self.power
        radius = np.clip(radius, self.detect.dilate, self.max_radius)
        rung = np.searchsorted(_RADIUS_LADDER, radius - 1e-9)  # first rung >= radius
        on_ladder = rung < _RADIUS_LADDER.size
        radius[on_ladder] = _RADIUS_LADDER[rung[on_ladder]]
        radius = np.minimum(radius, self.max_radius)
        radius[0] = 0.0
        return labels, radius

    def __call__(self, residual: Any, rms: Any = None, mask: Any = None) -> np.ndarray:
        """Source mask (True = excluded); see the class docstring."""
        labels, radius = self.radii(residual, rms, mask)
        out = np.zeros(labels.shape, dtype=bool)
        per_pixel = radius[labels]
        for r in np.unique(radius[1:]):
            out |= grow_mask((labels > 0) & (per_pixel == r), float(r))
        return out


#: JWST data-quality flag names -> bit numbers, for the bits whose meaning has been
#: stable across pipeline releases (jwst/stdatamodels ``dqflags.pixel``).
JWST_DQ_BITS = {
    "DO_NOT_USE": 0,
    "SATURATED": 1,
    "JUMP_DET": 2,
    "PERSISTENCE": 5,
    "AD_FLOOR": 6,
    "UNRELIABLE_ERROR": 8,
    "NON_SCIENCE": 9,
    "DEAD": 10,
    "HOT": 11,
    "WARM": 12,
    "LOW_QE": 13,
    "TELEGRAPH": 15,
    "NONLINEAR": 16,
    "BAD_REF_PIXEL": 17,
    "NO_FLAT_FIELD": 18,
    "NO_GAIN_VALUE": 19,
    "NO_LIN_CORR": 20,
    "NO_SAT_CHECK": 21,
    "UNRELIABLE_BIAS": 22,
    "UNRELIABLE_DARK": 23,
    "UNRELIABLE_SLOPE": 24,
    "UNRELIABLE_FLAT": 25,
    "OPEN": 26,
    "ADJ_OPEN": 27,
    "OTHER_BAD_PIXEL": 30,
    "REFERENCE_PIXEL": 31,
}

#: SPHEREx Level-2 FLAGS names -> bit numbers (SPHEREx Explanatory Supplement, as
#: summarised by the spxquery documentation).
SPHEREX_FLAG_BITS = {
    "TRANSIENT": 0,
    "OVERFLOW": 1,
    "SUR_ERROR": 2,
    "PHANTOM": 4,
    "NONFUNC": 6,
    "DICHROIC": 7,
    "MISSING_DATA": 9,
    "HOT": 10,
    "COLD": 11,
    "FULLSAMPLE": 12,
    "PHANMISS": 14,
    "NONLINEAR": 15,
    "PERSIST": 17,
    "OUTLIER": 19,
    "SOURCE": 21,
}

_FLAG_TABLES = {"jwst": JWST_DQ_BITS, "spherex": SPHEREX_FLAG_BITS}


def _flag_value(bits: tuple, bitmask: int, convention: str) -> int:
    """OR of ``bitmask`` and the bits named or numbered in ``bits``."""
    table = _FLAG_TABLES[convention]
    total = int(bitmask)
    for b in bits:
        if isinstance(b, str):
            key = b.strip().upper()
            if key not in table:
                names = ", ".join(sorted(table))
                raise ValueError(f"bits: unknown {convention} flag name {b!r}; known: {names}")
            total |= 1 << table[key]
        elif isinstance(b, (int, np.integer)) and not isinstance(b, bool) and 0 <= b < 64:
            total |= 1 << int(b)
        else:
            raise ValueError(f"bits entries must be bit numbers 0-63 or flag names, got {b!r}")
    return total


@dataclass(frozen=True, kw_only=True)
class FlagMasker:
    """Integer data-quality flags -> mask: a pixel is excluded if any chosen bit is set.

    Parameters
    ----------
    bits : sequence of int or str
        Bit numbers (0 = least significant) or flag names from the ``convention``'s
        table (:data:`JWST_DQ_BITS`, :data:`SPHEREX_FLAG_BITS`; case-insensitive).
    bitmask : int
        Further bits given as an integer mask (e.g. ``0b101``), OR-ed with ``bits``.
    convention : {"jwst", "spherex"}
        Which name table ``bits`` names refer to.

    With neither ``bits`` nor ``bitmask``, any nonzero flag excludes the pixel.

    Notes
    -----
    As a :class:`Masker`, the flag array is passed as the ``mask`` argument
    (``residual`` and ``rms`` are ignored); :meth:`to_mask` takes it directly.
    The ``SOURCE`` (SPHEREx) and ``FULLSAMPLE`` bits are informational; choose bits
    deliberately rather than excluding any nonzero flag on SPHEREx data.

    Examples
    --------
    >>> dq = np.array([[0, 1], [2, 6]], dtype=np.uint32)
    >>> FlagMasker(bits=["saturated"]).to_mask(dq).tolist()
    [[False, False], [True, True]]
    >>> FlagMasker(bitmask=0b100).to_mask(dq).tolist()
    [[False, False], [False, True]]
    >>> FlagMasker(bits=[0, "OVERFLOW"], convention="spherex").to_mask(dq).tolist()
    [[False, True], [True, True]]
    """

    bits: Sequence[int | str] = ()
    bitmask: int = 0
    convention: str = "jwst"

    def __post_init__(self):
        check_choice("convention", self.convention, tuple(_FLAG_TABLES))
        if isinstance(self.bits, (str, int, np.integer)):
            raise ValueError(f"bits must be a sequence of bit numbers or names, got {self.bits!r}")
        object.__setattr__(self, "bits", tuple(self.bits))
        if not isinstance(self.bitmask, (int, np.integer)) or self.bitmask < 0:
            raise ValueError(f"bitmask must be a non-negative integer, got {self.bitmask!r}")
        _flag_value(self.bits, self.bitmask, self.convention)

    @property
    def value(self) -> int:
        """The combined integer bit mask (0 = any nonzero flag)."""
        return _flag_value(self.bits, self.bitmask, self.convention)

    def to_mask(self, flags: Any) -> np.ndarray:
        """Boolean mask (True = excluded) of an integer flag array."""
        f = np.asarray(flags)
        if f.dtype == bool:
            return f.copy()
        if f.dtype.kind not in "iu":
            raise TypeError(f"flags must be an integer array, got dtype {f.dtype}")
        value = self.value
        if value == 0:
            return f != 0
        if value >= 1 << 63:
            return (f.astype(np.uint64) & np.uint64(value)) != 0
        return (f.astype(np.int64, copy=False) & value) != 0

    def __call__(self, residual: Any, rms: Any = None, mask: Any = None) -> np.ndarray:
        """Mask from the flag array passed as ``mask``.

        None gives an all-False mask and a boolean array passes through (copied), so a
        FlagMasker can head a chain whose later maskers receive boolean masks.
        """
        if mask is None:
            return np.zeros(np.shape(residual), dtype=bool)
        return self.to_mask(mask)
