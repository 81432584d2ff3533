"""Ring footprint and exact, NaN-aware ring median / ring percentile filters.

A ring median replaces each pixel by the median of an annulus around it. Sources smaller
than the inner radius drop out, so ``image - ring_median(image, ...)`` is a first cut at a
source-only image (the "Complex 2D Background" notebook's first step).

``ring_median`` and ``ring_percentile`` are exact: with no mask and finite data they equal
``scipy.ndimage.median_filter`` / ``percentile_filter`` with the same footprint and
``mode="reflect"`` bit for bit, and they ignore masked and non-finite pixels, which scipy
cannot do. ``approximate_ring_median`` trades exactness for speed on very large images.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage as ndi

from skymap._validate import as_image, as_mask, check_positive, check_range, combine_masks
from skymap.stats import _filters_kernels as _k

__all__ = [
    "approximate_ring_median",
    "ring_footprint",
    "ring_median",
    "ring_percentile",
    "upsample_linear",
]

_PARALLEL_MIN_PIXELS = 1 << 17


def ring_footprint(radius: float, width: float) -> np.ndarray:
    """Boolean annulus footprint of inner radius ``radius`` and width ``width`` (pixels).

    The same footprint as ``astropy.convolution.Ring2DKernel(radius, width).array > 0``:
    a square whose side is ``ceil(2 * (radius + width))`` rounded up to an odd number,
    holding the offsets whose squared distance from the centre lies in
    ``[radius**2, (radius + width)**2]`` (both ends included).

    Parameters
    ----------
    radius : float
        Inner radius in pixels, >= 0 (0 gives a disk).
    width : float
        Width of the annulus in pixels, > 0.

    Returns
    -------
    footprint : ndarray of bool, shape (n, n), n odd

    Examples
    --------
    >>> ring_footprint(1, 1).astype(int)
    array([[0, 0, 1, 0, 0],
           [0, 1, 1, 1, 0],
           [1, 1, 0, 1, 1],
           [0, 1, 1, 1, 0],
           [0, 0, 1, 0, 0]])
    """
    check_positive("radius", radius, allow_zero=True)
    check_positive("width", width)
    r_in = float(radius)
    r_out = r_in + float(width)
    size = math.ceil(2 * r_out)
    size += 1 - size % 2  # astropy's default kernel size: 2 * r_out rounded up to odd
    half = size // 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    rr = (xx * xx + yy * yy).astype(float)
    return (rr >= r_in**2) & (rr <= r_out**2)


def _footprint_runs(footprint: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Split a centred odd footprint into horizontal runs (dy, dx_lo, dx_hi) of offsets."""
    half = footprint.shape[0] // 2
    padded = np.zeros((footprint.shape[0], footprint.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = footprint
    edges = np.diff(padded, axis=1)
    rows_s, starts = np.nonzero(edges == 1)
    rows_e, stops = np.nonzero(edges == -1)
    # nonzero is row-major, so the starts and stops of each row pair up in order.
    dy = (rows_s - half).astype(np.int64)
    lo = (starts - half).astype(np.int64)
    hi = (stops - 1 - half).astype(np.int64)
    return dy, lo, hi, half


def ring_percentile(
    image,
    radius: float,
    width: float,
    percentile: float,
    *,
    mask=None,
    ceiling: float | None = None,
) -> np.ndarray:
    """Exact percentile of the valid pixels in a ring around each pixel.

    Parameters
    ----------
    image : array_like, shape (ny, nx)
        Input image. Integer input becomes float32; float32 stays float32.
    radius, width : float
        Ring inner radius and width in pixels (see :func:`ring_footprint`).
    percentile : float
        In [0, 100].
    mask : array_like of bool, optional
        True = excluded. NaN and inf pixels are excluded automatically.
    ceiling : float, optional
        Pixels above ``ceiling`` are replaced by ``ceiling`` before filtering, as survey
        pipelines do on bright fields so that saturated stars cannot drag the ring up.

    Returns
    -------
    filtered : ndarray, shape (ny, nx), the image's float dtype
        NaN where the ring holds no valid pixel.

    Notes
    -----
    Rank convention (scipy.ndimage's): among the ``n`` valid ring pixels sorted
    ascending, the value at index ``min(int(n * percentile / 100), n - 1)`` is returned,
    always one of the input values. For the median (50) and an even ``n`` this is the
    upper of the two middle values, so with no mask the result equals
    ``scipy.ndimage.percentile_filter(image, percentile, footprint=ring,
    mode="reflect")`` bit for bit. Edges are handled by the same reflection
    (``d c b a | a b c d``); reflected copies of masked pixels are excluded too.

    Cost: an O(n) radix rank transform of each tile (with its halo) plus, per output
    pixel, two bitset updates per horizontal run of the footprint (a ring has about
    ``3.5 * (radius + width)`` runs) and a short pointer walk. Tiles run in parallel on
    numba's threads for images of 2**17 pixels or more (``numba.set_num_threads``
    limits them). Its speed against scipy is measured by
    ``benchmarks/bench_ring_median.py`` (figures in ``benchmarks/README.md``).

    References
    ----------
    Huang, T., Yang, G. & Tang, G. 1979, IEEE Trans. ASSP 27, 13,
    https://doi.org/10.1109/TASSP.1979.1163188.
    Perreault, S. & Hebert, P. 2007, IEEE Trans. Image Processing 16, 2389,
    https://doi.org/10.1109/TIP.2007.902329.

    Examples
    --------
    >>> img = np.arange(49.0).reshape(7, 7)
    >>> float(ring_percentile(img, 1, 1, 0)[3, 3])  # minimum of the ring around (3, 3)
    10.0
    """
    img = as_image(image)
    check_range("percentile", percentile, 0.0, 100.0)
    footprint = ring_footprint(radius, width)
    m = as_mask(mask, img.shape)
    valid = ~combine_masks(img, m)
    if ceiling is not None:
        if not np.isfinite(float(ceiling)):
            raise ValueError(f"ceiling must be a finite number or None, got {ceiling!r}")
        img = np.minimum(img, img.dtype.type(ceiling))
    # C order for both: a transposed input would otherwise compile another specialisation.
    img = np.ascontiguousarray(img)
    valid = np.ascontiguousarray(valid)
    nbits = 8 * img.dtype.itemsize
    bits = img.view(np.uint32 if nbits == 32 else np.uint64)
    dy, lo, hi, half = _footprint_runs(footprint)
    foot_dy, foot_dx = np.nonzero(footprint)
    foot_dy, foot_dx = foot_dy - half, foot_dx - half
    # Tiles of ~4 ring radii keep each tile's rank histogram in L1/L2 while the halo
    # (re-sorted by each tile) stays a modest fraction of the work.
    tile = max(128, 4 * half)
    out = np.empty(img.shape, dtype=img.dtype)
    # Waking numba's threads costs ~0.1 ms on an idle machine and tens of ms on a busy
    # one; below ~2**17 pixels (about 20 ms of work) one thread is faster.
    if img.size >= _PARALLEL_MIN_PIXELS:
        kernel = _k.ring_percentile_tiles
    else:
        kernel = _k.ring_percentile_tiles_serial
    footprint_arrays = (foot_dy, foot_dx, dy, lo, hi)
    kernel(img, valid, bits, nbits, footprint_arrays, half, float(percentile), tile, out)
    return out


def ring_median(image, radius: float, width: float, *, mask=None, ceiling=None) -> np.ndarray:
    """Exact median of the valid pixels in a ring around each pixel.

    Shorthand for ``ring_percentile(image, radius, width, 50, mask=mask,
    ceiling=ceiling)``; see :func:`ring_percentile` for the parameters and conventions.
    For an even number of valid pixels the upper middle value is returned (scipy's
    convention), so with no mask and finite data this equals
    ``scipy.ndimage.median_filter(image, footprint=ring_footprint(radius, width),
    mode="reflect")`` bit for bit.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img = rng.normal(size=(64, 64)).astype(np.float32)
    >>> img[30:34, 30:34] += 100.0  # a source smaller than the ring's hole
    >>> bkg = ring_median(img, 6, 3)
    >>> bool(abs(bkg[32, 32]) < 0.5), bkg.dtype
    (True, dtype('float32'))
    """
    return ring_percentile(image, radius, width, 50.0, mask=mask, ceiling=ceiling)


def upsample_linear(small: np.ndarray, n: int, factor: int, axis: int) -> np.ndarray:
    """Linear interpolation of a 2-D grid of bin values back to ``n`` pixels along
    ``axis``.

    Bin ``i`` is centred on full-resolution pixel ``(i + 0.5) * factor - 0.5``; beyond
    the first and last centres the end values are held.

    Examples
    --------
    >>> upsample_linear(np.array([[0.0, 4.0]]), 8, 4, axis=1).tolist()
    [[0.0, 0.0, 0.5, 1.5, 2.5, 3.5, 4.0, 4.0]]
    """
    pos = (np.arange(n) + 0.5) / factor - 0.5
    i0 = np.clip(np.floor(pos).astype(int), 0, small.shape[axis] - 1)
    i1 = np.minimum(i0 + 1, small.shape[axis] - 1)
    frac = np.clip(pos - i0, 0.0, 1.0)
    shape = [1, 1]
    shape[axis] = n
    frac = frac.reshape(shape)
    a = np.take(small, i0, axis=axis)
    b = np.take(small, i1, axis=axis)
    # a + frac * (b - a), in b (fresh): the same values with two maps, not five
    b -= a
    b *= frac
    b += a
    return b


def approximate_ring_median(
    image, radius: float, width: float, *, factor: int = 4, mask=None
) -> np.ndarray:
    """APPROXIMATE ring median for very large images: bin, filter, interpolate back.

    The image is block-averaged by ``factor`` (ignoring masked pixels), filtered exactly
    with a ring of ``radius / factor`` and ``width / factor``, and interpolated back
    linearly. The filtering work drops by about ``factor**3``, leaving the binning and
    interpolation (linear in the number of pixels) to dominate, so the gain over
    :func:`ring_median` grows with the ring (``benchmarks/bench_ring_median.py``).
    The result is smooth on scales below ``factor`` pixels and
    is NOT equal to the exact filter: block means are not medians, so unmasked sources
    leak into the bins. Use it for a first guess on very large images, not where the
    exact ring median matters.

    Parameters
    ----------
    image : array_like, shape (ny, nx)
    radius, width : float
        Ring inner radius and width in full-resolution pixels.
    factor : int
        Binning factor >= 1 (1 = exact :func:`ring_median`).
    mask : array_like of bool, optional
        True = excluded; NaN/inf excluded automatically.

    Returns
    -------
    filtered : ndarray, shape (ny, nx), the image's float dtype

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> img = 5.0 + rng.normal(size=(256, 256))
    >>> bool(np.abs(approximate_ring_median(img, 24, 8, factor=4) - 5.0).max() < 0.3)
    True
    """
    img = as_image(image)
    check_positive("factor", factor)
    if int(factor) != factor:
        raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
    factor = int(factor)
    if factor == 1:
        return ring_median(img, radius, width, mask=mask)
    check_positive("radius", radius, allow_zero=True)
    check_positive("width", width)
    m = as_mask(mask, img.shape)
    invalid = combine_masks(img, m)
    ny, nx = img.shape
    by, bx = -(-ny // factor), -(-nx // factor)
    padded = np.zeros((by * factor, bx * factor), dtype=np.float64)
    weight = np.zeros((by * factor, bx * factor), dtype=np.float32)
    padded[:ny, :nx] = np.where(invalid, 0.0, img)
    weight[:ny, :nx] = ~invalid
    sums = padded.reshape(by, factor, bx, factor).sum(axis=(1, 3))
    counts = weight.reshape(by, factor, bx, factor).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        binned = (sums / counts).astype(img.dtype)
    small = ring_median(binned, radius / factor, max(width / factor, 0.5))
    # Holes (no valid pixel in the binned ring) are filled from the nearest valid bin.
    holes = ~np.isfinite(small)
    if holes.all():
        return np.full(img.shape, np.nan, dtype=img.dtype)
    if holes.any():
        nearest = ndi.distance_transform_edt(holes, return_distances=False, return_indices=True)
        small = small[tuple(nearest)]
    full = upsample_linear(upsample_linear(small, ny, factor, axis=0), nx, factor, axis=1)
    return full.astype(img.dtype, copy=False)
