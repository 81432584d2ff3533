"""The image side of the thin-plate smoother (:mod:`skymap.background.smooth`): the
image binned to cells (per-cell sums that tiles of an image add up to bit for bit, and
the statistics the smoother reads from them), the reference level subtracted before
binning, and the cubic-spline upsampling of a cell grid back to pixels."""

from __future__ import annotations

import threading
import weakref

import numpy as np
from scipy import ndimage

from skymap._select_kernels import exact_median
from skymap._validate import as_pair
from skymap.backends.base import block_sums
from skymap.background import _smooth_kernels as _k

__all__ = [
    "cell_stats",
    "cell_sums",
    "merged_sums",
    "valid_counts",
    "reference_level",
    "reference_step",
    "upsample",
    "weighted_sums",
]


def cell_sums(image: np.ndarray, bad: np.ndarray, cells, ref: float, origin=(0, 0)):
    """Per-cell sums of the good (not ``bad``) pixels of ``image``: count, sum and sum
    of squares of ``image - ref``, and sums of the y and x pixel coordinates, stacked
    as one (5, gy, gx) float64 array.

    The sums of an image cut into pieces along cell boundaries are the pieces' sums,
    bit for bit (each cell is summed in the same pixel order), so a tiled caller bins
    its tiles with this and puts the grids side by side. ``origin`` is the (y, x) pixel
    of ``image[0, 0]`` in the whole image, for the coordinate sums; it must sit on a
    cell boundary.

    Examples
    --------
    >>> img = np.arange(16.0).reshape(4, 4)
    >>> whole = cell_sums(img, np.zeros((4, 4), bool), (2, 2), 0.0)
    >>> right = cell_sums(img[:, 2:], np.zeros((4, 2), bool), (2, 2), 0.0, origin=(0, 2))
    >>> bool(np.array_equal(whole[:, :, 1:], right))
    True
    """
    cy, cx = cells
    n, s1, s2, sy, sx = _k.bin_cells(image, bad, cy, cx, ref)
    # Integer coordinate sums are exact in float64 (< 2**53), so shifting is exact.
    if origin[0]:
        sy += n * origin[0]
    if origin[1]:
        sx += n * origin[1]
    return np.stack([n, s1, s2, sy, sx])


def valid_counts(bad, cells, origin=(0, 0)) -> np.ndarray:
    """The count layer of :func:`cell_sums` (the pixels not ``bad`` per cell, a (1,
    gy, gx) float64 array) without reading the image; ``origin`` as there (unused).

    Examples
    --------
    >>> bad = np.zeros((5, 7), bool)
    >>> bad[0, :3] = True
    >>> valid_counts(bad, (2, 4))[0].tolist()
    [[5.0, 6.0], [8.0, 6.0], [4.0, 3.0]]
    """
    return _k.count_cells(np.asarray(bad, dtype=bool), int(cells[0]), int(cells[1]))[None]


def merged_sums(grid: np.ndarray, factor: int) -> np.ndarray:
    """The per-cell sums ``grid`` (over its last two axes) of cells ``factor`` times
    larger: ``factor`` x ``factor`` blocks of cells added up (a ragged last block sums
    what is there), by :func:`~skymap.backends.base.block_sums`. Equal to
    :func:`cell_sums` at the larger cells up to the order of the additions, without
    reading the image again.

    Examples
    --------
    >>> img = np.arange(35.0).reshape(5, 7)
    >>> ok = np.zeros(img.shape, bool)
    >>> small, large = cell_sums(img, ok, (1, 2), 0.0), cell_sums(img, ok, (2, 4), 0.0)
    >>> bool(np.allclose(merged_sums(small, 2), large))
    True
    """
    g = np.asarray(grid, dtype=np.float64)
    keep = np.zeros(g.shape[-2:], bool)
    layers = [block_sums(layer, keep, int(factor))[0] for layer in g.reshape(-1, *g.shape[-2:])]
    return np.stack(layers).reshape(*g.shape[:-2], *layers[0].shape)


def reference_level(sub: np.ndarray, subbad: np.ndarray) -> float | None:
    """The level subtracted before binning, for numerical accuracy only: the median of
    the good pixels of a subsample (``image[::s, ::s]`` with ``s`` from
    :func:`reference_step`); None when the subsample has no good pixel (the caller then
    takes the first good pixel of the image)."""
    return exact_median(sub[~subbad]) if not subbad.all() else None


