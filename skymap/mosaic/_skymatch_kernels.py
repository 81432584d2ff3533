"""Compiled kernels for :mod:`skymap.mosaic.skymatch` (private: import the module, not this).

One pass over the data each: moments within limits without copying, the selection
itself, and the resampling of one image's overlap onto another's pixels.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def moments_within(x, lo, hi, shift):
    """Count, mean, std (ddof=1), min and max of the values of ``x`` in ``[lo, hi]``.

    Sums are taken about ``shift`` (a value near the data) so that the variance does not
    cancel catastrophically for a faint scatter on a bright sky.
    """
    n = 0
    s = 0.0
    ss = 0.0
    vmin = np.inf
    vmax = -np.inf
    for k in range(x.size):
        v = x[k]
        if v >= lo and v <= hi:
            d = v - shift
            n += 1
            s += d
            ss += d * d
            if v < vmin:
                vmin = v
            if v > vmax:
                vmax = v
    if n == 0:
        return 0, np.nan, np.nan, np.nan, np.nan
    m = s / n
    var = (ss - n * m * m) / (n - 1) if n > 1 else 0.0
    return n, m + shift, np.sqrt(max(var, 0.0)), vmin, vmax


@njit(cache=True, nogil=True)
def select_within(x, lo, hi):
    """The values of ``x`` in ``[lo, hi]`` (a new float64 array)."""
    out = np.empty(x.size)
    n = 0
    for k in range(x.size):
        v = x[k]
        if v >= lo and v <= hi:
            out[n] = v
            n += 1
    return out[:n]


@njit(cache=True, nogil=True)
def overlap_samples(
    data_i, valid_i, data_j, valid_j, y0, y1, x0, x1, gy0, gdy, gx0, gdx, cy, cx, w_eps, positions
):
    """Pixels of image i in rows y0..y1, cols x0..x1 that land inside image j.

    ``cy``/``cx`` hold j's (y, x) at the nodes ``gy0 + k*gdy``, ``gx0 + l*gdx`` of a
    coarse grid; positions in between are bilinear in those nodes. j is sampled
    bilinearly; a neighbour whose weight is at most ``w_eps`` is dropped (and the others
    renormalised), so that an exact integer shift is not spoilt by a masked neighbour
    at a round-off distance. Returns (values of i, values of j, mean over the samples of
    the sum of squared interpolation weights: 1 on pixel centres, 4/9 on average for
    random shifts; resampled noise has that fraction of its variance, and, when
    ``positions`` is True, each sample's (y, x) in i and in j (else empty arrays).
    """
    nyj, nxj = data_j.shape
    nyg, nxg = cy.shape
    nmax = (y1 - y0 + 1) * (x1 - x0 + 1)
    vi = np.empty(nmax)
    vj = np.empty(nmax)
    npos = nmax if positions else 0
    pos = np.empty((4, npos))
    n = 0
    rsum = 0.0
    eps = 1e-6
    for y in range(y0, y1 + 1):
        ty = (y - gy0) / gdy
        ky = min(max(int(np.floor(ty)), 0), nyg - 2)
        fy = ty - ky
        for x in range(x0, x1 + 1):
            if not valid_i[y, x]:
                continue
            tx = (x - gx0) / gdx
            kx = min(max(int(np.floor(tx)), 0), nxg - 2)
            fx = tx - kx
            a = (1 - fy) * (1 - fx)
            b = (1 - fy) * fx
            c = fy * (1 - fx)
            d = fy * fx
            py = a * cy[ky, kx] + b * cy[ky, kx + 1] + c * cy[ky + 1, kx] + d * cy[ky + 1, kx + 1]
            px = a * cx[ky, kx] + b * cx[ky, kx + 1] + c * cx[ky + 1, kx] + d * cx[ky + 1, kx + 1]
            if py < -eps or py > nyj - 1 + eps or px < -eps or px > nxj - 1 + eps:
                continue
            iy = min(max(int(np.floor(py)), 0), max(nyj - 2, 0))
            ix = min(max(int(np.floor(px)), 0), max(nxj - 2, 0))
            gy = min(max(py - iy, 0.0), 1.0)
            gx = min(max(px - ix, 0.0), 1.0)
            iy1 = min(iy + 1, nyj - 1)
            ix1 = min(ix + 1, nxj - 1)
            total = 0.0
            norm = 0.0
            sq = 0.0
            ok = True
            for q in range(4):
                if q == 0:
                    yy, xx, w = iy, ix, (1 - gy) * (1 - gx)
                elif q == 1:
                    yy, xx, w = iy, ix1, (1 - gy) * gx
                elif q == 2:
                    yy, xx, w = iy1, ix, gy * (1 - gx)
                else:
                    yy, xx, w = iy1, ix1, gy * gx
                if w <= w_eps:
                    continue
                if not valid_j[yy, xx]:
                    ok = False
                    break
                total += w * data_j[yy, xx]
                norm += w
                sq += w * w
            if not ok or norm <= 0.0:
                continue
            vi[n] = data_i[y, x]
            vj[n] = total / norm
            if positions:
                pos[0, n] = y
                pos[1, n] = x
                pos[2, n] = py
                pos[3, n] = px
            rsum += sq / (norm * norm)
            n += 1
    return vi[:n], vj[:n], rsum / n if n else 1.0, pos[:, : min(n, npos)]


@njit(cache=True, nogil=True)
def clip_limits(x, lower, upper, nclip, lsigma, usigma):
    """Count, mean, std and final limits of the iterative clipping of ``x``.

    Limits start at ``[lower, upper]``; each of up to ``nclip`` passes sets them to
    ``[mean - lsigma*std, mean + usigma*std]`` (never wider than the start) of the values
    inside the current limits, selecting from the whole sample each time. A pass that
    keeps the same count and extremes ends the loop (nothing could change any more).
    """
    lo, hi = lower, upper
    if x.size == 0:
        return 0, np.nan, np.nan, lo, hi
    mid = x[x.size // 2]
    shift = mid if np.isfinite(mid) else 0.0
    n, mean, std, vmin, vmax = moments_within(x, lo, hi, shift)
    for _ in range(nclip):
        if n == 0:
            break
        lo = max(lower, mean - lsigma * std)
        hi = min(upper, mean + usigma * std)
        n0, min0, max0 = n, vmin, vmax
        n, mean, std, vmin, vmax = moments_within(x, lo, hi, shift)
        if n == n0 and vmin == min0 and vmax == max0:
            break
    return n, mean, std, lo, hi


@njit(cache=True, nogil=True)
def cell_statistics(vi, vj, order, starts, lower, upper, nclip, lsigma, usigma, stat, min_pixels):
    """Clipped sky difference ``i - j`` in each cell of an overlap.

    Cell ``c`` holds the samples ``order[starts[c]:starts[c+1]]``. In each cell both
    images' values are clipped on their own (``lower``/``upper``, then ``nclip`` passes);
    the samples kept by both are differenced, the differences clipped again, and the
    statistic taken (``stat``: 0 mean, 1 median, 2 mode = 2.5 median - 1.5 mean).
    Returns each cell's value, the std and count of its final selection (NaN value
    below ``min_pixels``), and which samples that final selection used.
    """
    nc = starts.size - 1
    value = np.full(nc, np.nan)
    std = np.full(nc, np.nan)
    count = np.zeros(nc, dtype=np.int64)
    used = np.zeros(vi.size, dtype=np.bool_)
    for c in range(nc):
        idx = order[starts[c] : starts[c + 1]]
        a = vi[idx].astype(np.float64)
        b = vj[idx].astype(np.float64)
        keep = np.ones(idx.size, dtype=np.bool_)
        for v in (a, b):
            _, _, _, lo, hi = clip_limits(v, lower, upper, nclip, lsigma, usigma)
            keep &= (v >= lo) & (v <= hi)
        if keep.sum() < min_pixels:
            continue
        d = a[keep] - b[keep]
        n, mean, s, lo, hi = clip_limits(d, -np.inf, np.inf, nclip, lsigma, usigma)
        if n < min_pixels:
            continue
        sel = (d >= lo) & (d <= hi)
        if stat == 0:
            value[c] = mean
        else:
            median = np.median(d[sel])
            value[c] = median if stat == 1 else 2.5 * median - 1.5 * mean
        std[c] = s
        count[c] = n
        used[idx[np.flatnonzero(keep)[sel]]] = True
    return value, std, count, used
