"""Compiled kernels of the in-memory back end (:mod:`skymap.backends.memory`)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True)
def positive_sample(values, target):  # pragma: no cover - compiled
    """``v[::step]`` of the finite positive values ``v`` of ``values`` in C order, with
    ``step = max(1, v.size // target)``: a subsample for a median, without the copy of
    every valid value and its mask."""
    flat = values.ravel()
    n = 0
    for v in flat:
        if np.isfinite(v) and v > 0:
            n += 1
    step = max(1, n // target)
    out = np.empty((n + step - 1) // step, values.dtype)
    k = 0
    for v in flat:
        if np.isfinite(v) and v > 0:
            if k % step == 0:
                out[k // step] = v
            k += 1
    return out


@njit(cache=True, nogil=True, parallel=True)
def floor_in_place(values, floor):  # pragma: no cover - compiled
    """``values = where(isfinite(values), maximum(values, floor), floor)``, in place."""
    flat = values.ravel()
    for i in prange(flat.size):
        v = flat[i]
        if not np.isfinite(v) or v < floor:
            flat[i] = floor
    return values


@njit(cache=True, nogil=True, parallel=True)
def subsampled_change(new, old_sub, bad, noise, q):  # pragma: no cover - compiled
    """RMS of ``(new[::2, ::2] - old_sub) / sigma`` over the pixels not ``bad`` and
    finite, ``sigma`` read from the noise grid ``noise`` at ``[y // q, x // q]``
    (edge-clamped, as in :func:`dog_snr`); 0 when no pixel is left. Rows are summed in
    parallel, then in order, so the result does not depend on the thread count."""
    ny, nx = old_sub.shape
    nqy, nqx = noise.shape
    sums = np.zeros(ny)
    counts = np.zeros(ny, np.int64)
    for i in prange(ny):
        y = 2 * i
        qy = min(y // q, nqy - 1)
        total = 0.0
        count = 0
        for j in range(nx):
            x = 2 * j
            if bad[y, x]:
                continue
            d = (new[y, x] - old_sub[i, j]) / noise[qy, min(x // q, nqx - 1)]
            if np.isfinite(d):
                total += d * d
                count += 1
        sums[i] = total
        counts[i] = count
    total = 0.0
    count = 0
    for i in range(ny):
        total += sums[i]
        count += counts[i]
    return np.sqrt(total / count) if count else 0.0