def reference_step(shape) -> int:
    """Stride of the subsample :func:`reference_level` reads (about 250 000 pixels)."""
    return max(1, int(np.sqrt(shape[0] * shape[1] / 250_000)))


def weighted_sums(image, bad, weight, cells, ref: float, origin=(0, 0)) -> np.ndarray:
    """:func:`cell_sums` plus two rows: per-cell sums of ``weight`` and of
    ``weight * (image - ref)`` over the good pixels, a (7, gy, gx) float64 array. The
    smoother then weights each cell by its summed weight and takes the weighted mean;
    the variance (the RMS map) stays that of the pixels."""
    plain = cell_sums(image, bad, cells, ref, origin)
    w = np.asarray(weight, dtype=np.float64)
    wsum = _k.bin_cells(w, bad, cells[0], cells[1], 0.0)[1]
    wx = _k.bin_cells(w * (image - ref), bad, cells[0], cells[1], 0.0)[1]
    return np.concatenate([plain, wsum[None], wx[None]])


def cell_stats(sums: np.ndarray, cy: int, cx: int, ref: float):
    """Per-cell count, mean, variance, centroid offset and weight of the good pixels
    (the weight is the count, or the summed pixel weights of :func:`weighted_sums`,
    and the mean then the weighted mean)."""
    n, s1, s2, sy, sx = sums[:5]
    # its own memory: a model keeps the count (and the weight), and a view would keep
    # all the layers of ``sums`` with it (a refit's whole cell grid in every record of
    # a fit's history)
    n = n.copy()
    iy = np.arange(n.shape[0]) * cy
    ix = np.arange(n.shape[1]) * cx
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n
        var = (s2 - n * mean**2) / (n - 1)
        dy = sy / n - (iy[:, None] + (cy - 1) / 2.0)
        dx = sx / n - (ix[None, :] + (cx - 1) / 2.0)
        if len(sums) == 7:
            w = np.where(n > 0, sums[5], 0.0)
            return n, sums[6] / sums[5] + ref, var, dy, dx, w
    return n, mean + ref, var, dy, dx, n


