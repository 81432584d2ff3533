"""Compiled kernels for :mod:`skymap.masking.bright`. Not public: call through bright.py."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from skymap._fill_kernels import fill
from skymap._util import in_bands


def label8(region):
    """``(labels, n)`` of the 8-connected regions of the boolean map ``region``, as
    ``scipy.ndimage.label(region, structure=np.ones((3, 3)))`` numbers them (1..n in
    the raster order of each region's first pixel), in int32. Reads the map eight
    pixels at a time and visits only the region pixels: for sparse regions several
    times faster than a labelling that scans every pixel."""
    flat = np.ascontiguousarray(region, dtype=bool).reshape(-1)
    labels = np.zeros(region.shape, np.int32)
    whole = flat.size // 8 * 8
    n = _label8(flat, flat[:whole].view(np.uint64), labels.reshape(-1), region.shape[1])
    return labels, n


@njit(cache=True, nogil=True)
def _label8(flat, words, labels, nx):  # pragma: no cover - compiled
    ny = flat.size // nx
    stack = np.empty(1 << 16, np.int64)
    n = 0
    for start in range(0, flat.size, 8):
        if start // 8 < words.size and words[start // 8] == 0:
            continue
        for i in range(start, min(start + 8, flat.size)):
            if not flat[i] or labels[i] != 0:
                continue
            n += 1
            stack = fill(flat, labels, ny, nx, i, n, stack)
    return n


@njit(cache=True, nogil=True)
def box_means_at(img, grid, block, invalid, flat, oy, ox):  # pragma: no cover - compiled
    """The 3 x 3 means (float64) of ``img - grid[(y + oy) // block, (x + ox) // block]``
    (invalid pixels as 0) at the flat indices ``flat`` of ``img``, edges reflected as
    ``scipy.ndimage.uniform_filter``'s default (the nearest pixel repeated), each the
    float64 sum of its nine values in row order over 9."""
    ny, nx = img.shape
    out = np.empty(flat.size)
    for k in range(flat.size):
        y = flat[k] // nx
        x = flat[k] - y * nx
        total = 0.0
        for dy in range(-1, 2):
            yy = min(max(y + dy, 0), ny - 1)
            for dx in range(-1, 2):
                xx = min(max(x + dx, 0), nx - 1)
                v = np.float32(0.0)
                if not invalid[yy, xx]:
                    v = img[yy, xx] - grid[(yy + oy) // block, (xx + ox) // block]
                total += v
        out[k] = total / 9.0
    return out


def block_rows(img, invalid, block, out, step=2):
    """``out[by * gx + bx]``: the pixels ``img[y, x]`` of block (by, bx) at every
    ``step``-th ``y`` and ``x`` (from the block's corner), in raster order, in ``out``'s
    dtype; NaN where ``invalid`` or beyond the image (``out`` is
    (gy * gx, (block // step) ** 2)); in bands of rows."""
    gx = -(-img.shape[1] // block)
    rows = out.shape[0] // gx * (block // step)
    in_bands(_block_rows, rows, img, invalid, block, step, out, grain=64)
    return out


@njit(cache=True, nogil=True)
def _block_rows(img, invalid, block, step, out, lo, hi):  # pragma: no cover - compiled
    ny, nx = img.shape
    h = block // step
    gx = -(-nx // block)
    for r in range(lo, hi):
        by, i = r // h, r % h
        y = by * block + step * i
        for bx in range(gx):
            row = out[by * gx + bx]
            x0 = bx * block
            for j in range(h):
                x = x0 + step * j
                if y < ny and x < nx and not invalid[y, x]:
                    row[i * h + j] = img[y, x]
                else:
                    row[i * h + j] = np.nan


@njit(cache=True, nogil=True)
def region_sums(where, lab, bad, vals, box, n, width, c09, c1e6):  # pragma: no cover
    """The per-region numbers of :func:`skymap.masking.bright.region_stats` in two
    passes over the pixels, without its sort: a region's peak is its largest value, the
    last pixel holding it (or its last NaN) as the sort orders ties; the counts and
    coordinate sums are integers (exact in any order). ``vals`` has ``-inf`` at the
    ``bad`` pixels; ``c09``, ``c1e6`` are 0.9 and 1e-6 in its dtype (numpy's scalar
    arithmetic on it). Every region holds a pixel."""
    peak = np.full(n, -np.inf, vals.dtype)
    last = np.full(n, -1, np.int64)
    boxmax = np.full(n, -np.inf)
    ints = np.zeros((6, n), np.int64)  # masked, top, repeats, area, sum_y, sum_x
    for i in range(where.size):
        r = lab[i]
        v = vals[i]
        # the sort's order: values ascending, NaN last, ties in the given order
        if last[r] < 0 or np.isnan(v) or (not np.isnan(peak[r]) and v >= peak[r]):
            peak[r] = v
            last[r] = i
        b = box[i]
        if not np.isnan(boxmax[r]) and (np.isnan(b) or b > boxmax[r]):
            boxmax[r] = b
        ints[0, r] += 1 if bad[i] else 0
    for i in range(where.size):
        r = lab[i]
        v = vals[i]
        p = peak[r]
        near = v >= c09 * p
        ints[1, r] += 1 if near else 0
        ints[2, r] += 1 if v >= p - c1e6 * abs(p) else 0
        if near or bad[i]:
            y = where[i] // width
            ints[3, r] += 1
            ints[4, r] += y
            ints[5, r] += where[i] - y * width
    py = np.empty(n, np.int64)
    px = np.empty(n, np.int64)
    for r in range(n):
        py[r] = where[last[r]] // width
        px[r] = where[last[r]] - py[r] * width
    return py, px, boxmax, ints


def above_sky(img, grid, block, oy, ox, threshold, invalid, out):
    """``out = (img - grid[(y + oy) // block, (x + ox) // block] > threshold) & ~invalid``
    in one pass (in bands of rows): each band's sky row expanded once (the loop over
    the pixels then vectorises), the difference in numpy's dtype of the two,
    ``threshold`` in it."""
    in_bands(_above_sky, img.shape[0], img, grid, block, oy, ox, threshold, invalid, out)
    return out


@njit(cache=True, nogil=True)
def _above_sky(img, grid, block, oy, ox, threshold, invalid, out, lo, hi):  # pragma: no cover
    ny, nx = img.shape
    sky = np.empty(nx, grid.dtype)
    band = -1
    for y in range(lo, hi):
        g = (y + oy) // block
        if g != band:
            for x in range(nx):
                sky[x] = grid[g, (x + ox) // block]
            band = g
        irow, vrow, orow = img[y], invalid[y], out[y]
        for x in range(nx):
            orow[x] = (irow[x] - sky[x] > threshold) & (not vrow[x])


@njit(cache=True, nogil=True)
def ring_medians(labels, key, v, out):  # pragma: no cover - compiled
    """``out[l]``: the median of the values ``v`` of label ``l`` (0 .. out.size - 1),
    as :func:`skymap.masking.bright.ring_profiles` reads it from
    ``v[np.argsort(key, kind="stable")]`` (``key`` orders the labels apart, the
    lower label first): the mean of the two middle values of each label's stable order
    by key. The elements at those ranks are selected (by key, then by position: the
    stable order) instead of sorted, in time linear in the values; labels without
    values are left alone."""
    nlab = out.size
    start = np.zeros(nlab + 1, np.int64)
    for i in range(labels.size):
        start[labels[i] + 1] += 1
    for j in range(nlab):
        start[j + 1] += start[j]
    pos = start[:-1].copy()
    idx = np.empty(labels.size, np.int64)
    for i in range(labels.size):
        idx[pos[labels[i]]] = i
        pos[labels[i]] += 1
    bk = np.empty(labels.size)
    for j in range(nlab):
        s, e = start[j], start[j + 1]
        c = e - s
        if c == 0:
            continue
        for t in range(s, e):
            bk[t] = key[idx[t]]
        m = (c - 1) // 2
        _select(bk, idx, s, e, s + m)
        lo = idx[s + m]
        hi = lo
        if c % 2 == 0:
            # the next in order: the least of those after the selected one
            best = s + m + 1
            for t in range(s + m + 2, e):
                if _before(bk[t], idx[t], bk[best], idx[best]):
                    best = t
            hi = idx[best]
        out[j] = 0.5 * (v[lo] + v[hi])


@njit(cache=True, nogil=True, inline="always")
def _before(ka, ia, kb, ib):  # pragma: no cover - compiled
    return ka < kb or (ka == kb and ia < ib)


@njit(cache=True, nogil=True)
def _select(k, i, lo, hi, m):  # pragma: no cover - compiled
    """Reorder ``k[lo:hi]``, ``i[lo:hi]`` (together) so that position ``m`` holds the
    pair that a sort by (key, index) puts there, the smaller ones before it and the
    larger after (Hoare's selection, the median of three as pivot)."""
    hi -= 1
    while hi > lo:
        mid = (lo + hi) // 2
        # median of three into lo
        if _before(k[mid], i[mid], k[lo], i[lo]):
            k[mid], k[lo] = k[lo], k[mid]
            i[mid], i[lo] = i[lo], i[mid]
        if _before(k[hi], i[hi], k[lo], i[lo]):
            k[hi], k[lo] = k[lo], k[hi]
            i[hi], i[lo] = i[lo], i[hi]
        if _before(k[hi], i[hi], k[mid], i[mid]):
            k[hi], k[mid] = k[mid], k[hi]
            i[hi], i[mid] = i[mid], i[hi]
        pk, pi = k[mid], i[mid]
        a, b = lo, hi
        while a <= b:
            while _before(k[a], i[a], pk, pi):
                a += 1
            while _before(pk, pi, k[b], i[b]):
                b -= 1
            if a <= b:
                k[a], k[b] = k[b], k[a]
                i[a], i[b] = i[b], i[a]
                a += 1
                b -= 1
        if m <= b:
            hi = b
        elif m >= a:
            lo = a
        else:
            return


@njit(cache=True, nogil=True)
def ring_samples(yy, xx, y, x, bad, values, edges, rmax, ny, nx):  # pragma: no cover
    """The samples of :func:`skymap.masking.bright.ring_profiles` inside ``rmax`` and
    on the image, in its order (source by source, offset by offset): each one's ring
    label (``ring + nb * source - 1``, the ring counted as ``np.searchsorted(edges, r,
    side="right")``), value (float64) and radius ``np.hypot(yy - y, xx - x)``; numpy's
    masks, hypot and compaction in one pass."""
    k, m = yy.shape
    nb = edges.size - 1
    labels = np.empty(k * m, np.int64)
    v = np.empty(k * m)
    rs = np.empty(k * m)
    n = 0
    for s in range(k):
        for o in range(m):
            sy, sx = yy[s, o], xx[s, o]
            if bad[s, o] or sy < 0 or sy >= ny or sx < 0 or sx >= nx:
                continue
            r = np.hypot(sy - y[s], sx - x[s])
            if not r < rmax:
                continue
            ring = 0
            while ring < edges.size and edges[ring] <= r:
                ring += 1
            labels[n] = ring + nb * s - 1
            v[n] = np.float64(values[s, o])
            rs[n] = r
            n += 1
    return labels[:n], v[:n], rs[:n]


@njit(cache=True, nogil=True)
def paint_disks(out, ys, xs, rs, y0, y1, x0, x1):  # pragma: no cover - compiled
    """OR into ``out`` (the window rows ``y0:y1``, columns ``x0:x1``) the disks
    ``(yy - y)**2 + (xx - x)**2 <= r * r`` of the sources, each over its bounding rows
    and columns ``ceil(c - r) .. floor(c + r)``, in float64 as numpy's arrays make it."""
    for k in range(ys.size):
        y, x, r = ys[k], xs[k], rs[k]
        ya, yb = max(y0, int(math.ceil(y - r))), min(y1, int(math.floor(y + r)) + 1)
        xa, xb = max(x0, int(math.ceil(x - r))), min(x1, int(math.floor(x + r)) + 1)
        if ya >= yb or xa >= xb:
            continue
        rr = r * r
        for yy in range(ya, yb):
            dy = np.float64(yy) - y
            dy2 = dy * dy
            row = out[yy - y0]
            for xx in range(xa, xb):
                dx = np.float64(xx) - x
                if dy2 + dx * dx <= rr:
                    row[xx - x0] = True
