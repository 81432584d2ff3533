"""Mesh background: tile the image, measure each tile, filter the grid, interpolate.

:class:`MeshBackground` is the engine every other skymap estimator builds on. It cuts the
image into boxes ("meshes") of ``box_size`` pixels, estimates the background level and
RMS of each from its unmasked pixels (sigma clipping, then a location and a scale
estimator), excludes meshes with too few usable pixels, fills those holes from their
neighbours, median-filters the grid of meshes and interpolates it to full resolution.

Two presets reproduce the reference implementations:

- :meth:`MeshBackground.like_photutils`: photutils 3.x ``Background2D`` (its defaults,
  edge padding, hole filling, selective filter and bicubic zoom);
- :meth:`MeshBackground.like_sextractor`: SExtractor's background (its histogram mode,
  mesh filter with threshold and bicubic spline; Bertin & Arnouts 1996).

Conventions: arrays are (y, x); masks are True where a pixel is excluded; NaN and inf
pixels are excluded automatically; inputs are never modified. The maps follow the
image's float dtype (integer input gives float32).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal

import numpy as np

from skymap._inputs import ImageInput, read_image
from skymap._util import cut_window
from skymap._validate import as_mask, as_pair, check_choice, check_range
from skymap.background import _mesh_kernels as _k
from skymap.background.interpolate import (
    Interpolator,
    MeshGeometry,
    SExtractorSpline,
    ZoomSpline,
    fill_holes,
)
from skymap.background.model import MapMethods
from skymap.stats import estimators as _stats

__all__ = ["MeshBackground", "MeshResult", "SExtractorHistogram"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SExtractorHistogram(_stats._SExtractorParameters):
    """SExtractor's joint background and RMS estimate of a mesh.

    Unlike a clip-then-estimate pair, SExtractor clips on a histogram: the mean and
    sigma of the mesh's valid pixels, again within mean +- 2 sigma, then a histogram
    spanning +- 5 of those sigmas (about one bin per pixel, at most 4096 bins) that is
    clipped at +- 3 sigma around its median until sigma settles. The level is
    ``median_factor * median - mean_factor * mean`` of the clipped histogram, or its
    median when ``|mean - median| / sigma >= skew_limit`` (a crowded mesh); the RMS is
    the clipped histogram's sigma. Use it as ``MeshBackground(estimator=...)`` with
    ``sigma_clip=None`` and ``rms_estimator=None``.

    Parameters
    ----------
    median_factor : float
        Weight of the median in the mode estimate (2.5; SExtractor >= 2.28 offers 3.5).
    mean_factor : float or None
        Weight of the mean; None means ``median_factor - 1``.
    skew_limit : float
        Switch to the median when ``|mean - median| / sigma`` reaches this.

    Notes
    -----
    One deliberate difference from SEP (and, we believe, SExtractor): a mesh with at
    most one pixel inside its 2-sigma cut (say a 1x1 corner mesh left by a box that
    almost divides the image) has a one-bin histogram, which SEP turns into twice the
    pixel value; here its level is the pixel value.

    References
    ----------
    Bertin, E. & Arnouts, S. 1996, A&AS 117, 393 (section 2.1),
    https://doi.org/10.1051/aas:1996164.

    Examples
    --------
    >>> MeshBackground(estimator=SExtractorHistogram(), sigma_clip=None,
    ...                rms_estimator=None).estimator
    SExtractorHistogram(median_factor=2.5, mean_factor=None, skew_limit=0.3)
    """


def _default_clip():
    return _stats.SigmaClip(sigma=3.0, maxiters=10)


# Meshes of halo for an interpolator without a ``window`` method, evaluated per tile:
# interpolants are global but a node's influence decays geometrically (by ~0.27 per mesh
# for cubic B-splines), so 24 meshes leave ~1e-14 of the grid's range.
DEFAULT_HALO = 24


@dataclass(frozen=True, kw_only=True)
class MeshBackground:
    """Configuration of a mesh background estimate; :meth:`fit` applies it.

    The defaults are those of photutils 3.x ``Background2D``. Each field is validated
    on construction; bad values raise ``ValueError`` naming the field.

    Parameters
    ----------
    box_size : int or (int, int)
        Mesh size ``(by, bx)`` in pixels. Must not exceed the image.
    filter_size : int or (int, int)
        Size in meshes of the median filter applied to the grid; odd. 1 disables it.
    filter_threshold : float or None
        Selective filtering; its meaning depends on ``filter_rule``. None filters every
        mesh.
    filter_rule : {"photutils", "sextractor"}
        ``"photutils"``: only meshes whose (hole-filled) level is above
        ``filter_threshold`` are filtered, and windows are cut at the grid edge
        (NaN padding). ``"sextractor"``: a mesh is replaced by its window median where
        ``|median - value| >= filter_threshold``, and windows shrink symmetrically at
        the edges (a corner mesh keeps its value). Both maps follow the level's choice.
    exclude_percentile : float in [0, 100]
        A mesh whose share of unusable pixels reaches this percentage is excluded and
        filled from its neighbours (see ``exclusion_rule``).
    exclusion_rule : {"photutils", "sextractor"}
        ``"photutils"``: pixels rejected by the sigma clip count as unusable, and a mesh
        is kept only if strictly more than ``(1 - p/100)`` of its area survive.
        ``"sextractor"``: only masked and non-finite pixels count, and a mesh is kept if
        at least ``(1 - p/100)`` of its area is valid.
    edge_method : {"pad", "shrink"}
        Images whose size is not a multiple of the box end in partial meshes.
        ``"pad"`` (photutils) measures their unusable share against the full box, as
        if the image were padded with masked pixels, so thin edge meshes are usually
        excluded and filled. ``"shrink"`` (SExtractor) measures it against the
        partial mesh's own area.
    hole_fill : {"idw", "nearest"}
        How excluded meshes are filled before filtering: inverse-distance weights over
        the 10 nearest valid meshes (photutils) or the mean of the nearest valid meshes
        (SExtractor); see :func:`skymap.interpolate.fill_holes`.
    sigma_clip : skymap.stats.SigmaClip, astropy.stats.SigmaClip or None
        Clipping of each mesh before estimating; default ``SigmaClip(3, maxiters=10)``.
    estimator : location estimator, name, photutils estimator or SExtractorHistogram
        Background level of a mesh (default: SExtractor's mode, ``2.5 median - 1.5
        mean``). See :func:`skymap.stats.as_location`.
    rms_estimator : scale estimator, name, photutils RMS estimator or None
        RMS of a mesh (default: standard deviation). None is required with
        :class:`SExtractorHistogram`, which gives its own RMS.
    interpolator : Interpolator
        Grid to full resolution (default :class:`~skymap.interpolate.ZoomSpline` of
        order 3, photutils'). See :mod:`skymap.interpolate`.
    fill_value : float
        Value of both maps where ``coverage_mask`` is True.
    stats_precision : {"float64", "input"}
        Arithmetic of the built-in estimators on a float32 image. ``"float64"``: sums
        in float64, the accurate choice. ``"input"``: numpy's float32 arithmetic
        (pairwise float32 sums, float32 mode formula), which is what photutils computes
        on float32 data; it reproduces photutils' float32 results to the last bit
        instead of differing by its float32 rounding (~1e-6 to 1e-5 of the RMS when the
        sky level is 10 to 100 times the RMS). float64 images are unaffected.

    Notes
    -----
    Built-in clip/estimator combinations (our ``SigmaClip`` with mean or median centre
    and std or MAD width; ``Mean``, ``Median``, ``SExtractorMode``, ``ModeEstimator``,
    ``MMM``; ``StdDev``, ``MADStd``; and ``SExtractorHistogram``) run in one compiled
    pass over the image, parallel over meshes, holding no copy of the image. Other
    estimators go through the generic path, which stacks the meshes into a (mesh,
    pixel) array (about two extra copies of the image).

    References
    ----------
    Bertin, E. & Arnouts, S. 1996, A&AS 117, 393 (SExtractor's background),
    https://doi.org/10.1051/aas:1996164.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> image = 10.0 + rng.normal(size=(128, 128))
    >>> result = MeshBackground(box_size=32).fit(image)
    >>> result.mesh_background.shape
    (4, 4)
    >>> bool(abs(result.global_background - 10.0) < 0.1)
    True
    """

    box_size: int | tuple[int, int] = 64
    filter_size: int | tuple[int, int] = 3
    filter_threshold: float | None = None
    filter_rule: Literal["photutils", "sextractor"] = "photutils"
    exclude_percentile: float = 10.0
    exclusion_rule: Literal["photutils", "sextractor"] = "photutils"
    edge_method: Literal["pad", "shrink"] = "pad"
    hole_fill: Literal["idw", "nearest"] = "idw"
    sigma_clip: Any = field(default_factory=_default_clip)
    estimator: Any = field(default_factory=_stats.SExtractorMode)
    rms_estimator: Any = field(default_factory=_stats.StdDev)
    interpolator: Interpolator = field(default_factory=ZoomSpline)
    fill_value: float = 0.0
    stats_precision: Literal["float64", "input"] = "float64"

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("box_size", as_pair("box_size", self.box_size))
        fs = as_pair("filter_size", self.filter_size)
        if fs[0] % 2 == 0 or fs[1] % 2 == 0:
            raise ValueError(f"filter_size must be odd along both axes, got {self.filter_size!r}")
        put("filter_size", fs)
        if self.filter_threshold is not None:
            try:
                t = float(self.filter_threshold)
            except (TypeError, ValueError):
                t = np.nan
            if not np.isfinite(t):
                raise ValueError(
                    f"filter_threshold must be None or a finite number, "
                    f"got {self.filter_threshold!r}"
                )
            put("filter_threshold", t)
        check_choice("filter_rule", self.filter_rule, ("photutils", "sextractor"))
        check_range("exclude_percentile", self.exclude_percentile, 0.0, 100.0)
        put("exclude_percentile", float(self.exclude_percentile))
        check_choice("exclusion_rule", self.exclusion_rule, ("photutils", "sextractor"))
        check_choice("edge_method", self.edge_method, ("pad", "shrink"))
        check_choice("hole_fill", self.hole_fill, ("idw", "nearest"))
        check_choice("stats_precision", self.stats_precision, ("float64", "input"))
        histogram = self.estimator == "sextractor-histogram" or isinstance(
            self.estimator, SExtractorHistogram
        )
        if histogram:
            put(
                "estimator",
                SExtractorHistogram() if isinstance(self.estimator, str) else self.estimator,
            )
            if self.sigma_clip is not None:
                raise ValueError(
                    "sigma_clip must be None with estimator=SExtractorHistogram, which clips "
                    "its own histogram"
                )
            if self.rms_estimator is not None:
                raise ValueError(
                    "rms_estimator must be None with estimator=SExtractorHistogram, which "
                    "gives its own RMS"
                )
        else:
            put("sigma_clip", _stats.as_sigma_clip(self.sigma_clip))
            put("estimator", _stats.as_location(self.estimator))
            rms = _stats.StdDev() if self.rms_estimator is None else self.rms_estimator
            put("rms_estimator", _stats.as_scale(rms))
        if not callable(self.interpolator):
            raise ValueError(
                "interpolator must follow skymap.interpolate.Interpolator "
                f"(ZoomSpline, IDW, SExtractorSpline, ...), got {self.interpolator!r}"
            )
        try:
            fv = float(self.fill_value)
        except (TypeError, ValueError):
            raise ValueError(f"fill_value must be a number, got {self.fill_value!r}") from None
        put("fill_value", fv)

    # ------------------------------------------------------------------ presets

    @classmethod
    def like_photutils(cls, box_size, **overrides) -> MeshBackground:
        """photutils 3.x ``Background2D(data, box_size)`` with its defaults.

        ``SExtractorBackground`` level, ``StdBackgroundRMS``, ``SigmaClip(sigma=3,
        maxiters=10)``, ``exclude_percentile=10``, ``filter_size=3`` (no threshold), edge
        meshes padded, holes filled by IDW, bicubic ``zoom`` clipped to the mesh range,
        and float32 images measured in float32 arithmetic as photutils does
        (``stats_precision="input"``). Any field can be overridden by keyword.

        Examples
        --------
        >>> MeshBackground.like_photutils(50, exclude_percentile=20).box_size
        (50, 50)
        """
        base = {
            "box_size": box_size,
            "filter_size": 3,
            "filter_threshold": None,
            "filter_rule": "photutils",
            "exclude_percentile": 10.0,
            "exclusion_rule": "photutils",
            "edge_method": "pad",
            "hole_fill": "idw",
            "sigma_clip": _default_clip(),
            "estimator": _stats.SExtractorMode(),
            "rms_estimator": _stats.StdDev(),
            "interpolator": ZoomSpline(order=3),
            "stats_precision": "input",
        }
        return cls(**{**base, **overrides})

    @classmethod
    def like_sextractor(cls, box_size=64, filter_size=3, **overrides) -> MeshBackground:
        """SExtractor's background (``BACK_SIZE``, ``BACK_FILTERSIZE``,
        ``BACK_FILTTHRESH`` 0 by default).

        :class:`SExtractorHistogram` level and RMS per mesh, meshes with less than half
        their area valid excluded and filled from the nearest valid meshes, the
        thresholded median filter with shrinking edge windows, and SExtractor's exact
        bicubic spline (:class:`~skymap.interpolate.SExtractorSpline`). Any field can be
        overridden by keyword (``filter_threshold`` plays ``BACK_FILTTHRESH``).

        Examples
        --------
        >>> MeshBackground.like_sextractor(32).interpolator
        SExtractorSpline(exact=True)
        """
        base = {
            "box_size": box_size,
            "filter_size": filter_size,
            "filter_threshold": 0.0,
            "filter_rule": "sextractor",
            "exclude_percentile": 50.0,
            "exclusion_rule": "sextractor",
            "edge_method": "shrink",
            "hole_fill": "nearest",
            "sigma_clip": None,
            "estimator": SExtractorHistogram(),
            "rms_estimator": None,
            "interpolator": SExtractorSpline(exact=True),
        }
        return cls(**{**base, **overrides})

    def replace(self, **changes) -> MeshBackground:
        """A copy with some fields changed (and validated)."""
        return replace(self, **changes)

    # ---------------------------------------------------------------------- fit

    def tile_unit(self, shape) -> tuple[int, int]:
        """Tiles align to the mesh grid, so no mesh straddles two tiles."""
        return self.box_size

    def fit_on(self, backend, mask, *, start_scale=None, min_scale=None) -> MeshResult:
        """:meth:`fit` through an array back end (:mod:`skymap.backends`), as the
        pipeline calls it: in memory :meth:`fit` itself; tiled, the per-mesh
        statistics of every tile (aligned to the mesh grid by :meth:`tile_unit`, so
        exact) finished on the whole grid in the driver, and the maps evaluated per
        window (equal to the in-memory maps to rounding, or bit for bit with
        :class:`~skymap.background.interpolate.IDW`). ``start_scale`` and
        ``min_scale`` do not apply.
        """
        if not backend.tiled:
            return self.fit(backend.image, mask)
        shape = backend.shape
        by, bx = self.box_size
        if by > shape[0] or bx > shape[1]:
            raise ValueError(f"box_size {self.box_size} must not exceed the image shape {shape}")
        stats = backend.cell_grid(_tile_stats, [backend.image, mask], self.box_size, 4, mesh=self)
        geometry = MeshGeometry(box_size=self.box_size, image_shape=shape)
        nvalid, ngood = stats[2].astype(np.int64), stats[3].astype(np.int64)
        return self.finish(
            stats[0], stats[1], nvalid, ngood, geometry, dtype=backend.dtype, coverage_mask=None
        )

    def fit(self, image, mask=None, coverage_mask=None) -> MeshResult:
        """Estimate the mesh background of ``image``.

        Parameters
        ----------
        image : array_like (ny, nx)
            Real-valued image. NaN and inf pixels are excluded. Not modified.
        mask : array_like of bool (ny, nx), optional
            True where a pixel must not be used (sources, bad pixels). Masked pixels
            still get interpolated background and RMS values.
        coverage_mask : array_like of bool (ny, nx), optional
            True where the image has no data; excluded like ``mask``, and both maps are
            set to ``fill_value`` there.

        Returns
        -------
        MeshResult
            Mesh-level values now; the full-resolution ``background`` and ``rms`` maps
            are interpolated on first access and cached.

        Raises
        ------
        ValueError
            Bad shapes or dtypes, a box larger than the image, every pixel masked, or
            every mesh excluded.
        """
        try:
            inp = read_image(image, mask)
            img = inp.data
            shape = img.shape
            m = inp.mask
            cov = as_mask(coverage_mask, shape, "coverage_mask")
        except TypeError as err:
            # a bad dtype is a bad value of the argument: one exception type for callers
            raise ValueError(str(err)) from err
        by, bx = self.box_size
        if by > shape[0] or bx > shape[1]:
            raise ValueError(f"box_size {self.box_size} must not exceed the image shape {shape}")
        if cov is not None:
            cov = cov.copy()  # kept for the lazy maps; the caller may reuse theirs
        excl = m if cov is None else (cov if m is None else m | cov)
        geometry = MeshGeometry(box_size=self.box_size, image_shape=shape)
        with _k.threads_for(img.size):
            loc, scale, nvalid, ngood = self.mesh_stats(img, excl, geometry)
        result = self.finish(
            loc, scale, nvalid, ngood, geometry, dtype=img.dtype, coverage_mask=cov
        )
        if inp.unit is None:
            return result
        return replace(result, inputs=replace(inp, data=None, mask=None, error=None))

    def finish(self, loc, scale, nvalid, ngood, geometry, *, dtype, coverage_mask):
        """From per-mesh statistics (:meth:`mesh_stats`) to a MeshResult: exclusion,
        holes, mesh filter.

        Split from :meth:`fit` so that a tiled back end (:meth:`fit_on`) can gather the
        statistics tile by tile and finish on the whole grid.
        """
        cov = coverage_mask
        if not nvalid.any():
            raise ValueError(
                "image: every pixel is masked (mask/coverage_mask) or non-finite; "
                "cannot estimate a background"
            )
        excluded = self._excluded(nvalid, ngood, geometry)
        excluded |= ~(np.isfinite(loc) & np.isfinite(scale))
        if excluded.all():
            raise ValueError(
                f"exclude_percentile: every mesh has too few usable pixels "
                f"(box_size={self.box_size}, exclude_percentile={self.exclude_percentile}); "
                "raise exclude_percentile or use a larger box"
            )
        raw_bkg = np.where(excluded, np.nan, loc).astype(dtype)
        raw_rms = np.where(excluded, np.nan, scale).astype(dtype)
        bkg = fill_holes(raw_bkg, excluded, method=self.hole_fill)
        rms = fill_holes(raw_rms, excluded, method=self.hole_fill)
        bkg, rms = self._filter(bkg, rms, raw_bkg)
        global_bkg = float(np.median(bkg))
        global_rms = float(np.median(rms))
        if self.filter_rule == "sextractor" and global_rms <= 0:
            # SExtractor falls back on the positive mesh RMS values, then on 1
            pos = rms[rms > 0]
            global_rms = float(np.median(pos)) if pos.size else 1.0
        log.debug(
            "mesh background: grid %s, %d excluded meshes", geometry.grid_shape, excluded.sum()
        )
        return MeshResult(
            config=self,
            geometry=geometry,
            mesh_background=bkg,
            mesh_rms=rms,
            mesh_excluded=excluded,
            n_pixels=ngood,
            n_valid=nvalid,
            global_background=global_bkg,
            global_rms=global_rms,
            coverage_mask=cov,
        )

    # ------------------------------------------------------------ fit internals

    def mesh_stats(self, img, excl, geometry):
        """Level, RMS, valid and used pixel counts of every mesh (float64 / int64)."""
        grid = geometry.grid_shape
        by, bx = self.box_size
        loc = np.empty(grid)
        scale = np.empty(grid)
        nvalid = np.empty(grid, dtype=np.int64)
        ngood = np.empty(grid, dtype=np.int64)
        use_mask = excl is not None
        mask = excl if use_mask else np.zeros((1, 1), dtype=bool)
        if isinstance(self.estimator, SExtractorHistogram):
            est = self.estimator
            _k.mesh_sextractor_stats(
                img, mask, use_mask, by, bx, float(est.median_factor), est.mean_weight,
                float(est.skew_limit), loc, scale, nvalid, ngood,
            )  # fmt: skip
            return loc, scale, nvalid, ngood
        plan = _kernel_plan(self.sigma_clip, self.estimator, self.rms_estimator)
        if plan is None:
            return _generic_stats(
                img, excl, geometry, self.sigma_clip, self.estimator, self.rms_estimator
            )
        clip = self.sigma_clip
        loc_code, mf, meanf, skew, scale_code, factor = plan
        _k.mesh_clip_stats(
            img, mask, use_mask, by, bx,
            clip is not None,
            clip is not None and clip.cenfunc == "median",
            clip is not None and clip.stdfunc == "mad_std",
            -1 if clip is None or clip.maxiters is None else int(clip.maxiters),
            1.0 if clip is None else clip.lower,
            1.0 if clip is None else clip.upper,
            loc_code, mf, meanf, skew, scale_code,
            self.stats_precision == "input" and img.dtype == np.float32,
            loc, scale, nvalid, ngood,
        )  # fmt: skip
        if factor != 1.0:
            scale /= factor
        return loc, scale, nvalid, ngood

    def _excluded(self, nvalid, ngood, geometry):
        by, bx = self.box_size
        if self.edge_method == "pad":
            area = np.full(geometry.grid_shape, float(by * bx))
        else:
            ny, nx = geometry.image_shape
            hy = np.minimum(by, ny - np.arange(geometry.grid_shape[0]) * by)
            hx = np.minimum(bx, nx - np.arange(geometry.grid_shape[1]) * bx)
            area = np.outer(hy, hx).astype(float)
        need = (1.0 - self.exclude_percentile / 100.0) * area
        if self.exclusion_rule == "photutils":
            return ngood <= need
        return (nvalid < need) | (nvalid == 0)

    def _filter(self, bkg, rms, raw_bkg):
        fy, fx = self.filter_size
        if (fy, fx) == (1, 1):
            return bkg, rms
        if self.filter_rule == "sextractor":
            t = -np.inf if self.filter_threshold is None else self.filter_threshold
            b64, r64 = bkg.astype(np.float64), rms.astype(np.float64)
            bo, ro = np.empty_like(b64), np.empty_like(r64)
            _k.median_filter_shrink(b64, r64, fy, fx, t, bo, ro)
            return bo.astype(bkg.dtype), ro.astype(rms.dtype)
        t = self.filter_threshold
        fb = _nanpad_median(bkg, fy, fx)
        fr = _nanpad_median(rms, fy, fx)
        if t is None or t < np.nanmin(raw_bkg):
            return fb, fr
        above = bkg > t
        return np.where(above, fb, bkg), np.where(above, fr, rms)


def _nanpad_median(values, fy, fx):
    """Median over a (fy, fx) window, cut at the grid edges (photutils' NaN padding)."""
    hy, hx = fy // 2, fx // 2
    padded = np.pad(values.astype(np.float64), ((hy, hy), (hx, hx)), constant_values=np.nan)
    win = np.lib.stride_tricks.sliding_window_view(padded, (fy, fx))
    return np.nanmedian(win, axis=(-2, -1)).astype(values.dtype)


def _kernel_plan(clip, est, rms):
    """Codes of the compiled path for these estimators, or None for the generic path."""
    if clip is not None and not isinstance(clip, _stats.SigmaClip):
        return None
    t = type(est)
    if t is _stats.Mean:
        loc = (_k.LOC_MEAN, 0.0, 0.0, 0.0)
    elif t is _stats.Median:
        loc = (_k.LOC_MEDIAN, 0.0, 0.0, 0.0)
    elif t is _stats.SExtractorMode:
        loc = (_k.LOC_SEXTRACTOR, float(est.median_factor), est.mean_weight, float(est.skew_limit))
    elif t is _stats.ModeEstimator:
        loc = (_k.LOC_PEARSON, float(est.median_factor), float(est.mean_factor), 0.0)
    elif t is _stats.MMM:
        loc = (_k.LOC_PEARSON, 3.0, 2.0, 0.0)
    else:
        return None
    s = type(rms)
    if s is _stats.StdDev:
        code = _k.SCALE_STD
    elif s is _stats.MADStd:
        code = _k.SCALE_MADSTD
    else:
        return None
    factor = 1.0
    if rms.clip_correction is not None:
        factor = float(_stats.clip_truncation_factor(rms.clip_correction, scale=rms))
    return (*loc, code, factor)


def _generic_stats(img, excl, geometry, clip, est, rms):
    """Any estimators: stack the meshes as rows (NaN = unusable) and call them."""
    (my, mx), (by, bx) = geometry.grid_shape, geometry.box_size
    ny, nx = geometry.image_shape
    padded = np.full(geometry.padded_shape, np.nan, dtype=img.dtype)
    padded[:ny, :nx] = img
    if excl is not None:
        padded[:ny, :nx][excl] = np.nan
    samples = padded.reshape(my, by, mx, bx).transpose(0, 2, 1, 3).reshape(my * mx, by * bx)
    del padded
    finite = np.isfinite(samples)
    samples[~finite] = np.nan  # inf -> NaN: NaN alone marks a missing value
    nvalid = finite.sum(axis=1)
    del finite
    if clip is not None:
        samples = clip(samples, axis=-1)
    ngood = np.isfinite(samples).sum(axis=1)
    with np.errstate(all="ignore"):
        loc = np.asarray(est(samples, axis=-1), dtype=np.float64)
        scale = np.asarray(rms(samples, axis=-1), dtype=np.float64)
    g = (my, mx)
    return loc.reshape(g), scale.reshape(g), nvalid.reshape(g), ngood.reshape(g)


def _tile_stats(img, excl, *, origin, mesh: MeshBackground):
    """Per-mesh level, RMS, valid and used counts of a tile aligned to the mesh grid."""
    geometry = MeshGeometry(box_size=mesh.box_size, image_shape=img.shape)
    loc, scale, nvalid, ngood = mesh.mesh_stats(img, excl, geometry)
    return np.stack([loc, scale, nvalid.astype(float), ngood.astype(float)])


@dataclass(frozen=True, kw_only=True, eq=False)
class MeshResult(MapMethods):
    """What :meth:`MeshBackground.fit` measured.

    The mesh-level arrays are computed by ``fit``. The full-resolution ``background``
    and ``rms`` maps are interpolated from them on first access and cached: a caller who
    needs only the background never pays the memory of the RMS map.

    Attributes
    ----------
    config : MeshBackground
        The configuration that made this result.
    geometry : MeshGeometry
        Box size, grid shape, image shape and mesh centres.
    mesh_background, mesh_rms : ndarray (my, mx)
        Final mesh values (holes filled, grid filtered); photutils'
        ``background_mesh``, SExtractor's MINIBACK check image.
    mesh_excluded : ndarray of bool (my, mx)
        True where a mesh had too few usable pixels (its values were filled).
    n_pixels : ndarray of int (my, mx)
        Pixels used per mesh (after sigma clipping; for SExtractorHistogram, those in
        the final histogram window).
    n_valid : ndarray of int (my, mx)
        Unmasked finite pixels per mesh, before clipping.
    global_background, global_rms : float
        Medians of the final mesh values (SExtractor's "(M+D)" global values).
    coverage_mask : ndarray of bool or None
        Where both maps are set to ``config.fill_value``.
    """

    config: MeshBackground
    geometry: MeshGeometry
    mesh_background: np.ndarray
    mesh_rms: np.ndarray
    mesh_excluded: np.ndarray
    n_pixels: np.ndarray
    n_valid: np.ndarray
    global_background: float
    global_rms: float
    coverage_mask: np.ndarray | None = None
    inputs: ImageInput | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the full-resolution maps."""
        return self.geometry.image_shape

    def _map(self, mesh_values):
        out = self.config.interpolator(
            mesh_values, self.mesh_excluded, self.geometry, self.geometry.image_shape
        )
        out = np.asarray(out, dtype=mesh_values.dtype)
        if self.coverage_mask is not None:
            out[self.coverage_mask] = self.config.fill_value
        # Units in, units out (a Quantity when the image had a unit).
        return out if self.inputs is None else self.inputs.wrap(out)

    @cached_property
    def background(self) -> np.ndarray:
        """Full-resolution background map (interpolated on first access, then cached)."""
        return self._map(self.mesh_background)

    @cached_property
    def rms(self) -> np.ndarray:
        """Full-resolution RMS map (interpolated on first access, then cached)."""
        return self._map(self.mesh_rms)

    # the BackgroundModel protocol (skymap.background.model), for the pipeline

    def background_map(self, step: int = 1, window=None) -> np.ndarray:
        """The background at every ``step``-th pixel: the cached map, or over
        ``window`` = ((y0, y1), (x0, x1)) only (:meth:`map_window`)."""
        if window is None:
            return cut_window(self.background, step)
        return cut_window(self.map_window(self.mesh_background, window), step)

    def rms_map(self, window=None) -> np.ndarray:
        """A new RMS map, whole or over ``window`` (:meth:`map_window`)."""
        if window is None:
            return self.rms.copy()
        return self.map_window(self.mesh_rms, window)

    def map_window(self, mesh_values, window, halo: int = DEFAULT_HALO) -> np.ndarray:
        """The full-resolution map of ``mesh_values`` over ``window`` only. An
        interpolator with a ``window`` method reads the whole (small) grid: exact, no
        halo; any other is run on the window's meshes plus ``halo`` meshes around
        (cut at the grid's edge)."""
        (y0, y1), (x0, x1) = window
        shape = self.geometry.image_shape
        interp = self.config.interpolator
        if hasattr(interp, "window"):
            out = interp.window(mesh_values, self.mesh_excluded, self.geometry, (y0, y1), (x0, x1))
        else:
            by, bx = self.config.box_size
            my, mx = mesh_values.shape
            j0, j1 = max(0, y0 // by - halo), min(my, -(-y1 // by) + halo)
            i0, i1 = max(0, x0 // bx - halo), min(mx, -(-x1 // bx) + halo)
            sub = (min(j1 * by, shape[0]) - j0 * by, min(i1 * bx, shape[1]) - i0 * bx)
            geometry = MeshGeometry(box_size=self.config.box_size, image_shape=sub)
            full = interp(
                mesh_values[j0:j1, i0:i1], self.mesh_excluded[j0:j1, i0:i1], geometry, sub
            )
            oy, ox = y0 - j0 * by, x0 - i0 * bx
            out = np.asarray(full)[oy : oy + y1 - y0, ox : ox + x1 - x0]
        out = np.array(out, dtype=mesh_values.dtype, order="C")
        if self.coverage_mask is not None:
            out[self.coverage_mask[y0:y1, x0:x1]] = self.config.fill_value
        return out

    scale = None
    error = float("nan")

    @property
    def grid(self) -> np.ndarray:
        """The mesh grid of the background (``mesh_background``)."""
        return self.mesh_background