def _bspline_weights(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Base index and the four cubic B-spline weights (unit knot spacing, coefficient
    k at position k) of each position; the weights apply to coefficients base-1..base+2."""
    base = np.floor(pos).astype(np.int64)
    t = pos - base
    weights = np.stack(
        [
            (1 - t) ** 3 / 6,
            (3 * t**3 - 6 * t**2 + 4) / 6,
            (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6,
            t**3 / 6,
        ],
        axis=1,
    )
    return base, weights


def upsample(
    grid: np.ndarray,
    cell_size,
    shape,
    dtype=np.float64,
    step: int = 1,
    offset: float = 0.0,
    window=None,
    out=None,
    subtract_from=None,
) -> np.ndarray:
    """Cubic-spline interpolation of a cell grid (node i at pixel ``i*c + (c-1)/2``) to
    the full ``shape``; beyond the outer nodes the grid is extended linearly, so a
    gradient carries on to the image edge. With ``step`` > 1 only every ``step``-th
    pixel along each axis is evaluated (exactly ``upsample(...)[::step, ::step]``), at
    positions shifted by ``offset`` pixels (``(step - 1) / 2``: the blocks' centres).
    ``window`` = ((y0, y1), (x0, x1)) evaluates only those rows and columns, exactly
    ``upsample(...)[y0:y1:step, x0:x1:step]`` (each pixel is computed on its own from
    the whole grid), which is how a tiled caller evaluates one tile. ``out``, an array
    of the result's shape and ``dtype``, is written into and returned (fresh memory
    costs the kernel's zeroing of its pages: ~9 ms for a 4096^2 float32 map).
    ``subtract_from``, an array of the result's shape (``out`` itself too), gives
    ``subtract_from - map`` instead, the map rounded to ``dtype`` first (a residual:
    with both in ``dtype``, ``subtract_from - upsample(...)`` bit for bit, in one
    pass).

    Examples
    --------
    >>> g = np.add.outer(np.arange(5.0), np.zeros(4))
    >>> upsample(g, 4, (20, 16))[:, 0][[0, 1, 18, 19]].round(6)
    array([-0.375, -0.125,  4.125,  4.375])
    """
    cy, cx = as_pair("cell_size", cell_size)
    coef = _coefficients(grid)
    pad = _PAD
    (y0, y1), (x0, x1) = ((0, shape[0]), (0, shape[1])) if window is None else window
    uy = (np.arange(y0, y1, step) + offset - (cy - 1) / 2.0) / cy + pad
    ux = (np.arange(x0, x1, step) + offset - (cx - 1) / 2.0) / cx + pad
    # Along x on the small grid (cheap; written row by row, no transposed copy), then
    # along y row by row: each output row combines four whole rows of that
    # (contiguous, so it vectorises; along x pixel by pixel it read each column's
    # weights and gathered its nodes).
    bx, wx = _bspline_weights(ux)
    by, wy = _bspline_weights(uy)
    # only the coefficient rows the output rows read (a window: a tile's few cells of
    # the grid, not all of them); each row is evaluated on its own, so the same values
    if by.size:
        r0, r1 = int(by.min()) - 1, int(by.max()) + 3
        coef, by = coef[r0:r1], by - r0
    tmp = _k.bspline_rows(coef, bx, wx)
    if out is None:
        out = np.empty((uy.size, ux.size), dtype=dtype)
    elif out.shape != (uy.size, ux.size) or out.dtype != np.dtype(dtype):
        raise ValueError(
            f"out must be a {np.dtype(dtype)} array of shape {(uy.size, ux.size)}, got "
            f"{out.dtype} {out.shape}"
        )
    if subtract_from is not None and np.shape(subtract_from) != out.shape:
        raise ValueError(
            f"subtract_from must have the shape {out.shape}, got {np.shape(subtract_from)}"
        )
    return _k.bspline_columns(tmp, by, wy, out, subtract_from)


# The IIR spline prefilter decays by 0.27 per node: 12 nodes of linear extension make
# the mirror boundary invisible (< 1e-6) at the outer pixels.
_PAD = 12

# The coefficients of the last grids evaluated (upsample's prefilter), by the grid's
# identity: a tiled fit evaluates one model on every tile (twice a tile for the
# change), and the prefilter of the whole grid cost ~0.3 ms a call on a 128^2 grid
# (~4 ms on the 512^2 grid of a 16384^2 image), as much as a tile's subsample itself.
# At most _KEEP entries (each ~2 grids of memory), each dropped with its grid too.
_COEFFICIENTS: dict[int, tuple] = {}
_KEEP = 4
_LOCK = threading.Lock()


def _coefficients(grid) -> np.ndarray:
    """The cubic B-spline coefficients of ``grid`` extended by :data:`_PAD` nodes on
    each side (float64, read-only, shared). Taken from the cache only for the very
    grid object holding the very bits it was made from (a grid written in place since
    is filtered again)."""
    z = np.ascontiguousarray(grid, dtype=np.float64)
    key = id(grid)
    found = _COEFFICIENTS.get(key)
    if found is not None:
        ref, bits, coef = found
        if ref() is grid and bits.shape == z.shape and np.array_equal(bits, z.view(np.uint64)):
            return coef
    coef = ndimage.spline_filter(
        _extend_linear(_extend_linear(z, _PAD, 0), _PAD, 1), order=3, mode="mirror"
    )
    coef.flags.writeable = False
    try:
        ref = weakref.ref(grid)
    except TypeError:  # an object without weak references (a list): not kept
        return coef
    with _LOCK:
        _COEFFICIENTS.pop(key, None)
        while len(_COEFFICIENTS) >= _KEEP:  # the oldest first (dicts keep their order)
            del _COEFFICIENTS[next(iter(_COEFFICIENTS))]
        _COEFFICIENTS[key] = (ref, z.view(np.uint64).copy(), coef)
    weakref.finalize(grid, _forget, key, ref)
    return coef


def _forget(key: int, ref) -> None:
    """Drop ``key``'s entry if it is still the one of the grid that died."""
    with _LOCK:
        found = _COEFFICIENTS.get(key)
        if found is not None and found[0] is ref:
            del _COEFFICIENTS[key]


def _extend_linear(z: np.ndarray, pad: int, axis: int) -> np.ndarray:
    z = np.moveaxis(z, axis, 0)
    n = z.shape[0]
    if n == 1:
        ext = np.concatenate([np.repeat(z, pad, 0), z, np.repeat(z, pad, 0)])
    else:
        k = np.arange(1, pad + 1)[:, None, ...]
        lo = z[0] - k[::-1] * (z[1] - z[0])
        hi = z[-1] + k * (z[-1] - z[-2])
        ext = np.concatenate([lo, z, hi])
    return np.moveaxis(ext, 0, axis)
