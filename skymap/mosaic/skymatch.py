"""Sky levels across overlapping images: 'local', 'global', 'match' and 'global+match'.

A mosaic is made of images whose sky levels differ (different exposures, detectors,
times). :func:`match` measures those levels and, for 'match', equalises them from the
differences measured where images overlap, so that the mosaic shows no steps.

* **local**: each image (or exposure, see ``exposures``) alone, over all its valid pixels.
* **global**: the smallest of the local skies, given to every image.
* **match**: for each pair of overlapping images, one equation ``sky_a - sky_b = d``
  with ``d`` measured in the overlap only; the equations are solved by weighted least
  squares. The skies are relative: the lowest (``match_down=True``) or the highest
  (``match_down=False``) is set to zero.
* **global+match**: 'match', then the global sky of the matched images is added, so that
  the skies are absolute again.

Beyond the JWST/stcal original this module finds the connected groups of overlapping
images (the original silently leaves disjoint subsets unmatched), reports them in
:attr:`SkyMatchResult.groups`, matches within each, then ties the groups together (one
baseline for all, or each its own) or refuses, as ``disjoint`` says. The equations are
weighted by their uncertainty (overlap size and scatter), and every equation's residual
is reported. By default a pair's difference is the statistic of the pixel-by-pixel
difference of the two images, so that sources common to both cancel.

Overlaps come from each image's WCS (any APE-14 WCS, e.g. :class:`astropy.wcs.WCS`): the
pixels of one image are mapped into the other through the sky on a coarse grid, which is
interpolated bilinearly to every pixel (exact for translations and affine maps; for a
smooth distortion the error is second order in ``grid_step``). Images without a WCS must
already sit on one pixel grid (same shape, NaN or mask where an image has no data).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from astropy.nddata import NDData
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from skymap._inputs import read_image
from skymap._validate import as_image, check_choice, check_positive
from skymap.mosaic import _skymatch_kernels as _k

__all__ = ["SkyMatch", "SkyMatchResult", "match", "clipped_statistic"]

log = logging.getLogger(__name__)

METHODS = ("local", "global", "match", "global+match")
STATISTICS = ("mode", "median", "mean")
APPROACHES = ("difference", "separate")
DISJOINT = ("global", "local", "raise")
WEIGHTINGS = ("inverse_variance", "npix", "uniform")

# Standard error of each statistic for Gaussian data, in units of sigma / sqrt(n):
# mean 1; median sqrt(pi/2); mode = 2.5 median - 1.5 mean, whose variance is
# 6.25 (pi/2) + 2.25 - 7.5 (the covariance of mean and median is sigma^2 / n).
_EFFICIENCY = {
    "mean": 1.0,
    "median": float(np.sqrt(np.pi / 2)),
    "mode": float(np.sqrt(6.25 * np.pi / 2 + 2.25 - 7.5)),
}
# A bilinear weight below this does not let a masked neighbour spoil the sample: WCS
# round trips put integer shifts a hair off the grid.
_WEIGHT_EPS = 1e-3


def clipped_statistic(
    values: np.ndarray,
    *,
    statistic: str = "mode",
    lower: float | None = None,
    upper: float | None = None,
    nclip: int = 5,
    lsigma: float = 4.0,
    usigma: float = 4.0,
) -> tuple[float, float, int]:
    """Sky statistic of a 1-D sample with the original skymatch's clipping rules.

    Values outside ``[lower, upper]`` are dropped first. Then, ``nclip`` times, the mean
    and standard deviation (ddof=1) of the values inside the current limits are computed
    and the limits become ``[mean - lsigma*std, mean + usigma*std]`` (never wider than
    ``[lower, upper]``); each pass selects from the whole sample, as stsci.imagestats
    does. The statistic is taken from the final selection.

    Parameters
    ----------
    values : ndarray
        The sample (any shape; NaN must already be removed).
    statistic : {'mode', 'median', 'mean'}
        'mode' is Pearson's estimate ``2.5 median - 1.5 mean`` (SExtractor's factors),
        far less noisy than the histogram peak of stsci.imagestats.
    lower, upper : float or None
        Hard limits on usable values, in the units of the data.
    nclip : int
        Number of clipping passes (0 = none).
    lsigma, usigma : float
        Lower and upper clipping limits in standard deviations.

    Returns
    -------
    value : float
        The statistic (NaN when no value survives).
    error : float
        Its standard error for Gaussian data, ``efficiency * std / sqrt(n)``.
    n : int
        Number of values used.

    Examples
    --------
    >>> x = np.r_[np.zeros(99), 1000.0]
    >>> clipped_statistic(x, statistic="mean", nclip=1)[::2]
    (0.0, 99)
    """
    x = np.ascontiguousarray(np.asarray(values).ravel())
    n, mean, std, lo, hi = _clip(x, lower, upper, nclip, lsigma, usigma)
    if n == 0:
        return np.nan, np.nan, 0
    if statistic == "mean":
        value = mean
    else:
        median = float(np.median(_k.select_within(x, lo, hi)))
        value = median if statistic == "median" else 2.5 * median - 1.5 * mean
    error = _EFFICIENCY[statistic] * std / np.sqrt(n) if n > 1 else np.inf
    return float(value), float(error), int(n)


def _clip(x, lower, upper, nclip, lsigma, usigma):
    """Count, mean, std and final limits of the clipping in :func:`clipped_statistic`."""
    base_lo = -np.inf if lower is None else float(lower)
    base_hi = np.inf if upper is None else float(upper)
    lo, hi = base_lo, base_hi
    if x.size == 0:
        return 0, np.nan, np.nan, lo, hi
    shift = float(x[x.size // 2]) if np.isfinite(x[x.size // 2]) else 0.0
    n, mean, std, vmin, vmax = _k.moments_within(x, lo, hi, shift)
    for _ in range(nclip):
        if n == 0:
            break
        lo = max(base_lo, mean - lsigma * std)
        hi = min(base_hi, mean + usigma * std)
        prev = (n, vmin, vmax)
        n, mean, std, vmin, vmax = _k.moments_within(x, lo, hi, shift)
        # Same count and same extremes means the same selection: further passes cannot
        # change anything, so stop early (a speed-up only).
        if (n, vmin, vmax) == prev:
            break
    return n, mean, std, lo, hi


@dataclass(frozen=True, kw_only=True)
class SkyMatch:
    """Configuration of sky matching; :meth:`run` applies it to a list of images.

    Parameters
    ----------
    method : {'global+match', 'local', 'global', 'match'}
        See the module docstring.
    match_down : bool
        For 'match'-type methods: True sets the lowest relative sky to zero (skies are
        subtracted from the brighter images), False sets the highest to zero.
    subtract : bool
        Return sky-subtracted copies in :attr:`SkyMatchResult.images`. Inputs are never
        modified.
    statistic : {'mode', 'median', 'mean'}
        Sky statistic, see :func:`clipped_statistic`.
    lower, upper : float or None
        Hard limits on usable pixel values (data units).
    nclip : int
        Clipping passes.
    lsigma, usigma : float
        Clipping limits in standard deviations.
    approach : {'difference', 'separate'}
        How a pair's sky difference is measured in its overlap. 'difference': each
        image's values there are clipped (``lower``/``upper``, then ``nclip`` passes),
        the pixels that survive in both are kept, and the statistic is taken of their
        pixel-by-pixel difference (the second image resampled bilinearly onto the
        first), so that sources common to both cancel. 'separate': the original's way,
        the statistic of each image's own pixels in the overlap, then the difference.
    disjoint : {'global', 'local', 'raise'}
        What to do when the images fall into several groups that do not overlap one
        another. Each group is matched on its own; then 'global' treats the groups as
        the 'global' method treats images, giving every group the same baseline (its
        reference image gets the same sky in all groups); 'local' gives each group its
        own baseline, the global sky of that group alone; 'raise' raises ValueError
        naming the groups.
    weighting : {'inverse_variance', 'npix', 'uniform'}
        Weights of the pair equations in the least squares: ``1/error**2`` (overlap size
        and scatter), the number of pixels used, or equal.
    min_pixels : int
        Overlaps with fewer usable pixels give no equation.
    grid_step : int
        Spacing (pixels) of the grid on which the WCS is evaluated exactly; positions in
        between are interpolated bilinearly.
    n_threads : int or None
        Threads over images and overlaps (None = one per CPU). Results do not depend on
        it.

    Examples
    --------
    >>> SkyMatch(method="match", statistic="median").method
    'match'
    """

    method: str = "global+match"
    match_down: bool = True
    subtract: bool = False
    statistic: str = "mode"
    lower: float | None = None
    upper: float | None = None
    nclip: int = 5
    lsigma: float = 4.0
    usigma: float = 4.0
    approach: str = "difference"
    disjoint: str = "global"
    weighting: str = "inverse_variance"
    min_pixels: int = 25
    grid_step: int = 16
    n_threads: int | None = None

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        check_choice("statistic", self.statistic, STATISTICS)
        check_choice("approach", self.approach, APPROACHES)
        check_choice("disjoint", self.disjoint, DISJOINT)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        for name in ("match_down", "subtract"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("lower", "upper"):
            v = getattr(self, name)
            if v is not None and not np.isfinite(_as_float(name, v)):
                raise ValueError(f"{name} must be a finite number or None, got {v!r}")
        if self.lower is not None and self.upper is not None and self.lower >= self.upper:
            raise ValueError(f"lower must be < upper, got lower={self.lower}, upper={self.upper}")
        for name, lo in (("nclip", 0), ("min_pixels", 1), ("grid_step", 1), ("n_threads", 1)):
            v = getattr(self, name)
            if name == "n_threads" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        check_positive("lsigma", self.lsigma)
        check_positive("usigma", self.usigma)

    def run(
        self, images: Sequence[Any], *, exposures: Sequence[Sequence[int]] | None = None
    ) -> SkyMatchResult:
        """Measure (and optionally subtract) the sky of ``images``; see :func:`match`."""
        frames, exposures = _prepare(images, exposures)
        n_img = len(frames)
        exp_of = np.empty(n_img, dtype=np.intp)
        for e, members in enumerate(exposures):
            exp_of[members] = e
        n_exp = len(exposures)

        pairs, delta, error, npix = _measure_pairs(frames, exp_of, self)
        groups = _components(n_img, pairs, exp_of, exposures)

        # Plain 'match' needs the local skies only to give disjoint groups their own
        # baselines; they cost one pass of the statistic over every image.
        need_local = self.method != "match" or (len(groups) > 1 and self.disjoint == "local")
        local = self._local_skies(frames, exposures) if need_local else np.full(n_exp, np.nan)
        do_match = "match" in self.method
        if do_match:
            exp_sky = self._solve(pairs, delta, error, npix, exp_of, n_exp, groups, local)
            if self.method == "global+match":
                exp_sky = exp_sky + _nanmin(local - exp_sky)
        elif self.method == "global":
            exp_sky = np.full(n_exp, _nanmin(local))
        else:
            exp_sky = local
        if not np.all(np.isfinite(exp_sky)):
            bad = [m for e, m in enumerate(exposures) if not np.isfinite(exp_sky[e])]
            warnings.warn(
                f"no sky could be computed for images {bad} (no valid pixels or overlaps); "
                "their sky is NaN and they are left unchanged",
                RuntimeWarning,
                stacklevel=3,
            )
        ea, eb = exp_of[pairs[:, 0]], exp_of[pairs[:, 1]]
        residual = delta - (exp_sky[ea] - exp_sky[eb])
        ok = np.isfinite(residual) & (error > 0)
        dof = max(int(ok.sum()) - (n_exp - len(groups)), 1)
        chi2 = float(np.sum(residual[ok] ** 2 / error[ok] ** 2) / dof) if ok.any() else np.nan
        sky = exp_sky[exp_of]
        out_images = None
        if self.subtract:
            out_images = [_subtract(img, s) for img, s in zip(_flat(images), sky, strict=True)]
        return SkyMatchResult(
            sky=sky,
            groups=groups,
            exposures=[list(m) for m in exposures],
            local_sky=local[exp_of],
            pairs=pairs,
            pair_delta=delta,
            pair_error=error,
            pair_npix=npix,
            pair_residual=residual,
            reduced_chi2=chi2,
            images=out_images,
            config=self,
        )

    def _local_skies(self, frames, exposures) -> np.ndarray:
        # An exposure's sky is the smallest of its members' skies, as in the original:
        # a detector full of nebula should not raise the sky of its clean neighbours.
        per_image = np.array(
            [r[0] for r in _map(lambda f: self._stat(f.data[f.valid]), frames, self)]
        )
        out = np.full(len(exposures), np.nan)
        for e, members in enumerate(exposures):
            out[e] = _nanmin(per_image[members])
        return out

    def _stat(self, values, *, limits: bool = True):
        # limits=False for pixel differences: lower/upper bound pixel values, and were
        # applied to both images' pixels before differencing.
        return clipped_statistic(
            values,
            statistic=self.statistic,
            lower=self.lower if limits else None,
            upper=self.upper if limits else None,
            nclip=self.nclip,
            lsigma=self.lsigma,
            usigma=self.usigma,
        )

    def _solve(self, pairs, delta, error, npix, exp_of, n_exp, groups, local) -> np.ndarray:
        w = _weights(self.weighting, error, npix)
        ok = np.isfinite(delta) & (w > 0) & np.isfinite(w)
        ea, eb = exp_of[pairs[ok, 0]], exp_of[pairs[ok, 1]]
        sw = np.sqrt(w[ok])
        a = np.zeros((int(ok.sum()), n_exp))
        rows = np.arange(a.shape[0])
        a[rows, ea] = sw
        a[rows, eb] = -sw
        # The minimum-norm solution fixes each group's free constant: it sums to zero
        # over the group, whatever the weights.
        rel = np.linalg.lstsq(a, sw * delta[ok], rcond=None)[0] if a.size else np.zeros(n_exp)
        if len(groups) > 1 and self.disjoint == "raise":
            raise ValueError(
                f"images form {len(groups)} groups that do not overlap one another: "
                f"{groups}; their skies cannot be matched. Pass disjoint='global' (same "
                "baseline sky for every group) or disjoint='local' (each group keeps its "
                "own measured sky), or match each group separately"
            )
        # Each group's free constant: its reference image (lowest for match_down,
        # highest otherwise) gets 0, as a single connected mosaic would.
        for members in _exposure_groups(groups, exp_of):
            part = rel[members]
            rel[members] = part - (part.min() if self.match_down else part.max())
            if self.disjoint == "local" and len(groups) > 1:
                # The group's own baseline: its global sky once matched.
                rel[members] += _nanmin(local[members] - rel[members])
        if len(groups) > 1:
            log.info("tied %d disjoint groups with the %r rule", len(groups), self.disjoint)
        ref = np.nanmin(rel) if self.match_down else np.nanmax(rel)
        return rel - ref


def _nanmin(x) -> float:
    """Smallest finite value of ``x``, or NaN (without numpy's all-NaN warning)."""
    x = np.asarray(x)
    finite = x[np.isfinite(x)]
    return float(finite.min()) if finite.size else np.nan


def _as_float(name, v):
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number or None, got {v!r}") from None


def _weights(weighting, error, npix):
    if weighting == "inverse_variance":
        err = np.where(np.isfinite(error), error, np.inf)
        # A noise-free overlap has zero error: give it the largest weight seen rather
        # than an infinite one (or none at all when every overlap is noise-free).
        positive = err[(err > 0) & np.isfinite(err)]
        floor = positive.min() if positive.size else 1.0
        return 1.0 / np.maximum(err, floor) ** 2
    if weighting == "npix":
        return npix.astype(float)
    return np.ones(len(npix))


def _exposure_groups(groups, exp_of):
    return [np.unique(exp_of[g]) for g in groups]


@dataclass(frozen=True, kw_only=True, eq=False)
class SkyMatchResult:
    """Skies measured by :func:`match`.

    Attributes
    ----------
    sky : ndarray, shape (n_images,)
        Sky of each image (flattened input order), in data units. Relative for 'match'
        (the reference is 0), absolute otherwise. NaN where no sky could be computed.
    groups : list of list of int
        Connected groups of images (indices): images are linked when their overlap gave
        an equation, or when they belong to one exposure.
    exposures : list of list of int
        The images that share one sky (one unknown).
    local_sky : ndarray, shape (n_images,)
        The 'local' sky of each image's exposure, over all its valid pixels (NaN for
        'match', which does not need it, unless ``disjoint='local'`` did).
    pairs : ndarray, shape (n_pairs, 2)
        Image indices ``(a, b)`` of each measured overlap.
    pair_delta : ndarray
        Measured ``sky_a - sky_b`` in the overlap.
    pair_error : ndarray
        Standard error of ``pair_delta``, from the scatter and the pixel count, for
        Gaussian noise; with resampling it allows for the smoothing of the resampled
        image's noise, assuming both images have the same noise.
    pair_npix : ndarray
        Pixels used by each measurement.
    pair_residual : ndarray
        ``pair_delta - (sky[a] - sky[b])``: how well each equation is satisfied.
    reduced_chi2 : float
        ``sum((residual / error)**2)`` over the equations divided by the degrees of
        freedom; near 1 when the errors are honest and the skies are constant.
    images : list or None
        With ``subtract=True``, sky-subtracted copies (same types as the input,
        flattened); otherwise None.
    config : SkyMatch
        The configuration that made this result.
    """

    sky: np.ndarray
    groups: list[list[int]]
    exposures: list[list[int]]
    local_sky: np.ndarray
    pairs: np.ndarray
    pair_delta: np.ndarray
    pair_error: np.ndarray
    pair_npix: np.ndarray
    pair_residual: np.ndarray
    reduced_chi2: float
    images: list | None
    config: SkyMatch


def match(
    images: Sequence[Any],
    *,
    method: str = "global+match",
    match_down: bool = True,
    subtract: bool = False,
    statistic: str = "mode",
    lower: float | None = None,
    upper: float | None = None,
    nclip: int = 5,
    lsigma: float = 4.0,
    usigma: float = 4.0,
    exposures: Sequence[Sequence[int]] | None = None,
    **options: Any,
) -> SkyMatchResult:
    """Compute, and optionally subtract, the sky of overlapping images.

    Parameters
    ----------
    images : list
        Each item is an :class:`astropy.nddata.NDData` (``data``, ``mask`` with True =
        bad, ``wcs``) or a 2-D array, or a list/tuple of these that share one sky (the
        detectors of one exposure). Either every image has a WCS, or none has and all
        share one pixel grid (same shape). NaN and inf pixels are excluded.
    method : {'global+match', 'local', 'global', 'match'}
        See the module docstring.
    match_down : bool
        'match' methods: bring brighter skies down to the lowest (True) or up to the
        highest (False).
    subtract : bool
        Also return sky-subtracted copies (inputs are never modified).
    statistic : {'mode', 'median', 'mean'}
        Sky statistic (see :func:`clipped_statistic`).
    lower, upper : float or None
        Hard limits on usable pixel values.
    nclip : int
        Clipping passes.
    lsigma, usigma : float
        Clipping limits in standard deviations.
    exposures : list of list of int, optional
        Indices (into the flattened ``images``) of images that share one sky. Not
        allowed together with nested ``images``.
    **options
        Further :class:`SkyMatch` fields: ``approach``, ``disjoint``, ``weighting``,
        ``min_pixels``, ``grid_step``, ``n_threads``.

    Returns
    -------
    SkyMatchResult

    Notes
    -----
    Cost: one pass of the statistic per image ('local' sky), plus, per overlapping pair,
    WCS calls on a ``grid_step`` grid and one resampling of the overlap. Pairs are
    found from the images' footprints on a tangent plane, so the cost grows with the
    number of overlaps, not with the square of the number of images. The least squares
    problem is dense in the number of exposures (fine up to a few thousand).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a = np.full((50, 80), np.nan)
    >>> b = np.full((50, 80), np.nan)
    >>> a[:, :50] = 10 + rng.normal(size=(50, 50))
    >>> b[:, 30:] = 13 + rng.normal(size=(50, 50))
    >>> res = match([a, b], method="match", statistic="mean")
    >>> np.round(res.sky, 1)
    array([0., 3.])
    >>> res.groups
    [[0, 1]]
    """
    cfg = SkyMatch(
        method=method,
        match_down=match_down,
        subtract=subtract,
        statistic=statistic,
        lower=lower,
        upper=upper,
        nclip=nclip,
        lsigma=lsigma,
        usigma=usigma,
        **options,
    )
    return cfg.run(images, exposures=exposures)


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True, kw_only=True, eq=False)
class _Frame:
    data: np.ndarray
    valid: np.ndarray
    wcs: Any
    # Footprint bounding box: pixel rows/cols on the common grid (no WCS) or a box on the
    # tangent plane (WCS), as (y0, y1, x0, x1).
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    border: np.ndarray | None = None  # (2, n) world coordinates of the outline


