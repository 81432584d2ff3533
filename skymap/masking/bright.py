"""Bright stars and their halos: :class:`HaloMasker` masks each source far above the
noise (or saturated, or with a flagged core) out to the radius where its wings, as
measured on the image's own brightest stars, fall below a small fraction of the noise.

A thresholding masker sees a bright star's halo only where it is significant pixel by
pixel, and a background smoother then follows the rest of the halo as if it were sky:
the background rises towards the star. The halo masker instead measures the point
spread function's wings from the image (azimuthal medians around the brightest sources,
scaled onto each other where both are measured), and masks every bright source out to
where that profile, scaled to the source, drops below ``wing`` times the noise.

The work splits into a global step on small data (:meth:`HaloMasker.find`: label the
pixels far above the noise, measure profiles in cutouts around a few dozen sources,
return a :class:`BrightSources` catalogue) and a local step (:meth:`HaloMasker.paint`:
disks around the catalogued positions, for any window of the image), so a tiled run can
paint each tile with a halo of :meth:`HaloMasker.reach` pixels.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from skymap._select_kernels import median_mad32
from skymap._util import MAD_TO_STD, concurrently, nanmedian_rows
from skymap._validate import as_image, as_mask, check_positive, combine_masks
from skymap.masking import _bright_kernels as _kb

__all__ = ["BrightSources", "HaloMasker", "radial_profiles"]

#: Radius ratio over which a measured halo profile must fall faster than 1/r.
HALO_SPAN = 4.0
#: From ring to ring, outwards, the halo profile falls at least as ``r**-MIN_FALL``: a
#: star's aureole falls as r**-2 to r**-3 (King 1971), a saturated star's on a
#: photographic plate (densities compress the wings) near r**-1; a ring that barely
#: falls is sky.
MIN_FALL = 0.5

log = logging.getLogger(__name__)

# The standard error of a median of n Gaussian samples is sqrt(pi / 2) sigma / sqrt(n).
_MEDIAN_ERROR = math.sqrt(math.pi / 2.0)
# Annulus edges in pixels: 1-px rings in the core, then a factor sqrt(2) per ring, so
# that a ring's median is well measured far out where the halo is faint.
_EDGES = np.array(
    [0.0, 1.5, 2.5, 3.5, 5.0, 7.0, 10.0, 14.0, 20.0, 28.0, 40.0, 56.0, 80.0, 113.0]
    + [160.0, 226.0, 320.0, 452.0, 640.0, 905.0, 1280.0]
)

#: Flat tops whose levels (the image's value at the peak) differ by less than this many
#: sigma sit at one level (see :func:`shared_level`).
LEVEL_WIDTH = 2.0

#: Fewest rings of a halo profile (three steps of sqrt(2) in radius): a shorter one
#: has not been seen to fall (see :meth:`HaloMasker._stacked_profile`).
MIN_RINGS = 4

#: Side in pixels of the blocks of the coarse sky that bright sources are found against.
SKY_BLOCK = 64


@functools.lru_cache(maxsize=8)
def _sample_offsets(rmax: float) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx) of the pixels a profile out to ``rmax`` samples (see
    :func:`radial_profiles`)."""
    half = int(math.ceil(rmax))
    dy, dx = np.mgrid[-half : half + 1, -half : half + 1]
    r = np.hypot(dy, dx)
    stride = np.where(r < 14, 1, np.where(r < 56, 2, 4))
    keep = (dy % stride == 0) & (dx % stride == 0) & (r < rmax + 1)
    return dy[keep], dx[keep]


def radial_profiles(image: Any, y: Any, x: Any, rmax: float, mask: Any = None):
    """Azimuthal medians of ``image`` in rings around each of the centres (``y``, ``x``).

    Rings are 1 px wide out to 3.5 px, then grow by a factor sqrt(2) (edges 0, 1.5,
    2.5, 3.5, 5, 7, 10, 14, 20, ...); masked and non-finite pixels and pixels off the
    image are left out, and so is everything beyond ``rmax``. A median ignores the
    other sources that cross a ring, as long as they cover less than half of it. All
    centres are done in one pass (one labelled median over their stacked cutouts).

    Parameters
    ----------
    image : array_like, shape (ny, nx)
    y, x : array_like
        Centres in pixels, shape (k,).
    rmax : float
        Outer radius in pixels.
    mask : array_like of bool, optional
        True = excluded.

    Returns
    -------
    radius : ndarray, shape (k, nrings)
        Mean radius of each ring's pixels (NaN for an empty ring).
    median : ndarray, shape (k, nrings)
        Median of each ring (NaN for an empty ring).
    count : ndarray of int, shape (k, nrings)
        Pixels sampled in each ring: all of them within 14 px, every other row and
        column out to 56 px, every fourth beyond (a ring of thousands of pixels gives
        a median as good from a quarter of them).

    Examples
    --------
    >>> yy, xx = np.mgrid[:41, :41]
    >>> img = 100.0 / (1.0 + (yy - 20) ** 2 + (xx - 20) ** 2)
    >>> r, med, n = radial_profiles(img, [20], [20], 20)
    >>> int(n[0, 0]), float(med[0, 0])
    (9, 50.0)
    """
    img = as_image(image)
    check_positive("rmax", rmax)
    given = None if mask is None else as_mask(mask, img.shape)

    def sample(cy, cx):
        values = img[cy, cx]
        bad = ~np.isfinite(values)
        if given is not None:
            bad |= given[cy, cx]
        return values, bad

    return ring_profiles(sample, img.shape, y, x, rmax)


