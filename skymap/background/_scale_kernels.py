"""Compiled kernels for :mod:`skymap.background.scale`. Not public: call through scale.py."""

from __future__ import annotations

import numpy as np
from numba import njit


def box3_mean(a: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.uniform_filter(a, 3)`` of a 2-D float64 array, bit for bit: the
    same running sums (per line, the first three values in order, then each step
    adds the entering value minus the leaving one, divided by 3 at the output) along
    y, then along x, edges reflected; along memory, so the passes vectorise (scipy's
    line buffers do not: ~5x slower on the 1024^2 window of :func:`source_scale`)."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    out = np.empty(a.shape, np.float64)
    if a.size:
        _box3(a, out)
    return out


@njit(cache=True, nogil=True)
def _box3(a, out):  # pragma: no cover - compiled
    ny, nx = a.shape
    # along y, all columns at once: the running sum of each column in ``run``
    run = np.empty(nx)
    for x in range(nx):
        run[x] = (a[0, x] + a[0, x]) + a[min(1, ny - 1), x]
        out[0, x] = run[x] / 3.0
    for y in range(1, ny):
        enter, leave = a[min(y + 1, ny - 1)], a[max(y - 2, 0)]
        for x in range(nx):
            run[x] += enter[x] - leave[x]
            out[y, x] = run[x] / 3.0
    # along x, row by row, through a copy of the row with its reflected edges
    ext = np.empty(nx + 2)
    for y in range(ny):
        row = out[y]
        ext[0] = row[0]
        for x in range(nx):
            ext[x + 1] = row[x]
        ext[nx + 1] = row[nx - 1]
        s = (ext[0] + ext[1]) + ext[2]
        row[0] = s / 3.0
        for x in range(1, nx):
            s += ext[x + 2] - ext[x - 1]
            row[x] = s / 3.0


def component_areas(mask: np.ndarray) -> np.ndarray:
    """The pixel counts (int64) of the 4-connected regions of the boolean map ``mask``
    in the raster order of their first pixels: ``np.bincount(scipy.ndimage.label(mask)
    [0].ravel())[1:]``, without the labels (each region filled from its first pixel
    through a stack as long as the map's set pixels)."""
    m = np.ascontiguousarray(mask, dtype=np.bool_)
    return _component_areas(m, np.zeros(m.shape, np.bool_), np.empty(int(m.sum()), np.int64))


@njit(cache=True, nogil=True)
def _component_areas(m, seen, stack):  # pragma: no cover - compiled
    ny, nx = m.shape
    areas = np.empty(stack.size, np.int64)
    n = 0
    for y0 in range(ny):
        for x0 in range(nx):
            if not m[y0, x0] or seen[y0, x0]:
                continue
            seen[y0, x0] = True
            stack[0] = y0 * nx + x0
            top, area = 1, 0
            while top:
                top -= 1
                i = stack[top]
                area += 1
                y, x = i // nx, i % nx
                if y > 0 and m[y - 1, x] and not seen[y - 1, x]:
                    seen[y - 1, x] = True
                    stack[top] = i - nx
                    top += 1
                if y < ny - 1 and m[y + 1, x] and not seen[y + 1, x]:
                    seen[y + 1, x] = True
                    stack[top] = i + nx
                    top += 1
                if x > 0 and m[y, x - 1] and not seen[y, x - 1]:
                    seen[y, x - 1] = True
                    stack[top] = i - 1
                    top += 1
                if x < nx - 1 and m[y, x + 1] and not seen[y, x + 1]:
                    seen[y, x + 1] = True
                    stack[top] = i + 1
                    top += 1
            areas[n] = area
            n += 1
    return areas[:n]
