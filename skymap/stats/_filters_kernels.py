"""Compiled kernels for :mod:`skymap.filters`. Private: callers use ``skymap.filters``.

The ring percentile is exact. Each output tile, with its reflected halo, is rank-transformed
by an LSD radix sort of order-preserving integer keys. A window then slides along each row
of the tile: a two-level histogram of ranks (a bitset of window members, with each 64-bit
word's popcount as the coarse bin) is updated with the footprint's edge cells only (Huang
1979; Perreault & Hebert 2007), and the wanted rank is found by moving a word pointer from
where the previous pixel left it. Tiles run in parallel.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

_RADIX_BITS = 11
_RADIX_SIZE = 1 << _RADIX_BITS


@njit(cache=True, nogil=True)
def _reflect(i, n):
    """scipy.ndimage 'reflect' extension (d c b a | a b c d | d c b a), any distance."""
    period = 2 * n
    m = i % period
    if m >= n:
        m = period - 1 - m
    return m


@njit(cache=True, nogil=True)
def _radix_argsort(keys, nbits):
    """Stable argsort of unsigned integer ``keys`` (uint64 holding ``nbits`` bits)."""
    n = keys.size
    npass = (nbits + _RADIX_BITS - 1) // _RADIX_BITS
    digit_mask = np.uint64(_RADIX_SIZE - 1)
    # All digit histograms in one read of the keys; offsets are unsigned so that the
    # scatters below skip numba's negative-index wraparound.
    count = np.zeros((npass, _RADIX_SIZE), np.uint64)
    for i in range(n):
        k = keys[i]
        for p in range(npass):
            count[p, (k >> np.uint64(p * _RADIX_BITS)) & digit_mask] += np.uint64(1)
    idx = np.arange(n).astype(np.int32)
    idx_tmp = np.empty(n, np.int32)
    k = keys.copy()
    k_tmp = np.empty(n, keys.dtype)
    for p in range(npass):
        # A digit shared by every key (high exponent bits of similar values) sorts nothing.
        if count[p].max() == np.uint64(n):
            continue
        ushift = np.uint64(p * _RADIX_BITS)
        offset = np.empty(_RADIX_SIZE, np.uint64)
        total = np.uint64(0)
        for d in range(_RADIX_SIZE):
            offset[d] = total
            total += count[p, d]
        for i in range(n):
            ki = k[i]
            d = (ki >> ushift) & digit_mask
            pos = offset[d]
            offset[d] = pos + np.uint64(1)
            idx_tmp[pos] = idx[i]
            k_tmp[pos] = ki
        idx, idx_tmp = idx_tmp, idx
        k, k_tmp = k_tmp, k
    return idx


@intrinsic
def _popcount(typingctx, x):
    """Number of set bits of a uint64 (LLVM ctpop: one instruction on x86-64)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@njit(cache=True, nogil=True)