def ring_profiles(sample, shape, y, x, rmax: float):
    """:func:`radial_profiles` of an image read through ``sample(cy, cx) -> (values,
    bad)`` (its pixels at the integer index arrays ``cy``, ``cx``, and whether each
    is excluded), ``shape`` its shape: the same numbers, from wherever the pixels
    live (a tiled image reads only the sampled ones)."""
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    edges = np.append(_EDGES[rmax > _EDGES], rmax)
    nb, k = edges.size - 1, y.size
    ny, nx = shape
    dy, dx = _sample_offsets(float(rmax))
    yy = np.rint(y).astype(np.int64)[:, None] + dy
    xx = np.rint(x).astype(np.int64)[:, None] + dx
    cy, cx = np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)
    values, bad = sample(cy, cx)
    # the samples on the image and inside rmax: ring label, value and radius
    labels, v, r = _kb.ring_samples(yy, xx, y, x, np.asarray(bad, bool), np.asarray(values),
                                    edges, float(rmax), int(ny), int(nx))  # fmt: skip
    count = np.bincount(labels, minlength=k * nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        radius = np.bincount(labels, r, minlength=k * nb) / count
    # The medians of all rings: by ring, then by value (the value scaled into [0, 0.5)
    # is added to the ring number; ties in that key keep their order), the middle of
    # each ring, selected rather than sorted (the same elements as numpy's stable sort).
    median = np.full(k * nb, np.nan)
    if v.size:
        lo_v, span = v.min(), np.ptp(v)
        key = labels + (0.5 * (v - lo_v) / span if span > 0 else 0.0)
        _kb.ring_medians(labels, key, v, median)
    return radius.reshape(k, nb), median.reshape(k, nb), count.reshape(k, nb)


@dataclass(frozen=True, kw_only=True, eq=False)
class BrightSources:
    """What :meth:`HaloMasker.find` found: one row per bright source.

    Attributes
    ----------
    x, y : ndarray
        Centres in pixels.
    amplitude : ndarray
        Each source's scale relative to the halo profile (the profile times the
        amplitude is the source's surface brightness, residual units).
    saturated : ndarray of bool
        A flat top, or a core of masked or non-finite pixels.
    radius : ndarray
        Mask radius in pixels.
    profile_radius, profile : ndarray
        The stacked halo profile (per unit amplitude) at the ring radii where it was
        measured (NaN where it was not).
    noise : float
        The noise (residual units) the radii were set against.
    """

    x: np.ndarray
    y: np.ndarray
    amplitude: np.ndarray
    saturated: np.ndarray
    radius: np.ndarray
    profile_radius: np.ndarray
    profile: np.ndarray
    noise: float

    def __len__(self) -> int:
        return int(self.x.size)


def sky_blocks(img: np.ndarray, invalid: np.ndarray, block: int) -> np.ndarray:
    """The medians of the valid pixels (every other one) of each ``block`` x ``block``
    block of ``img`` (NaN: none), the last ones padded with NaN; per block, so a window
    that starts on a block edge gives its part of the grid."""
    ny, nx = img.shape
    gy, gx, h = -(-ny // block), -(-nx // block), block // 2
    # Every other pixel of each block as one row (NaN where invalid or beyond the
    # image), gathered in one pass.
    blocks = _kb.block_rows(img, invalid, block, np.empty((gy * gx, h * h), np.float32))
    return nanmedian_rows(blocks, overwrite=True).reshape(gy, gx)


def filled_sky(grid: np.ndarray) -> np.ndarray:
    """:func:`sky_blocks`' grid with its empty blocks filled from the nearest ones and
    median-filtered over 3 x 3 blocks (all empty: zeros)."""
    return ndi.median_filter(filled_blocks(grid), size=3, mode="nearest")


def filled_blocks(grid: np.ndarray) -> np.ndarray:
    """``grid`` with its empty (NaN) blocks filled from the nearest ones (all empty:
    zeros)."""
    hole = ~np.isfinite(grid)
    if hole.all():
        return np.zeros(grid.shape, np.float32)
    if hole.any():
        idx = ndi.distance_transform_edt(hole, return_distances=False, return_indices=True)
        return grid[tuple(idx)]
    return grid


class _CoarseSky:
    """A sky to find bright sources against, held at one value per ``block`` x
    ``block`` block: medians of the block's every other pixel, median-filtered over
    3 x 3 blocks (a block that a bright star fills is outvoted by its neighbours). It
    is read as ``image - sky`` at full resolution band by band, at a subsample or at
    given pixels, so that neither map is ever held at full resolution (memory)."""

    def __init__(self, img: np.ndarray, invalid: np.ndarray, block: int):
        self.grid = filled_sky(sky_blocks(img, invalid, block))
        self.block = block
        self.img = img

    def at(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``image - sky`` at the pixels (``rows``, ``cols``) (arrays that broadcast)."""
        b = self.block
        return self.img[rows, cols] - self.grid[rows // b, cols // b]

    def subsample(self, step: int) -> np.ndarray:
        """``(image - sky)[::step, ::step]``."""
        ny, nx = self.img.shape
        return self.at(np.arange(0, ny, step)[:, None], np.arange(0, nx, step)[None, :])

    def above(self, threshold: float, invalid: np.ndarray) -> np.ndarray:
        """Full-resolution ``image - sky > threshold`` and not ``invalid``
        (:func:`above_sky`)."""
        return above_sky(self.img, self.grid, self.block, threshold, invalid)


def above_sky(img, grid, block: int, threshold: float, invalid, origin=(0, 0)) -> np.ndarray:
    """``img - sky > threshold`` and not ``invalid``, the sky ``grid`` one value per
    ``block`` x ``block`` block of the image, ``img`` the part of it that starts at
    ``origin`` (a tile's window); in one pass, without a full-size sky or difference
    map. The values of numpy's ``img - sky > threshold`` (the difference in their
    common dtype, ``threshold`` taken in it).

    Examples
    --------
    >>> img = np.arange(8.0).reshape(2, 4)
    >>> above_sky(img, np.array([[0.0, 4.0]]), 2, 0.5, np.zeros((2, 4), bool)).astype(int)
    array([[0, 1, 0, 0],
           [1, 1, 1, 1]])
    """
    img = np.asarray(img)
    dtype = np.result_type(img.dtype, grid.dtype)
    out = np.empty(img.shape, bool)
    return _kb.above_sky(img, grid, int(block), int(origin[0]), int(origin[1]),
                         dtype.type(threshold), np.asarray(invalid, bool), out)  # fmt: skip


def mad_sigma(a: np.ndarray) -> float:
    """MAD-based sigma of the finite values of ``a`` (a subsample of ~250 000: see
    :func:`mad_step`); their order does not matter."""
    v = a[np.isfinite(a)]
    if v.size == 0:
        return 1.0
    if v.dtype == np.float32:
        mad = MAD_TO_STD * float(median_mad32(v)[1])  # numpy's medians, bit for bit
    else:
        mad = MAD_TO_STD * float(np.median(np.abs(v - np.median(v))))
    return mad if mad > 0 else 1.0


def mad_step(shape) -> int:
    """Row and column step of the ~250 000 pixels :func:`mad_sigma` reads."""
    return max(1, int(math.sqrt(shape[0] * shape[1] / 250_000)))


def box_means(img, grid, block: int, invalid, flat, origin=(0, 0)) -> np.ndarray:
    """The 3 x 3 means (float64) of ``image - sky`` at the flat indices ``flat`` of
    ``img`` (invalid pixels as 0), computed at those pixels only: the sky is ``grid``,
    one value per ``block`` x ``block`` block of the image, and ``img`` is the part of
    the image that starts at ``origin`` (a tile's window). Edges are reflected as
    ``scipy.ndimage.uniform_filter``'s default at ``img``'s edges, so a window one
    pixel larger than the pixels asked for gives the whole image's numbers.

    Examples
    --------
    >>> img = np.arange(16.0).reshape(4, 4)
    >>> box_means(img, np.zeros((1, 1)), 4, np.zeros((4, 4), bool), np.array([5]))
    array([5.])
    """
    return _kb.box_means_at(img, grid, block, invalid, flat, int(origin[0]), int(origin[1]))


def touching(above: np.ndarray, invalid: np.ndarray, *, inplace: bool = False) -> np.ndarray:
    """``above`` OR the ``invalid`` pixels that share an edge with it (a binary
    dilation of ``above`` by the cross, cut to ``invalid``), reading the neighbours
    of the invalid pixels only; ``inplace``: in ``above`` itself (returned)."""
    region = above if inplace else above.copy()
    iv = np.flatnonzero(invalid)
    if iv.size:
        ny, nx = above.shape
        y, x = np.divmod(iv, nx)
        near = np.zeros(iv.size, bool)
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            yy, xx = y + dy, x + dx
            inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
            near[inside] |= above[yy[inside], xx[inside]]
        region.ravel()[iv[near]] = True
    return region


def joined_cores(piece, region, refused) -> tuple[np.ndarray, np.ndarray]:
    """Which masked pixels join a candidate region as part of its core.

    ``piece`` numbers each masked pixel's 8-connected masked piece (1..n), ``region``
    is the candidate region already at that pixel (0: none); ``refused`` (n + 1
    booleans) marks pieces that may not join (larger than a halo's core, or not
    settled here). A piece joins the region one of its pixels lies in (the last such
    pixel's, in the order given). Returns the region each masked pixel joins (0:
    none) and which of them are new to it (not in a region already).

    Examples
    --------
    >>> add, new = joined_cores(np.array([1, 1, 2]), np.array([0, 3, 0]),
    ...                         np.zeros(3, bool))
    >>> add.tolist(), new.tolist()
    ([3, 3, 0], [True, False, False])
    """
    touched = np.zeros(refused.size, np.int64)
    hit = region > 0
    touched[piece[hit]] = region[hit]
    touched[refused] = 0
    touched[0] = 0
    add = touched[piece]
    return add, (region == 0) & (add > 0)


def region_stats(where, lab, bad, vals, box, n: int, width: int) -> dict:
    """Per-region statistics of :meth:`HaloMasker.find`'s candidate regions from their
    pixels: flat indices ``where`` (ascending) into an image ``width`` wide, region
    index ``lab`` (0 .. ``n`` - 1), excluded flag ``bad``, value ``vals`` and 3 x 3
    mean ``box``. Each region's numbers depend on its own pixels only (exact sums
    and extremes), so regions may be measured apart (tile by tile)."""
    vals = np.where(bad, -np.inf, vals)
    # A region's peak is its brightest pixel (ties: the last in C order). A flat top:
    # the area above 90% of the peak is several times the typical bright source's
    # (which the PSF sets, whatever the seeing), as a clipped core makes it. Quantised
    # data repeat values near any peak, so counting repeats of the maximum would not
    # do; the maximum repeated (a core clipped at one level) is counted too. The area
    # is the flat top and masked core, its centre a saturated source's.
    t = vals.dtype.type
    py, px, boxmax, ints = _kb.region_sums(
        np.ascontiguousarray(where, np.int64), np.ascontiguousarray(lab, np.int64),
        np.ascontiguousarray(bad, bool), vals, np.ascontiguousarray(box, np.float64),
        int(n), int(width), t(0.9), t(1e-6),
    )  # fmt: skip
    masked, top, repeats, area, sum_y, sum_x = ints.astype(np.float64)
    return {
        "peak_y": py,
        "peak_x": px,
        "masked": masked,
        "boxmax": boxmax,
        "top": top,
        "repeats": repeats,
        "area": area,
        "sum_y": sum_y,
        "sum_x": sum_x,
    }


@dataclass(frozen=True, kw_only=True)
class HaloMasker:
    """Mask bright sources out to where their measured halos fall below the noise.

    1. Sources: connected regions of the residual, minus a coarse sky of its own,
       above ``seed`` times the noise (the MAD of that difference), joined with the
       masked or non-finite pixels they touch (flagged and NaN cores). A region is
       bright when its largest 3x3 mean is above ``nsigma`` times that mean's noise
       (``sigma / 3``, so that poor seeing does not hide a bright star), or saturated:
       a core of masked pixels, or a flat top: its maximum repeated in 3 pixels or
       more, or an area above 90% of its peak of at least 5 pixels and 3 times the
       median over the bright regions (a density-saturated photographic plate is
       flat but not constant). Such an area on a region that is not bright counts
       only at a level most of them share (:func:`shared_level`): a knot of emission
       a few sigma up is flat at its own level.
    2. Halo profile: azimuthal medians (:func:`radial_profiles`) around the ``stack``
       brightest sources, out to ``max_radius``, each against its local sky (the median
       of its outer rings). The brightest one's profile defines the
       scale and gives the profile where it is measured (its rings above 3 times
       their noise, outside a saturated core, falling outwards); each other one is
       scaled onto it by the median ratio over the rings both measured, and fills in
       the rings the brightest lacks (a saturated core inwards, fainter wings
       outwards) where they continue its fall; outwards it ends where it falls slower
       than ``r**-MIN_FALL`` over two rings running (a plateau of sky around the
       brightest source is not its halo). A profile that falls slower than 1/r
       over a factor of :data:`HALO_SPAN` in radius is extended emission around the
       brightest peaks (a nebula's knot), not a point source's wings (a finite flux
       falls faster than 1/r^2): then no source is given a halo, unless the brightest
       is saturated (a star by its core); nor when fewer than :data:`MIN_RINGS` rings
       are left. Where the brightest's rings are no halo, each of the others leads in
       turn (filled in from all the rest); if most of the stack give a profile, the
       brightest of those is the frame's (which of a few flat-topped knots of about one
       size leads swings with the noise: on M51 filling its frame, no halos in 2 of 6
       injected fits and 15% of the frame masked in the others).
    3. Amplitudes: every bright source's own profile (within 16 px, or 3 times its
       saturated core) is scaled onto the stacked one in the same way.
    4. Radius: for an unsaturated source, where its own rings are seen to fall below
       ``wing`` times the noise (a galaxy, or a star without a halo, is not given the
       brightest star's wings); for a saturated one, or where the rings are still
       above it at their last ring, where amplitude times
       profile falls below ``wing`` times the noise
       (interpolated in log-log between rings; beyond the last measured ring the
       profile is extended as the power law of its last two rings, no shallower than
       ``r**-2``, at most twice as far), at most ``max_radius`` or a quarter of the
       image's larger side.

    Follows the :class:`skymap.masking.Masker` protocol: returns the disks only, without
    the pixels of ``mask``. ``residual`` may be the image itself (the default pipeline
    passes the image, once, before its first guess); ``rms`` is not read (see
    :meth:`find`). A halo that still holds light at the outer half of the measured
    rings (the local sky) comes out somewhat short, as in the example below.

    Parameters
    ----------
    nsigma : float
        Signal-to-noise of the largest 3x3 mean above which a source is bright.
    seed : float
        Threshold in noise sigmas of a source's region (its flat top and masked core
        are found within it), at most ``nsigma``.
    wing : float
        The halo is masked down to this fraction of the noise.
    stack : int
        Number of bright sources whose profiles make the halo profile.
    max_radius : float
        Largest mask radius in pixels (and the extent of the measured profile).
    max_sources : int
        At most this many bright sources (the brightest) are measured and masked.

    References
    ----------
    .. [1] King, I. R. 1971, "The Profile of a Star Image", PASP 83, 199,
       doi:10.1086/129100 (the power-law aureole of a star image, out to degrees).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> yy, xx = np.mgrid[:400, :400]
    >>> star = lambda y, x, a: a * (1 + ((yy - y) ** 2 + (xx - x) ** 2) / 4.0) ** -1.5
    >>> img = rng.normal(size=(400, 400)) + star(120, 120, 5e4) + star(300, 280, 500)
    >>> found = HaloMasker().find(img)
    >>> [round(float(r)) for r in found.radius]  # the profiles reach 0.5 at 93 and 20
    [75, 19]
    """

    nsigma: float = 50.0
    seed: float = 5.0
    wing: float = 0.5
    stack: int = 8
    max_radius: float = 256.0
    max_sources: int = 200

    def __post_init__(self):
        check_positive("nsigma", self.nsigma)
        check_positive("seed", self.seed)
        if self.seed > self.nsigma:
            raise ValueError(
                f"seed must be <= nsigma, got seed={self.seed!r}, nsigma={self.nsigma!r}"
            )
        check_positive("wing", self.wing)
        for name in ("stack", "max_sources"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        check_positive("max_radius", self.max_radius)

    def reach(self) -> int:
        """Halo in pixels a tile needs around it for :meth:`paint` (the largest radius)."""
        return int(math.ceil(self.max_radius))

    def __call__(self, residual: Any, rms: Any = None, mask: Any = None) -> np.ndarray:
        """Disks around the bright sources (True = masked), without ``mask``'s pixels;
        ``residual`` may be the image itself (see :meth:`find`)."""
        res = as_image(residual, "residual")
        given = as_mask(mask, res.shape)
        out = self.paint(self.find(res, rms, given), res.shape)
        if given is not None:
            np.greater(out, given, out=out)
        return out

    # ------------------------------------------------------------------ global step

    def find(self, residual: Any, rms: Any = None, mask: Any = None) -> BrightSources:
        """The bright sources, their halo profile and mask radii (see the class
        docstring). Global, but it reads only the pixels near bright sources.

        ``residual`` may be the image itself: sources are found against a coarse sky
        of its own (medians of 64-px blocks, median-filtered), and each profile is
        measured against its local sky (the median of its rings' outer half), so a
        background that has already followed part of a halo is not needed. ``rms``
        is not read: the noise is the MAD of ``residual`` minus that coarse sky, the
        pixel noise the halos are cut at."""
        img = as_image(residual, "residual")
        invalid = combine_masks(img, as_mask(mask, img.shape))
        sky = _CoarseSky(img, invalid, SKY_BLOCK)
        step = mad_step(img.shape)
        det = sky.subsample(step)
        det[invalid[::step, ::step]] = np.nan
        sigma = mad_sigma(det)
        del det
        stats = self._candidates(sky, invalid, sigma, self.limit(img.shape))

        def sample(cy, cx):
            return img[cy, cx], invalid[cy, cx]

        return self.measure(stats, sigma, sample, img.shape)

    def limit(self, shape) -> float:
        """The largest mask radius for an image of ``shape``: ``max_radius``, at most
        a quarter of the larger side."""
        return min(self.max_radius, max(shape) / 4.0)

    def measure(self, stats, sigma: float, sample, shape, tops=None) -> BrightSources:
        """The halo profile and mask radii of the candidate regions ``stats``
        (:func:`region_stats` of every region, in the order of their first pixel, or
        None: no region), the image read through ``sample(cy, cx) -> (values,
        excluded)`` (:func:`ring_profiles`): the part of :meth:`find` after the
        pixel-level step, for any back end. ``tops``: the top counts of regions left
        out of ``stats`` as never bright (:meth:`keep_region`)."""
        rows = None
        if stats is not None:
            # The image's own value at each region's peak: the level a clipped core
            # sits at (not the sky-subtracted one, which the coarse sky moves).
            level, _ = sample(stats["peak_y"].astype(np.int64), stats["peak_x"].astype(np.int64))
            rows = self._bright(stats, sigma, tops, np.asarray(level, np.float64))
        if rows is None:
            return self._empty(sigma)
        limit = self.limit(shape)
        y, x, snr, core, sat = rows
        # Saturated ones by the size of their core, then by signal-to-noise.
        order = np.lexsort((-snr, -core))[: self.max_sources]
        y, x, core, sat = y[order], x[order], core[order], sat[order]
        radii, profile = self._stacked_profile(sample, shape, sigma, y, x, core, limit)
        if profile is None:
            return self._empty(sigma)
        amp, own = self._amplitudes(sample, shape, sigma, y, x, core, limit, profile)
        ok = np.isfinite(amp) & (amp > 0)
        radius = np.array([self._radius(a, radii, profile, sigma) for a in amp[ok]])
        # A saturated source's own rings (a small cutout whose outer half, its local
        # sky, still holds its halo) end too soon: its radius comes from the profile.
        radius = np.where(np.isfinite(own[ok]) & ~sat[ok], own[ok], radius)
        radius = np.minimum(np.maximum(radius, core[ok] + 1.0), limit) if ok.any() else radius
        log.debug(
            "%d bright sources (%d saturated), noise %.4g, largest mask radii %s px",
            int(ok.sum()),
            int(sat[ok].sum()),
            sigma,
            np.round(np.sort(radius)[::-1][:5], 1).tolist(),
        )
        return BrightSources(
            x=x[ok],
            y=y[ok],
            amplitude=amp[ok],
            saturated=sat[ok],
            radius=radius.reshape(-1),
            profile_radius=radii,
            profile=profile,
            noise=sigma,
        )

    def _empty(self, sigma: float) -> BrightSources:
        z = np.zeros(0)
        return BrightSources(
            x=z,
            y=z,
            amplitude=z,
            saturated=np.zeros(0, bool),
            radius=z,
            profile_radius=z,
            profile=z,
            noise=sigma,
        )

    def _candidates(self, sky, invalid, sigma, limit):
        """:func:`region_stats` of the candidate regions of ``image - sky`` (a
        :class:`_CoarseSky`), in label order, or None."""
        above = sky.above(self.seed * sigma, invalid)
        if not above.any():
            return None
        # Masked pixels that touch a region join it: a NaN or flagged saturated core.
        region = touching(above, invalid, inplace=True)
        del above
        nx = invalid.shape[1]

        def per_pixel(flat):
            # The region pixels' sky-subtracted values and 3 x 3 means.
            ry, rx = np.divmod(flat, nx)
            return sky.at(ry, rx), box_means(sky.img, sky.grid, sky.block, invalid, flat)

        def pixels(region):
            # The labelled pixels, found in the boolean map (a quarter of the bytes of
            # the labels), and their numbers: beside the labelling, which needs none
            # of them.
            where = np.flatnonzero(region)
            return where, *per_pixel(where)

        # 8-connected, numbered as scipy's label does; visits the (few) region pixels
        # only.
        (labels, n), (where, vals, box) = concurrently(
            functools.partial(_kb.label8, region), functools.partial(pixels, region)
        )
        del region
        if invalid.any():
            # Pull in the whole masked core (it may be wider than one pixel), reading
            # the masked pixels only.
            core_lab, ncore = ndi.label(invalid, structure=np.ones((3, 3), bool))
            iv = np.flatnonzero(invalid)
            cl, lb = core_lab.ravel()[iv], labels.ravel()[iv]
            del core_lab
            # A masked region larger than the largest halo is not a star's core
            # (a border, a chip gap): it does not join.
            big = np.bincount(cl, minlength=ncore + 1) > self.core_limit(limit)
            add, join = joined_cores(cl, lb, big)
            labels.ravel()[iv[join]] = add[join]
            if join.any():
                # The joined pixels (in no region before) in their places among the
                # region pixels, with their numbers.
                new = iv[join]
                merged = np.union1d(where, new)
                at = np.searchsorted(merged, new)
                old = np.ones(merged.size, bool)
                old[at] = False
                nvals, nbox = per_pixel(new)
                vals_m, box_m = np.empty(merged.size, vals.dtype), np.empty(merged.size)
                vals_m[old], vals_m[at] = vals, nvals
                box_m[old], box_m[at] = box, nbox
                where, vals, box = merged, vals_m, box_m
            del iv, cl, lb, add, join
        # Per-region statistics over the region pixels only (few, for bright sources).
        lab = labels.ravel()[where] - 1
        del labels
        return region_stats(where, lab, invalid.ravel()[where], vals, box, n, nx)

    @staticmethod
    def core_limit(limit: float) -> float:
        """The largest masked area (pixels) that joins a region as its core."""
        return math.pi * limit**2 / 4.0

    def keep_region(self, stats, sigma: float) -> np.ndarray:
        """Which regions of ``stats`` may come out bright, whatever the others are:
        bright by signal-to-noise, masked pixels, a repeated maximum, or 5 pixels or
        more near the peak (the least a flat top needs)."""
        snr = stats["boxmax"] / (sigma / 3.0)
        return (
            (snr > self.nsigma)
            | (stats["masked"] > 0)
            | (stats["repeats"] >= 3)
            | (stats["top"] >= 5)
        )

    def _bright(self, stats, sigma, tops=None, level=None):
        """(y, x, snr, core radius, saturated) of the bright regions of ``stats``, or
        None. ``tops``: the top counts of regions left out of ``stats`` (none of
        which is bright, see :meth:`keep_region`), for the typical top; ``level``:
        the image's value at each region's peak (None: every flat top counts)."""
        masked, top, area = stats["masked"], stats["top"], stats["area"]
        # Brightness: the largest 3x3 mean, in units of its noise (sigma / 3 for white
        # noise), so that a star spread by poor seeing counts as much as a sharp one.
        snr = stats["boxmax"] / (sigma / 3.0)
        bright = snr > self.nsigma
        if bright.any():
            typical = float(np.median(top[bright]))
        else:
            typical = float(np.median(top if tops is None else np.concatenate([top, tops])))
        flat = top >= max(5.0, 3.0 * typical)
        clipped = (masked > 0) | (stats["repeats"] >= 3)
        if level is not None:
            flat &= (
                shared_level(level, flat & ~bright & ~clipped, LEVEL_WIDTH * sigma)
                | bright
                | clipped
            )
        sat = clipped | flat
        bright |= sat
        if not bright.any():
            return None
        # Saturated centre: the middle of the flat top and masked core; otherwise the
        # peak pixel.
        with np.errstate(invalid="ignore", divide="ignore"):
            cy = stats["sum_y"] / area
            cx = stats["sum_x"] / area
        y = np.where(sat, cy, stats["peak_y"])[bright]
        x = np.where(sat, cx, stats["peak_x"])[bright]
        radius = np.where(sat, np.sqrt(area / math.pi), 0.0)[bright]
        return y, x, snr[bright], radius, sat[bright]

    def _profiles(self, sample, shape, sigma, y, x, rmax, core):
        """(ring radii, ring medians) of each source against its local sky (the median
        of the rings in the outer half), kept only over the rings outside its
        saturated core that fall outwards, each above 3 times its noise, up to the
        first that does not (further out: a neighbour's light, or the noise)."""
        r, med, n = ring_profiles(sample, shape, y, x, rmax)
        outer = np.isfinite(med) & (r >= rmax / 2.0)
        # (no warnings filter: not safe while another thread runs)
        sky = nanmedian_rows(np.where(outer, med, np.nan))
        med = med - sky[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            good = (med > 3.0 * _MEDIAN_ERROR * sigma / np.sqrt(n)) & (r > core[:, None] + 1.0)
        good &= ~outer
        keep = np.zeros(good.shape, bool)
        alive, started = np.ones(len(med), bool), np.zeros(len(med), bool)
        last = np.full(len(med), np.inf)
        for j in range(med.shape[1]):
            ok = good[:, j] & (med[:, j] < last)
            alive &= ~(started & ~ok)
            keep[:, j] = alive & ok
            last = np.where(keep[:, j], med[:, j], last)
            started |= keep[:, j]
        return r, np.where(keep, med, np.nan), med

    def _stacked_profile(self, sample, shape, sigma, y, x, core, limit):
        """(ring radii, profile per unit amplitude) from the ``stack`` brightest."""
        k = min(self.stack, y.size)
        r, p, _ = self._profiles(sample, shape, sigma, y[:k], x[:k], limit, core[:k])
        radii = nanmedian_rows(r.T)
        # The brightest source with measured rings leads. Where its rings are no halo,
        # the frame still has one if most of the stack, each leading, give one (the
        # brightest of those then leads): which of a few flat-topped peaks of about
        # one size comes first swings with the noise (M51: no halos in 2 of 6 injected
        # fits, 15% of the frame masked in the others; a 2MASS tile: 0 or 190 sources),
        # and one of them cannot speak for the frame's stars.
        first = next((i for i in range(k) if np.isfinite(p[i]).any()), None)
        if first is None:
            return radii, None
        ref = self._led_profile(p, first, radii, core)
        if ref is not None:
            return radii, ref
        refs = [self._led_profile(p, i, radii, core) if np.isfinite(p[i]).any() else None
                for i in range(first + 1, k)]  # fmt: skip
        led = [ref for ref in refs if ref is not None]
        if 2 * len(led) <= k:
            log.debug("%d of %d sources give a halo profile: no halos", len(led), k)
            return radii, None
        return radii, led[0]

    def _led_profile(self, p, lead, radii, core):
        """The stacked profile that source ``lead`` of the profiles ``p`` leads, or
        None where what is left of it is no halo (see :meth:`_stacked_profile`)."""
        k = len(p)
        ref = p[lead].copy()
        own = np.flatnonzero(np.isfinite(ref))
        for i in (j for j in range(k) if j != lead):
            amp = _match(p[i], ref)
            if np.isfinite(amp) and amp > 0:
                # Each ring from the brightest source that measured it (the best
                # measured; a fainter one's outer rings hold its brighter neighbours'
                # halos); a saturated brightest one leaves its core to the others.
                ref = np.where(np.isfinite(ref), ref, p[i] / amp)
        # The leading source's rings fall outwards; a ring filled in from the others
        # is kept only where it continues that fall, inwards and outwards.
        for j in range(own[0] - 1, -1, -1):
            if not (np.isfinite(ref[j]) and ref[j] > ref[j + 1]):
                ref[: j + 1] = np.nan
                break
        for j in range(own[-1] + 1, ref.size):
            if not (np.isfinite(ref[j]) and ref[j] < ref[j - 1]):
                ref[j:] = np.nan
                break
        # A point source's wings fall faster than 1/r (a finite flux needs more than
        # 1/r^2): a "profile" that falls slower over a factor of 4 in radius is
        # extended emission around the brightest peak (a nebula's knot), not a halo.
        # A saturated lead is a star by its core, however its wings fall (a
        # photographic plate's densities are far from linear in flux).
        kept = np.flatnonzero(np.isfinite(ref) & (ref > 0))
        span = kept.size >= 2 and radii[kept[-1]] >= HALO_SPAN * radii[kept[0]]
        if span and not core[lead] > 0:
            fall = math.log(ref[kept[-1]] / ref[kept[0]])
            if not fall < -math.log(radii[kept[-1]] / radii[kept[0]]):
                log.debug("the brightest peaks' profile falls slower than 1/r: no halos")
                return None
        # Outwards, a plateau (sky structure around the brightest source, saturated
        # or not; a faint galaxy under it) is not a halo, and would give every source
        # its reach: the profile ends where it falls slower than r**-MIN_FALL over two
        # rings running (one such ring is a blip, as a ring median in an undersampled
        # core can be).
        with np.errstate(invalid="ignore", divide="ignore"):
            slow = ref[1:] >= ref[:-1] * (radii[1:] / radii[:-1]) ** -MIN_FALL
        for j in range(own[0] + 1, ref.size - 1):
            if slow[j - 1] and slow[j]:
                ref[j:] = np.nan
                break
        # What is left must have been seen to fall: the plateau test ends a profile
        # at two slow rings running and lets one pass, so fewer than MIN_RINGS rings
        # (a knot's flat top on a nebula, taken as saturated; a few rings of a star
        # sunk in the nebula's light) are no measured halo, and every radius drawn
        # from them would be the extrapolation's (twice the last ring), not the
        # image's. Which knot led, and how many of its rings survived, swung with
        # the noise (the Galactic-centre MIPS frame: 1 to 3 rings).
        if np.count_nonzero(np.isfinite(ref) & (ref > 0)) < MIN_RINGS:
            log.debug("the halo profile has fewer than %d rings: no halos", MIN_RINGS)
            return None
        return ref

    def _amplitudes(self, sample, shape, sigma, y, x, core, limit, profile):
        """Each source's scale on the profile, from its own rings within
        2 max(16, 3 core) px (batched by that radius, rounded up to a power of 2), and
        the radius where its own profile was seen to fall below ``wing`` sigma (NaN
        where its last measured ring is still above: the profile extrapolates)."""
        reach = np.minimum(limit, 2.0 ** np.ceil(np.log2(2.0 * np.maximum(16, 3 * core))))
        amp, own = np.full(y.size, np.nan), np.full(y.size, np.nan)
        level = self.wing * sigma
        for rmax in np.unique(reach):
            sel = np.nonzero(reach == rmax)[0]
            r, p, raw = self._profiles(
                sample, shape, sigma, y[sel], x[sel], float(rmax), core[sel]
            )
            amp[sel] = [_match(row, profile) for row in p]
            for i, row in enumerate(p):
                kept = np.flatnonzero(np.isfinite(row))
                if not kept.size or kept[-1] + 1 >= row.size:
                    continue
                j = kept[-1]
                hi, lo, r0, r1 = row[j], raw[i, j + 1], r[i, j], r[i, j + 1]
                if lo < level < hi and np.isfinite(r1):
                    # The next ring is measured below the level: the source's own
                    # wings end between the two (log-log, or linear to a ring at or
                    # below the sky), whatever the profile of the brightest says.
                    if lo > 0:
                        t = math.log(hi / level) / math.log(hi / lo)
                        own[sel[i]] = math.exp(math.log(r0) + t * math.log(r1 / r0))
                    else:
                        own[sel[i]] = r0 + (r1 - r0) * (hi - level) / (hi - lo)
        return amp, own

    def _radius(self, amp, radii, profile, sigma) -> float:
        level = self.wing * sigma / amp
        ok = np.isfinite(profile) & np.isfinite(radii) & (profile > 0)
        r, p = radii[ok], profile[ok]
        if r.size == 0:
            return 0.0
        above = np.nonzero(p > level)[0]
        if above.size == 0:
            return float(r[0])
        j = int(above[-1])
        if j + 1 < r.size:
            # Log-log interpolation to the crossing between ring j and j + 1.
            t = math.log(p[j] / level) / math.log(p[j] / p[j + 1])
            return float(math.exp(math.log(r[j]) + t * math.log(r[j + 1] / r[j])))
        if r.size >= 2 and p[-2] > p[-1]:
            # Beyond the last measured ring: its power law, no shallower than r**-2
            # (a PSF aureole's) and at most twice as far out.
            slope = min(-2.0, math.log(p[-1] / p[-2]) / math.log(r[-1] / r[-2]))
            return float(min(2.0 * r[-1], r[-1] * (level / p[-1]) ** (1.0 / slope)))
        return float(r[-1])

    # ------------------------------------------------------------------ local step

    def paint(
        self,
        sources: BrightSources,
        shape: tuple[int, int],
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
        *,
        into: np.ndarray | None = None,
    ) -> np.ndarray:
        """Disks of the sources' radii (True = masked) over the window ``rows`` x
        ``cols`` (half-open pixel ranges, default the whole ``shape``): local, each
        window needs only the sources within :meth:`reach` of it. ``into``, a boolean
        array of the window's shape, has the disks ORed into it and is returned.

        Examples
        --------
        >>> src = BrightSources(x=np.array([2.0]), y=np.array([2.0]),
        ...     amplitude=np.ones(1), saturated=np.zeros(1, bool), radius=np.ones(1),
        ...     profile_radius=np.zeros(0), profile=np.zeros(0), noise=1.0)
        >>> HaloMasker().paint(src, (5, 5), rows=(1, 4), cols=(1, 4)).astype(int)
        array([[0, 1, 0],
               [1, 1, 1],
               [0, 1, 0]])
        """
        y0, y1 = rows if rows is not None else (0, shape[0])
        x0, x1 = cols if cols is not None else (0, shape[1])
        out = np.zeros((y1 - y0, x1 - x0), bool) if into is None else into
        as64 = functools.partial(np.ascontiguousarray, dtype=np.float64)
        _kb.paint_disks(out, as64(sources.y), as64(sources.x), as64(sources.radius),
                        int(y0), int(y1), int(x0), int(x1))  # fmt: skip
        return out


def shared_level(level: np.ndarray, candidate: np.ndarray, width: float) -> np.ndarray:
    """Which ``candidate`` flat tops sit at a level most of them share: within
    ``width`` of their own ``level`` lie the levels of more than half of the
    candidates (each counts itself).

    A detector's full well or an emulsion's density limit clips every saturated core
    of a frame at one level (a 1949 plate's 79 flat tops peak within 0.9 sigma of one
    value); the flat tops of a nebula's knots, galaxy cores or blends at a few sigma
    lie at their own levels (the Galactic-centre MIPS frame's 31 spread over 36
    sigma), and which of them came out flat swung with the noise and the orientation.
    :class:`HaloMasker` takes levels within 2 sigma (:data:`LEVEL_WIDTH`) as one:
    at 1 sigma the smooth sky of 1-3 sigma that an injection test adds after the
    clipping split the plate's; at 3 sigma a scene's faint galaxies of one
    brightness passed as clipped. A lone candidate shares its own level.

    Examples
    --------
    >>> shared_level(np.array([10.0, 10.3, 9.8, 25.0, 40.0]), np.ones(5, bool), 1.0)
    array([ True,  True,  True, False, False])
    """
    out = np.zeros(level.size, bool)
    idx = np.flatnonzero(candidate)
    if idx.size:
        v = np.sort(level[idx])
        near = np.searchsorted(v, level[idx] + width, "right") - np.searchsorted(
            v, level[idx] - width, "left"
        )
        out[idx] = near > idx.size / 2.0
    return out


def _match(p: np.ndarray, ref: np.ndarray) -> float:
    """Median ratio ``p / ref`` over the rings where both are measured (NaN if none)."""
    m = min(p.size, ref.size)
    a, b = p[:m], ref[:m]
    ok = np.isfinite(a) & np.isfinite(b) & (b > 0)
    if not ok.any():
        return float("nan")
    # numpy's median of a few values (the middle one, or the mean of the middle two:
    # their sum over 2), without its machinery (~600 calls a fit)
    v = sorted((a[ok] / b[ok]).tolist())
    k = len(v) // 2
    return v[k] if len(v) % 2 else (v[k - 1] + v[k]) / 2.0