def _flat(images):
    out = []
    for item in images:
        if isinstance(item, list | tuple):
            out.extend(item)
        else:
            out.append(item)
    return out


def _prepare(images, exposures):
    if isinstance(images, np.ndarray | NDData) or not isinstance(images, Sequence):
        raise TypeError("images must be a list of NDData or 2-D arrays (or lists of them)")
    nested = any(isinstance(item, list | tuple) for item in images)
    flat = _flat(images)
    if not flat:
        raise ValueError("images must contain at least one image")
    if nested and exposures is not None:
        raise ValueError("exposures cannot be given when images is nested; use one or the other")
    if nested:
        exposures, k = [], 0
        for item in images:
            size = len(item) if isinstance(item, list | tuple) else 1
            if size == 0:
                raise ValueError("images must not contain an empty group")
            exposures.append(list(range(k, k + size)))
            k += size
    elif exposures is None:
        exposures = [[i] for i in range(len(flat))]
    else:
        exposures = [[int(i) for i in m] for m in exposures]
        seen = sorted(i for m in exposures for i in m)
        if seen != list(range(len(flat))) or any(len(m) == 0 for m in exposures):
            raise ValueError(
                "exposures must list every image index 0..n-1 exactly once, in non-empty "
                f"groups; got {exposures} for {len(flat)} images"
            )
    frames = []
    for i, item in enumerate(flat):
        # arrays, MaskedArrays, Quantities, NDData/CCDData alike (masks ORed in)
        inp = read_image(item, name=f"images[{i}]")
        data, mask, wcs = inp.data, inp.mask, inp.wcs
        valid = np.isfinite(data)
        if mask is not None:
            valid &= ~mask
        frames.append(_Frame(data=data, valid=valid, wcs=_low_level(wcs)))
    has_wcs = [f.wcs is not None for f in frames]
    if any(has_wcs) and not all(has_wcs):
        raise ValueError(
            "either every image must have a WCS or none (then all share one pixel grid); "
            f"images without WCS: {[i for i, h in enumerate(has_wcs) if not h]}"
        )
    if all(has_wcs):
        frames = _tangent_boxes(frames)
    else:
        shapes = {f.data.shape for f in frames}
        if len(shapes) > 1:
            raise ValueError(
                "images without a WCS must share one pixel grid (one shape); got shapes "
                f"{sorted(shapes)}"
            )
        frames = [replace(f, box=_valid_box(f.valid)) for f in frames]
    return frames, exposures