def _ring_tile(
    image, valid, bits, nbits, off_all, off_rem, off_add, half, percentile, y0, y1, x0, x1, out
):
    """Exact ring percentile for output rows [y0, y1) and columns [x0, x1).

    Offsets are flat offsets in the padded tile (row stride ``x1 - x0 + 2 * half``):
    ``off_all`` every footprint cell, ``off_rem`` / ``off_add`` the cells that leave /
    enter the window when it moves one column right.
    """
    ny, nx = image.shape
    ph = y1 - y0 + 2 * half
    pw = x1 - x0 + 2 * half
    ncell = ph * pw

    # Gather the tile and its reflected halo; invalid cells get no rank.
    # IEEE-754 bits -> order-preserving unsigned keys: flip negatives, set sign of positives.
    sign = np.uint64(1) << np.uint64(nbits - 1)
    full = (sign - np.uint64(1)) | sign
    cell_key = np.empty(ncell, np.uint64)
    cell_pos = np.empty(ncell, np.int32)
    cell_val = np.empty(ncell, image.dtype)
    col = np.empty(pw, np.int64)
    for j in range(pw):
        col[j] = _reflect(x0 - half + j, nx)
    nvalid = 0
    for i in range(ph):
        oy = _reflect(y0 - half + i, ny)
        for j in range(pw):
            ox = col[j]
            if valid[oy, ox]:
                b = np.uint64(bits[oy, ox])
                cell_key[nvalid] = (full ^ b) if (b & sign) else (b | sign)
                cell_pos[nvalid] = i * pw + j
                cell_val[nvalid] = image[oy, ox]
                nvalid += 1

    order = _radix_argsort(cell_key[:nvalid], nbits)
    # The window is a bitset over ranks: one XOR per cell entering or leaving, and a
    # word's popcount serves as the coarse histogram bin. Invalid cells share a dummy rank
    # in a word of their own past the valid ones, so the update loop has no branch.
    # Indices are unsigned from here on: numba then drops its negative-index wraparound,
    # which doubled the cost of an update. Negative offsets wrap modulo 2**64 and still
    # land on the right cell.
    u1 = np.uint64(1)
    u6 = np.uint64(6)
    u63 = np.uint64(63)
    nword = (nvalid + 63) // 64
    dummy = np.uint64(nword * 64)
    rank = np.full(ncell, dummy, np.uint64)
    sorted_val = np.empty(max(nvalid, 1), image.dtype)
    for r in range(nvalid):
        c = order[r]
        rank[cell_pos[c]] = np.uint64(r)
        sorted_val[r] = cell_val[c]
    window = np.zeros(nword + 1, np.uint64)
    has_invalid = nvalid < ncell
    uoff_all = off_all.astype(np.uint64)
    uoff_rem = off_rem.astype(np.uint64)
    uoff_add = off_add.astype(np.uint64)
    nrun = uoff_rem.size

    nan = image.dtype.type(np.nan)
    wptr = np.uint64(0)  # current word
    below = 0  # window members in words < wptr
    for y in range(y0, y1):
        window[:] = 0
        below = 0
        n = 0
        base = np.uint64((y - y0 + half) * pw + half)
        for k in range(uoff_all.size):
            r = rank[base + uoff_all[k]]
            w = r >> u6
            window[w] |= u1 << (r & u63)
            n += r != dummy
            below += w < wptr
        for x in range(x0, x1):
            if x > x0:
                c0 = base + np.uint64(x - x0)
                for k in range(nrun):
                    # Branch-free counting: whether a rank falls below the pointer is a
                    # coin toss, and mispredicted branches would dominate the cost.
                    r = rank[c0 + uoff_rem[k]]
                    w = r >> u6
                    window[w] ^= u1 << (r & u63)
                    below -= w < wptr
                    r = rank[c0 + uoff_add[k]]
                    w = r >> u6
                    window[w] ^= u1 << (r & u63)
                    below += w < wptr
                # The valid count changes only where invalid cells enter or leave; this
                # second pass keeps the hot loop above lean for unmasked tiles.
                if has_invalid:
                    for k in range(nrun):
                        n += np.int64(rank[c0 + uoff_rem[k]] == dummy) - np.int64(
                            rank[c0 + uoff_add[k]] == dummy
                        )
            if n == 0:
                out[y, x] = nan
                continue
            # scipy.ndimage's rank: int(n * percentile / 100) capped at n - 1, evaluated
            # in scipy's order so that the float rounding agrees too.
            t = int(float(n) * percentile / 100.0)
            if t >= n:
                t = n - 1
            while below > t:
                wptr -= u1
                below -= np.int64(_popcount(window[wptr]))
            while True:
                cnt = np.int64(_popcount(window[wptr]))
                if below + cnt > t:
                    break
                below += cnt
                wptr += u1
            w = window[wptr]
            for _ in range(t - below):
                w &= w - u1
            out[y, x] = sorted_val[(wptr << u6) + np.uint64(trailing_zeros(w))]


@njit(cache=True, nogil=True)
def _one_tile(t, image, valid, bits, nbits, footprint, half, percentile, tile, out):
    """Tile number ``t`` (raster order) of ``ring_percentile_tiles``."""
    foot_dy, foot_dx, run_dy, run_lo, run_hi = footprint
    ny, nx = image.shape
    ntx = (nx + tile - 1) // tile
    ty = t // ntx
    tx = t - ty * ntx
    y0 = ty * tile
    x0 = tx * tile
    y1 = min(ny, y0 + tile)
    x1 = min(nx, x0 + tile)
    pw = x1 - x0 + 2 * half
    off_all = foot_dy * pw + foot_dx
    off_rem = run_dy * pw + run_lo - 1
    off_add = run_dy * pw + run_hi
    _ring_tile(
        image,
        valid,
        bits,
        nbits,
        off_all,
        off_rem,
        off_add,
        half,
        percentile,
        y0,
        y1,
        x0,
        x1,
        out,
    )


@njit(cache=True, nogil=True, parallel=True)
def ring_percentile_tiles(image, valid, bits, nbits, footprint, half, percentile, tile, out):
    """Fill ``out`` with the exact percentile over the footprint, tiles in parallel.

    ``bits`` is the image viewed as unsigned integers of ``nbits`` (32 or 64) bits.
    ``footprint`` is ``(foot_dy, foot_dx, run_dy, run_lo, run_hi)``: the footprint's
    offsets from the centre, and the same footprint as horizontal runs (dy, dx in
    [lo, hi]); ``half`` is the footprint's half-size.
    """
    ny, nx = image.shape
    ntile = ((ny + tile - 1) // tile) * ((nx + tile - 1) // tile)
    for t in prange(ntile):
        _one_tile(t, image, valid, bits, nbits, footprint, half, percentile, tile, out)


@njit(cache=True, nogil=True)
def ring_percentile_tiles_serial(
    image, valid, bits, nbits, footprint, half, percentile, tile, out
):
    """``ring_percentile_tiles`` on the calling thread (small images: no thread wake-up)."""
    ny, nx = image.shape
    ntile = ((ny + tile - 1) // tile) * ((nx + tile - 1) // tile)
    for t in range(ntile):
        _one_tile(t, image, valid, bits, nbits, footprint, half, percentile, tile, out)
