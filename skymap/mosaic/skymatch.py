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
smooth distortion the error is second order in ``grid_step``). Images without a WCS (or
whose WCS has no celestial axes) must already sit on one pixel grid (same shape, NaN or
mask where an image has no data).

Sky gradients (``model='plane'`` or ``'poly2'``)
------------------------------------------------
Each image (or exposure) then gets a polynomial sky in its own normalised pixel frame
(:mod:`skymap.mosaic.skymodel`): ``a + b*u + c*v``, plus ``u**2, u*v, v**2`` terms for
'poly2'; an exposure's model lives in the frame of its first image. Each overlap is cut
into cells of ``cell_size`` pixels of the first image (narrower across a narrow overlap,
so that there are two cells across it, three for 'poly2'); in each cell both images are
clipped on their own and the clipped statistic of their pixel differences is one
equation, at the cell's mean model terms in each image's frame. All cells of all
overlaps are solved together by weighted least squares. The statistic 'mean' is the
most precise here (common sources cancel in the difference, the clipping removes what is
left; 'mode' costs a factor of about 1.9 in noise), and the only one exact for a model
that curves within a cell.

*The free common model.* Overlaps fix the models only up to one model common to all
images on the sky. As 'match' does for offsets, each group's reference exposure gets a
sky of zero everywhere, and every other model is relative to it: the reference is the
exposure with the lowest (``match_down=True``; highest otherwise) sky at its centre once
the others are relative to it. 'global+match' then adds one constant, the smallest
difference between an exposure's local sky and its matched sky at its centre.

*Small overlaps.* A pair constrains the full model when its overlap gives at least 3
cells ('poly2': 6) with at least ``min_pixels`` valid pixel pairs each and is at least
``cell_size / 2`` pixels wide ('poly2': ``3 * cell_size``), the width being that of the
rectangle with the same second moments as the overlap's pixels. A smaller overlap with
at least ``min_pixels`` valid pairs falls back to one offset equation (the two models'
mean difference over the overlap) with a warning naming the pairs; with 'poly2' it is
refused with a ValueError stating the minimum size. If the remaining equations leave a
model free, a ValueError names the images and the overlaps that were too small.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.nddata import NDData
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from skymap._inputs import read_image
from skymap._validate import as_image, check_choice, check_positive
from skymap.mosaic import skymodel
from skymap.mosaic.overlaps import (
    EFFICIENCY,
    Frame,
    candidate_pairs,
    clip_sample,
    clipped_statistic,
    flatten,
    nanmin,
    overlap_samples,
    parallel_map,
    prepare,
)

__all__ = ["SkyMatch", "SkyMatchResult", "match", "clipped_statistic"]

log = logging.getLogger(__name__)

