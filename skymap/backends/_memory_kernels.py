"""Compiled kernels of the in-memory back end (:mod:`skymap.backends.memory`)."""

from __future__ import annotations

import numpy as np
from numba import njit

from skymap._util import in_bands


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


def floor_in_place(values, floor):
    """``values = where(isfinite(values), maximum(values, floor), floor)``, in place."""
    flat = values.reshape(-1)  # a view when values is contiguous, else a copy
    in_bands(_floor_in_place, flat.size, flat, floor, grain=1 << 15)
    if not values.flags.c_contiguous:
        values[...] = flat.reshape(values.shape)
    return values


@njit(cache=True, nogil=True)
def _floor_in_place(flat, floor, lo, hi):  # pragma: no cover - compiled
    for i in range(lo, hi):
        v = flat[i]
        if not np.isfinite(v) or v < floor:
            flat[i] = floor


def subsampled_change(new, old_sub, bad, noise, q, step):
    """RMS of ``(new[::step, ::step] - old_sub) / sigma`` over the pixels not ``bad`` and
    finite, ``sigma`` read from the noise grid ``noise`` at ``[y // q, x // q]``
    (edge-clamped, as in :func:`dog_snr`); pixels of zero noise are left out (their
    ratio is not finite), and the result is 0 when no pixel is left. Rows are summed in
    parallel, then in order, so the result does not depend on the thread count."""
    ny = old_sub.shape[0]
    sums = np.zeros(ny)
    counts = np.zeros(ny, np.int64)
    in_bands(_row_changes, ny, new, old_sub, bad, noise, q, step, sums, counts, grain=16)
    return _rms_of_rows(sums, counts)


@njit(cache=True, nogil=True)
def _row_changes(new, old_sub, bad, noise, q, step, sums, counts, lo, hi):  # pragma: no cover
    nx = old_sub.shape[1]
    nqy, nqx = noise.shape
    # Each column's noise column once, not an integer division per pixel.
    qcol = np.empty(nx, np.int64)
    for j in range(nx):
        qcol[j] = min(step * j // q, nqx - 1)
    for i in range(lo, hi):
        y = step * i
        qy = min(y // q, nqy - 1)
        total = 0.0
        count = 0
        for j in range(nx):
            x = step * j
            if bad[y, x]:
                continue
            s = noise[qy, qcol[j]]
            if s == 0:
                # numpy's x / 0 is inf or nan, which the tiled path drops as non-finite
                continue
            d = (new[y, x] - old_sub[i, j]) / s
            if np.isfinite(d):
                total += d * d
                count += 1
        sums[i] = total
        counts[i] = count


@njit(cache=True, nogil=True)
def _rms_of_rows(sums, counts):  # pragma: no cover - compiled
    total = 0.0
    count = 0
    for i in range(sums.size):
        total += sums[i]
        count += counts[i]
    return np.sqrt(total / count) if count else 0.0


@njit(cache=True, nogil=True)
def block_sums_small(values, minus, excluded, b, out, lo, hi):  # pragma: no cover - compiled
    """Block rows ``lo:hi`` of :func:`skymap.backends.base.block_sums` for ``b`` < 8
    (``minus`` subtracted from ``values`` first, in their dtypes, if it has their
    shape): each row's values from 0 in order, then the rows from the first: the order
    of numpy's sums of the reshaped copy, whose sums over fewer than 8 contiguous
    values are sequential."""
    ny, nx = values.shape
    sub = minus.shape == values.shape
    for by in range(lo, hi):
        for bx in range(out.shape[2]):
            tot = 0.0
            cnt = 0.0
            for y in range(by * b, min(ny, (by + 1) * b)):
                rs = 0.0
                rc = 0.0
                for x in range(bx * b, min(nx, (bx + 1) * b)):
                    if not excluded[y, x]:
                        v = values[y, x] - minus[y, x] if sub else values[y, x]
                        rs += np.float64(v)
                        rc += 1.0
                if y == by * b:
                    tot, cnt = rs, rc
                else:
                    tot += rs
                    cnt += rc
            out[0, by, bx] = tot
            out[1, by, bx] = cnt
