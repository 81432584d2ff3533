"""Compiled kernels for :mod:`skymap.smooth`. Not public: call through smooth.py."""

from __future__ import annotations

import numpy as np
from numba import njit

from skymap._util import in_bands


@njit(cache=True, nogil=True)
def thin_plate_apply(z, cyy, cxx, cxy, out):  # pragma: no cover - compiled
    """out = cyy D2y'D2y z + cxx D2x'D2x z + cxy Dxy'Dxy z (second differences, natural
    boundaries: no condition is imposed at the grid edges, so planes cost nothing)."""
    ny, nx = z.shape
    for i in range(ny):
        for j in range(nx):
            out[i, j] = 0.0
    for i in range(ny - 2):
        for j in range(nx):
            d = (z[i, j] - 2.0 * z[i + 1, j] + z[i + 2, j]) * cyy
            out[i, j] += d
            out[i + 1, j] -= 2.0 * d
            out[i + 2, j] += d
    for i in range(ny):
        for j in range(nx - 2):
            d = (z[i, j] - 2.0 * z[i, j + 1] + z[i, j + 2]) * cxx
            out[i, j] += d
            out[i, j + 1] -= 2.0 * d
            out[i, j + 2] += d
    for i in range(ny - 1):
        for j in range(nx - 1):
            d = (z[i + 1, j + 1] - z[i + 1, j] - z[i, j + 1] + z[i, j]) * cxy
            out[i + 1, j + 1] += d
            out[i + 1, j] -= d
            out[i, j + 1] -= d
            out[i, j] += d
    return out


@njit(cache=True, nogil=True)
def thin_plate_apply_field(z, cyy, cxx, cxy, fyy, fxx, fxy, out):  # pragma: no cover - compiled
    """:func:`thin_plate_apply` with each second difference's term weighted by a field:
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
    gx = n.shape[1]
    for i in range(lo, hi):
        for y in range(i * cy, min(ny, (i + 1) * cy)):
            vrow, brow = image[y], bad[y]
            for j in range(gx):
                c = 0.0
                a1 = 0.0
                a2 = 0.0
                ax = 0.0
                # Selects, not branches (bad values may be NaN): they vectorise.
                for x in range(j * cx, min(nx, (j + 1) * cx)):
                    ok = not brow[x]
                    v = (vrow[x] - ref) if ok else 0.0
                    w = 1.0 if ok else 0.0
                    c += w
                    a1 += v
                    a2 += v * v
                    ax += w * x
                n[i, j] += c
                s1[i, j] += a1
                s2[i, j] += a2
                sy[i, j] += c * y
                sx[i, j] += ax


def bspline_rows(tmp, base, weights, out):
    """out[y, x] = sum_k weights[x, k] * tmp[y, base[x] - 1 + k], k = 0..3: the cubic
    B-spline evaluation along x of rows already evaluated along y."""
    in_bands(_bspline_rows, out.shape[0], tmp, base, weights, out, grain=32)
    return out


@njit(cache=True, nogil=True)
def _bspline_rows(tmp, base, weights, out, lo, hi):  # pragma: no cover - compiled
    nx = out.shape[1]
    for y in range(lo, hi):
        for x in range(nx):
            b = base[x] - 1
            out[y, x] = (
                weights[x, 0] * tmp[y, b]
                + weights[x, 1] * tmp[y, b + 1]
                + weights[x, 2] * tmp[y, b + 2]
                + weights[x, 3] * tmp[y, b + 3]
            )
