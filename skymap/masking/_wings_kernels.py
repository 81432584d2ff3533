"""Compiled kernels for :mod:`skymap.masking.wings`. Not public: call through wings.py."""

from __future__ import annotations

import numpy as np
from numba import njit

from skymap._util import in_bands


def distances(seeds: np.ndarray, unit: float, rows=None) -> np.ndarray:
    """``unit`` times the Euclidean distance (float64) of every pixel of the boolean
    map ``seeds`` from its nearest True pixel, equal to
    ``unit * scipy.ndimage.distance_transform_edt(~seeds)`` bit for bit: both are the
    square root of the exact integer squared distance. ``seeds`` must hold a True
    pixel. ``rows`` = (y0, y1): those rows only (the same values as the whole map's
    rows y0:y1), with memory for those rows only, so that a band at a time can be read
    from a large map.

    The transform is the separable one of Felzenszwalb & Huttenlocher (each column's
    distance to its nearest seed, then per row the lower envelope of the parabolas
    those distances make), in integers, without scipy's (2, ny, nx) int32 feature
    indices: ~10x faster on the wing step's 1024^2 block grids.

    References
    ----------
    Felzenszwalb, P. F. & Huttenlocher, D. P. 2012, Theory of Computing 8, 415
    (distance transforms of sampled functions), https://doi.org/10.4086/toc.2012.v008a019.
    """
    seeds = np.ascontiguousarray(seeds, dtype=bool)
    y0, y1 = (0, seeds.shape[0]) if rows is None else (int(rows[0]), int(rows[1]))
    out = np.empty((y1 - y0, seeds.shape[1]), np.float64)
    col = np.empty(out.shape, np.int32)
    # both passes in bands (of columns, then of rows): each value is its own exact
    # integer minimum, whatever the bands
    in_bands(_column_distances, seeds.shape[1], seeds, col, y0, y1, grain=64)
    in_bands(_distances, out.shape[0], col, float(unit), out, seeds.shape[0])
    return out


@njit(cache=True, nogil=True)
def _column_distances(seeds, col, y0, y1, lo, hi):  # pragma: no cover - compiled
    """Columns ``lo:hi`` of rows ``y0:y1``: each pixel's distance (in rows) to the
    nearest seed of its column, down, then up, the band's columns of a row at once
    (along memory). Rows outside ``y0:y1`` are searched for the nearest seed above
    and below the rows only."""
    ny, nx = seeds.shape
    far = ny + nx  # further than any seed: its square exceeds every true squared distance
    for x in range(lo, hi):
        d = far
        for y in range(y0, -1, -1):  # the nearest seed at or above row y0
            if seeds[y, x]:
                d = min(y0 - y, far)
                break
        col[0, x] = d
    for y in range(y0 + 1, y1):
        k = y - y0
        for x in range(lo, hi):
            col[k, x] = 0 if seeds[y, x] else min(col[k - 1, x] + 1, far)
    last = y1 - y0 - 1
    for x in range(lo, hi):
        for y in range(y1, ny):  # the nearest seed below the rows
            if seeds[y, x]:
                col[last, x] = min(col[last, x], y - (y1 - 1))
                break
    for k in range(last - 1, -1, -1):
        for x in range(lo, hi):
            col[k, x] = min(col[k, x], col[k + 1, x] + 1)


