"""Robust statistics on stacks of samples, vectorised over rows.

Every estimator here works on an array whose ``axis`` (the last one by default) holds
the samples of one set -- one mesh, one aperture -- and every other axis enumerates the
sets. NaN (and inf) marks a missing sample; a set with no valid sample gives NaN. There
is no Python loop over sets: the work runs in compiled kernels (``_stats_kernels``) or
vectorised numpy.

Contents
--------
Sigma clipping
    `SigmaClip` (configuration, callable), `sigma_clip` and `sigma_clipped_stats`
    (function forms), `ClippedStats` ("clip once, ask many statistics"), and
    `as_sigma_clip`, which also accepts ``astropy.stats.SigmaClip`` instances.
Location estimators (the `LocationEstimator` protocol)
    `Mean`, `Median`, `SExtractorMode`, `ModeEstimator`, `MMM`, `BiweightLocation`.
Scale estimators (the `ScaleEstimator` protocol)
    `StdDev`, `MADStd`, `BiweightScale`; each can undo the truncation that a given
    sigma clip imposes on Gaussian noise (`clip_truncation_factor`).
Adapters
    `as_location` and `as_scale` accept our estimators, their names, and photutils'
    background / background-RMS estimator instances.

Estimators are pure: they never clip. The mesh engine (and any caller) clips first,
with a `SigmaClip`, and hands the clipped stack (clipped values are NaN) to the
estimator. Results are float64 whatever the input dtype: the per-set results are small
and the extra precision is free.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from typing import Any, Protocol, runtime_checkable

import numpy as np

from skymap._util import MAD_TO_STD
from skymap._validate import check_choice, check_positive
from skymap.stats import _kernels as _k

__all__ = [
    "MMM",
    "BiweightLocation",
    "BiweightScale",
    "ClippedStats",
    "LocationEstimator",
    "MADStd",
    "Mean",
    "Median",
    "ModeEstimator",
    "PhotutilsEstimator",
    "SExtractorMode",
    "ScaleEstimator",
    "SigmaClip",
    "StdDev",
    "WrappedSigmaClip",
    "as_location",
    "as_scale",
    "as_sigma_clip",
    "clip_truncation_factor",
    "sigma_clip",
    "sigma_clipped_stats",
    "with_clip_correction",
]


# --------------------------------------------------------------------------- helpers


def _as_rows(samples: Any, axis: int, name: str = "samples") -> tuple[np.ndarray, tuple]:
    """Return ``samples`` as a C-contiguous 2-D float array (sets, values) and the shape
    of one result per set. Masked arrays have their masked values turned into NaN."""
    arr = _unmask(samples)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers (int or float), got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if not -arr.ndim <= axis < arr.ndim:
        raise ValueError(f"axis must be in [{-arr.ndim}, {arr.ndim - 1}], got {axis}")
    if arr.dtype.kind != "f" or arr.dtype.itemsize < 4 or not arr.dtype.isnative:
        arr = arr.astype(np.float64)
    moved = np.moveaxis(arr, axis, -1)
    out_shape = moved.shape[:-1]
    rows = np.ascontiguousarray(moved.reshape(-1, moved.shape[-1]))
    return rows, out_shape


def _unmask(samples: Any) -> np.ndarray:
    """A plain array with the masked values of a MaskedArray set to NaN (no copy for a
    plain array)."""
    if not isinstance(samples, np.ma.MaskedArray):
        return np.asarray(samples)
    kind = samples.dtype.kind
    dtype = samples.dtype if kind == "f" else np.float64
    return samples.astype(dtype).filled(np.nan)


def _row_stats(samples: Any, axis: int, *, median: bool = False, mad: bool = False):
    """Count, mean, std, median and MAD (about the median) of every set, each shaped
    like one result per set. Median/MAD are NaN unless asked for."""
    rows, shape = _as_rows(samples, axis)
    nrow = rows.shape[0]
    count = np.empty(nrow, dtype=np.int64)
    mean, std, med, mad_ = (np.full(nrow, np.nan) for _ in range(4))
    _k.row_stats(rows, median or mad, mad, count, mean, std, med, mad_)
    return tuple(a.reshape(shape) for a in (count, mean, std, med, mad_))


# ---------------------------------------------------------------------- sigma clipping


@dataclass(frozen=True, kw_only=True)
class SigmaClip:
    """Iterated sigma clipping of every set in a stack at once.

    Each iteration computes a centre (``cenfunc``) and a width (``stdfunc``) of the
    surviving values of a set and rejects those below ``centre - sigma_lower * width``
    or above ``centre + sigma_upper * width``. It stops when an iteration rejects
    nothing, when nothing would survive, or after ``maxiters`` iterations. The bounds of
    the last iteration are then applied to all the set's valid values: this is exactly
    what ``astropy.stats.sigma_clip(data, axis=..., masked=False)`` returns, row by row.

    Parameters
    ----------
    sigma : float
        Clipping limit in units of the width, for both sides unless overridden.
    sigma_lower, sigma_upper : float or None
        Lower / upper limits; None means ``sigma``.
    maxiters : int or None
        Maximum number of iterations; None iterates until nothing changes.
        Note: astropy's default is 5; ours is 10, photutils' ``Background2D`` default.
    cenfunc : {"median", "mean"}
        Centre of the surviving values.
    stdfunc : {"std", "mad_std"}
        Width of the surviving values: population standard deviation, or the median
        absolute deviation scaled to a Gaussian sigma (times 1.4826).

    Examples
    --------
    >>> clip = SigmaClip(sigma=2.0, maxiters=None)
    >>> stack = np.array([[1.0, 2.0, 3.0, 2.0, 1.0, 2.0, 100.0], [5, 5, 5, np.nan, 5, 6, 5]])
    >>> clip(stack)
    array([[ 1.,  2.,  3.,  2.,  1.,  2., nan],
           [ 5.,  5.,  5., nan,  5., nan,  5.]])
    """

    sigma: float = 3.0
    sigma_lower: float | None = None
    sigma_upper: float | None = None
    maxiters: int | None = 10
    cenfunc: str = "median"
    stdfunc: str = "std"

    def __post_init__(self):
        check_positive("sigma", self.sigma)
        check_positive("sigma_lower", self.sigma_lower, allow_none=True)
        check_positive("sigma_upper", self.sigma_upper, allow_none=True)
        if self.maxiters is not None and (
            isinstance(self.maxiters, bool)
            or not isinstance(self.maxiters, (int, np.integer))
            or self.maxiters < 1
        ):
            raise ValueError(
                f"maxiters must be None (iterate to convergence) or an int >= 1, "
                f"got {self.maxiters!r}"
            )
        check_choice("cenfunc", self.cenfunc, ("median", "mean"))
        check_choice("stdfunc", self.stdfunc, ("std", "mad_std"))

    @property
    def lower(self) -> float:
        """The lower limit actually used (``sigma_lower`` or ``sigma``)."""
        return float(self.sigma if self.sigma_lower is None else self.sigma_lower)

    @property
    def upper(self) -> float:
        """The upper limit actually used (``sigma_upper`` or ``sigma``)."""
        return float(self.sigma if self.sigma_upper is None else self.sigma_upper)

    def __call__(self, samples: np.ndarray, axis: int = -1, *, return_bounds: bool = False):
        """Return a new array like ``samples`` with clipped and missing values set to NaN.

        Float input keeps its dtype; integer input becomes float32 (as astropy does).
        With ``return_bounds=True`` also return the final lower and upper bounds of
        every set (float64, NaN for a set with no valid value).
        """
        kind = np.asarray(samples).dtype.kind
        arr = _unmask(samples)
        rows, shape = _as_rows(arr, axis)
        # float32/float64 keep their precision (in native byte order); integers and
        # float16 become float32 (numba has no float16)
        wide_float = kind == "f" and arr.dtype.itemsize >= 4
        out_dtype = arr.dtype.newbyteorder("=") if wide_float else np.dtype(np.float32)
        out = np.empty(rows.shape, dtype=out_dtype)
        lo = np.empty(rows.shape[0])
        hi = np.empty(rows.shape[0])
        _k.sigma_clip_rows(
            rows,
            self.cenfunc == "median",
            self.stdfunc == "mad_std",
            -1 if self.maxiters is None else int(self.maxiters),
            self.lower,
            self.upper,
            out,
            lo,
            hi,
        )
        n = rows.shape[1]
        clipped = np.moveaxis(out.reshape(*shape, n), -1, axis)
        if return_bounds:
            return clipped, lo.reshape(shape), hi.reshape(shape)
        return clipped

    def stats(self, samples: np.ndarray, axis: int = -1) -> ClippedStats:
        """Clip once and return a `ClippedStats` to ask several statistics of."""
        clipped, lo, hi = self(samples, axis=axis, return_bounds=True)
        return ClippedStats(data=np.moveaxis(clipped, axis, -1), lower=lo, upper=hi)


@dataclass(frozen=True)
class ClippedStats:
    """The outcome of one sigma clip, with statistics computed on demand and cached.

    ``data`` holds the clipped samples with the sample axis last (clipped and missing
    values are NaN); ``lower`` and ``upper`` are the final bounds of each set. The cheap
    moments (count, mean, std) are computed together; the median and MAD together.

    Examples
    --------
    >>> st = SigmaClip(sigma=2.5).stats(np.array([[0.0, 1, 2, 3, 4, 50]]))
    >>> st.count, st.median, st.mean
    (array([5]), array([2.]), array([2.]))
    """

    data: np.ndarray
    lower: np.ndarray
    upper: np.ndarray

    @cached_property
    def _moments(self):
        return _row_stats(self.data, -1, mad=True)

    @property
    def count(self) -> np.ndarray:
        """Number of samples of each set that survived the clip."""
        return self._moments[0]

    @property
    def mean(self) -> np.ndarray:
        return self._moments[1]

    @property
    def std(self) -> np.ndarray:
        """Population (ddof=0) standard deviation of the survivors."""
        return self._moments[2]

    @property
    def median(self) -> np.ndarray:
        return self._moments[3]

    @property
    def mad_std(self) -> np.ndarray:
        """Median absolute deviation of the survivors, times 1.4826."""
        return self._moments[4] * MAD_TO_STD

    def location(self, estimator: Any) -> np.ndarray:
        """Apply a location estimator (anything `as_location` accepts) to the survivors."""
        return as_location(estimator)(self.data, axis=-1)

    def scale(self, estimator: Any) -> np.ndarray:
        """Apply a scale estimator (anything `as_scale` accepts) to the survivors."""
        return as_scale(estimator)(self.data, axis=-1)


def sigma_clip(
    samples: np.ndarray,
    *,
    sigma: float = 3.0,
    sigma_lower: float | None = None,
    sigma_upper: float | None = None,
    maxiters: int | None = 10,
    cenfunc: str = "median",
    stdfunc: str = "std",
    axis: int = -1,
    return_bounds: bool = False,
):
    """Function form of `SigmaClip`: clipped values come back as NaN.

    Examples
    --------
    >>> sigma_clip(np.array([1.0, 2.0, 3.0, 2.0, 1.0, 2.0, 100.0]), sigma=2.0)
    array([ 1.,  2.,  3.,  2.,  1.,  2., nan])
    """
    clip = SigmaClip(
        sigma=sigma,
        sigma_lower=sigma_lower,
        sigma_upper=sigma_upper,
        maxiters=maxiters,
        cenfunc=cenfunc,
        stdfunc=stdfunc,
    )
    return clip(samples, axis=axis, return_bounds=return_bounds)


def sigma_clipped_stats(
    samples: np.ndarray,
    *,
    sigma: float = 3.0,
    sigma_lower: float | None = None,
    sigma_upper: float | None = None,
    maxiters: int | None = 10,
    cenfunc: str = "median",
    stdfunc: str = "std",
    axis: int = -1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, median and standard deviation of every set after one sigma clip.

    Like ``astropy.stats.sigma_clipped_stats`` with an axis, but the default axis is the
    last one (one result per set) and the default ``maxiters`` is 10.

    Examples
    --------
    >>> stack = np.array([[1.0, 2, 3, 100, 2, 1, 3], [4, 4, 4, 4, 4, 4, 4]])
    >>> sigma_clipped_stats(stack, sigma=2.0)
    (array([2., 4.]), array([2., 4.]), array([0.81649658, 0.        ]))
    """
    st = SigmaClip(
        sigma=sigma,
        sigma_lower=sigma_lower,
        sigma_upper=sigma_upper,
        maxiters=maxiters,
        cenfunc=cenfunc,
        stdfunc=stdfunc,
    ).stats(samples, axis=axis)
    return st.mean, st.median, st.std