def _low_level(wcs):
    if wcs is None:
        return None
    return getattr(wcs, "low_level_wcs", wcs)


def _valid_box(valid):
    rows = np.flatnonzero(valid.any(axis=1))
    cols = np.flatnonzero(valid.any(axis=0))
    if rows.size == 0:
        return (0.0, -1.0, 0.0, -1.0)
    return (float(rows[0]), float(rows[-1]), float(cols[0]), float(cols[-1]))


def _outline(shape, step=64):
    """Pixel (x, y) points along the outer edge of an image, corners included."""
    ny, nx = shape
    xs = np.linspace(-0.5, nx - 0.5, max(2, int(np.ceil(nx / step)) + 1))
    ys = np.linspace(-0.5, ny - 0.5, max(2, int(np.ceil(ny / step)) + 1))
    x = np.concatenate([xs, np.full(ys.size, nx - 0.5), xs[::-1], np.full(ys.size, -0.5)])
    y = np.concatenate([np.full(xs.size, -0.5), ys, np.full(xs.size, ny - 0.5), ys[::-1]])
    return x, y


def _unit(lon, lat):
    lon, lat = np.radians(lon), np.radians(lat)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)])


def _tangent_boxes(frames):
    borders = []
    for f in frames:
        x, y = _outline(f.data.shape)
        lon, lat = f.wcs.pixel_to_world_values(x, y)
        borders.append(np.array([lon, lat], dtype=float))
    vecs = [_unit(b[0], b[1]) for b in borders]
    centre = np.sum([np.nanmean(v, axis=1) for v in vecs], axis=0)
    centre /= np.linalg.norm(centre)
    # Gnomonic projection about the mosaic's centre: great circles become straight lines,
    # so a box around the projected outline contains the whole footprint.
    east = np.cross([0.0, 0.0, 1.0], centre)
    if np.linalg.norm(east) < 1e-12:
        east = np.array([0.0, 1.0, 0.0])
    east /= np.linalg.norm(east)
    north = np.cross(centre, east)
    out = []
    for f, b, v in zip(frames, borders, vecs, strict=True):
        z = centre @ v
        if np.any(z <= 0):
            raise ValueError("images span more than a hemisphere; cannot place them on one plane")
        u, w = (east @ v) / z, (north @ v) / z
        # A WCS may return NaN outside its valid region: such points bound nothing.
        box = (_nanmin(w), -_nanmin(-w), _nanmin(u), -_nanmin(-u))
        out.append(replace(f, box=box, border=b))
    return out