METHODS = ("local", "global", "match", "global+match")
STATISTICS = ("mode", "median", "mean")
APPROACHES = ("difference", "separate")
DISJOINT = ("global", "local", "raise")
WEIGHTINGS = ("inverse_variance", "npix", "uniform")


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
    model : {'offset', 'plane', 'poly2'}
        The sky of each image (or exposure), in its own pixel frame: a constant, a plane
        ``a + b*u + c*v`` or a quadratic (see :mod:`skymap.mosaic.skymodel` for the normalised
        coordinates ``u, v``). Planes and quadratics need a 'match'-type method and the
        'difference' approach; see the module docstring.
    cell_size : int
        'plane'/'poly2': side in pixels of the cells into which each overlap is cut;
        each cell with at least ``min_pixels`` usable pixel pairs gives one equation.

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
    model: str = "offset"
    cell_size: int = 32

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        check_choice("statistic", self.statistic, STATISTICS)
        check_choice("approach", self.approach, APPROACHES)
        check_choice("disjoint", self.disjoint, DISJOINT)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_choice("model", self.model, skymodel.MODELS)
        if self.model != "offset" and "match" not in self.method:
            raise ValueError(
                f"model={self.model!r} needs method 'match' or 'global+match' (the sky "
                f"shape comes from the overlaps); got method={self.method!r}"
            )
        if self.model != "offset" and self.approach != "difference":
            raise ValueError(
                f"model={self.model!r} needs approach='difference'; got {self.approach!r}"
            )
        for name in ("match_down", "subtract"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("lower", "upper"):
            v = getattr(self, name)
            if v is not None and not np.isfinite(_as_float(name, v)):
                raise ValueError(f"{name} must be a finite number or None, got {v!r}")
        if self.lower is not None and self.upper is not None and self.lower >= self.upper:
            raise ValueError(f"lower must be < upper, got lower={self.lower}, upper={self.upper}")
        for name, lo in (
            ("nclip", 0),
            ("min_pixels", 1),
            ("grid_step", 1),
            ("n_threads", 1),
            ("cell_size", 4),
        ):
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
        frames, exposures = prepare(images, exposures)
        n_img = len(frames)
        exp_of = np.empty(n_img, dtype=np.intp)
        for e, members in enumerate(exposures):
            exp_of[members] = e
        n_exp = len(exposures)
        if self.model != "offset":
            return self._run_model(images, frames, exposures, exp_of)

        pairs, delta, error, npix = _measure_pairs(frames, exp_of, self)
        groups = _components(n_img, pairs, exp_of, exposures)

        need_local = self._need_local(groups)
        local = self._local_skies(frames, exposures) if need_local else np.full(n_exp, np.nan)
        do_match = "match" in self.method
        if do_match:
            exp_sky = self._solve(pairs, delta, error, npix, exp_of, n_exp, groups, local)
            if self.method == "global+match":
                exp_sky = exp_sky + nanmin(local - exp_sky)
        elif self.method == "global":
            exp_sky = np.full(n_exp, nanmin(local))
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
            out_images = [_subtract(img, s) for img, s in zip(flatten(images), sky, strict=True)]
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
            coefficients=sky[:, None],
            shapes=[f.data.shape for f in frames],
        )

    def _local_skies(self, frames, exposures) -> np.ndarray:
        # An exposure's sky is the smallest of its members' skies, as in the original:
        # a detector full of nebula should not raise the sky of its clean neighbours.
        stats = parallel_map(lambda f: self._stat(f.data[f.valid]), frames, self.n_threads)
        per_image = np.array([r[0] for r in stats])
        out = np.full(len(exposures), np.nan)
        for e, members in enumerate(exposures):
            out[e] = nanmin(per_image[members])
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
        self._check_disjoint(groups)
        # Each group's free constant: its reference image (lowest for match_down,
        # highest otherwise) gets 0, as a single connected mosaic would.
        for members in _exposure_groups(groups, exp_of):
            part = rel[members]
            rel[members] = part - (part.min() if self.match_down else part.max())
            if self.disjoint == "local" and len(groups) > 1:
                # The group's own baseline: its global sky once matched.
                rel[members] += nanmin(local[members] - rel[members])
        if len(groups) > 1:
            log.info("tied %d disjoint groups with the %r rule", len(groups), self.disjoint)
        ref = np.nanmin(rel) if self.match_down else np.nanmax(rel)
        return rel - ref

    def _check_disjoint(self, groups):
        if len(groups) > 1 and self.disjoint == "raise":
            raise ValueError(
                f"images form {len(groups)} groups that do not overlap one another: "
                f"{groups}; their skies cannot be matched. Pass disjoint='global' (same "
                "baseline sky for every group) or disjoint='local' (each group keeps its "
                "own measured sky), or match each group separately"
            )

    def _need_local(self, groups) -> bool:
        # Plain 'match' needs the local skies only to give disjoint groups their own
        # baselines; they cost one pass of the statistic over every image.
        return self.method != "match" or (len(groups) > 1 and self.disjoint == "local")

    def _run_model(self, images, frames, exposures, exp_of) -> SkyMatchResult:
        """'plane'/'poly2': cell equations over every overlap, one model per exposure."""
        model, n_exp = self.model, len(exposures)
        eqs = _measure_cells(frames, exposures, exp_of, self)
        small = [q for q in eqs if not q.full]
        if small and model == "poly2":
            q = small[0]
            raise ValueError(
                f"model='poly2' needs every overlap to give at least {_MIN_CELLS[model]} cells "
                f"of {self.cell_size}x{self.cell_size} pixels with >= {self.min_pixels} "
                f"valid pixel pairs each, and to be at least {_min_width(self)} pixels "
                f"wide; images {q.i} and {q.j} overlap in {q.n_cells} such cells, "
                f"{q.width:.0f} pixels wide. Use model='plane' or a smaller cell_size"
            )
        if small:
            warnings.warn(
                "these overlaps are too small to constrain a plane (it needs >= "
                f"{_MIN_CELLS[model]} cells of {self.cell_size}x{self.cell_size} pixels with "
                f">= {self.min_pixels} valid pixel pairs each, and >= {_min_width(self)} "
                "pixels of width), so each only matches the two images' mean skies: "
                + "; ".join(
                    f"images {q.i} and {q.j} ({q.n_cells} cells, {q.width:.0f} px wide)"
                    for q in small
                ),
                RuntimeWarning,
                stacklevel=3,
            )
        eqs = [q for q in eqs if q.delta.size]
        pairs = np.array([(q.i, q.j) for q in eqs], dtype=np.intp).reshape(-1, 2)
        groups = _components(len(frames), pairs, exp_of, exposures)
        self._check_disjoint(groups)
        exp_groups = _exposure_groups(groups, exp_of)
        row_pair = np.concatenate([np.full(q.delta.size, k) for k, q in enumerate(eqs)] + [[]])
        row_pair = row_pair.astype(np.intp)
        ti = _stack([q.ti for q in eqs], self)
        tj = _stack([q.tj for q in eqs], self)
        delta = np.concatenate([q.delta for q in eqs] + [[]])
        error = np.concatenate([q.error for q in eqs] + [[]])
        npix = np.concatenate([q.npix for q in eqs] + [np.empty(0, np.int64)])
        ea, eb = exp_of[pairs[row_pair, 0]], exp_of[pairs[row_pair, 1]]
        weight = _weights(self.weighting, error, npix)

        def solve(refs):
            coef, cov, bad = skymodel.solve_models(
                ea, eb, ti, tj, delta, weight, n_exp=n_exp, references=refs
            )
            if bad:
                members = sorted(i for e in bad for i in exposures[e])
                named = [f"({q.i}, {q.j})" for q in small if {q.i, q.j} & set(members)]
                raise ValueError(
                    f"the overlaps do not constrain the {model} sky of images {members}"
                    + (f"; too small for it: the overlaps {', '.join(named)}" if named else "")
                    + ". Use model='offset' (or 'plane' instead of 'poly2')"
                )
            return coef, cov

        # The free common model: as for offsets, the exposure with the lowest (highest)
        # sky at its centre becomes the reference, with a sky of zero everywhere. Which
        # one that is depends on the reference (the others' gradients change with it),
        # so re-solve until the reference is the lowest, or a choice comes back.
        pick = np.argmin if self.match_down else np.argmax
        refs, seen = [int(g[0]) for g in exp_groups], []
        while refs not in seen:
            seen.append(refs)
            coef, cov = solve(refs)
            refs = [int(g[pick(coef[g, 0])]) for g in exp_groups]
        sky_error = self._sky_errors(cov, frames, exp_of, cells_std=error * np.sqrt(npix))
        local = (
            self._local_skies(frames, exposures)
            if self._need_local(groups)
            else np.full(n_exp, np.nan)
        )
        if self.disjoint == "local" and len(groups) > 1:
            base = [nanmin(local[g] - coef[g, 0]) for g in exp_groups]
            for g, b in zip(exp_groups, base, strict=True):
                coef[g, 0] += b
            coef[:, 0] -= nanmin(base) if self.match_down else -nanmin(-np.array(base))
        if self.method == "global+match":
            coef[:, 0] += nanmin(local - coef[:, 0])
        empty = [e for e, m in enumerate(exposures) if not any(frames[i].valid.any() for i in m)]
        if empty:
            coef[empty] = np.nan
            warnings.warn(
                f"no sky could be computed for images {[exposures[e] for e in empty]} (no "
                "valid pixels); their sky is NaN and they are left unchanged",
                RuntimeWarning,
                stacklevel=3,
            )
        fitted = np.einsum("rk,rk->r", ti, coef[ea]) - np.einsum("rk,rk->r", tj, coef[eb])
        residual = delta - fitted
        ok = np.isfinite(residual) & (error > 0)
        dof = max(int(ok.sum()) - (n_exp - len(groups)) * coef.shape[1], 1)
        chi2 = float(np.sum((residual[ok] / error[ok]) ** 2) / dof) if ok.any() else np.nan
        # Per-pair summaries: inverse-variance means (zero errors floored, as in the fit).
        w = _weights("inverse_variance", error, npix)
        sums = [
            np.bincount(row_pair, weights=x, minlength=len(eqs))
            for x in (w, w * delta, w * residual, npix)
        ]
        image_coef = _image_coefficients(coef, frames, exposures, model)
        out_images = None
        if self.subtract:
            out_images = [
                _subtract(item, skymodel.sky_map(c, f.data.shape, model))
                for item, c, f in zip(flatten(images), image_coef, frames, strict=True)
            ]
        return SkyMatchResult(
            sky=image_coef[:, 0].copy(),
            groups=groups,
            exposures=[list(m) for m in exposures],
            local_sky=local[exp_of],
            pairs=pairs,
            pair_delta=sums[1] / sums[0],
            pair_error=1.0 / np.sqrt(sums[0]),
            pair_npix=sums[3].astype(np.int64),
            pair_residual=sums[2] / sums[0],
            reduced_chi2=chi2,
            images=out_images,
            config=self,
            coefficients=image_coef,
            shapes=[f.data.shape for f in frames],
            pair_cells=np.array([q.delta.size if q.full else 0 for q in eqs], dtype=np.intp),
            sky_error=sky_error,
        )

    def _sky_errors(self, cov, frames, exp_of, cells_std) -> np.ndarray | None:
        """Predicted RMS error of each image's sky map relative to its group's reference
        (None unless the weights are inverse variances). For 'poly2', warns when it
        exceeds the pixel noise, as on overlaps that are narrow for the images. (Plane
        errors also grow with the distance from the reference, like a random walk,
        without the map being poorly constrained where it matters: near its
        neighbours.)"""
        if self.weighting != "inverse_variance":
            return None
        err = np.array(
            [
                skymodel.map_error(cov[e], f.data.shape, self.model)
                for f, e in zip(frames, exp_of, strict=True)
            ]
        )
        # The pixel noise: the scatter of a cell's differences is sqrt(2) sigma.
        sigma = np.median(cells_std) / EFFICIENCY[self.statistic] / np.sqrt(2.0)
        poor = np.flatnonzero(err > sigma)
        if poor.size and np.isfinite(sigma) and self.model == "poly2":
            warnings.warn(
                f"the overlaps constrain the {self.model} skies of images {poor.tolist()} "
                f"poorly: their predicted error is up to {err.max() / sigma:.2g} times the "
                "pixel noise. Use a lower-order model or images that overlap more widely",
                RuntimeWarning,
                stacklevel=4,
            )
        return err


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
    coefficients : ndarray, shape (n_images, n_terms)
        Each image's sky model in its own normalised pixel frame (see
        :mod:`skymap.mosaic.skymodel`): ``[sky]`` for 'offset', ``[a, b, c]`` for 'plane'
        (``a + b*u + c*v``), ``[a, b, c, d, e, f]`` for 'poly2' (``... + d*u**2 + e*u*v
        + f*v**2``). ``a`` is the sky at the image centre and equals :attr:`sky`.
    shapes : list of tuple
        Shape of each image, for :meth:`sky_map`.
    sky_error : ndarray or None
        'plane'/'poly2' with inverse-variance weights: predicted RMS error over each
        image's pixels of its sky map, relative to its group's reference, from the
        least-squares covariance (each image's own block; images of one exposure share
        it). None otherwise.
    pair_cells : ndarray of int or None
        'plane'/'poly2': cell equations each pair gave (0 where the overlap was too
        small and gave one offset equation); None for 'offset'. The ``pair_*`` values
        are then inverse-variance means over the pair's equations.
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
    coefficients: np.ndarray
    shapes: list[tuple[int, int]]
    pair_cells: np.ndarray | None = None
    sky_error: np.ndarray | None = None

    def sky_map(self, i: int) -> np.ndarray:
        """Full-resolution float64 map of image ``i``'s fitted sky (computed on demand:
        one array the size of the image). Constant for 'offset'; NaN where no sky could
        be computed.

        Examples
        --------
        >>> a = np.zeros((20, 30)); b = np.ones((20, 30))
        >>> match([a, b], method="match", statistic="mean").sky_map(1)[0, :3]
        array([1., 1., 1.])
        """
        i = int(i)
        if not -len(self.shapes) <= i < len(self.shapes):
            raise ValueError(f"i must be an image index in [0, {len(self.shapes)}), got {i}")
        return skymodel.sky_map(self.coefficients[i], self.shapes[i], self.config.model)


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