@dataclass(frozen=True, kw_only=True)
class WrappedSigmaClip:
    """An ``astropy.stats.SigmaClip`` whose centre or width is a custom callable.

    We cannot compile arbitrary callables, so the clip is delegated to astropy itself
    (which vectorises over the axis as long as the callables accept ``axis=``). It has
    the same call signature as `SigmaClip` and its ``lower``/``upper``/``maxiters``.
    """

    clipper: Any = field(compare=False)

    @property
    def lower(self) -> float:
        return float(self.clipper.sigma_lower)

    @property
    def upper(self) -> float:
        return float(self.clipper.sigma_upper)

    @property
    def maxiters(self) -> int | None:
        m = self.clipper.maxiters
        return None if not np.isfinite(m) else int(m)

    def __call__(self, samples: np.ndarray, axis: int = -1, *, return_bounds: bool = False):
        with warnings.catch_warnings():
            # astropy warns about NaN input; NaN is our "missing" marker
            warnings.simplefilter("ignore")
            res = self.clipper(
                samples, axis=axis, masked=False, return_bounds=return_bounds, copy=True
            )
        if return_bounds:
            data, lo, hi = res
            return (
                data,
                np.squeeze(np.asarray(lo, float), axis),
                np.squeeze(np.asarray(hi, float), axis),
            )
        return res

    def stats(self, samples: np.ndarray, axis: int = -1) -> ClippedStats:
        clipped, lo, hi = self(samples, axis=axis, return_bounds=True)
        return ClippedStats(data=np.moveaxis(clipped, axis, -1), lower=lo, upper=hi)


