"""One place that turns whatever image a caller hands skymap into plain arrays.

Every public entry point that takes an image (``fit``, ``IterativeBackground.fit``,
``MeshBackground.fit``, ``photometry.local``, ``mosaic.skymatch.match``,
``quality.evaluate``, the CLI readers) calls :func:`read_image`, which accepts

* a plain array (anything :func:`numpy.asarray` reads as real numbers),
* a :class:`numpy.ma.MaskedArray` (its mask is ORed with ``mask=``),
* an :class:`astropy.units.Quantity` (its unit is carried to the outputs),
* an :class:`astropy.nddata.NDData` or :class:`~astropy.nddata.CCDData` (mask ORed in,
  unit and WCS carried, ``uncertainty`` read as the error map),

and returns an :class:`ImageInput`: ``(data, mask, error, unit, wcs, meta)``. Nothing is
silently dropped: an attribute skymap cannot use (``NDData.flags``, ``psf``, an
uncertainty class it does not know) gets a warning that names it. Inputs are never
mutated; ``data`` may share memory with the input, so callers must not write into it.

Outputs go back through :meth:`ImageInput.wrap`: a :class:`~astropy.units.Quantity`
when the input had a unit, else a plain array, so that ``image - result.background``
works for arrays, masked arrays, Quantities and CCDData (astropy's NDData defines no
operators; :meth:`ImageInput.as_nddata` gives an NDData/CCDData with the WCS and meta).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from skymap import _inputs_kernels as _k
from skymap._util import MAD_TO_STD, concurrently
from skymap._validate import as_image, as_mask

__all__ = [
    "CLIP",
    "NEGATIVE",
    "ImageInput",
    "blank_fill",
    "edge_fill_values",
    "run_values",
    "Normalisation",
    "noise_sigma",
    "noise_value",
    "read_image",
    "read_noise",
    "strip_unit",
    "valid_bounds",
    "valid_frame",
]


@dataclass(frozen=True, kw_only=True, eq=False)
class ImageInput:
    """An image as skymap computes on it, plus what must be carried to the outputs.

    Attributes
    ----------
    data : ndarray (ny, nx)
        Float32 or float64 (see :func:`skymap._validate.as_image`), unitless.
    mask : ndarray of bool or None
        The input's own mask ORed with ``mask=`` (True = excluded).
    error : ndarray or None
        1-sigma per pixel in the units of ``data``; ``inf`` where a weight was 0 or an
        error non-finite (those pixels are also in ``mask``).
    unit : astropy.units.UnitBase or None
        The input's unit.
    wcs : object or None
        The input's WCS (NDData/CCDData only).
    meta : dict
        The input's meta (NDData/CCDData only).
    kind : str
        ``"array"``, ``"quantity"``, ``"nddata"`` or ``"ccddata"``.
    """

    data: np.ndarray
    mask: np.ndarray | None = None
    error: np.ndarray | None = None
    unit: Any = None
    wcs: Any = None
    meta: dict = field(default_factory=dict)
    kind: str = "array"

    def wrap(self, values: np.ndarray):
        """``values`` (in the input's units) as the caller should see them: a Quantity
        with the input's unit, or the array itself when the input had none. A lazy
        (dask) map is computed first: a Quantity holds an ndarray, and an image that
        had a unit was in memory (a tiled fit of it, ``tile=``), so its maps fit too."""
        if self.unit is None:
            return values
        from astropy import units as u

        if hasattr(values, "compute"):
            values = np.asarray(values.compute())

        return u.Quantity(values, self.unit, copy=False)

    def as_nddata(self, values: np.ndarray):
        """``values`` as a CCDData (input was CCDData) or NDData (any other input),
        with the input's unit, WCS and a copy of its meta."""
        from astropy.nddata import CCDData, NDData

        cls = CCDData if self.kind == "ccddata" else NDData
        unit = self.unit
        if cls is CCDData and unit is None:
            unit = "adu"  # CCDData requires one; only reached for a unitless CCDData
        return cls(np.asarray(values), unit=unit, wcs=self.wcs, meta=dict(self.meta))


def strip_unit(value: Any, unit: Any, name: str) -> Any:
    """``value`` as a plain number/array in ``unit`` (None: the image had no unit).

    A Quantity in convertible units is converted; incompatible units raise a ValueError
    naming both; a Quantity against a unitless image must be dimensionless.

    Examples
    --------
    >>> from astropy import units as u
    >>> float(strip_unit(2 * u.km, u.m, "error"))
    2000.0
    """
    from astropy import units as u

    if not isinstance(value, u.Quantity):
        return value
    target = u.dimensionless_unscaled if unit is None else unit
    try:
        return value.to_value(target)
    except u.UnitConversionError:
        raise ValueError(
            f"{name} has unit {value.unit!s}, which does not convert to the image's unit "
            f"{target!s}"
        ) from None


def read_image(
    image: Any,
    mask: Any = None,
    *,
    error: Any = None,
    weight: Any = None,
    name: str = "image",
) -> ImageInput:
    """Normalise ``image`` (array, MaskedArray, Quantity, NDData, CCDData), ``mask``
    and an optional ``error`` (1 sigma per pixel) or ``weight`` (inverse variance).

    Parameters
    ----------
    image : array_like, MaskedArray, Quantity, NDData or CCDData
        2-D image (y, x).
    mask : array_like of bool or int, optional
        True (nonzero) = excluded; ORed with the image's own mask.
    error, weight : array_like or Quantity, optional
        Mutually exclusive; either overrides an NDData uncertainty (with a warning).
        Zero weight or non-finite error excludes the pixel; negative values raise.

    Returns
    -------
    ImageInput

    Raises
    ------
    ValueError
        NDData without data, an uncertainty/error/weight of the wrong shape, negative
        errors or weights, units that do not convert, both error and weight.

    Examples
    --------
    >>> from astropy.nddata import CCDData, StdDevUncertainty
    >>> ccd = CCDData(np.ones((2, 2)), unit="electron/s", mask=[[0, 1], [0, 0]],
    ...               uncertainty=StdDevUncertainty(np.full((2, 2), 0.5)))
    >>> inp = read_image(ccd)
    >>> inp.mask.tolist(), str(inp.unit), float(inp.error[0, 0])
    ([[False, True], [False, False]], 'electron / s', 0.5)
    """
    from astropy import units as u
    from astropy.nddata import CCDData, NDData

    unit = wcs = None
    meta: dict = {}
    own_mask = None
    uncertainty = None
    kind = "array"
    if isinstance(image, NDData):
        kind = "ccddata" if isinstance(image, CCDData) else "nddata"
        if image.data is None:
            raise ValueError(f"{name} is an {type(image).__name__} with data=None")
        data = image.data
        unit, wcs, meta = image.unit, image.wcs, dict(image.meta or {})
        own_mask = image.mask
        uncertainty = image.uncertainty
        ignored = [a for a in ("flags", "psf") if getattr(image, a, None) is not None]
        if ignored:
            warnings.warn(
                f"{name}: skymap does not use the {type(image).__name__} attribute(s) "
                f"{', '.join(ignored)}; pass what they mean through mask=",
                UserWarning,
                stacklevel=3,
            )
        if isinstance(data, u.Quantity):
            data = data.to_value(unit) if unit is not None else data.value
    elif isinstance(image, u.Quantity):
        kind = "quantity"
        unit = image.unit
        data = image.value
    elif isinstance(image, np.ma.MaskedArray):
        data = image.data
        own_mask = np.ma.getmask(image)
        if own_mask is np.ma.nomask:
            own_mask = None
    else:
        data = image
    arr = as_image(data, name)
    shape = arr.shape
    combined = as_mask(mask, shape)
    if own_mask is not None and np.ndim(own_mask) == 0:
        own_mask = None if not bool(own_mask) else np.ones(shape, bool)
    if own_mask is not None:
        own = as_mask(own_mask, shape, f"{name}.mask")
        combined = own if combined is None else own | combined
    if error is not None and weight is not None:
        raise ValueError("pass error= or weight=, not both")
    if uncertainty is not None and (error is not None or weight is not None):
        warnings.warn(
            f"{name}.uncertainty is ignored: the {'error' if error is not None else 'weight'}"
            " passed explicitly is used",
            UserWarning,
            stacklevel=3,
        )
        uncertainty = None
    if uncertainty is not None:
        error = _uncertainty_error(uncertainty, unit, shape, name)
    err = read_noise(error, weight, shape, unit)
    if err is not None:
        bad = ~np.isfinite(err)
        if bad.any():
            combined = bad if combined is None else combined | bad
    return ImageInput(data=arr, mask=combined, error=err, unit=unit, wcs=wcs, meta=meta, kind=kind)


def _uncertainty_error(unc: Any, unit: Any, shape, name: str) -> np.ndarray:
    """1-sigma array from an NDData uncertainty, in the image's unit."""
    from astropy import units as u
    from astropy.nddata import InverseVariance, StdDevUncertainty, VarianceUncertainty

    arr = np.asarray(unc.array, dtype=float)
    if arr.shape != tuple(shape):
        raise ValueError(
            f"{name}.uncertainty must have the image's shape {tuple(shape)}, got {arr.shape}"
        )
    _check_nonnegative(arr, f"{name}.uncertainty")
    uunit = getattr(unc, "unit", None)
    with np.errstate(divide="ignore"):
        if isinstance(unc, StdDevUncertainty):
            sigma, power = arr, 1
        elif isinstance(unc, VarianceUncertainty):
            sigma, power = np.sqrt(arr), 2
        elif isinstance(unc, InverseVariance):
            sigma, power = 1.0 / np.sqrt(arr), -2
        else:
            warnings.warn(
                f"{name}.uncertainty of type {type(unc).__name__} is ignored: skymap reads "
                "StdDevUncertainty, VarianceUncertainty and InverseVariance",
                UserWarning,
                stacklevel=4,
            )
            return None
    if uunit is not None:
        sigma = strip_unit(
            u.Quantity(sigma, uunit ** (1.0 / power), copy=False), unit, f"{name}.uncertainty"
        )
    return sigma


def _check_nonnegative(arr: np.ndarray, name: str) -> None:
    with np.errstate(invalid="ignore"):
        if np.any(arr < 0):
            raise ValueError(
                f"{name} must be >= 0 everywhere, got a minimum of {float(np.nanmin(arr))!r}"
            )


def read_noise(error: Any, weight: Any, shape, unit: Any = None) -> np.ndarray | None:
    """The 1-sigma map (float64 copy) from ``error`` or ``weight`` (inverse variance),
    in the image's ``unit``; ``inf`` where the weight is 0 or the error is non-finite
    or 0 (no information: the pixel is excluded).

    Examples
    --------
    >>> read_noise(None, np.array([[4.0, 0.0]]), (1, 2)).tolist()
    [[0.5, inf]]
    """
    if error is None and weight is None:
        return None
    value, pname = noise_value(error, weight, unit)
    arr = np.array(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(tuple(shape), float(arr))
    if arr.shape != tuple(shape):
        raise ValueError(f"{pname} must have the image's shape {tuple(shape)}, got {arr.shape}")
    _check_nonnegative(arr, pname)
    return noise_sigma(arr, from_weight=weight is not None)


def noise_value(error: Any, weight: Any, unit: Any = None) -> tuple[Any, str]:
    """(``error`` or ``weight`` without its unit, its parameter name): the one given,
    a Quantity converted to the image's ``unit`` (a weight's unit is 1 / unit**2);
    ValueError when both are given or the units do not convert. An array is returned
    as it is (a dask array stays lazy)."""
    from astropy import units as u

    if error is not None and weight is not None:
        raise ValueError("pass error= or weight=, not both")
    pname = "error" if error is not None else "weight"
    value = error if error is not None else weight
    if isinstance(value, u.Quantity) and weight is not None:
        # A weight's unit is 1 / (image unit)^2; convert as the error it implies.
        return strip_unit(value**-0.5, unit, pname) ** -2.0, pname
    return strip_unit(value, unit, pname), pname


def noise_sigma(values: np.ndarray, *, from_weight: bool) -> np.ndarray:
    """1 sigma per pixel (float64, a new array) from errors or (``from_weight``)
    inverse variances, elementwise: ``inf`` where the weight is 0 or the error is 0 or
    non-finite. Every back end converts its pixels with it, so they agree bit for bit.

    Examples
    --------
    >>> noise_sigma(np.array([4.0, 0.0, np.nan]), from_weight=True).tolist()
    [0.5, inf, inf]
    """
    arr = np.array(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.sqrt(arr, out=arr) if from_weight else arr
        if from_weight:
            np.divide(1.0, sigma, out=sigma)
    sigma[~np.isfinite(sigma) | (sigma <= 0)] = np.inf
    return sigma


# --------------------------------------------------------------------------- scale
# The affine map the pipeline works in: ``(image - level) / scale``.
#
# Results must scale exactly with the input, from 1e-30 to 1e30 and in float32 as in
# float64. The pipeline therefore works on a normalised copy: a robust level (a median)
# is subtracted, which keeps float32 arithmetic on images with a large offset as precise
# as the data, and the result is divided by a robust scale (a MAD) rounded to a power of
# two, so that the division and its undoing are exact and no square of a pixel value
# under- or overflows. The statistics read a strided subsample of the image (so a tiled
# caller computes the same constants from the same pixels) and ignore any single value,
# however extreme.
#
# Normalised values beyond ``CLIP`` (1e8 robust sigmas) are clipped there: such a pixel is
# a source or a defect whatever its exact value, and the clip keeps its square and its
# sums finite and its share of a cell mean from swamping the fit before the masker has
# seen it. Pixels more than ``NEGATIVE`` (50) robust sigmas below the level are
# :meth:`Normalisation.outliers`: dead pixels, bad columns, negative saturation codes
# (-32768). No sky dips that deep below an image's median, and the maskers look for
# sources above the background only, so the pipeline excludes them from the start, as it
# does non-finite pixels, and reports them with the detections.

CLIP = 1e8
NEGATIVE = 50.0


def _step(shape) -> int:
    # about 250 000 pixels, as the smoother's reference level
    return max(1, int(np.sqrt(shape[0] * shape[1] / 250_000)))


def _compiled_pass(a, dtype) -> bool:
    """Whether :class:`Normalisation`'s compiled passes take ``a``: a 2-D C-contiguous
    float32 or float64 ndarray of ``dtype`` (the others take numpy's passes)."""
    return (
        isinstance(a, np.ndarray)
        and a.ndim == 2
        and a.dtype == dtype
        and a.dtype in (np.float32, np.float64)
        and a.flags.c_contiguous
    )


@dataclass(frozen=True)
class Normalisation:
    """``work = (image - level) / scale``; ``scale`` is a power of two.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img = 1e9 + 10 * rng.normal(size=(64, 64))
    >>> norm = Normalisation.of(img, np.zeros(img.shape, bool))
    >>> work = norm.apply(img)
    >>> bool(0.5 < work.std() < 2), bool(np.allclose(norm.undo(work), img))
    (True, True)
    """

    level: float
    scale: float
    spread: float = 1.0

    @classmethod
    def of(cls, image: np.ndarray, bad: np.ndarray) -> Normalisation:
        """The normalisation of ``image`` ignoring ``bad`` (True = excluded), from a
        strided subsample (:meth:`from_sample`)."""
        s = _step(image.shape)
        return cls.from_sample(image[::s, ::s], bad[::s, ::s], image.dtype)

    @staticmethod
    def sample_step(shape) -> int:
        """Stride of the subsample :meth:`of` reads."""
        return _step(shape)

    @classmethod
    def from_sample(cls, sub: np.ndarray, subbad: np.ndarray, dtype) -> Normalisation:
        """The normalisation from the subsample ``sub`` of an image of ``dtype``.

        The level is the median of the good samples, rounded to ``dtype`` (so that it is
        subtracted exactly); the scale is the MAD about it (or, when more than half the
        samples share one value, the mean absolute deviation, or 1) rounded to a power
        of two."""
        v = np.asarray(sub, dtype=np.float64)[~np.asarray(subbad)]
        v = v[np.isfinite(v)]
        if v.size == 0:
            return cls(level=0.0, scale=1.0, spread=1.0)
        # The lower middle value: a sample value, so exact in the image's dtype.
        level = float(np.partition(v, (v.size - 1) // 2)[(v.size - 1) // 2])
        dev = np.abs(v - level)
        spread = MAD_TO_STD * float(np.median(dev))
        if not spread > 0:
            spread = float(np.mean(dev))
        if not (spread > 0 and math.isfinite(spread)):
            spread = 1.0 if level == 0 else abs(level)
        scale = 2.0 ** round(math.log2(spread))
        return cls(level=float(np.dtype(dtype).type(level)), scale=float(scale), spread=spread)

    def apply(self, image: np.ndarray, dtype=None) -> np.ndarray:
        """A new normalised array (``dtype``, default the image's), clipped at
        +/- ``CLIP``; non-finite values stay non-finite."""
        dtype = np.dtype(dtype or image.dtype)
        out = np.empty(image.shape, dtype)
        if _compiled_pass(image, dtype):
            # The passes below in one (the same values).
            return _k.normalised_into(image, self.level, 1.0 / self.scale, CLIP, out)
        with np.errstate(over="ignore", invalid="ignore"):
            np.subtract(image, dtype.type(self.level), out=out, casting="unsafe")
            # The scale is a power of two: multiplying by its inverse is exact.
            np.multiply(out, dtype.type(1.0 / self.scale), out=out)
        finite = np.isfinite(image)
        np.clip(out, -CLIP, CLIP, out=out, where=finite)
        return out

    def apply_excluding(self, image: np.ndarray, given: np.ndarray):
        """``(apply(image), given | outliers(apply(image)))``: the normalised image and
        ``given`` (a boolean mask of its shape) with its extreme negative pixels, in
        one pass where :meth:`apply` makes one (two new arrays)."""
        if (
            _compiled_pass(image, getattr(image, "dtype", None))
            and isinstance(given, np.ndarray)
            and given.dtype == bool
            and given.shape == image.shape
        ):
            t = image.dtype.type
            out, bad = np.empty(image.shape, image.dtype), np.empty(image.shape, bool)
            _k.normalised_into(
                image, self.level, 1.0 / self.scale, CLIP, out, t(self._cut()), given, bad
            )
            return out, bad
        work = self.apply(image)
        return work, given | self.outliers(work)

    def _cut(self) -> float:
        return -NEGATIVE * self.spread / self.scale

    def outliers(self, work: np.ndarray) -> np.ndarray:
        """Pixels of the normalised ``work`` more than ``NEGATIVE`` robust sigmas below
        the level (a new boolean array)."""
        return work < work.dtype.type(self._cut())

    def undo(self, work, *, offset: bool = True, reuse: bool = False, minus: float = 0.0):
        """``work * scale + level`` in ``work``'s dtype (a new array; a lazy one for a
        dask array); ``offset=False`` for spreads (rms, errors), which only scale.
        ``reuse``: a float ``work`` ndarray that the caller no longer needs is
        overwritten with the result (the same values; no second image of memory).
        ``minus``, if not 0, is subtracted from ``work`` first (in its dtype: the
        values of ``work - minus`` undone)."""
        if hasattr(work, "map_blocks"):
            if minus:
                work = work - np.asarray(minus, dtype=work.dtype)
            return work.map_blocks(self.undo, offset=offset, dtype=work.dtype)
        work = np.asarray(work)
        dtype = work.dtype if work.dtype.kind == "f" else np.dtype(np.float64)
        into = work if reuse and work.dtype == dtype and work.flags.writeable else None
        if offset and _compiled_pass(work, dtype):
            # The passes below (and the subtraction) in one, in bands of rows.
            out = np.empty(work.shape, dtype) if into is None else into
            t = dtype.type
            return _k.undone_into(work, t(minus), t(self.scale), t(self.level), out)
        if minus:
            work = into = np.subtract(work, dtype.type(minus), dtype=dtype, out=into)
        out = np.multiply(work, dtype.type(self.scale), dtype=dtype, out=into)
        if offset:
            np.add(out, dtype.type(self.level), out=out)
        return out


# --------------------------------------------------------------------------- blank fills
# Drizzled, reprojected and mosaicked frames fill the part of the output that no input
# covered with one value, often exact 0 rather than NaN (a rotated frame leaves a wedge
# at each corner; a mosaic tile leaves a border). Where the sky is far above 0 such a
# fill is a deep hole that drags the smooth background down around it; where the sky
# was subtracted it sits at the sky level and the masker cannot tell it from sky. No
# sky with noise is exactly constant over a hundred connected pixels, so the default fit
# takes such regions as blank -- conservatively: only a region touching the image's
# edge (where fills are), at or below the sky level (a saturated plateau is a source,
# left to the maskers), of at least BLANK_MIN_PIXELS pixels, whose value is rare among
# the other pixels (at most BLANK_MAX_SHARE of them), solid (holes of other values
# inside it at most BLANK_MAX_HOLES of its area) and leaving at least BLANK_MIN_REST of
# the valid pixels. In a low-count image 0 is the common sky value: its clusters can
# span the frame, but then they are riddled with the counts (holes) or leave almost
# nothing else (rest), so they stay sky.

BLANK_MIN_PIXELS = 100
BLANK_RUN = 8
BLANK_MAX_SHARE = 0.1
BLANK_MAX_HOLES = 0.01
BLANK_MIN_REST = 0.1


def edge_fill_values(image, bad=None, *, run: int = BLANK_RUN, sides: bool = True) -> list:
    """The values that fill a run of at least ``run`` consecutive valid pixels along one
    of the image's four edges, most frequent first (at most four). Reads only the edges,
    so a dask array costs four strips; ``sides=False`` reads the top and bottom rows
    only (a memory map's column, even sampled, maps the file's pages, up to 2 MB each,
    into the reading process: the whole of a 4096 x 4096 file).

    Examples
    --------
    >>> img = np.arange(400.0).reshape(20, 20)
    >>> img[:, :3] = 0.0
    >>> edge_fill_values(img)
    [0.0]
    """
    counts: dict = {}
    edges = (
        (slice(0, 1), slice(None)),
        (slice(-1, None), slice(None)),
        (slice(None), slice(0, 1)),
        (slice(None), slice(-1, None)),
    )
    for sl in edges if sides else edges[:2]:
        v = np.asarray(image[sl], dtype=np.float64).ravel()
        ok = np.isfinite(v)
        if bad is not None:
            ok &= ~np.asarray(bad[sl]).ravel()
        if v.size < run:
            continue
        # runs of equal valid values: a new run starts where the value or validity changes
        start = np.ones(v.size, bool)
        start[1:] = (v[1:] != v[:-1]) | (ok[1:] != ok[:-1])
        idx = np.flatnonzero(start)
        lengths = np.diff(np.append(idx, v.size))
        for i, n in zip(idx, lengths, strict=True):
            if n >= run and ok[i]:
                counts[float(v[i])] = counts.get(float(v[i]), 0) + int(n)
    return sorted(counts, key=counts.get, reverse=True)[:4]


def run_values(
    image: np.ndarray, bad: np.ndarray | None = None, *, run: int = BLANK_RUN, step: int = 8
) -> list:
    """The values that fill a run of at least ``run`` consecutive valid pixels along
    every ``step``-th row or column of ``image``, or along any of its four edges, most
    frequent first (at most four): the candidates for a blank fill. No sky with noise
    has such runs; a fill at least ``step`` pixels wide, or along an edge, is seen.

    Examples
    --------
    >>> img = np.arange(400.0).reshape(20, 20)
    >>> img[5:15, 5:9] = -1.0
    >>> run_values(img)
    [-1.0]
    """

    def runs_along(axis):
        # True where a run of `run` equal valid pixels starts (NaN never equals itself)
        if image.shape[axis] < run:
            return None
        return _k.sampled_runs(image, bad, run, step, axis)

    def rows_and_edges():
        return runs_along(1), edge_fill_values(image, bad, run=run)

    # the column pass beside the row pass and the edges (numba's threads)
    down, (along, edges) = concurrently(functools.partial(runs_along, 0), rows_and_edges)
    counts = dict.fromkeys(edges, 1)
    for axis, runs in enumerate((down, along)):
        lines = (slice(None), slice(None, None, step)) if axis == 0 else (slice(None, None, step),)
        a = np.moveaxis(image[lines], axis, 0)
        if runs is None or not runs.any():
            continue
        width = runs.shape[0]
        vals = a[:width][runs]
        if vals.size > 100_000:
            vals = vals[:: vals.size // 100_000]
        uniq, cnt = np.unique(vals, return_counts=True)
        for u, c in zip(uniq.tolist(), cnt.tolist(), strict=True):
            counts[float(u)] = counts.get(float(u), 0) + c
    return sorted(counts, key=counts.get, reverse=True)[:4]


def valid_frame(image, mask=None) -> tuple[slice, slice] | None:
    """The bounding box of the finite pixels of ``image`` that ``mask`` (True =
    excluded) leaves, as (rows, cols) slices, when whole edge rows or columns are
    excluded; None when valid pixels reach every edge, or there are none (the fit
    then raises).

    Examples
    --------
    >>> img = np.full((6, 8), np.nan)
    >>> img[1:5, 2:7] = 1.0
    >>> valid_frame(img)
    (slice(1, 5, None), slice(2, 7, None))
    """

    def bad(sl):
        out = ~np.isfinite(image[sl])
        return out if mask is None else out | mask[sl]

    # valid pixels on every edge: nothing to cut (reads four lines)
    edges = ((0, slice(None)), (-1, slice(None)), (slice(None), 0), (slice(None), -1))
    if not any(bad(sl).all() for sl in edges):
        return None
    excluded = bad((slice(None), slice(None)))
    return valid_bounds(excluded.all(axis=1), excluded.all(axis=0))


def valid_bounds(rows_bad, cols_bad) -> tuple[slice, slice] | None:
    """The bounding box of the valid pixels as (rows, cols) slices, from which rows
    and which columns are wholly bad (1-D bool); None when none is valid.

    Examples
    --------
    >>> valid_bounds(np.array([True, False, False, True]), np.array([False, True, False]))
    (slice(1, 3, None), slice(0, 3, None))
    """
    rows = np.flatnonzero(~np.asarray(rows_bad))
    cols = np.flatnonzero(~np.asarray(cols_bad))
    if rows.size == 0:
        return None
    return (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))


def blank_fill(image: np.ndarray, bad: np.ndarray | None = None) -> np.ndarray | None:
    """Pixels of an exactly constant fill that touches the image's edge (a new boolean
    array), or None when there is none.

    A region counts when it is one 4-connected set of pixels of exactly one value that
    touches the image's edge, directly or through excluded pixels that do (a fill
    inside a NaN border, or cut in pieces by a mask), holds at least
    ``BLANK_MIN_PIXELS`` (100) pixels, lies at or below the median of the other valid
    pixels plus three robust sigma (not a saturated plateau), is solid (islands of
    other values under 100 pixels enclosed in it: at most 1% of its area), leaves at
    least 10% of the valid pixels, and whose value makes up at most
    ``BLANK_MAX_SHARE`` (10%) of the other valid pixels (not the common value of a
    low-count image, whose clusters of 0 are sky). Only values filling a run of
    ``BLANK_RUN`` (8) pixels along a row or column are looked at (:func:`run_values`),
    so an image without one costs a few comparisons.

    Parameters
    ----------
    image : ndarray (ny, nx)
    bad : ndarray of bool, optional
        Pixels already excluded (True), never part of a fill.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img = 100 + rng.normal(size=(64, 64))
    >>> img[:20, :20] = 0.0          # a fill in one corner
    >>> blank = blank_fill(img)
    >>> int(blank.sum()), bool(blank[:20, :20].all())
    (400, True)
    >>> blank_fill(100 + rng.normal(size=(64, 64))) is None
    True
    """
    from scipy import ndimage

    image = np.asarray(image)
    values = run_values(image, bad)
    if not values:
        return None
    valid = np.isfinite(image)
    if bad is not None:
        valid &= ~np.asarray(bad, dtype=bool)
    out = None
    for v in values:
        eq = image == image.dtype.type(v)
        eq &= valid
        labels, n = ndimage.label(eq)
        if n == 0:
            continue
        # Touching the edge directly or through excluded pixels that reach it (a fill
        # cut in pieces by a mask or by NaN).
        joint, _ = ndimage.label(eq | ~valid)
        edge = np.concatenate((joint[0], joint[-1], joint[:, 0], joint[:, -1]))
        outside = np.isin(joint, np.unique(edge[edge > 0]))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = np.unique(labels[outside & eq])
        keep = keep[sizes[keep] >= BLANK_MIN_PIXELS]
        if keep.size == 0:
            continue
        region = np.isin(labels, keep)
        rest = valid & ~region
        nrest = int(np.count_nonzero(rest))
        if nrest < BLANK_MIN_REST * np.count_nonzero(valid):
            continue  # (nearly) all one value: a constant or a low-count image
        if np.count_nonzero(eq & rest) > BLANK_MAX_SHARE * nrest:
            continue
        # Small islands of other values inside it (a large one is the data a border
        # frames): a cluster of noise at a common value is riddled with them.
        holes, _ = ndimage.label(ndimage.binary_fill_holes(region) & ~region)
        hole_sizes = np.bincount(holes.ravel())[1:]
        small = int(hole_sizes[hole_sizes < BLANK_MIN_PIXELS].sum())
        if small > BLANK_MAX_HOLES * np.count_nonzero(region):
            continue
        norm = Normalisation.of(image, ~rest)
        if v > norm.level + 3.0 * norm.spread:
            continue
        out = region if out is None else out | region
    return out