def _measure_pairs(frames, exp_of, cfg: SkyMatch):
    ii, jj = candidate_pairs(frames)
    keep = exp_of[ii] != exp_of[jj]
    pairs, delta, error, npix = [], [], [], []
    todo = list(zip(ii[keep].tolist(), jj[keep].tolist(), strict=True))
    measured = parallel_map(
        lambda ij: _pair_difference(frames[ij[0]], frames[ij[1]], cfg), todo, cfg.n_threads
    )
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


def _pair_difference(fi: Frame, fj: Frame, cfg: SkyMatch) -> tuple[float, float, int]:
    """Measured ``sky_i - sky_j`` in the overlap of two frames, its error and pixel count."""
    vi, vj, kept_var = overlap_samples(fi, fj, cfg.grid_step)
    if vi.size == 0:
        return np.nan, np.nan, 0
    if cfg.approach == "difference":
        return _difference_statistic(vi, vj, kept_var, cfg)
    # The original's way: each image's own pixels in the common region.
    wj = overlap_samples(fj, fi, cfg.grid_step)[0]
    si, ei, ni = cfg._stat(vi)
    sj, ej, nj = cfg._stat(wj)
    if min(ni, nj) < cfg.min_pixels:
        return np.nan, np.nan, min(ni, nj)
    return si - sj, float(np.hypot(ei, ej)), min(ni, nj)