def as_sigma_clip(obj: Any) -> SigmaClip | WrappedSigmaClip | None:
    """Return our sigma clip for ``obj``.

    Accepts None (no clipping), a `SigmaClip`, a `WrappedSigmaClip`, or an
    ``astropy.stats.SigmaClip``. An astropy instance with string ``cenfunc``/``stdfunc``
    becomes an equivalent `SigmaClip` (its ``maxiters=None``/``0``, meaning
    unlimited, becomes None). One with callable ``cenfunc``/``stdfunc`` becomes a
    `WrappedSigmaClip` that calls astropy. ``grow`` (clipping neighbours too) is not
    supported and raises.

    Examples
    --------
    >>> import astropy.stats
    >>> as_sigma_clip(astropy.stats.SigmaClip(sigma=2.5, maxiters=None))
    SigmaClip(sigma=2.5, sigma_lower=2.5, sigma_upper=2.5, maxiters=None, \
cenfunc='median', stdfunc='std')
    """
    if obj is None or isinstance(obj, (SigmaClip, WrappedSigmaClip)):
        return obj
    try:
        from astropy.stats import SigmaClip as AstropySigmaClip
    except ImportError:  # pragma: no cover - astropy is a dependency
        AstropySigmaClip = ()
    if not isinstance(obj, AstropySigmaClip):
        raise TypeError(
            f"sigma_clip must be None, a skymap.stats.SigmaClip or an "
            f"astropy.stats.SigmaClip, got {type(obj).__name__}"
        )
    if obj.grow:
        raise ValueError(
            f"sigma_clip: astropy's grow={obj.grow!r} is not supported; use grow=False "
            "and a masker to grow masks"
        )
    if not (isinstance(obj.cenfunc, str) and isinstance(obj.stdfunc, str)):
        return WrappedSigmaClip(clipper=obj)
    maxiters = obj.maxiters
    maxiters = None if not np.isfinite(maxiters) else int(maxiters)
    return SigmaClip(
        sigma=float(obj.sigma),
        sigma_lower=float(obj.sigma_lower),
        sigma_upper=float(obj.sigma_upper),
        maxiters=maxiters,
        cenfunc=obj.cenfunc,
        stdfunc=obj.stdfunc,
    )