# ----------------------------------------------------------------------------- overlaps


def _candidate_pairs(frames):
    box = np.array([f.box for f in frames])
    y0, y1, x0, x1 = box.T
    tol = 1e-9 * max(1.0, float(np.nanmax(np.abs(box))))
    hit = (
        (y0[:, None] <= y1[None, :] + tol)
        & (y0[None, :] <= y1[:, None] + tol)
        & (x0[:, None] <= x1[None, :] + tol)
        & (x0[None, :] <= x1[:, None] + tol)
    )
    ii, jj = np.nonzero(np.triu(hit, k=1))
    return ii, jj


def _measure_pairs(frames, exp_of, cfg: SkyMatch):
    ii, jj = _candidate_pairs(frames)
    keep = exp_of[ii] != exp_of[jj]
    pairs, delta, error, npix = [], [], [], []
    todo = list(zip(ii[keep].tolist(), jj[keep].tolist(), strict=True))
    measured = _map(lambda ij: _pair_difference(frames[ij[0]], frames[ij[1]], cfg), todo, cfg)
    for (i, j), (d, e, n) in zip(todo, measured, strict=True):
        if n >= cfg.min_pixels and np.isfinite(d):
            pairs.append((i, j))
            delta.append(d)
            error.append(e)
            npix.append(n)
    return (
        np.array(pairs, dtype=np.intp).reshape(-1, 2),
        np.array(delta, dtype=float),
        np.array(error, dtype=float),
        np.array(npix, dtype=np.int64),
    )