def _difference_statistic(vi, vj, kept_var, cfg: SkyMatch) -> tuple[float, float, int]:
    """``approach='difference'``: statistic of ``vi - vj`` over pixels kept in both."""
    # Clip each image's own values first (lower/upper, then nclip passes), and keep
    # the pixels that survive in both: a source is then dropped from both images at
    # once, even where resampling has left a residual of it in the difference.
    keep = np.ones(vi.size, dtype=bool)
    for v in (vi, vj):
        _, _, _, lo, hi = clip_sample(v, cfg.lower, cfg.upper, cfg.nclip, cfg.lsigma, cfg.usigma)
        keep &= (v >= lo) & (v <= hi)
    if keep.sum() < cfg.min_pixels:
        return np.nan, np.nan, int(keep.sum())
    value, error, n = cfg._stat(vi[keep].astype(np.float64) - vj[keep], limits=False)
    # Resampling smooths j's noise: the scatter of the differences shows only
    # sigma_i^2 + kept_var * sigma_j^2, while the mean still carries all of
    # sigma_j^2 (each j pixel keeps a total weight of one). With equal noise in both
    # images the variance of the statistic is 2 / (1 + kept_var) times the naive one.
    return value, error * np.sqrt(2.0 / (1.0 + kept_var)), n


# ----------------------------------------------------------------------------- models

