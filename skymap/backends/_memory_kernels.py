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


def subsampled_change(diff, bad, noise, q, step):
    """RMS of ``diff / sigma`` (a difference of maps at every ``step``-th pixel along
    each axis) over the pixels not ``bad`` and finite, ``sigma`` read from the
    noise grid ``noise`` at ``[y // q, x // q]`` (edge-clamped, as in :func:`dog_snr`);
    pixels of zero noise are left out (their ratio is not finite), and the result is 0
    when no pixel is left. Rows are summed in parallel, then in order, so the result
    does not depend on the thread count."""
    return _rms_of_rows(*subsampled_change_rows(diff, bad, noise, q, step))


def subsampled_change_rows(diff, bad, noise, q, step):
    """(sum of squares, count) of each row of :func:`subsampled_change`'s ratios: what
    a tile adds to the image's (its window's noise grid starting on a block)."""
    ny = diff.shape[0]
    sums = np.zeros(ny)
    counts = np.zeros(ny, np.int64)
    in_bands(_row_changes, ny, diff, bad, noise, q, step, sums, counts, grain=16)
    return sums, counts


@njit(cache=True, nogil=True)
def _row_changes(diff, bad, noise, q, step, sums, counts, lo, hi):  # pragma: no cover
    nx = diff.shape[1]
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
            d = diff[i, j] / s
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


@njit(cache=True, nogil=True, inline="always")
def _run_sums(cv, cc, b, rs, rc):  # pragma: no cover - compiled
    """``rs[bx]``, ``rc[bx]``: the sums of ``cv``, ``cc`` over each run of ``b`` (the
    last may be short), from 0 in order; whole runs of 2 or 4 written out, so that
    the loop over the blocks vectorises (the same sums)."""
    nx = cv.size
    start = 0
    if b == 4:
        start = nx // 4
        for bx in range(start):
            x = 4 * bx
            rs[bx] = (((0.0 + cv[x]) + cv[x + 1]) + cv[x + 2]) + cv[x + 3]
            rc[bx] = (((0.0 + cc[x]) + cc[x + 1]) + cc[x + 2]) + cc[x + 3]
    elif b == 2:
        start = nx // 2
        for bx in range(start):
            rs[bx] = (0.0 + cv[2 * bx]) + cv[2 * bx + 1]
            rc[bx] = (0.0 + cc[2 * bx]) + cc[2 * bx + 1]
    for bx in range(start, rs.size):
        sv = 0.0
        sc = 0.0
        for x in range(bx * b, min(nx, (bx + 1) * b)):
            sv += cv[x]
            sc += cc[x]
        rs[bx] = sv
        rc[bx] = sc


@njit(cache=True, nogil=True)
def block_sums_small(values, minus, excluded, b, out, lo, hi):  # pragma: no cover - compiled
    """Block rows ``lo:hi`` of :func:`skymap.backends.base.block_sums` for ``b`` < 8
    (``minus`` subtracted from ``values`` first, in their dtypes, if it has their
    shape): each row's values from 0 in order, then the rows from the first: the order
    of numpy's sums of the reshaped copy, whose sums over fewer than 8 contiguous
    values are sequential. A row's float64 values (0 where excluded: adding +0.0 to
    a sum that starts at +0.0 changes nothing) are made along it first, so that pass
    vectorises, then summed per block."""
    ny, nx = values.shape
    gx = out.shape[2]
    sub = minus.shape == values.shape
    cv = np.empty(nx)
    cc = np.empty(nx)
    rs = np.empty(gx)
    rc = np.empty(gx)
    for by in range(lo, hi):
        for y in range(by * b, min(ny, (by + 1) * b)):
            vrow, erow = values[y], excluded[y]
            if sub:
                mrow = minus[y]
                for x in range(nx):
                    e = erow[x]
                    cv[x] = 0.0 if e else np.float64(vrow[x] - mrow[x])
                    cc[x] = 0.0 if e else 1.0
            else:
                for x in range(nx):
                    e = erow[x]
                    cv[x] = 0.0 if e else np.float64(vrow[x])
                    cc[x] = 0.0 if e else 1.0
            _run_sums(cv, cc, b, rs, rc)
            if y == by * b:
                for bx in range(gx):
                    out[0, by, bx] = rs[bx]
                    out[1, by, bx] = rc[bx]
            else:
                for bx in range(gx):
                    out[0, by, bx] += rs[bx]
                    out[1, by, bx] += rc[bx]


#: Set bits per byte value.
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.int64)


#: Words (of eight pixels) per chunk of :func:`pack_stats`' bands.
_PACK_CHUNK = 1 << 15


def pack_stats(mask, last):
    """``(flips, count, packed)``: ``packed = np.packbits(mask.ravel())``, the number
    of set pixels, and the number of bits in which ``packed`` differs from ``last``
    (a previous ``packed`` of the same shape; 0 when ``last`` is None), in one pass:
    eight pixels a byte as one 64-bit product (the bits in numpy's big-endian order),
    counted through a table; in bands of chunks (integer counts: any order)."""
    flat = np.ascontiguousarray(mask, dtype=bool).reshape(-1).view(np.uint8)
    whole = flat.size // 8 * 8
    packed = np.empty(-(-flat.size // 8), np.uint8)
    previous = np.zeros(0, np.uint8) if last is None else last
    words = flat[:whole].view(np.uint64)
    chunks = -(-packed.size // _PACK_CHUNK)
    tally = np.zeros((chunks, 2), np.int64)
    in_bands(_pack_stats, chunks, flat, words, previous, packed, _POPCOUNT, tally, grain=4)
    flips, count = tally.sum(axis=0)
    return int(flips), int(count), packed


@njit(cache=True, nogil=True)
def _pack_stats(flat, words, last, packed, pop, tally, lo, hi):  # pragma: no cover - compiled
    compare = last.size == packed.size
    for c in range(lo, hi):
        count = 0
        flips = 0
        start, stop = c * _PACK_CHUNK, min(packed.size, (c + 1) * _PACK_CHUNK)
        for i in range(start, min(stop, words.size)):
            # byte k of the word (pixel 8 i + k, 0 or 1) lands on bit 7 - k of the top
            # byte
            byte = np.uint8((words[i] * np.uint64(0x8040201008040201)) >> np.uint64(56))
            packed[i] = byte
            count += pop[byte]
            if compare:
                flips += pop[byte ^ last[i]]
        for i in range(max(start, words.size), stop):
            byte = np.uint8(0)
            for k in range(8):
                j = 8 * i + k
                if j < flat.size and flat[j]:
                    byte |= np.uint8(1 << (7 - k))
            packed[i] = byte
            count += pop[byte]
            if compare:
                flips += pop[byte ^ last[i]]
        tally[c, 0] = flips
        tally[c, 1] = count