# ------------------------------------------------------------------------- protocols


@runtime_checkable
class LocationEstimator(Protocol):
    """``(samples, axis=-1) -> one location per set``; NaN = missing, all-NaN -> NaN."""

    def __call__(self, samples: np.ndarray, axis: int = -1) -> np.ndarray: ...


@runtime_checkable
class ScaleEstimator(Protocol):
    """``(samples, axis=-1) -> one scale per set``; NaN = missing, all-NaN -> NaN."""

    def __call__(self, samples: np.ndarray, axis: int = -1) -> np.ndarray: ...


# ------------------------------------------------------------------------- locations


@dataclass(frozen=True, kw_only=True)
class Mean:
    """Arithmetic mean of each set.

    Examples
    --------
    >>> Mean()(np.array([[1.0, 2.0, np.nan], [np.nan, np.nan, np.nan]]))
    array([1.5, nan])
    """

    def __call__(self, samples: np.ndarray, axis: int = -1) -> np.ndarray:
        return _row_stats(samples, axis)[1]


@dataclass(frozen=True, kw_only=True)
class Median:
    """Median of each set (mean of the two middle values for an even count).

    Examples
    --------
    >>> Median()(np.array([[1.0, 2.0, 10.0, 3.0], [4.0, np.nan, 5.0, 6.0]]))
    array([2.5, 5. ])
    """

    def __call__(self, samples: np.ndarray, axis: int = -1) -> np.ndarray:
        return _row_stats(samples, axis, median=True)[3]