# A pair constrains the full model when its overlap gives at least this many cell
# equations and is at least _min_width pixels wide; otherwise it only matches offsets.
_MIN_CELLS = {"plane": 3, "poly2": 6}


def _min_width(cfg: SkyMatch) -> int:
    # A plane needs two rows of cells across the overlap, a quadratic three.
    return cfg.cell_size // 2 if cfg.model == "plane" else 3 * cfg.cell_size


@dataclass(frozen=True, kw_only=True, eq=False)
class _PairEquations:
    i: int
    j: int
    full: bool  # cell equations (True) or one offset equation over the whole overlap
    n_cells: int
    width: float
    ti: np.ndarray  # (n, n_terms) mean model terms in i's exposure frame
    tj: np.ndarray
    delta: np.ndarray
    error: np.ndarray
    npix: np.ndarray


def _frame_maps(frames, exposures):
    """For each image, a function (y, x) -> (u, v) into its exposure's model frame: the
    normalised pixel frame of the exposure's first image."""
    maps = [None] * len(frames)
    for members in exposures:
        ref = frames[members[0]]
        for i in members:
            f = frames[i]
            if i == members[0] or f.wcs is None:
                maps[i] = lambda y, x, shape=ref.data.shape: skymodel.frame_coords(x, y, shape)
            else:

                def to_ref(y, x, f=f, ref=ref):
                    xr, yr = ref.wcs.world_to_pixel_values(*f.wcs.pixel_to_world_values(x, y))
                    return skymodel.frame_coords(xr, yr, ref.data.shape)

                maps[i] = to_ref
    return maps


