"""Compiled kernels for :mod:`skymap.smooth`. Not public: call through smooth.py."""

from __future__ import annotations

import numpy as np
from numba import njit

from skymap._util import in_bands


@njit(cache=True, nogil=True)
def thin_plate_matvec(z, w, cyy, cxx, cxy, dy, dx, e, out):  # pragma: no cover - compiled
    """out = w z + K z, K the thin-plate penalty: ``cyy D2y'D2y + cxx D2x'D2x + cxy
    Dxy'Dxy`` (second differences, natural boundaries: no condition is imposed at the
    grid edges, so planes cost nothing); returns ``z . out``, the conjugate gradients'
    curvature. The operator gathered instead of scattered: the second
    differences go to zero-bordered scratch arrays ``dy`` (ny + 2, nx), ``dx`` (ny,
    nx + 2) and ``e`` (ny + 1, nx + 1) (borders must be zero), so that every output is
    a branch-free sum that vectorises (three times faster on grids of 100^2)."""
    ny, nx = z.shape
    for i in range(ny - 2):
        for j in range(nx):
            dy[i + 2, j] = (z[i, j] - 2.0 * z[i + 1, j] + z[i + 2, j]) * cyy
    for i in range(ny):
        for j in range(nx - 2):
            dx[i, j + 2] = (z[i, j] - 2.0 * z[i, j + 1] + z[i, j + 2]) * cxx
    for i in range(ny - 1):
        for j in range(nx - 1):
            e[i + 1, j + 1] = (z[i + 1, j + 1] - z[i + 1, j] - z[i, j + 1] + z[i, j]) * cxy
    curv = 0.0
    for i in range(ny):
        for j in range(nx):
            v = (
                w[i, j] * z[i, j]
                + (dy[i + 2, j] - 2.0 * dy[i + 1, j] + dy[i, j])
                + (dx[i, j + 2] - 2.0 * dx[i, j + 1] + dx[i, j])
                + (e[i + 1, j + 1] - e[i + 1, j] - e[i, j + 1] + e[i, j])
            )
            out[i, j] = v
            curv += z[i, j] * v
    return curv


@njit(cache=True, nogil=True)
def cg_step(z, r, p, ap, alpha):  # pragma: no cover - compiled
    """z += alpha p, r -= alpha ap in one pass; returns ``r . r``."""
    ny, nx = z.shape
    rr = 0.0
    for i in range(ny):
        for j in range(nx):
            z[i, j] += alpha * p[i, j]
            v = r[i, j] - alpha * ap[i, j]
            r[i, j] = v
            rr += v * v
    return rr


@njit(cache=True, nogil=True)
def cg_direction(p, q, r, rz):  # pragma: no cover - compiled
    """p = q + (r.q / rz) p in place (the next conjugate direction); returns ``r . q``."""
    ny, nx = p.shape
    rz_new = 0.0
    for i in range(ny):
        for j in range(nx):
            rz_new += r[i, j] * q[i, j]
    beta = rz_new / rz
    for i in range(ny):
        for j in range(nx):
            p[i, j] = q[i, j] + beta * p[i, j]
    return rz_new


@njit(cache=True, nogil=True)
def thin_plate_apply_field(z, cyy, cxx, cxy, fyy, fxx, fxy, out):  # pragma: no cover - compiled
    """``K z`` of :func:`thin_plate_matvec` (scattered, into ``out``) with each second
    difference's term weighted by a field:
    ``fyy`` (ny - 2, nx), ``fxx`` (ny, nx - 2), ``fxy`` (ny - 1, nx - 1), the penalty's
    local multiplier where each difference is taken."""
    ny, nx = z.shape
    for i in range(ny):
        for j in range(nx):
            out[i, j] = 0.0
    for i in range(ny - 2):
        for j in range(nx):
            d = (z[i, j] - 2.0 * z[i + 1, j] + z[i + 2, j]) * cyy * fyy[i, j]
            out[i, j] += d
            out[i + 1, j] -= 2.0 * d
            out[i + 2, j] += d
    for i in range(ny):
        for j in range(nx - 2):
            d = (z[i, j] - 2.0 * z[i, j + 1] + z[i, j + 2]) * cxx * fxx[i, j]
            out[i, j] += d
            out[i, j + 1] -= 2.0 * d
            out[i, j + 2] += d
    for i in range(ny - 1):
        for j in range(nx - 1):
            d = (z[i + 1, j + 1] - z[i + 1, j] - z[i, j + 1] + z[i, j]) * cxy * fxy[i, j]
            out[i + 1, j + 1] += d
            out[i + 1, j] -= d
            out[i, j + 1] -= d
            out[i, j] += d
    return out