@dataclass(frozen=True, kw_only=True)
class ModeEstimator:
    """``median_factor * median - mean_factor * mean`` of each set.

    With the default 3 and 2 this is Pearson's empirical mode of a mildly skewed
    distribution; the factors should differ by one so that a symmetric distribution
    gives its centre.

    References
    ----------
    Bertin, E. & Arnouts, S. 1996, A&AS 117, 393, https://doi.org/10.1051/aas:1996164.

    Examples
    --------
    >>> ModeEstimator(median_factor=3.0, mean_factor=2.0)(np.array([[0.0, 1, 2, 3, 9]]))
    array([0.])
    """

    median_factor: float = 3.0
    mean_factor: float = 2.0

    def __post_init__(self):
        for name in ("median_factor", "mean_factor"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")

    def __call__(self, samples: np.ndarray, axis: int = -1) -> np.ndarray:
        _, mean, _, med, _ = _row_stats(samples, axis, median=True)
        return self.median_factor * med - self.mean_factor * mean


@dataclass(frozen=True, kw_only=True)
class MMM:
    """DAOPHOT's MMM mode as photutils' ``MMMBackground`` defines it:
    ``3 * median - 2 * mean`` (photutils does not implement DAOPHOT's full iterative
    MMM, and neither do we).

    References
    ----------
    Stetson, P. B. 1987, PASP 99, 191 (DAOPHOT's sky estimator), https://doi.org/10.1086/131977.

    Examples
    --------
    >>> MMM()(np.array([[0.0, 1, 2, 3, 9]]))
    array([0.])
    """

    def __call__(self, samples: np.ndarray, axis: int = -1) -> np.ndarray:
        return ModeEstimator(median_factor=3.0, mean_factor=2.0)(samples, axis)


@dataclass(frozen=True, kw_only=True)
class _SExtractorParameters:
    """The parameters of SExtractor's mode and their rules, shared by
    :class:`SExtractorMode` (on samples) and :class:`skymap.mesh.SExtractorHistogram`
    (on a mesh's clipped histogram)."""

    median_factor: float = 2.5
    mean_factor: float | None = None
    skew_limit: float = 0.3

    def __post_init__(self):
        if not np.isfinite(self.median_factor):
            raise ValueError(f"median_factor must be a finite number, got {self.median_factor!r}")
        if self.mean_factor is not None and not np.isfinite(self.mean_factor):
            raise ValueError(
                f"mean_factor must be None or a finite number, got {self.mean_factor!r}"
            )
        check_positive("skew_limit", self.skew_limit)

    @property
    def mean_weight(self) -> float:
        """The weight of the mean actually used (``median_factor - 1`` for None)."""
        return self.median_factor - 1.0 if self.mean_factor is None else float(self.mean_factor)


@dataclass(frozen=True, kw_only=True)
class SExtractorMode(_SExtractorParameters):
    """SExtractor's background mode estimate of each set.

    ``median_factor * median - mean_factor * mean`` (2.5 and 1.5 by default), except:

    * where ``std == 0`` (a constant set) the mean is returned;
    * where ``|mean - median| / std >= skew_limit`` (0.3) the distribution is deemed
      too skewed (crowded) for the Pearson-like formula and the median is returned.

    These are the exact switches of photutils' ``SExtractorBackground`` (``>=``, and
    the mean for a zero std), whose docstring says ``>``; ``std`` is the population
    (ddof=0) standard deviation of the set. SExtractor applies the same ``< 0.3`` test
    (formula) / otherwise (median) to the clipped histogram of a mesh. ``mean_factor``
    None means ``median_factor - 1``, which is how SExtractor's ``BACK_PEARSON``
    setting (default 2.5) works, so ``SExtractorMode(median_factor=3.5)`` gives
    ``3.5 * median - 2.5 * mean``, and ``median_factor=3.0`` is Pearson's classic
    ``3 * median - 2 * mean``.

    References
    ----------
    Bertin, E. & Arnouts, S. 1996, A&AS 117, 393 (section 2.1), https://doi.org/10.1051/aas:1996164.

    Examples
    --------
    >>> SExtractorMode()(np.array([[0.0, 1, 2, 2, 3.5], [0.0, 0, 0, 0, 9]]))
    array([2.45, 0.  ])
    """

    def __call__(self, samples: np.ndarray, axis: int = -1) -> np.ndarray:
        _, mean, std, med, _ = _row_stats(samples, axis, median=True)
        mf = self.mean_weight
        with np.errstate(divide="ignore", invalid="ignore"):
            skewed = np.abs(mean - med) / std >= self.skew_limit
        mode = self.median_factor * med - mf * mean
        mode = np.where(skewed, med, mode)
        return np.where(std == 0, mean, mode)


@dataclass(frozen=True, kw_only=True)
class BiweightLocation:
    """Tukey biweight location of each set, as ``astropy.stats.biweight_location``
    (``M`` = the median, tuning constant ``c``); a set whose MAD is 0 gives its median.

    References
    ----------
    Beers, T. C., Flynn, K. & Gebhardt, K. 1990, AJ 100, 32, https://doi.org/10.1086/115487.

    Examples
    --------
    >>> BiweightLocation()(np.array([[1.0, 2, 3, 4, 100]]))
    array([2.5706499])
    """

    c: float = 6.0

    def __post_init__(self):
        check_positive("c", self.c)

    def __call__(self, samples: np.ndarray, axis: int = -1) -> np.ndarray:
        return _biweight(samples, axis, self.c, scale=False, modify_sample_size=False)


def _biweight(samples, axis, c, *, scale, modify_sample_size):
    rows, shape = _as_rows(samples, axis)
    out = np.empty(rows.shape[0])
    _k.biweight_rows(rows, c, scale, modify_sample_size, out)
    return out.reshape(shape)


# ---------------------------------------------------------------------------- scales


class _ScaleBase:
    """Shared truncation correction of the scale estimators.

    ``clip_correction``: the `SigmaClip` the samples went through, or None. When set,
    the estimate is divided by `clip_truncation_factor` of that clip for this
    estimator, so that for Gaussian noise the corrected value is the noise sigma
    rather than the ~1.5% smaller width of the clipped (truncated) distribution.
    """

    def _raw(self, samples, axis):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, samples: np.ndarray, axis: int = -1) -> np.ndarray:
        value = self._raw(samples, axis)
        if self.clip_correction is not None:
            value = value / _cached_factor(
                self.clip_correction, replace(self, clip_correction=None)
            )
        return value


