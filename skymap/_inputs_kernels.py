"""Compiled kernels for :mod:`skymap._inputs`. Not public: call through _inputs.py."""

from __future__ import annotations

import numpy as np
from numba import njit

from skymap._util import in_bands


def normalised_into(image, level, inv, clip, out, cut=None, given=None, bad=None):
    """``out = (image - level) * inv``, clipped at +/- ``clip`` where ``image`` is
    finite, in ``out``'s dtype (``image``'s: float32 or float64, C-contiguous, 2-D),
    with numpy's operations in numpy's order: the values of
    :meth:`~skymap._inputs.Normalisation.apply`'s passes in one. With ``cut`` (in
    ``out``'s dtype), also ``bad = given | (out < cut)`` in the same pass (boolean
    maps of the image's shape)."""
    t = out.dtype.type
    excluding = cut is not None
    if not excluding:
        cut, given = t(0), np.zeros((1, 1), np.bool_)
        bad = given
    in_bands(_normalised, image.shape[0], image, t(level), t(inv), t(clip), out, cut, given,
             bad, excluding, grain=32)  # fmt: skip
    return out


@njit(cache=True, nogil=True)
def _normalised(  # pragma: no cover - compiled
    image, level, inv, clip, out, cut, given, bad, excluding, lo, hi
):
    for y in range(lo, hi):
        src, dst = image[y], out[y]
        for x in range(src.size):
            v = src[x]
            w = (v - level) * inv
            if np.isfinite(v):
                w = min(max(w, -clip), clip)
            dst[x] = w
        if excluding:
            g, b = given[y], bad[y]
            for x in range(src.size):
                b[x] = g[x] | (dst[x] < cut)


def sampled_runs(image, bad, run, step, axis):
    """The ``runs`` map of :func:`skymap._inputs.run_values` along ``axis`` (0: down
    every ``step``-th column, 1: along every ``step``-th row): True at the first pixel
    of ``run`` consecutive pixels of one value, all valid (finite comparisons, not
    ``bad``), laid out as ``np.moveaxis(image[lines], axis, 0)[:n - run + 1]`` (n: the
    line length). One pass over the image rows, counting each line's current run of
    equal neighbours, instead of ``run - 1`` comparisons of whole sampled maps.
    ``run`` >= 2 and no longer than the lines."""
    image = np.asarray(image)
    ny, nx = image.shape
    flag = np.zeros((1, 1), np.bool_) if bad is None else np.asarray(bad, dtype=np.bool_)
    if axis == 0:
        out = np.empty((ny - run + 1, -(-nx // step)), np.bool_)
        _column_runs(image, flag, bad is not None, run, step, out)
    else:
        # written line by line (along memory), handed back transposed: the same layout
        # of values, without a strided write per pixel
        lines = np.empty((-(-ny // step), nx - run + 1), np.bool_)
        _row_runs(image, flag, bad is not None, run, step, lines)
        out = lines.T
    return out


@njit(cache=True, nogil=True)
def _column_runs(image, bad, masked, run, step, out):  # pragma: no cover - compiled
    ny, nx = image.shape
    cols = out.shape[1]
    count = np.zeros(cols, np.int64)
    for y in range(1, ny):
        above, here = image[y - 1], image[y]
        for j in range(cols):
            x = j * step
            same = here[x] == above[x]
            if masked:
                same = same and not bad[y, x] and not bad[y - 1, x]
            count[j] = count[j] + 1 if same else 0
        start = y - run + 1  # the first row of the run of pairs ending at row y
        if start >= 0:
            for j in range(cols):
                out[start, j] = count[j] >= run - 1


@njit(cache=True, nogil=True)
def _row_runs(image, bad, masked, run, step, out):  # pragma: no cover - compiled
    nx = image.shape[1]
    for j in range(out.shape[0]):
        y = j * step
        row, line = image[y], out[j]
        count = 0
        for x in range(1, nx):
            same = row[x] == row[x - 1]
            if masked:
                same = same and not bad[y, x] and not bad[y, x - 1]
            count = count + 1 if same else 0
            start = x - run + 1
            if start >= 0:
                line[start] = count >= run - 1


def nonfinite_or(values, given, out):
    """``out = given | ~isfinite(values)`` (``given`` None: no mask); returns the number
    of non-finite values outside ``given``."""
    ny = values.shape[0]
    masked = given is not None
    counts = np.zeros(ny, np.int64)
    given = given if masked else np.zeros((1, 1), bool)
    in_bands(_nonfinite_or, ny, values, given, masked, out, counts, grain=32)
    return int(counts.sum())


@njit(cache=True, nogil=True)
def _nonfinite_or(values, given, masked, out, counts, lo, hi):  # pragma: no cover - compiled
    for y in range(lo, hi):
        counts[y] = nonfinite_or_row(values[y], given, masked, y, out[y])


@njit(cache=True, nogil=True, inline="always")
def nonfinite_or_row(vrow, given, masked, y, orow):  # pragma: no cover - compiled
    """Row ``y`` of :func:`nonfinite_or`; returns its count."""
    # On bytes, not booleans, and without a branch per pixel, so that the loops
    # vectorise; |v| < inf is False for NaN and infinities only.
    n = 0
    inf = np.inf
    out = orow.view(np.uint8)
    if masked:
        grow = given[y].view(np.uint8)
        for x in range(vrow.size):
            bad = np.uint8(not (abs(vrow[x]) < inf))
            g = grow[x]
            n += bad & (g ^ np.uint8(1))
            out[x] = bad | g
    else:
        for x in range(vrow.size):
            bad = np.uint8(not (abs(vrow[x]) < inf))
            n += bad
            out[x] = bad
    return n


def undone_into(work, minus, scale, level, out):
    """``out = (work - minus) * scale + level`` in ``out``'s dtype (``work``'s: float32
    or float64, C-contiguous, 2-D; ``out`` may be ``work``), each operation rounded as
    numpy's: :meth:`~skymap._inputs.Normalisation.undo`'s passes in one, in bands of
    rows."""
    in_bands(_undone, work.shape[0], work, minus, scale, level, out, grain=32)
    return out


@njit(cache=True, nogil=True)
def _undone(work, minus, scale, level, out, lo, hi):  # pragma: no cover - compiled
    for y in range(lo, hi):
        src, dst = work[y], out[y]
        for x in range(src.size):
            dst[x] = (src[x] - minus) * scale + level