def _measure_cells(frames, exposures, exp_of, cfg: SkyMatch) -> list[_PairEquations]:
    ii, jj = candidate_pairs(frames)
    keep = exp_of[ii] != exp_of[jj]
    todo = list(zip(ii[keep].tolist(), jj[keep].tolist(), strict=True))
    maps = _frame_maps(frames, exposures)
    out = parallel_map(lambda ij: _pair_equations(frames, maps, *ij, cfg), todo, cfg.n_threads)
    return [q for q in out if q is not None]


def _pair_equations(frames, maps, i, j, cfg: SkyMatch) -> _PairEquations | None:
    vi, vj, kept_var, pos = overlap_samples(frames[i], frames[j], cfg.grid_step, True)
    if vi.size < cfg.min_pixels:
        return None
    cells = skymodel.overlap_cells(
        vi,
        vj,
        pos[0],
        pos[1],
        cell_size=cfg.cell_size,
        statistic=cfg.statistic,
        efficiency=EFFICIENCY[cfg.statistic],
        lower=cfg.lower,
        upper=cfg.upper,
        nclip=cfg.nclip,
        lsigma=cfg.lsigma,
        usigma=cfg.usigma,
        min_pixels=cfg.min_pixels,
        kept_var=kept_var,
        across=2 if cfg.model == "plane" else 3,
    )
    ui, vi_ = maps[i](pos[0], pos[1])
    uj, vj_ = maps[j](pos[2], pos[3])
    common = {"i": i, "j": j, "n_cells": cells.n_valid, "width": cells.width}
    if cells.n_valid >= _MIN_CELLS[cfg.model] and cells.width >= _min_width(cfg):
        ok = np.isfinite(cells.value)
        return _PairEquations(
            full=True,
            ti=cells.term_means(ui, vi_, cfg.model)[ok],
            tj=cells.term_means(uj, vj_, cfg.model)[ok],
            delta=cells.value[ok],
            error=cells.error[ok],
            npix=cells.npix[ok],
            **common,
        )
    d, e, n = _difference_statistic(vi, vj, kept_var, cfg)
    ok = n >= cfg.min_pixels and np.isfinite(d)
    return _PairEquations(
        full=False,
        ti=skymodel.terms(ui, vi_, cfg.model).mean(axis=0, keepdims=True)[: int(ok)],
        tj=skymodel.terms(uj, vj_, cfg.model).mean(axis=0, keepdims=True)[: int(ok)],
        delta=np.array([d])[: int(ok)],
        error=np.array([e])[: int(ok)],
        npix=np.array([n], dtype=np.int64)[: int(ok)],
        **common,
    )


def _stack(parts, cfg: SkyMatch) -> np.ndarray:
    return np.concatenate(parts + [np.empty((0, skymodel.N_TERMS[cfg.model]))])


def _image_coefficients(coef, frames, exposures, model) -> np.ndarray:
    """Each image's model in its own frame. An image that is not its exposure's first
    has its exposure's model refitted on a grid of its pixels mapped through the WCS
    (exact when the mapping between the two pixel grids is affine)."""
    out = np.empty((len(frames), coef.shape[1]))
    maps = _frame_maps(frames, exposures)
    for e, members in enumerate(exposures):
        for i in members:
            f = frames[i]
            if i == members[0] or f.wcs is None:
                out[i] = coef[e]
                continue
            ny, nx = f.data.shape
            yy, xx = np.meshgrid(
                np.linspace(0, ny - 1, 9), np.linspace(0, nx - 1, 9), indexing="ij"
            )
            sky = skymodel.terms(*maps[i](yy.ravel(), xx.ravel()), model) @ coef[e]
            own = skymodel.terms(
                *skymodel.frame_coords(xx.ravel(), yy.ravel(), f.data.shape), model
            )
            out[i] = np.linalg.lstsq(own, sky, rcond=None)[0]
    return out


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
    """A copy of ``item`` minus ``sky`` (a number or a map; NaN: left unchanged)."""
    if not np.all(np.isfinite(sky)):
        sky = 0.0
    if isinstance(item, NDData):
        data = as_image(item.data)
        new = _minus(data, sky)
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
    return inp.wrap(_minus(inp.data, sky))


def _minus(data, sky):
    if np.ndim(sky) == 0:
        return (data - data.dtype.type(sky)).astype(data.dtype, copy=False)
    return (data - sky).astype(data.dtype, copy=False)