def _check_clip_correction(obj):
    if obj.clip_correction is not None and not isinstance(obj.clip_correction, SigmaClip):
        raise ValueError(
            "clip_correction must be None or a skymap.stats.SigmaClip (the clip the "
            f"samples went through), got {type(obj.clip_correction).__name__}"
        )


@dataclass(frozen=True, kw_only=True)
class StdDev(_ScaleBase):
    """Population (ddof=0) standard deviation of each set.

    Examples
    --------
    >>> StdDev()(np.array([[1.0, 3.0, np.nan], [2.0, 2.0, 2.0]]))
    array([1., 0.])
    """

    clip_correction: SigmaClip | None = None

    def __post_init__(self):
        _check_clip_correction(self)

    def _raw(self, samples, axis):
        return _row_stats(samples, axis)[2]


@dataclass(frozen=True, kw_only=True)
class MADStd(_ScaleBase):
    """Median absolute deviation about the median, times 1.4826 (a Gaussian sigma).

    Examples
    --------
    >>> MADStd()(np.array([[1.0, 2.0, 3.0, 4.0, 100.0]]))
    array([1.48260222])
    """

    clip_correction: SigmaClip | None = None

    def __post_init__(self):
        _check_clip_correction(self)

    def _raw(self, samples, axis):
        return _row_stats(samples, axis, mad=True)[4] * MAD_TO_STD


@dataclass(frozen=True, kw_only=True)
class BiweightScale(_ScaleBase):
    """Biweight scale of each set, as ``astropy.stats.biweight_scale`` with ``M`` = the
    median and tuning constant ``c``; a set whose MAD is 0 gives 0.

    ``modify_sample_size``: count only the samples with ``|u| < 1`` as the sample size
    (astropy's option of the same name), instead of all valid samples.

    References
    ----------
    Beers, T. C., Flynn, K. & Gebhardt, K. 1990, AJ 100, 32, https://doi.org/10.1086/115487.

    Examples
    --------
    >>> BiweightScale()(np.array([[1.0, 2, 3, 4, 100]]))
    array([1.42439879])
    """

    c: float = 9.0
    modify_sample_size: bool = False
    clip_correction: SigmaClip | None = None

    def __post_init__(self):
        check_positive("c", self.c)
        _check_clip_correction(self)

    def _raw(self, samples, axis):
        return _biweight(
            samples, axis, self.c, scale=True, modify_sample_size=self.modify_sample_size
        )


# ------------------------------------------------------ Gaussian truncation correction


def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi) if math.isfinite(x) else 0.0


def _cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