def _map(fn, items, cfg: SkyMatch) -> list:
    """``[fn(x) for x in items]``, spread over ``cfg.n_threads`` threads (the kernels and
    numpy's selection release the GIL); the order of the results is kept."""
    n = cfg.n_threads if cfg.n_threads is not None else (os.cpu_count() or 1)
    if n <= 1 or len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(n, len(items))) as pool:
        return list(pool.map(fn, items))


def _pair_difference(fi: _Frame, fj: _Frame, cfg: SkyMatch) -> tuple[float, float, int]:
    """Measured ``sky_i - sky_j`` in the overlap of two frames, its error and pixel count."""
    vi, vj, kept_var = _overlap_samples(fi, fj, cfg.grid_step)
    if vi.size == 0:
        return np.nan, np.nan, 0
    if cfg.approach == "difference":
        # Clip each image's own values first (lower/upper, then nclip passes), and keep
        # the pixels that survive in both: a source is then dropped from both images at
        # once, even where resampling has left a residual of it in the difference.
        keep = np.ones(vi.size, dtype=bool)
        for v in (vi, vj):
            _, _, _, lo, hi = _clip(v, cfg.lower, cfg.upper, cfg.nclip, cfg.lsigma, cfg.usigma)
            keep &= (v >= lo) & (v <= hi)
        if keep.sum() < cfg.min_pixels:
            return np.nan, np.nan, int(keep.sum())
        value, error, n = cfg._stat(vi[keep].astype(np.float64) - vj[keep], limits=False)
        # Resampling smooths j's noise: the scatter of the differences shows only
        # sigma_i^2 + kept_var * sigma_j^2, while the mean still carries all of
        # sigma_j^2 (each j pixel keeps a total weight of one). With equal noise in both
        # images the variance of the statistic is 2 / (1 + kept_var) times the naive one.
        return value, error * np.sqrt(2.0 / (1.0 + kept_var)), n
    # The original's way: each image's own pixels in the common region.
    wj = _overlap_samples(fj, fi, cfg.grid_step)[0]
    si, ei, ni = cfg._stat(vi)
    sj, ej, nj = cfg._stat(wj)
    if min(ni, nj) < cfg.min_pixels:
        return np.nan, np.nan, min(ni, nj)
    return si - sj, float(np.hypot(ei, ej)), min(ni, nj)


