"""Compiled kernels for :mod:`skymap.smooth`. Not public: call through smooth.py."""

from __future__ import annotations

from numba import njit


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