@njit(cache=True, nogil=True)
def _distances(col, unit, out, ny, ylo, yhi):  # pragma: no cover - compiled
    """Rows ``ylo:yhi``: the lower envelope of the parabolas of ``col``'s distances
    (``ny``: the whole map's height)."""
    nx = col.shape[1]
    far = ny + nx
    f = np.empty(nx, np.int64)  # each column's squared distance plus x^2
    v = np.empty(nx, np.int64)  # the columns of the envelope's parabolas
    # the envelope's breakpoints as exact ratios zn / zd (zd > 0): parabola k is
    # lowest from zn[k] / zd[k] to zn[k + 1] / zd[k + 1]
    zn = np.empty(nx, np.int64)
    zd = np.empty(nx, np.int64)
    for y in range(ylo, yhi):
        for x in range(nx):
            f[x] = np.int64(col[y, x]) * col[y, x] + x * x
        # the lower envelope of the parabolas (x - q)^2 + col[y, q]^2 of the columns
        # that have a seed
        k = -1
        for q in range(nx):
            if col[y, q] >= far:
                continue
            while k >= 0:
                # where q's parabola meets v[k]'s: sn / sd
                sn, sd = f[q] - f[v[k]], 2 * (q - v[k])
                if k == 0 or sn * zd[k] > zn[k] * sd:
                    break
                k -= 1  # v[k]'s parabola is nowhere lowest
            k += 1
            v[k] = q
            if k > 0:
                zn[k] = sn
                zd[k] = sd
        if k < 0:  # no seed in any column: an image without seeds
            for x in range(nx):
                out[y, x] = np.inf
            continue
        j = 0
        for x in range(nx):
            while j < k and zn[j + 1] < x * zd[j + 1]:
                j += 1
            d = x - v[j]
            out[y, x] = unit * np.sqrt(np.float64(d * d + f[v[j]] - v[j] * v[j]))


def ring_sums(num, den, weight, dist, keep, edges, out=None):
    """Per ring ``r`` (``edges[r] <= dist < edges[r + 1]``, the last open-ended), over
    the values ``keep`` selects (all when it is empty), with ``mean = num / den``
    (``den`` of one value: that value for all): the sums of ``weight``,
    ``weight * mean``, ``mean**2 * weight`` and the count, as a (4, edges.size)
    float64 array. Those of ``np.bincount(np.digitize(dist, edges) - 1, weights=...)``
    over the selected values bit for bit (the same products, added in the same
    order) for ``dist >= edges[0]``, without the selections' copies or digitize's
    binary search per value (edges are few, most values lie in the first rings).

    ``out``, a (4, edges.size) or (5, edges.size) float64 array, is added to and
    returned: values read in parts (bands of rows) give the sums of the whole bit for
    bit when their parts are added in order. A fifth row gets the sums of ``num``."""
    if out is None:
        out = np.zeros((4, np.size(edges)))
    _ring_sums(num, den, weight, dist, keep, edges, out)
    return out


@njit(cache=True, nogil=True)
def _ring_sums(num, den, weight, dist, keep, edges, out):  # pragma: no cover - compiled
    n = edges.size
    every = keep.size == 0
    one = den.size == 1
    nums = out.shape[0] > 4
    for i in range(dist.size):
        if not every and not keep[i]:
            continue
        r = 0
        while r + 1 < n and edges[r + 1] <= dist[i]:
            r += 1
        mean = num[i] / (den[0] if one else den[i])
        out[0, r] += weight[i]
        out[1, r] += weight[i] * mean
        out[2, r] += mean * mean * weight[i]
        out[3, r] += 1.0
        if nums:
            out[4, r] += num[i]


def seeds_free(cnt, nbad, hy, hx):
    """``(cnt <= 0.5 * area) & (nbad < 0.5 * area)`` and ``(cnt > 0) & ~seeds`` with
    ``area = np.outer(hy, hx)`` (float64 pixels per block), in one pass in bands of
    rows, without the area map: :func:`skymap.masking.wings._seeds_free`'s maps."""
    seeds = np.empty(cnt.shape, np.bool_)
    free = np.empty(cnt.shape, np.bool_)
    in_bands(_seeds_free, cnt.shape[0], cnt, nbad, hy, hx, seeds, free, grain=64)
    return seeds, free


@njit(cache=True, nogil=True)
def _seeds_free(cnt, nbad, hy, hx, seeds, free, lo, hi):  # pragma: no cover - compiled
    for y in range(lo, hi):
        for x in range(cnt.shape[1]):
            half = 0.5 * (hy[y] * hx[x])
            s = (cnt[y, x] <= half) & (nbad[y, x] < half)
            seeds[y, x] = s
            free[y, x] = (cnt[y, x] > 0) & (not s)