def bin_cells(image, bad, cy, cx, ref):
    """Per-cell count, sum, sum of squares (of ``image - ref``) and sums of the y and x
    coordinates of the good pixels, in float64, in one pass."""
    ny, nx = image.shape
    n, s1, s2, sy, sx = np.zeros((5, -(-ny // cy), -(-nx // cx)))
    in_bands(
        _bin_cells, n.shape[0], image, bad, cy, cx, ref, n, s1, s2, sy, sx, grain=-(-32 // cy)
    )
    return n, s1, s2, sy, sx


@njit(cache=True, nogil=True)
def _bin_cells(image, bad, cy, cx, ref, n, s1, s2, sy, sx, lo, hi):  # pragma: no cover - compiled
    ny, nx = image.shape
    for i in range(lo, hi):
        y = i * cy
        y1 = min(ny, (i + 1) * cy)
        # Four rows at a time: their sums are independent chains, each added to the
        # cell's totals in row order as before (the same sums, bit for bit).
        while y + 4 <= y1:
            _cell_rows4(image, bad, y, i, cx, ref, n, s1, s2, sy, sx)
            y += 4
        for yy in range(y, y1):
            _cell_row(image, bad, yy, i, cx, ref, n, s1, s2, sy, sx)


@njit(cache=True, nogil=True, inline="always")
def _cell_row(image, bad, y, i, cx, ref, n, s1, s2, sy, sx):  # pragma: no cover - compiled
    """Row ``y``'s count, sum, sum of squares, x sum of the good pixels per cell of
    cell row ``i``, added to the totals (the counts and x sums as integers: exact, so
    the same as float64 sums of ones and of x)."""
    nx = image.shape[1]
    vrow, brow = image[y], bad[y]
    for j in range(n.shape[1]):
        c = 0
        a1 = 0.0
        a2 = 0.0
        ax = 0
        # Selects, not branches (bad values may be NaN).
        for x in range(j * cx, min(nx, (j + 1) * cx)):
            ok = not brow[x]
            v = (vrow[x] - ref) if ok else 0.0
            c += 1 if ok else 0
            a1 += v
            a2 += v * v
            ax += x if ok else 0
        _add_row(n, s1, s2, sy, sx, i, j, y, float(c), a1, a2, float(ax))


@njit(cache=True, nogil=True, inline="always")
def _add_row(n, s1, s2, sy, sx, i, j, y, c, a1, a2, ax):  # pragma: no cover - compiled
    """One row's sums of cell (i, j) added to its totals, as the single-row loop did."""
    n[i, j] += c
    s1[i, j] += a1
    s2[i, j] += a2
    sy[i, j] += c * y
    sx[i, j] += ax


@njit(cache=True, nogil=True, inline="always")
def _cell_rows4(image, bad, y, i, cx, ref, n, s1, s2, sy, sx):  # pragma: no cover - compiled
    """:func:`_cell_row` for rows ``y`` .. ``y + 3`` at once."""
    nx = image.shape[1]
    v0, v1, v2, v3 = image[y], image[y + 1], image[y + 2], image[y + 3]
    b0, b1, b2, b3 = bad[y], bad[y + 1], bad[y + 2], bad[y + 3]
    for j in range(n.shape[1]):
        c0 = c1 = c2 = c3 = 0
        p0 = p1 = p2 = p3 = 0.0
        q0 = q1 = q2 = q3 = 0.0
        x0 = x1 = x2 = x3 = 0
        for x in range(j * cx, min(nx, (j + 1) * cx)):
            ok = not b0[x]
            v = (v0[x] - ref) if ok else 0.0
            c0 += 1 if ok else 0
            p0 += v
            q0 += v * v
            x0 += x if ok else 0
            ok = not b1[x]
            v = (v1[x] - ref) if ok else 0.0
            c1 += 1 if ok else 0
            p1 += v
            q1 += v * v
            x1 += x if ok else 0
            ok = not b2[x]
            v = (v2[x] - ref) if ok else 0.0
            c2 += 1 if ok else 0
            p2 += v
            q2 += v * v
            x2 += x if ok else 0
            ok = not b3[x]
            v = (v3[x] - ref) if ok else 0.0
            c3 += 1 if ok else 0
            p3 += v
            q3 += v * v
            x3 += x if ok else 0
        _add_row(n, s1, s2, sy, sx, i, j, y, float(c0), p0, q0, float(x0))
        _add_row(n, s1, s2, sy, sx, i, j, y + 1, float(c1), p1, q1, float(x1))
        _add_row(n, s1, s2, sy, sx, i, j, y + 2, float(c2), p2, q2, float(x2))
        _add_row(n, s1, s2, sy, sx, i, j, y + 3, float(c3), p3, q3, float(x3))


def bspline_columns(tmp, base, weights, out):
    """out[y, x] = sum_k weights[y, k] * tmp[base[y] - 1 + k, x], k = 0..3: the cubic
    B-spline evaluation along y of rows already evaluated along x (each output row
    four whole rows of ``tmp`` combined, so the loop over x vectorises)."""
    in_bands(_bspline_columns, out.shape[0], tmp, base, weights, out, grain=32)
    return out


@njit(cache=True, nogil=True)
def _bspline_columns(tmp, base, weights, out, lo, hi):  # pragma: no cover - compiled
    nx = out.shape[1]
    for y in range(lo, hi):
        b = base[y] - 1
        w0, w1, w2, w3 = weights[y, 0], weights[y, 1], weights[y, 2], weights[y, 3]
        t0, t1, t2, t3 = tmp[b], tmp[b + 1], tmp[b + 2], tmp[b + 3]
        row = out[y]
        for x in range(nx):
            row[x] = w0 * t0[x] + w1 * t1[x] + w2 * t2[x] + w3 * t3[x]


def count_cells(bad, cy, cx):
    """Per-cell count of the pixels not ``bad`` (float64): :func:`bin_cells`' first
    layer, without reading an image."""
    ny, nx = bad.shape
    n = np.zeros((-(-ny // cy), -(-nx // cx)))
    in_bands(_count_cells, n.shape[0], bad, cy, cx, n, grain=-(-32 // cy))
    return n


@njit(cache=True, nogil=True)
def _count_cells(bad, cy, cx, n, lo, hi):  # pragma: no cover - compiled
    ny, nx = bad.shape
    for i in range(lo, hi):
        for y in range(i * cy, min(ny, (i + 1) * cy)):
            brow = bad[y]
            for j in range(n.shape[1]):
                c = 0
                for x in range(j * cx, min(nx, (j + 1) * cx)):
                    c += 0 if brow[x] else 1
                n[i, j] += c
