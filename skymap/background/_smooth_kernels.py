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
    # Per cell row, each column's sums over the row's pixel rows first (independent
    # chains side by side: the loop over x vectorises), then the columns of each cell
    # in x order. The counts and coordinate sums are integers (exact).
    col1 = np.empty(nx)
    col2 = np.empty(nx)
    coln = np.empty(nx, np.int64)
    coly = np.empty(nx, np.int64)
    for i in range(lo, hi):
        col1[:] = 0.0
        col2[:] = 0.0
        coln[:] = 0
        coly[:] = 0
        y, y1 = i * cy, min(ny, (i + 1) * cy)
        # Four pixel rows a pass (each column's sums still added row after row, in
        # the same order): a quarter of the column sums' loads and stores.
        while y + 4 <= y1:
            v0, v1, v2, v3 = image[y], image[y + 1], image[y + 2], image[y + 3]
            b0, b1, b2, b3 = bad[y], bad[y + 1], bad[y + 2], bad[y + 3]
            for x in range(nx):
                k0, k1, k2, k3 = not b0[x], not b1[x], not b2[x], not b3[x]
                # Selects, not branches (bad values may be NaN).
                u0 = (v0[x] - ref) if k0 else 0.0
                u1 = (v1[x] - ref) if k1 else 0.0
                u2 = (v2[x] - ref) if k2 else 0.0
                u3 = (v3[x] - ref) if k3 else 0.0
                col1[x] = (((col1[x] + u0) + u1) + u2) + u3
                col2[x] = (((col2[x] + u0 * u0) + u1 * u1) + u2 * u2) + u3 * u3
                coln[x] += (
                    (1 if k0 else 0) + (1 if k1 else 0) + (1 if k2 else 0) + (1 if k3 else 0)
                )
                coly[x] += ((y if k0 else 0) + (y + 1 if k1 else 0) + (y + 2 if k2 else 0)
                            + (y + 3 if k3 else 0))  # fmt: skip
            y += 4
        for yt in range(y, y1):
            vrow, brow = image[yt], bad[yt]
            for x in range(nx):
                ok = not brow[x]
                v = (vrow[x] - ref) if ok else 0.0
                col1[x] += v
                col2[x] += v * v
                coln[x] += 1 if ok else 0
                coly[x] += yt if ok else 0
        for j in range(n.shape[1]):
            a1 = 0.0
            a2 = 0.0
            c = 0
            ay = 0
            ax = 0
            for x in range(j * cx, min(nx, (j + 1) * cx)):
                a1 += col1[x]
                a2 += col2[x]
                c += coln[x]
                ay += coly[x]
                ax += coln[x] * x
            n[i, j] = c
            s1[i, j] = a1
            s2[i, j] = a2
            sy[i, j] = ay
            sx[i, j] = ax


def bspline_rows(coef, base, weights):
    """tmp[i, x] = sum_k weights[x, k] * coef[i, base[x] - 1 + k], k = 0..3, summed
    from 0 in k order (the order of scipy's CSR product ``(xmat @ coef.T).T`` with the
    four weights of each row of ``xmat``): the B-spline evaluation along x of every
    row of coefficients, written row by row (contiguous, no transposed copy)."""
    tmp = np.empty((coef.shape[0], base.size))
    in_bands(_bspline_rows, tmp.shape[0], np.ascontiguousarray(coef), base, weights, tmp)
    return tmp


@njit(cache=True, nogil=True)
def _bspline_rows(coef, base, weights, tmp, lo, hi):  # pragma: no cover - compiled
    nx = tmp.shape[1]
    for i in range(lo, hi):
        c = coef[i]
        row = tmp[i]
        for x in range(nx):
            b = base[x] - 1
            acc = 0.0
            acc += weights[x, 0] * c[b]
            acc += weights[x, 1] * c[b + 1]
            acc += weights[x, 2] * c[b + 2]
            acc += weights[x, 3] * c[b + 3]
            row[x] = acc


def bspline_columns(tmp, base, weights, out, subtract_from=None):
    """out[y, x] = sum_k weights[y, k] * tmp[base[y] - 1 + k, x], k = 0..3: the cubic
    B-spline evaluation along y of rows already evaluated along x (each output row
    four whole rows of ``tmp`` combined, so the loop over x vectorises). With
    ``subtract_from`` (an array of ``out``'s shape, which may be ``out`` itself),
    ``out`` is ``subtract_from`` minus that map rounded to ``out``'s dtype first:
    ``subtract_from - map`` bit for bit where both have ``out``'s dtype, without the
    map's pass."""
    if subtract_from is None:
        in_bands(_bspline_columns, out.shape[0], tmp, base, weights, out, grain=32)
    else:
        in_bands(_bspline_minus, out.shape[0], tmp, base, weights, subtract_from, out, grain=32)
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


@njit(cache=True, nogil=True)
def _bspline_minus(tmp, base, weights, image, out, lo, hi):  # pragma: no cover - compiled
    nx = out.shape[1]
    for y in range(lo, hi):
        b = base[y] - 1
        w0, w1, w2, w3 = weights[y, 0], weights[y, 1], weights[y, 2], weights[y, 3]
        t0, t1, t2, t3 = tmp[b], tmp[b + 1], tmp[b + 2], tmp[b + 3]
        row, irow = out[y], image[y]
        for x in range(nx):
            # image may be out itself (read first); the map's value is rounded to out's
            # dtype by the store, as in a map
            v = irow[x]
            row[x] = w0 * t0[x] + w1 * t1[x] + w2 * t2[x] + w3 * t3[x]
            row[x] = v - row[x]


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
    # Per cell row, each column's count over its pixel rows (along memory: the loop
    # vectorises), then the cells' columns; integers, so exact.
    col = np.empty(nx, np.int64)
    for i in range(lo, hi):
        col[:] = 0
        for y in range(i * cy, min(ny, (i + 1) * cy)):
            brow = bad[y]
            for x in range(nx):
                col[x] += 0 if brow[x] else 1
        for j in range(n.shape[1]):
            c = 0
            for x in range(j * cx, min(nx, (j + 1) * cx)):
                c += col[x]
            n[i, j] += c
