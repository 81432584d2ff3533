"""Compiled kernels for :mod:`skymap.quality.simulate.render`: stamp rendering of many
sources at once.

Private: callers use :func:`skymap.quality.simulate.render_sources`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from skymap._util import in_bands

# Profile codes shared with simulate.py.
GAUSSIAN = 0
MOFFAT = 1
SERSIC = 2


@njit(cache=True, nogil=True)
def _profile(kind, q, shape_par, bn):
    # q is the squared elliptical radius in the profile's own units (see simulate.py).
    if kind == GAUSSIAN:
        return np.exp(-q)
    if kind == MOFFAT:
        return (1.0 + q) ** (-shape_par)
    return np.exp(-bn * (q ** (0.5 / shape_par) - 1.0))


def render_stamps(
    image, x, y, amp, qa, qb, qc, kind, shape_par, bn, x_lo, x_hi, y_lo, y_hi, sub_n, sub_r2
):
    """Add every source's profile to ``image`` inside its stamp ``[y_lo..y_hi, x_lo..x_hi]``.

    Rows are split into bands rendered in parallel; within a band the sources are added in
    catalogue order, so every pixel receives the same sum in the same order whatever the
    number of threads (bitwise-reproducible). Pixels whose centre lies within
    ``sqrt(sub_r2)`` of a source centre are averaged over ``sub_n[s]`` x ``sub_n[s]``
    sub-pixels (cuspy profiles); the rest are point-sampled at the pixel centre.
    """
    args = (image, x, y, amp, qa, qb, qc, kind, shape_par, bn, x_lo, x_hi, y_lo, y_hi)
    in_bands(_render_bands, min(image.shape[0], 64), *args, sub_n, sub_r2, grain=1)
    return image


@njit(cache=True, nogil=True)
def _render_bands(
    image, x, y, amp, qa, qb, qc, kind, shape_par, bn, x_lo, x_hi, y_lo, y_hi, sub_n, sub_r2,
    lo, hi,
):  # fmt: skip
    """Bands ``lo``..``hi`` of :func:`render_stamps`' ``min(ny, 64)`` row bands."""
    ny = image.shape[0]
    nsrc = x.shape[0]
    nbands = min(ny, 64)
    for band in range(lo, hi):
        r0 = band * ny // nbands
        r1 = (band + 1) * ny // nbands - 1
        for s in range(nsrc):
            ylo = max(y_lo[s], r0)
            yhi = min(y_hi[s], r1)
            if ylo > yhi or x_lo[s] > x_hi[s]:
                continue
            k = kind[s]
            a = qa[s]
            b = qb[s]
            c = qc[s]
            A = amp[s]
            xs = x[s]
            ys = y[s]
            sp = shape_par[s]
            bns = bn[s]
            ns = sub_n[s]
            for iy in range(ylo, yhi + 1):
                dy = iy - ys
                for ix in range(x_lo[s], x_hi[s] + 1):
                    dx = ix - xs
                    if ns > 1 and dx * dx + dy * dy <= sub_r2:
                        acc = 0.0
                        for jy in range(ns):
                            ddy = dy + (jy + 0.5) / ns - 0.5
                            for jx in range(ns):
                                ddx = dx + (jx + 0.5) / ns - 0.5
                                q = (a * ddx**2) + (b * ddx * ddy) + (c * ddy**2)
                                acc += _profile(k, q, sp, bns)
                        image[iy, ix] += A * (acc / (ns * ns))
                    else:
                        q = (a * dx**2) + (b * dx * dy) + (c * dy**2)
                        image[iy, ix] += A * _profile(k, q, sp, bns)