class _Truncated:
    """Unit Gaussian truncated to [a, b]: the population analogue of a clipped set."""

    def __init__(self, a: float, b: float):
        from scipy.special import ndtri

        self.a, self.b = a, b
        self.fa, self.fb = _cdf(a), _cdf(b)
        self.z = self.fb - self.fa
        self._ndtri = ndtri

    def mean(self) -> float:
        return (_phi(self.a) - _phi(self.b)) / self.z

    def std(self) -> float:
        a = self.a * _phi(self.a) if math.isfinite(self.a) else 0.0
        b = self.b * _phi(self.b) if math.isfinite(self.b) else 0.0
        var = 1.0 + (a - b) / self.z - self.mean() ** 2
        return math.sqrt(max(var, 0.0))

    def median(self) -> float:
        return float(self._ndtri(0.5 * (self.fa + self.fb)))

    def mad(self, m: float) -> float:
        """Median of |X - m|: the half-width d holding half the probability."""
        from scipy.optimize import brentq

        def excess(d):
            return (_cdf(min(m + d, self.b)) - _cdf(max(m - d, self.a))) / self.z - 0.5

        hi = 1.0
        while excess(hi) < 0:
            hi *= 2.0
        return brentq(excess, 0.0, hi, xtol=1e-15, rtol=1e-14)

    def biweight_scale(self, c: float) -> float:
        from scipy.integrate import quad

        m = self.median()
        cm = c * self.mad(m)
        lo, hi = max(self.a, m - cm), min(self.b, m + cm)

        def f1(x):
            u2 = ((x - m) / cm) ** 2
            return (x - m) ** 2 * (1 - u2) ** 4 * _phi(x)

        def f2(x):
            u2 = ((x - m) / cm) ** 2
            return (1 - u2) * (1 - 5 * u2) * _phi(x)

        e1 = quad(f1, lo, hi, epsabs=1e-14)[0] / self.z
        e2 = quad(f2, lo, hi, epsabs=1e-14)[0] / self.z
        return math.sqrt(e1) / abs(e2)


def _clip_population(clip: SigmaClip) -> _Truncated:
    """Run ``clip`` on a unit Gaussian population: the truncation it converges to (or
    reaches after ``maxiters`` iterations)."""
    dist = _Truncated(-math.inf, math.inf)
    iters = 10_000 if clip.maxiters is None else clip.maxiters
    for _ in range(iters):
        m = dist.median() if (clip.cenfunc == "median" or clip.stdfunc == "mad_std") else 0.0
        cen = m if clip.cenfunc == "median" else dist.mean()
        width = dist.mad(m) * MAD_TO_STD if clip.stdfunc == "mad_std" else dist.std()
        a, b = cen - clip.lower * width, cen + clip.upper * width
        if abs(a - dist.a) < 1e-14 and abs(b - dist.b) < 1e-14:
            break
        dist = _Truncated(a, b)
    return dist


@lru_cache(maxsize=256)
def _cached_factor(clip: SigmaClip, scale: Any) -> float:
    # estimators call this on every evaluation; the quadratures behind it take ~ms
    return clip_truncation_factor(clip, scale=scale)


def clip_truncation_factor(clip: SigmaClip, scale: Any = "std") -> float:
    """What a scale estimator returns, in units of sigma, on Gaussian noise after
    ``clip``: divide a measured scale by it to undo the truncation.

    The clip is run on the population: a unit Gaussian, truncated at the bounds that
    ``clip`` computes from the previous truncation, ``maxiters`` times (or to the fixed
    point when ``maxiters`` is None). The truncated moments are analytic: for bounds
    ``[a, b]`` and ``Z = Phi(b) - Phi(a)``, the mean is ``(phi(a) - phi(b)) / Z``, the
    variance ``1 + (a phi(a) - b phi(b)) / Z - mean**2``, the median
    ``Phi^-1((Phi(a) + Phi(b)) / 2)``; the MAD is found by root finding and the biweight
    scale by quadrature. Symmetric 3-sigma clipping iterated to convergence gives
    0.9848 for the standard deviation.

    Parameters
    ----------
    clip : SigmaClip
        The clip the samples went through.
    scale : {"std", "mad_std", "biweight"} or StdDev, MADStd, BiweightScale
        The estimator to calibrate.

    Examples
    --------
    >>> round(clip_truncation_factor(SigmaClip(sigma=3.0, maxiters=None)), 4)
    0.9848
    """
    clip = as_sigma_clip(clip)
    if not isinstance(clip, SigmaClip):
        raise ValueError("clip must be a SigmaClip with named cenfunc/stdfunc")
    if isinstance(scale, str):
        scale = as_scale(scale)
    dist = _clip_population(clip)
    if isinstance(scale, StdDev):
        return dist.std()
    if isinstance(scale, MADStd):
        return dist.mad(dist.median()) * MAD_TO_STD
    if isinstance(scale, BiweightScale):
        return dist.biweight_scale(scale.c)
    raise ValueError(
        f"scale must be 'std', 'mad_std', 'biweight' or one of StdDev, MADStd, "
        f"BiweightScale, got {scale!r}"
    )


# ---------------------------------------------------------------------------- adapters

_LOCATION_NAMES = {
    "mean": Mean,
    "median": Median,
    "sextractor": SExtractorMode,
    "mode": ModeEstimator,
    "mmm": MMM,
    "biweight": BiweightLocation,
}
_SCALE_NAMES = {"std": StdDev, "mad_std": MADStd, "biweight": BiweightScale}