def _overlap_samples(fi: _Frame, fj: _Frame, step: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Values of frame i at its valid pixels inside frame j, j's values there, and the
    fraction of j's noise variance that survives the resampling (1 without it).

    Without WCS the frames share one grid. With WCS, i's pixels are mapped into j and j
    is sampled bilinearly (exactly, when the mapping lands on j's pixel centres).
    """
    if fi.wcs is None:
        y0 = int(max(fi.box[0], fj.box[0]))
        y1 = int(min(fi.box[1], fj.box[1]))
        x0 = int(max(fi.box[2], fj.box[2]))
        x1 = int(min(fi.box[3], fj.box[3]))
        if y1 < y0 or x1 < x0:
            return np.empty(0), np.empty(0), 1.0
        sl = (slice(y0, y1 + 1), slice(x0, x1 + 1))
        ok = fi.valid[sl] & fj.valid[sl]
        return fi.data[sl][ok], fj.data[sl][ok], 1.0
    region = _region_in(fi, fj)
    if region is None:
        return np.empty(0), np.empty(0), 1.0
    y0, y1, x0, x1 = region
    gy = np.linspace(y0, max(y1, y0 + 1), max(2, int(np.ceil((y1 - y0) / step)) + 1))
    gx = np.linspace(x0, max(x1, x0 + 1), max(2, int(np.ceil((x1 - x0) / step)) + 1))
    xx, yy = np.meshgrid(gx, gy)
    world = fi.wcs.pixel_to_world_values(xx.ravel(), yy.ravel())
    cx, cy = fj.wcs.world_to_pixel_values(*world)
    cx = np.asarray(cx, dtype=float).reshape(xx.shape)
    cy = np.asarray(cy, dtype=float).reshape(xx.shape)
    return _k.overlap_samples(
        fi.data,
        fi.valid,
        fj.data,
        fj.valid,
        y0,
        y1,
        x0,
        x1,
        gy[0],
        gy[1] - gy[0],
        gx[0],
        gx[1] - gx[0],
        cy,
        cx,
        _WEIGHT_EPS,
    )


def _region_in(fi: _Frame, fj: _Frame):
    """Pixel box (y0, y1, x0, x1) of frame i that can overlap frame j, or None."""
    x, y = fi.wcs.world_to_pixel_values(fj.border[0], fj.border[1])
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    good = np.isfinite(x) & np.isfinite(y)
    if not good.any():
        return None
    ny, nx = fi.data.shape
    # One pixel of margin: the outline is sampled, and its edges may bow slightly.
    x0 = max(int(np.floor(x[good].min())) - 1, 0)
    x1 = min(int(np.ceil(x[good].max())) + 1, nx - 1)
    y0 = max(int(np.floor(y[good].min())) - 1, 0)
    y1 = min(int(np.ceil(y[good].max())) + 1, ny - 1)
    if x1 < x0 or y1 < y0:
        return None
    return y0, y1, x0, x1


# ----------------------------------------------------------------------------- groups


def _components(n_img, pairs, exp_of, exposures):
    # Edges: measured overlaps, plus a chain through each exposure's members.
    src = [pairs[:, 0]] if pairs.size else []
    dst = [pairs[:, 1]] if pairs.size else []
    for members in exposures:
        if len(members) > 1:
            src.append(np.asarray(members[:-1]))
            dst.append(np.asarray(members[1:]))
    if src:
        s, d = np.concatenate(src), np.concatenate(dst)
    else:
        s = d = np.empty(0, dtype=np.intp)
    graph = coo_matrix((np.ones(s.size), (s, d)), shape=(n_img, n_img))
    n_comp, labels = connected_components(graph, directed=False)
    groups = [np.flatnonzero(labels == c).tolist() for c in range(n_comp)]
    return sorted(groups, key=lambda g: g[0])


# ----------------------------------------------------------------------------- output


def _subtract(item, sky):
    if not np.isfinite(sky):
        sky = 0.0
    if isinstance(item, NDData):
        data = as_image(item.data)
        new = (data - data.dtype.type(sky)).astype(data.dtype, copy=False)
        return NDData(
            new,
            mask=None if item.mask is None else np.array(item.mask, copy=True),
            wcs=item.wcs,
            uncertainty=item.uncertainty,
            meta=dict(item.meta),
            unit=item.unit,
            psf=item.psf,
        )
    inp = read_image(item)
    data = inp.data
    return inp.wrap((data - data.dtype.type(sky)).astype(data.dtype, copy=False))
