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

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from skymap._validate import as_image, as_mask, check_positive, combine_masks

__all__ = ["BrightSources", "HaloMasker", "radial_profile"]

log = logging.getLogger(__name__)

_MAD_TO_STD = 1.482602218505602
# The standard error of a median of n Gaussian samples is sqrt(pi / 2) sigma / sqrt(n).
_MEDIAN_ERROR = math.sqrt(math.pi / 2.0)
# Annulus edges in pixels: 1-px rings in the core, then a factor sqrt(2) per ring, so
# that a ring's median is well measured far out where the halo is faint.
_EDGES = np.array(
    [0.0, 1.5, 2.5, 3.5, 5.0, 7.0, 10.0, 14.0, 20.0, 28.0, 40.0, 56.0, 80.0, 113.0]
    + [160.0, 226.0, 320.0, 452.0, 640.0, 905.0, 1280.0]
)


def radial_profile(image: Any, y: float, x: float, rmax: float, mask: Any = None):
    """Azimuthal medians of ``image`` in rings around (``y``, ``x``).

    Rings are 1 px wide out to 3.5 px, then grow by a factor sqrt(2) (edges 0, 1.5,
    2.5, 3.5, 5, 7, 10, 14, 20, ...); masked and non-finite pixels are left out, and
    so is everything beyond ``rmax``. A median ignores the other sources that cross a
    ring, as long as they cover less than half of it.

    Parameters
    ----------
    image : array_like, shape (ny, nx)
    y, x : float
        Centre in pixels.
    rmax : float
        Outer radius in pixels.
    mask : array_like of bool, optional
        True = excluded.

    Returns
    -------
    radius : ndarray
        Mean radius of the ring's pixels (NaN for an empty ring).
    median : ndarray
        Median of the ring (NaN for an empty ring).
    count : ndarray of int
        Pixels in the ring.

    Examples
    --------
    >>> yy, xx = np.mgrid[:41, :41]
    >>> img = 100.0 / (1.0 + (yy - 20) ** 2 + (xx - 20) ** 2)
    >>> r, med, n = radial_profile(img, 20, 20, 20)
    >>> int(n[0]), float(med[0])
    (9, 50.0)
    """
    img = as_image(image)
    check_positive("rmax", rmax)
    edges = _EDGES[rmax > _EDGES]
    edges = np.append(edges, rmax)
    ny, nx = img.shape
    half = int(math.ceil(rmax))
    y0, y1 = max(0, int(round(y)) - half), min(ny, int(round(y)) + half + 1)
    x0, x1 = max(0, int(round(x)) - half), min(nx, int(round(x)) + half + 1)
    cut = img[y0:y1, x0:x1]
    bad = combine_masks(cut, None if mask is None else as_mask(mask, img.shape)[y0:y1, x0:x1])
    yy, xx = np.ogrid[y0:y1, x0:x1]
    r = np.hypot(yy - y, xx - x)
    ring = np.searchsorted(edges, r, side="right")  # 1 .. len(edges) - 1 inside
    ring[bad | (r >= rmax)] = 0
    nb = edges.size - 1
    index = np.arange(1, nb + 1)
    count = np.bincount(ring.ravel(), minlength=nb + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        radius = np.bincount(ring.ravel(), r.ravel(), minlength=nb + 1)[1:] / count
    median = np.full(nb, np.nan)
    have = count > 0
    if have.any():
        median[have] = ndi.median(cut, labels=ring, index=index[have])
    return radius, median, count


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


def _scalar_noise(rms: Any, res: np.ndarray, invalid: np.ndarray) -> float:
    """One noise value for the whole image: the median of ``rms`` (a scalar, a map, or
    anything with a ``values`` grid such as a CoarseRMS), else the MAD of ``res``."""
    if rms is None:
        v = res[~invalid]
        return _MAD_TO_STD * float(np.median(np.abs(v - np.median(v)))) if v.size else 1.0
    values = getattr(rms, "values", rms)
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    return float(np.median(v)) if v.size else 1.0


@dataclass(frozen=True, kw_only=True)
class HaloMasker:
    """Mask bright sources out to where their measured halos fall below the noise.

    1. Sources: connected regions of the residual above ``seed`` times the noise,
       joined with the masked or non-finite pixels they touch (flagged and NaN cores).
       A region is bright when it peaks above ``nsigma`` times the noise, or saturated:
       a core of masked pixels, or a flat top (at least 5 pixels within half a noise
       sigma, or 0.2%, of the peak).
    2. Halo profile: azimuthal medians (:func:`radial_profile`) around the ``stack``
       brightest sources, out to ``max_radius``. The brightest one's profile defines the
       scale; each other one is scaled onto it by the median ratio over the rings where
       both are measured (above 3 times the ring's noise, outside saturated cores), and
       the profile is the median of the scaled ones ring by ring.
    3. Amplitudes: every bright source's own profile (within 32 px, or 4 times its
       saturated core) is scaled onto the stacked one in the same way.
    4. Radius: where amplitude times profile falls below ``wing`` times the noise
       (interpolated in log-log between rings; beyond the last measured ring the
       profile is extended as the power law of its last two rings), at most
       ``max_radius``.

    Follows the :class:`skymap.masking.Masker` protocol: returns the disks only, without
    the pixels of ``mask``. ``rms`` is the pixel noise: a scalar, a map, or a
    :class:`~skymap.masking.CoarseRMS` (its median is used).

    Parameters
    ----------
    nsigma : float
        Peak above which a source is bright, in noise sigmas.
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

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> yy, xx = np.mgrid[:200, :200]
    >>> star = lambda y, x, a: a * (1 + ((yy - y) ** 2 + (xx - x) ** 2) / 4.0) ** -1.5
    >>> img = rng.normal(size=(200, 200)) + star(60, 60, 5e4) + star(140, 140, 500)
    >>> found = HaloMasker().find(img, 1.0)
    >>> [round(float(r)) for r in found.radius]  # brighter star, wider halo
    [93, 20]
    """

    nsigma: float = 50.0
    seed: float = 10.0
    wing: float = 0.25
    stack: int = 8
    max_radius: float = 256.0
    max_sources: int = 500

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

    #: The pipeline may hand this masker a CoarseRMS (it reads the median only).
    reads_coarse_rms = True

    def reach(self) -> int:
        """Halo in pixels a tile needs around it for :meth:`paint` (the largest radius)."""
        return int(math.ceil(self.max_radius))

    def __call__(self, residual: Any, rms: Any = None, mask: Any = None) -> np.ndarray:
        """Disks around the bright sources (True = masked), without ``mask``'s pixels."""
        res = as_image(residual, "residual")
        given = as_mask(mask, res.shape)
        out = self.paint(self.find(res, rms, given), res.shape)
        if given is not None:
            np.greater(out, given, out=out)
        return out

    # ------------------------------------------------------------------ global step

    def find(self, residual: Any, rms: Any = None, mask: Any = None) -> BrightSources:
        """The bright sources, their halo profile and mask radii (see the class
        docstring). Global, but it reads only the pixels near bright sources."""
        res = as_image(residual, "residual")
        invalid = combine_masks(res, as_mask(mask, res.shape))
        sigma = _scalar_noise(rms, res, invalid)
        rows = self._candidates(res, invalid, sigma)
        if rows is None:
            return self._empty(sigma)
        y, x, peak, core, sat = rows
        order = np.lexsort((-peak, -core))[: self.max_sources]  # saturated, then peak
        y, x, peak, core, sat = y[order], x[order], peak[order], core[order], sat[order]
        radii, profile = self._stacked_profile(res, invalid, sigma, y, x, core)
        if profile is None:
            return self._empty(sigma)
        amp = np.array(
            [
                self._amplitude(res, invalid, sigma, yi, xi, ci, radii, profile)
                for yi, xi, ci in zip(y, x, core, strict=True)
            ]
        )
        ok = np.isfinite(amp) & (amp > 0)
        radius = np.array([self._radius(a, radii, profile, sigma) for a in amp[ok]])
        radius = np.maximum(radius, core[ok] + 1.0) if radius.size else radius
        log.debug(
            "%d bright sources (%d saturated), mask radii %s px",
            int(ok.sum()),
            int(sat[ok].sum()),
            np.round(radius[:10], 1).tolist(),
        )
        return BrightSources(
            x=x[ok],
            y=y[ok],
            amplitude=amp[ok],
            saturated=sat[ok],
            radius=np.minimum(radius, self.max_radius),
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

    def _candidates(self, res, invalid, sigma):
        """(y, x, peak, core radius, saturated) of the bright regions, or None."""
        with np.errstate(invalid="ignore"):
            above = res > self.seed * sigma
        above &= ~invalid
        if not above.any():
            return None
        # Masked pixels that touch a region join it: a NaN or flagged saturated core.
        region = above | (invalid & ndi.binary_dilation(above))
        labels, n = ndi.label(region, structure=np.ones((3, 3), bool))
        # Pull in the whole masked core (it may be wider than one pixel).
        core_lab, ncore = ndi.label(invalid, structure=np.ones((3, 3), bool))
        if ncore:
            touched = np.zeros(ncore + 1, np.int64)
            hit = (labels > 0) & (core_lab > 0)
            touched[core_lab[hit]] = labels[hit]
            sizes = np.bincount(core_lab.ravel(), minlength=ncore + 1)
            # A masked region larger than the largest halo is not a star's core
            # (a border, a chip gap): it does not join.
            small = sizes <= math.pi * self.max_radius**2 / 4.0
            touched[~small] = 0
            touched[0] = 0
            add = touched[core_lab]
            labels = np.where((labels == 0) & (add > 0), add, labels)
        index = np.arange(1, n + 1)
        values = np.where(invalid, -np.inf, res)
        peak = ndi.maximum(values, labels, index)
        masked = ndi.sum_labels(invalid & (labels > 0), labels, index)
        tol = np.maximum(0.5 * sigma, 2e-3 * np.abs(peak))
        near = values >= (np.concatenate([[np.inf], peak - tol]))[labels]
        flat = ndi.sum_labels(near, labels, index)
        sat = (masked > 0) | (flat >= 5)
        bright = (peak > self.nsigma * sigma) | (sat & (peak > self.seed * sigma))
        if not bright.any():
            return None
        keep = index[bright]
        # Saturated centre: the middle of the flat top and masked core; otherwise the
        # peak pixel.
        coremask = (near | invalid) & (labels > 0)
        cy, cx = np.array(ndi.center_of_mass(coremask, labels, keep)).T.reshape(2, -1)
        py, px = np.array(ndi.maximum_position(values, labels, keep), float).T.reshape(2, -1)
        s = sat[bright]
        y, x = np.where(s, cy, py), np.where(s, cx, px)
        area = ndi.sum_labels(coremask, labels, keep)
        core = np.where(s, np.sqrt(area / math.pi), 0.0)
        return y, x, peak[bright], core, s

    def _ring_stats(self, res, invalid, sigma, y, x, rmax, core):
        """(ring radii, ring medians): the medians only over the rings outside the
        saturated core that fall outwards, each above 3 times its noise, up to the
        first that does not (further out, a neighbour's light or the noise)."""
        r, med, n = radial_profile(res, y, x, rmax, invalid)
        with np.errstate(invalid="ignore", divide="ignore"):
            good = (med > 3.0 * _MEDIAN_ERROR * sigma / np.sqrt(n)) & (r > core + 1.0)
        out = np.full(med.shape, np.nan)
        started = False
        for j in range(med.size):
            if not good[j] or (started and med[j] >= out[j - 1]):
                if started:
                    break
                continue
            out[j] = med[j]
            started = True
        return r, out

    def _stacked_profile(self, res, invalid, sigma, y, x, core):
        """(ring radii, profile per unit amplitude) from the ``stack`` brightest."""
        k = min(self.stack, y.size)
        nb = int(np.searchsorted(_EDGES, self.max_radius)) + 1
        radii = np.full(nb, np.nan)
        ref = None
        for i in range(k):
            r, p = self._ring_stats(res, invalid, sigma, y[i], x[i], self.max_radius, core[i])
            m = min(nb, p.size)
            p = np.pad(p[:m], (0, nb - m), constant_values=np.nan)
            r = np.pad(r[:m], (0, nb - m), constant_values=np.nan)
            if ref is None:
                if not np.isfinite(p).any():
                    continue
                amp = 1.0
            else:
                amp = _match(p, ref)
                if not np.isfinite(amp):
                    continue
            radii = np.where(np.isfinite(radii), radii, r)
            # The reference grows where the scaled profile adds rings (a saturated
            # brightest star leaves the core to the fainter ones).
            ref = p / amp if ref is None else np.where(np.isfinite(ref), ref, p / amp)
        if ref is None:
            return radii, None
        # Each ring from the brightest source that measured it (the best measured;
        # a fainter one's outer rings hold its brighter neighbours' halos).
        profile = ref
        # Only a profile that falls outwards can be extended: keep it to the first
        # ring that does not.
        falling = np.concatenate([[True], ~(profile[1:] >= profile[:-1])])
        profile[np.cumsum(~falling) > 0] = np.nan
        return radii, profile

    def _amplitude(self, res, invalid, sigma, y, x, core, radii, profile) -> float:
        rmax = min(self.max_radius, max(32.0, 4.0 * core))
        _, p = self._ring_stats(res, invalid, sigma, y, x, rmax, core)
        m = min(p.size, profile.size)
        return _match(p[:m], profile[:m])

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
            slope = math.log(p[-1] / p[-2]) / math.log(r[-1] / r[-2])
            return float(r[-1] * (level / p[-1]) ** (1.0 / slope))
        return float(self.max_radius)

    # ------------------------------------------------------------------ local step

    def paint(
        self,
        sources: BrightSources,
        shape: tuple[int, int],
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """Disks of the sources' radii (True = masked) over the window ``rows`` x
        ``cols`` (half-open pixel ranges, default the whole ``shape``): local, each
        window needs only the sources within :meth:`reach` of it.

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
        out = np.zeros((y1 - y0, x1 - x0), bool)
        for y, x, r in zip(sources.y, sources.x, sources.radius, strict=True):
            ya, yb = max(y0, int(math.ceil(y - r))), min(y1, int(math.floor(y + r)) + 1)
            xa, xb = max(x0, int(math.ceil(x - r))), min(x1, int(math.floor(x + r)) + 1)
            if ya >= yb or xa >= xb:
                continue
            yy, xx = np.ogrid[ya:yb, xa:xb]
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] |= (yy - y) ** 2 + (xx - x) ** 2 <= r * r
        return out


def _match(p: np.ndarray, ref: np.ndarray) -> float:
    """Median ratio ``p / ref`` over the rings where both are measured (NaN if none)."""
    m = min(p.size, ref.size)
    a, b = p[:m], ref[:m]
    ok = np.isfinite(a) & np.isfinite(b) & (b > 0)
    if not ok.any():
        return float("nan")
    return float(np.median(a[ok] / b[ok]))