@dataclass(frozen=True, kw_only=True)
class PhotutilsEstimator:
    """A photutils background or RMS estimator of a class we do not know, called with
    its own ``sigma_clip`` disabled (clipping is the caller's job, as in photutils'
    ``Background2D``). The user's instance is copied, never modified."""

    estimator: Any = field(compare=False)

    def __call__(self, samples: np.ndarray, axis: int = -1) -> np.ndarray:
        est = copy.copy(self.estimator)
        est.sigma_clip = None
        method = getattr(est, "calc_background", None) or est.calc_background_rms
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.asarray(method(np.asarray(samples, dtype=float), axis=axis), float)


def _from_photutils(obj: Any, kind: str):
    """Map a photutils estimator instance to ours, or None if ``obj`` is not one."""
    try:
        from photutils import background as pb
    except ImportError:  # pragma: no cover - photutils is a dependency
        return None
    base = pb.BackgroundBase if kind == "location" else pb.BackgroundRMSBase
    if not isinstance(obj, base):
        return None
    # Exact class matches only: a user subclass may change the computation.
    cls = type(obj)
    if cls is pb.MeanBackground:
        return Mean()
    if cls is pb.MedianBackground:
        return Median()
    if cls is pb.SExtractorBackground:
        return SExtractorMode()
    if cls is pb.MMMBackground:
        return MMM()
    if cls is pb.ModeEstimatorBackground:
        return ModeEstimator(median_factor=obj.median_factor, mean_factor=obj.mean_factor)
    if cls is pb.BiweightLocationBackground and obj.M is None:
        return BiweightLocation(c=obj.c)
    if cls is pb.StdBackgroundRMS:
        return StdDev()
    if cls is pb.MADStdBackgroundRMS:
        return MADStd()
    if cls is pb.BiweightScaleBackgroundRMS and obj.M is None:
        return BiweightScale(c=obj.c)
    return PhotutilsEstimator(estimator=obj)


def as_location(obj: Any) -> LocationEstimator:
    """Return a location estimator for ``obj``.

    Accepts one of ours (or any callable following `LocationEstimator`), a name
    (``"mean"``, ``"median"``, ``"sextractor"``, ``"mode"``, ``"mmm"``, ``"biweight"``),
    or a photutils ``BackgroundBase`` instance. photutils' own classes map to the
    equivalent estimator here (its ``sigma_clip`` attribute is ignored, as photutils'
    ``Background2D`` ignores it: clip with a `SigmaClip` first); other subclasses are
    wrapped in `PhotutilsEstimator`.

    Examples
    --------
    >>> from photutils.background import SExtractorBackground
    >>> as_location(SExtractorBackground())
    SExtractorMode(median_factor=2.5, mean_factor=None, skew_limit=0.3)
    """
    if isinstance(obj, str):
        check_choice("estimator", obj, _LOCATION_NAMES)
        return _LOCATION_NAMES[obj]()
    mapped = _from_photutils(obj, "location")
    if mapped is not None:
        return mapped
    if callable(obj):
        return obj
    raise TypeError(
        f"estimator must be a location estimator, one of {sorted(_LOCATION_NAMES)} or a "
        f"photutils BackgroundBase instance, got {type(obj).__name__}"
    )


def as_scale(obj: Any) -> ScaleEstimator:
    """Return a scale estimator for ``obj``: one of ours (or any callable following
    `ScaleEstimator`), a name (``"std"``, ``"mad_std"``, ``"biweight"``), or a
    photutils ``BackgroundRMSBase`` instance (mapped like `as_location` does).

    Examples
    --------
    >>> from photutils.background import MADStdBackgroundRMS
    >>> as_scale(MADStdBackgroundRMS())
    MADStd(clip_correction=None)
    """
    if isinstance(obj, str):
        check_choice("rms_estimator", obj, _SCALE_NAMES)
        return _SCALE_NAMES[obj]()
    mapped = _from_photutils(obj, "scale")
    if mapped is not None:
        return mapped
    if callable(obj):
        return obj
    raise TypeError(
        f"rms_estimator must be a scale estimator, one of {sorted(_SCALE_NAMES)} or a "
        f"photutils BackgroundRMSBase instance, got {type(obj).__name__}"
    )


def with_clip_correction(scale: Any, clip: Any) -> ScaleEstimator:
    """Return ``scale`` set to undo the Gaussian truncation of ``clip`` (see
    `clip_truncation_factor`). None for ``clip`` returns ``scale`` unchanged."""
    scale = as_scale(scale)
    clip = as_sigma_clip(clip)
    if clip is None:
        return scale
    if not isinstance(scale, (StdDev, MADStd, BiweightScale)):
        raise ValueError(
            f"rms_estimator {scale!r} has no truncation correction; use StdDev, MADStd or "
            "BiweightScale"
        )
    return replace(scale, clip_correction=clip)
