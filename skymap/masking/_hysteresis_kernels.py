"""Compiled kernels for :mod:`skymap.hysteresis`. Not public: call through hysteresis.py.

The public names are Python functions that run a serial ``nogil`` kernel over bands of
rows on numba's thread count (:func:`skymap._util.in_bands`): the same threads as
``parallel=True``, at a fraction of its compile time on a first run. Rows are copied
by loops, not by slice assignment, which would compile numba's error-message
formatting (~2 s on a first run).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit

from skymap._inputs_kernels import nonfinite_or, nonfinite_or_row  # noqa: F401 (kept here)
from skymap._util import in_bands

# Image rows per band below which a band is not worth a thread.
_ROWS = 32


@njit(cache=True, nogil=True, inline="always")
def _copy_into(dst, offset, src):  # pragma: no cover - compiled
    """``dst[offset : offset + src.size] = src``."""
    for x in range(src.size):
        dst[offset + x] = src[x]


def masked_block_sums(values, excluded, b, num, cnt):
    """Sums over b x b blocks of the valid ``values`` and the valid-pixel counts, into
    ``num`` and ``cnt`` of shape ceil(shape / b). Partial blocks at the far edges sum
    what they hold. (Outputs come from the caller:
    numpy's allocations of large arrays use huge pages, numba's do not, and the page
    faults of fresh memory cost as much as the arithmetic here.)"""
    none = np.zeros((1, 1), bool)
    counts = np.zeros(1, np.int64)
    in_bands(_masked_block_sums, num.shape[0], values, excluded, b, num, cnt, False, none,
             False, counts, grain=-(-_ROWS // b))  # fmt: skip
    return num, cnt


def nonfinite_or_sums(values, given, out, num, cnt):
    """:func:`nonfinite_or` and :func:`masked_block_sums` of ``values`` with that
    ``out`` excluded, at blocks of 2 (``num``, ``cnt``), in one pass over the image:
    the same map, count and sums bit for bit."""
    masked = given is not None
    counts = np.zeros(num.shape[0], np.int64)
    given = given if masked else np.zeros((1, 1), bool)
    in_bands(_masked_block_sums, num.shape[0], values, out, 2, num, cnt, True, given, masked,
             counts, grain=_ROWS // 2)  # fmt: skip
    return int(counts.sum())


@njit(cache=True, nogil=True)
def _masked_block_sums(
    values, excluded, b, num, cnt, fill, given, masked, counts, lo, hi
):  # pragma: no cover - compiled
    """With ``fill``, each row of ``excluded`` is first made :func:`nonfinite_or`'s row
    (the row is still in cache when it is summed), its count added to ``counts``."""
    ny, nx = values.shape
    bv = np.empty(nx, np.float32)
    bc = np.empty(nx, np.float32)
    for by in range(lo, hi):
        y0, y1 = by * b, min(ny, (by + 1) * b)
        if fill:
            for y in range(y0, y1):
                counts[by] += nonfinite_or_row(values[y], given, masked, y, excluded[y])
        # Column sums over the block's rows first (selects, not branches: excluded
        # values may be NaN; the loops vectorise), then the sums along x.
        if y1 - y0 == 2:
            _pair_rows(values[y0], values[y0 + 1], excluded[y0], excluded[y0 + 1], bv, bc)
        else:
            bv[:] = 0.0
            bc[:] = 0.0
            for y in range(y0, y1):
                _add_masked_row(values[y], excluded[y], bv, bc)
        _sum_pairs(bv, bc, b, num[by], cnt[by])


@njit(cache=True, nogil=True, inline="always")
def _pair_rows(v0, v1, e0, e1, bv, bc):  # pragma: no cover - compiled
    """``bv``, ``bc``: :func:`_add_masked_row` of two rows from zero, in one pass (the
    same sums: half the loads and stores of the column sums)."""
    z = np.float32(0.0)
    one = np.float32(1.0)
    for x in range(v0.size):
        a, b = e0[x], e1[x]
        bv[x] = (z + (z if a else v0[x])) + (z if b else v1[x])
        bc[x] = (z + (z if a else one)) + (z if b else one)


@njit(cache=True, nogil=True, inline="always")
def _add_masked_row(vrow, erow, bv, bc):  # pragma: no cover - compiled
    """``bv += vrow``, ``bc += 1`` where ``erow`` is not set."""
    for x in range(vrow.size):
        e = erow[x]
        bv[x] += np.float32(0.0) if e else vrow[x]
        bc[x] += np.float32(0.0) if e else np.float32(1.0)


@njit(cache=True, nogil=True, inline="always")
def _sum_pairs(bv, bc, b, nrow, crow):  # pragma: no cover - compiled
    """``nrow[bx]``, ``crow[bx]``: the sums of ``bv``, ``bc`` over each run of ``b``
    (the last may be short), from 0 in order; whole runs of 2 or 4 written out, so
    that the loop over the blocks vectorises (the same sums)."""
    nx = bv.size
    z = np.float32(0.0)
    start = 0
    if b == 2:
        start = nx // 2
        for bx in range(start):
            nrow[bx] = (z + bv[2 * bx]) + bv[2 * bx + 1]
            crow[bx] = (z + bc[2 * bx]) + bc[2 * bx + 1]
    elif b == 4:
        start = nx // 4
        for bx in range(start):
            x = 4 * bx
            nrow[bx] = (((z + bv[x]) + bv[x + 1]) + bv[x + 2]) + bv[x + 3]
            crow[bx] = (((z + bc[x]) + bc[x + 1]) + bc[x + 2]) + bc[x + 3]
    for bx in range(start, nrow.size):
        sn = z
        sc = z
        for x in range(bx * b, min(nx, (bx + 1) * b)):
            sn += bv[x]
            sc += bc[x]
        nrow[bx] = sn
        crow[bx] = sc


@njit(cache=True, nogil=True, inline="always")
def _correlate_row(src, kernel, out):  # pragma: no cover - compiled
    """``out[x] = sum_j kernel[j] * src[x + j]`` (``src`` padded by the kernel's
    half-width on each side), summed from 0 in the order of the taps: taps outermost,
    so the inner loop vectorises; 7 taps (the kernel of every scale whose sigma is a
    whole number of bins) unrolled in registers, the same sums in the same order."""
    n = out.size
    if kernel.size == 7:
        z = np.float32(0.0)
        k0, k1, k2, k3, k4, k5, k6 = (kernel[0], kernel[1], kernel[2], kernel[3],
                                      kernel[4], kernel[5], kernel[6])  # fmt: skip
        for x in range(n):
            out[x] = (((((((z + k0 * src[x]) + k1 * src[x + 1]) + k2 * src[x + 2])
                         + k3 * src[x + 3]) + k4 * src[x + 4]) + k5 * src[x + 5])
                      + k6 * src[x + 6])  # fmt: skip
        return
    out[:] = 0.0
    for j in range(kernel.size):
        w = kernel[j]
        for x in range(n):
            out[x] += w * src[x + j]


@njit(cache=True, nogil=True, inline="always")
def _correlate_row2(src, k1, k2, out1, out2):  # pragma: no cover - compiled
    """:func:`_correlate_row` with two kernels of one size at once (one read of src)."""
    if k1.size == 7:
        _correlate_row(src, k1, out1)
        _correlate_row(src, k2, out2)
        return
    out1[:] = 0.0
    out2[:] = 0.0
    n = out1.size
    for j in range(k1.size):
        w1 = k1[j]
        w2 = k2[j]
        for x in range(n):
            v = src[x + j]
            out1[x] += w1 * v
            out2[x] += w2 * v


@njit(cache=True, nogil=True, inline="always")
def _sum_rows7(rows, i0, w, out):  # pragma: no cover - compiled
    """``out[x] = sum_t w[t] * rows[i0 + t][x]`` over 7 rows, summed from 0 in order:
    the y pass of one output row, in registers."""
    z = np.float32(0.0)
    w0, w1, w2, w3, w4, w5, w6 = w[0], w[1], w[2], w[3], w[4], w[5], w[6]
    r0, r1, r2, r3 = rows[i0], rows[i0 + 1], rows[i0 + 2], rows[i0 + 3]
    r4, r5, r6 = rows[i0 + 4], rows[i0 + 5], rows[i0 + 6]
    for x in range(out.size):
        out[x] = (((((((z + w0 * r0[x]) + w1 * r1[x]) + w2 * r2[x]) + w3 * r3[x])
                    + w4 * r4[x]) + w5 * r5[x]) + w6 * r6[x])  # fmt: skip


def gaussian_separable(a, kernel, out):
    """Correlate ``a`` with ``kernel`` along x then y, zero outside the array
    (scipy.ndimage.correlate1d with mode="constant", twice), in float32, into ``out``,
    which may be ``a`` itself.

    Without a workspace of ``a``'s shape (its fresh pages cost as much as the pass):
    each band of rows keeps the x pass of the ``2 r + 1`` rows its next output row
    reads in a ring, and the x passes of the rows within ``r`` of an inner band edge
    are made before any band writes, so that ``out`` may overwrite ``a``."""
    ny, nx = a.shape
    r = kernel.size // 2
    # One band below 2^19 pixels: there a second thread costs more than it saves
    # (512^2: 1.6 ms in two bands, 1.7 in one; 256^2: 0.8 against 0.4).
    bands = max(1, min(numba.get_num_threads(), ny // _ROWS)) if ny * nx >= 1 << 19 else 1
    edges = np.array([ny * i // bands for i in range(bands + 1)], np.int64)
    edge_rows = np.empty((bands, 2 * r, nx if bands > 1 else 0), np.float32)
    in_bands(_edge_rows, bands, a, kernel, edges, edge_rows, grain=1)
    in_bands(_separable_bands, bands, a, kernel, edges, edge_rows, out, grain=1)
    return out


@njit(cache=True, nogil=True)
def _edge_rows(a, kernel, edges, edge_rows, lo, hi):  # pragma: no cover - compiled
    """``edge_rows[k, t]``: the x pass of row ``edges[k] - r + t`` (``t < 2 r``) for
    the inner band edges ``k`` in ``[lo, hi)``."""
    ny, nx = a.shape
    r = kernel.size // 2
    row = np.zeros(nx + 2 * r, np.float32)
    for k in range(max(lo, 1), hi):
        for t in range(2 * r):
            y = edges[k] - r + t
            if 0 <= y < ny:
                _copy_into(row, r, a[y])
                _correlate_row(row, kernel, edge_rows[k, t])


@njit(cache=True, nogil=True)
def _separable_bands(a, kernel, edges, edge_rows, out, lo, hi):  # pragma: no cover
    ny, nx = a.shape
    r = kernel.size // 2
    m = 2 * r + 1
    row = np.zeros(nx + 2 * r, np.float32)
    ring = np.empty((m, nx), np.float32)
    for k in range(lo, hi):
        y0, y1 = edges[k], edges[k + 1]
        for y in range(max(0, y0 - r), min(ny, y0 + r)):
            _ring_row(a, kernel, edges, edge_rows, k, y, row, ring)
        for y in range(y0, y1):
            if y + r < ny:
                # row y + r is not written yet (rows below y only are)
                _ring_row(a, kernel, edges, edge_rows, k, y + r, row, ring)
            acc = out[y]
            acc[:] = 0.0
            i, i1 = max(0, y - r), min(ny - 1, y + r) + 1
            # Four rows a pass (still added one after the other, in order): a quarter
            # of the loads and stores of the output row.
            while i + 4 <= i1:
                w0, w1 = kernel[i - y + r], kernel[i + 1 - y + r]
                w2, w3 = kernel[i + 2 - y + r], kernel[i + 3 - y + r]
                s0, s1, s2, s3 = (
                    ring[i % m],
                    ring[(i + 1) % m],
                    ring[(i + 2) % m],
                    ring[(i + 3) % m],
                )
                for x in range(nx):
                    acc[x] = (((acc[x] + w0 * s0[x]) + w1 * s1[x]) + w2 * s2[x]) + w3 * s3[x]
                i += 4
            for j in range(i, i1):
                w = kernel[j - y + r]
                src = ring[j % m]
                for x in range(nx):
                    acc[x] += w * src[x]


@njit(cache=True, nogil=True, inline="always")
def _ring_row(a, kernel, edges, edge_rows, k, y, row, ring):  # pragma: no cover - compiled
    """The x pass of row ``y`` into ``ring[y % (2 r + 1)]``: from ``a`` inside band
    ``k``, from the edges' rows outside it."""
    r = kernel.size // 2
    dst = ring[y % (2 * r + 1)]
    if y < edges[k]:
        dst[:] = edge_rows[k, y - edges[k] + r]
    elif y >= edges[k + 1]:
        dst[:] = edge_rows[k + 1, y - edges[k + 1] + r]
    else:
        _copy_into(row, r, a[y])
        _correlate_row(row, kernel, dst)


def block_sum(a, b):
    """Sums over b x b blocks (partial blocks at the far edges sum what they hold)."""
    ny, nx = a.shape
    return block_sum_into(a, b, np.zeros((-(-ny // b), -(-nx // b)), np.float32))


def block_sum_into(a, b, out):
    """:func:`block_sum` of ``a`` added into ``out`` (zeros: the sums themselves), which
    may be a strided view (a part of a larger map)."""
    in_bands(_block_sum, out.shape[0], a, b, out, grain=-(-_ROWS // b))
    return out


@njit(cache=True, nogil=True)
def _block_sum(a, b, out, lo, hi):  # pragma: no cover - compiled
    ny, nx = a.shape
    for by in range(lo, hi):
        orow = out[by]
        for y in range(by * b, min(ny, (by + 1) * b)):
            row = a[y]
            start = 0
            if b == 2:
                # Whole pairs written out (the same sums in the same order): the loop
                # over the blocks vectorises.
                start = nx // 2 * 2
                for bx in range(nx // 2):
                    orow[bx] = (orow[bx] + row[2 * bx]) + row[2 * bx + 1]
            for x in range(start, nx):
                orow[x // b] += row[x]


@njit(cache=True, nogil=True)
def _runs(keys):  # pragma: no cover - compiled
    """Start indices of the runs of equal values in ``keys``, then ``keys.size``."""
    n = keys.size
    starts = np.empty(n + 1, np.int64)
    m = 0
    for i in range(n):
        if i == 0 or keys[i] != keys[i - 1]:
            starts[m] = i
            m += 1
    starts[m] = n
    return starts[: m + 1]


def dog_snr(num, cnt, excluded, g, g2, local, bw, noise, b, q, snr, grow, work):
    """Signal-to-noise maps of a normalised Gaussian smoothing, in one fused pass.

    With G the separable kernel ``g`` and G2 that of ``g2 = g**2``:
    ``grow = G*num / sqrt(nv)`` and ``snr = (G*num - G*cnt * local) / sqrt(nv)`` with
    ``nv = sigma**2 * G2*cnt``, ``sigma`` the noise of one full-resolution pixel read
    from the coarse rms map ``noise`` at ``[(y*b + b//2) // q, (x*b + b//2) // q]``
    (edge-clamped; this grid is binned by ``b``, the rms map samples every ``q``-th
    full-resolution pixel): the noise varies slowly enough to be constant over a
    kernel. ``local`` is sampled at ``[y // bw, x // bw]``. Zero where nv is 0. When
    ``excluded`` has the shape of ``num`` (unbinned data), ``num`` is the raw residual
    and ``cnt`` is unused: excluded pixels count as value 0 and weight 0, which saves
    two full-size arrays. The maps are written into ``snr`` and ``grow`` (of ``num``'s
    shape; a (1, 1) ``grow`` skips that map).

    ``work`` is ``(bands, strip)``: the rows are cut into ``bands`` bands, shared out
    among the threads, and each band is swept in strips of ``strip`` rows through an
    x-pass buffer of ``3 (strip + 2 r)`` rows per thread, so the buffers stay small.
    """
    spec = (np.zeros((1, 1), np.uint8), np.float32(1.0), False, np.float32(0.0),
            np.float32(0.0), False)  # fmt: skip
    _dog_run(num, cnt, excluded, g, g2, local, bw, noise, b, q, snr, grow, work, spec)
    return snr, grow


def dog_codes(num, cnt, excluded, g, g2, local, bw, noise, b, q, factor, low, high, plain,
              codes, work):  # fmt: skip
    """The hysteresis codes of :func:`dog_snr`'s maps, in the same fused pass, without
    the maps: ``codes`` (uint8, ``num``'s shape) is 2 where ``snr / factor > high``,
    else 1 where ``grow / factor > low`` (``grow`` the plain map with ``plain``, else
    ``snr``), else 0, with the maps' values and the division in float32 (no division
    when ``factor <= 1``), exactly as thresholding the maps would give. Saves the two
    float32 maps (two images of memory at full resolution)."""
    none = np.zeros((1, 1), np.float32)
    spec = (codes, np.float32(factor), bool(factor > 1.0), np.float32(low), np.float32(high),
            bool(plain))  # fmt: skip
    _dog_run(num, cnt, excluded, g, g2, local, bw, noise, b, q, none, none, work, spec)
    return codes


def _dog_run(num, cnt, excluded, g, g2, local, bw, noise, b, q, snr, grow, work, spec):
    """:func:`dog_snr` or :func:`dog_codes` (``spec``: the codes and their thresholds)."""
    ny, nx = num.shape
    direct = excluded.shape[0] == ny and excluded.shape[1] == nx
    # Unbinned rows without an excluded pixel have weights of one everywhere, so their
    # weight convolutions are all the same row, and every row whose whole kernel
    # window is such a row has the same G*cnt and G2*cnt: computed once (in
    # _dog_constants) with the very operations of the general path, so the results
    # are bit-identical to it (and independent of where the strips or a tile's edges
    # fall).
    clean = np.zeros(ny, np.bool_)
    if direct:
        in_bands(_clean_rows, ny, excluded, clean, grain=_ROWS)
    qruns, lruns, crow, vrow1, cint, vint = _dog_constants(nx, g, g2, b, q, noise.shape[1], bw)
    in_bands(
        _dog_bands, work[0], num, cnt, excluded, direct, g, g2, local, bw, noise, b,
        q, snr, grow, work, clean, crow, vrow1, cint, vint, qruns, lruns, spec, grain=1,
    )  # fmt: skip


@njit(cache=True, nogil=True)
def _clean_rows(excluded, clean, lo, hi):  # pragma: no cover - compiled
    """``clean[y]``: row y of ``excluded`` holds no excluded pixel."""
    nx = excluded.shape[1]
    for y in range(lo, hi):
        # the count of the row's excluded pixels (vectorises; any() stops early, but
        # reads a byte at a time)
        row = excluded[y]
        acc = 0
        for x in range(nx):
            acc += np.int32(row[x])
        clean[y] = acc == 0


@njit(cache=True, nogil=True)
def _dog_constants(nx, g, g2, b, q, nqx, bw):  # pragma: no cover - compiled
    """What every strip of :func:`dog_snr` shares: the runs of columns with one noise
    value and one local mean (per-run constants keep the final loops free of gathers,
    so they vectorise), and the weight rows of a clean row (``crow``, ``vrow1``) and
    of a clean kernel window (``cint``, ``vint``)."""
    r = g.size // 2
    qcol = np.empty(nx, np.int64)
    lcol = np.empty(nx, np.int64)
    for x in range(nx):
        qcol[x] = min((x * b + b // 2) // q, nqx - 1)
        lcol[x] = x // bw
    ones = np.zeros(nx + 2 * r, np.float32)
    ones[r : r + nx] = 1.0
    crow = np.empty(nx, np.float32)
    vrow1 = np.empty(nx, np.float32)
    _correlate_row2(ones, g, g2, crow, vrow1)
    cint = np.zeros(nx, np.float32)
    vint = np.zeros(nx, np.float32)
    for i in range(2 * r + 1):
        w = g[i]
        w2 = g2[i]
        for x in range(nx):
            cint[x] += w * crow[x]
            vint[x] += w2 * vrow1[x]
    return _runs(qcol), _runs(lcol), crow, vrow1, cint, vint


def _dog_bands(
    num, cnt, excluded, direct, g, g2, local, bw, noise, b, q, snr, grow, work, clean,
    crow, vrow1, cint, vint, qruns, lruns, spec, lo, hi,
):  # fmt: skip
    """Bands ``lo``..``hi`` of :func:`dog_snr`'s ``work[0]`` bands of rows, through
    one x-pass buffer (this thread's).

    A Python loop over compiled strips of many rows each: calling them costs little,
    and compiling this loop too (which takes in the strip's code) would add ~1 s to a
    first run."""
    ny, nx = num.shape
    r = g.size // 2
    want_grow = grow.shape[0] == ny and grow.shape[1] == nx
    codes, factor, divide, low, high, plain = spec
    bands, strip = work
    per_band = -(-ny // bands)
    if lo == hi:  # in_bands' empty first band: compile the strip in the calling thread
        buf = np.empty((3, 1, 1), np.float32)
        _dog_strip(
            num, cnt, excluded, direct, g, g2, local, bw, noise, b, q, snr, grow, want_grow,
            buf[0], buf[1], buf[2], 0, 0, 0, 0, clean, crow, vrow1, cint, vint,
            qruns, lruns, codes, factor, divide, low, high, plain,
        )  # fmt: skip
        return
    buf = np.empty((3, strip + 2 * r, nx), np.float32)
    tn, tc, tv = buf[0], buf[1], buf[2]
    for band in range(lo, hi):
        for y0 in range(band * per_band, min(ny, (band + 1) * per_band), strip):
            y1 = min(ny, y0 + strip, (band + 1) * per_band)
            a0 = max(0, y0 - r)
            a1 = min(ny, y1 + r)
            _dog_strip(
                num, cnt, excluded, direct, g, g2, local, bw, noise, b, q, snr, grow,
                want_grow, tn, tc, tv, y0, y1, a0, a1, clean, crow, vrow1, cint, vint,
                qruns, lruns, codes, factor, divide, low, high, plain,
            )  # fmt: skip


@njit(cache=True, nogil=True)
def _dog_strip(
    num, cnt, excluded, direct, g, g2, local, bw, noise, b, q, snr, grow, want_grow,
    tn, tc, tv, y0, y1, a0, a1, clean, crow, vrow1, cint, vint, qruns, lruns, codes,
    factor, divide, low, high, plain,
):  # fmt: skip  # pragma: no cover - compiled
    """Rows y0..y1 of :func:`dog_snr` (x pass over a0..a1, then the y pass), or of
    :func:`dog_codes` when ``codes`` has ``num``'s shape."""
    ny, nx = num.shape
    want_codes = codes.shape[0] == ny and codes.shape[1] == nx
    r = g.size // 2
    nqy = noise.shape[0]
    # Row buffers once per strip (their padding stays zero), not per row.
    pn = np.zeros(nx + 2 * r, np.float32)
    pc = np.zeros(nx + 2 * r if not direct else 0, np.float32)
    # dirty[k, x]: the weights of x-pass row k at x are not a clean row's.
    dirty = np.zeros((max(0, a1 - a0), nx if direct else 0), np.uint8)
    for k in range(a1 - a0):
        y = a0 + k
        # Unbinned, only the windows of the first and last r output rows read whole
        # weight rows; the others read a row's weights at its dirty columns only
        # (:func:`_dirty_columns` takes a clean row's elsewhere), so the rest of the
        # row is not written.
        whole = y < 2 * r or y >= ny - 2 * r
        # Padded rows of the masked values and weights, then the taps.
        if clean[y]:
            _copy_into(pn, r, num[y])
            _correlate_row(pn, g, tn[k])
            if whole:
                _copy_into(tc[k], 0, crow)
                _copy_into(tv[k], 0, vrow1)
            continue
        if direct:
            erow, vrow = excluded[y], num[y]
            for x in range(nx):
                pn[x + r] = np.float32(0.0) if erow[x] else vrow[x]
            _correlate_row(pn, g, tn[k])
            # The weights differ from a clean row's only within r of an excluded
            # pixel: those columns are summed (the same taps in the same order) and
            # marked.
            if whole:
                _copy_into(tc[k], 0, crow)
                _copy_into(tv[k], 0, vrow1)
            _weights_near_excluded(erow, g, g2, tc[k], tv[k], dirty[k])
            continue
        _copy_into(pn, r, num[y])
        _copy_into(pc, r, cnt[y])
        _correlate_row(pn, g, tn[k])
        _correlate_row2(pc, g, g2, tc[k], tv[k])
    an = np.empty(nx, np.float32)
    ac = np.empty(nx, np.float32)
    av = np.empty(nx, np.float32)
    # A full window's dirty columns and their weights (unbinned).
    nd = nx if direct else 0
    anyd = np.empty(nd, np.uint8)
    cols = np.empty(nd, np.int64)
    dc = np.empty(nd, np.float32)
    dv = np.empty(nd, np.float32)
    # 1 / noise of a steady row (weights of a clean window) depends on its noise row
    # only: kept for the next steady rows of that noise row.
    steady_av = np.empty(nx, np.float32)
    steady_qy = -1
    # sigma**2 per column of the current noise row, the surround mean per column of
    # the current local row (each changes every few rows only).
    s2 = np.empty(nx, np.float32)
    s2_qy = -1
    lmean = np.empty(nx, np.float32)
    lmean_y = -1
    fdiv = factor if divide else np.float32(1.0)
    for k in range(y1 - y0):
        y = y0 + k
        lo, hi = max(0, y - r), min(ny - 1, y + r)
        qy = min((y * b + b // 2) // q, nqy - 1)
        if qy != s2_qy:
            _noise_row(noise, qy, qruns, b, q, s2)
            s2_qy = qy
        if direct and lo == y - r and hi == y + r:
            # A full window: a clean one's weights (and, per noise row, 1 / noise),
            # except in the columns where a row of the window is dirty.
            if g.size == 7:
                _sum_rows7(tn, lo - a0, g, an)
            else:
                an[:] = 0.0
                for i in range(lo, hi + 1):
                    w = g[i - y + r]
                    sn = tn[i - a0]
                    for x in range(nx):
                        an[x] += w * sn[x]
            if qy != steady_qy:
                _inverse_noise(vint, s2, steady_av)
                steady_qy = qy
            # The outputs are made with a clean window's weights throughout, then
            # remade at the dirty columns (few) with theirs: the same values as
            # weights rows patched first, without copying them.
            wc, wv = cint, steady_av
            m = 0
            if not clean[lo : hi + 1].all():
                m = _dirty_columns(
                    dirty, lo - a0, 2 * r + 1, tc, tv, crow, vrow1, g, g2, noise, qy, b, q,
                    anyd, cols, dc, dv,
                )  # fmt: skip
        else:
            wc, wv = ac, av
            m = 0
            if g.size == 7 and lo == y - r and hi == y + r:
                _sum_rows7(tn, lo - a0, g, an)
                _sum_rows7(tc, lo - a0, g, ac)
                _sum_rows7(tv, lo - a0, g2, av)
            else:
                an[:] = 0.0
                ac[:] = 0.0
                av[:] = 0.0
                for i in range(lo, hi + 1):
                    w = g[i - y + r]
                    w2 = g2[i - y + r]
                    sn, sc, sv = tn[i - a0], tc[i - a0], tv[i - a0]
                    for x in range(nx):
                        an[x] += w * sn[x]
                        ac[x] += w * sc[x]
                        av[x] += w2 * sv[x]
            _inverse_noise(av, s2, av)
        if y // bw != lmean_y:
            lmean_y = y // bw
            _local_row(local[lmean_y], bw, lruns, lmean)
        if want_codes:
            # The values dog_snr would store, divided and thresholded as
            # HysteresisMasker.scale_mask and hysteresis_codes do (float32 throughout).
            crow_out = codes[y]
            # Selects, not branches, so that the loop vectorises: a division by 1
            # is exact, so dividing always changes no value.
            for x in range(nx):
                sv = ((an[x] - wc[x] * lmean[x]) * wv[x]) / fdiv
                pv = (an[x] * wv[x]) / fdiv
                gv = pv if plain else sv
                crow_out[x] = 2 if sv > high else (1 if gv > low else 0)
            for j in range(m):
                x = cols[j]
                sv = ((an[x] - dc[j] * lmean[x]) * dv[j]) / fdiv
                pv = (an[x] * dv[j]) / fdiv
                gv = pv if plain else sv
                crow_out[x] = 2 if sv > high else (1 if gv > low else 0)
            continue
        if want_grow:
            out = grow[y]
            for x in range(nx):
                out[x] = an[x] * wv[x]
            for j in range(m):
                out[cols[j]] = an[cols[j]] * dv[j]
        out = snr[y]
        for x in range(nx):
            out[x] = (an[x] - wc[x] * lmean[x]) * wv[x]
        for j in range(m):
            x = cols[j]
            out[x] = (an[x] - dc[j] * lmean[x]) * dv[j]


@njit(cache=True, nogil=True, inline="always")
def _next_set(flags, words, x):  # pragma: no cover - compiled
    """The first index from ``x`` where the bytes ``flags`` are set, or their size:
    eight at a time where none is (``words``: the flags' whole 8-byte words; most
    of a row is clear)."""
    n = flags.size
    nw = words.size
    while x < n:
        if x % 8 == 0 and x // 8 < nw and words[x // 8] == 0:
            x += 8
        elif flags[x]:
            return x
        else:
            x += 1
    return n


@njit(cache=True, nogil=True, inline="always")
def _weights_near_excluded(erow, g, g2, tc, tv, dirty):  # pragma: no cover - compiled
    """The x pass of the weight row of ``erow`` (0 where excluded, else 1, and 0 past
    the row's ends) into ``tc``, ``tv`` at the columns within r of an excluded pixel
    (marked in ``dirty``, which is zeroed first); the other columns are left as they
    are."""
    nx = erow.size
    r = g.size // 2
    w = 2 * r + 1
    z = np.float32(0.0)
    one = np.float32(1.0)
    for x in range(nx):
        dirty[x] = 0
    words = erow[: nx // 8 * 8].view(np.uint64)
    x = _next_set(erow, words, 0)
    while x < nx:
        e0 = x
        while x < nx and erow[x]:
            x += 1
        for c in range(max(0, e0 - r), min(nx, x + r)):
            if dirty[c]:
                continue
            sc, sv = z, z
            for j in range(w):
                i = c + j - r
                v = one if 0 <= i < nx and not erow[i] else z
                sc = sc + g[j] * v
                sv = sv + g2[j] * v
            tc[c], tv[c] = sc, sv
            dirty[c] = 1
        x = _next_set(erow, words, x)


@njit(cache=True, nogil=True, inline="always")
def _dirty_columns(dirty, i0, n, tc, tv, crow, vrow1, g, g2, noise, qy, b, q, anyd, cols,
                   dc, dv):  # fmt: skip  # pragma: no cover - compiled
    """The columns where one of the ``n`` x-pass rows from ``i0`` is dirty, into
    ``cols`` (ascending), and their weights ``dc`` and 1 / noise ``dv`` (the y pass's
    sums in order, as in :func:`_dog_strip`; a row not dirty at a column holds a
    clean row's weights there, ``crow`` and ``vrow1``, and was not written). Returns
    how many. ``anyd`` is a work row."""
    nx = anyd.size
    nqx = noise.shape[1]
    z = np.float32(0.0)
    for x in range(nx):
        anyd[x] = dirty[i0, x]
    for t in range(1, n):
        row = dirty[i0 + t]
        for x in range(nx):
            anyd[x] |= row[x]
    words = anyd[: nx // 8 * 8].view(np.uint64)
    m = 0
    x = _next_set(anyd, words, 0)
    while x < nx:
        sc, sv = z, z
        for t in range(n):
            d = dirty[i0 + t, x]
            sc = sc + g[t] * (tc[i0 + t, x] if d else crow[x])
            sv = sv + g2[t] * (tv[i0 + t, x] if d else vrow1[x])
        sigma = noise[qy, min((x * b + b // 2) // q, nqx - 1)]
        v = sv * (sigma * sigma)
        cols[m] = x
        dc[m] = sc
        dv[m] = 1.0 / np.sqrt(v) if v > 0 else 0.0
        m += 1
        x = _next_set(anyd, words, x + 1)
    return m


@njit(cache=True, nogil=True, inline="always")
def _noise_row(noise, qy, qruns, b, q, out):  # pragma: no cover - compiled
    """``out[x]``: sigma**2 of row ``qy`` of the noise grid at column x, constant over
    each run of ``qruns``: per-pixel lookups without an integer division each, so that
    :func:`_inverse_noise` vectorises."""
    nqx = noise.shape[1]
    for k0 in range(qruns.size - 1):
        x0, x1 = qruns[k0], qruns[k0 + 1]
        sigma = noise[qy, min((x0 * b + b // 2) // q, nqx - 1)]
        s2 = sigma * sigma
        for x in range(x0, x1):
            out[x] = s2
    return out


@njit(cache=True, nogil=True, inline="always")
def _inverse_noise(var, s2, out):  # pragma: no cover - compiled
    """``out = 1 / sqrt(var * s2)`` (0 where that is not positive), ``s2`` the noise
    variance per column (:func:`_noise_row`); ``out`` may be ``var``. The square root
    takes 1 where the product is not positive (a select, not a branch), so the loop
    vectorises: the same values."""
    one = np.float32(1.0)
    for x in range(var.size):
        v = var[x] * s2[x]
        ok = v > 0
        s = np.sqrt(v if ok else one)
        out[x] = 1.0 / s if ok else 0.0


@njit(cache=True, nogil=True, inline="always")
def _local_row(lrow, bw, lruns, out):  # pragma: no cover - compiled
    """``out[x] = lrow[x // bw]``: the surround mean per column, so that the final
    loops of :func:`_dog_strip` vectorise (an integer division per pixel or per short
    run cost more than the rest of the loop)."""
    if bw & (bw - 1) == 0:
        shift = 0
        while (1 << shift) < bw:
            shift += 1
        for x in range(out.size):
            out[x] = lrow[x >> shift]
        return out
    for k0 in range(lruns.size - 1):
        m = lrow[lruns[k0] // bw]
        for x in range(lruns[k0], lruns[k0 + 1]):
            out[x] = m
    return out


def divide_finite(num, den) -> None:
    """``num /= den`` in place, then 0 wherever the quotient is not finite (float32
    maps of one shape; numpy's division, without its temporaries and serial passes)."""
    in_bands(_divide_finite, num.shape[0], num, den, grain=_ROWS)


@njit(cache=True, nogil=True, error_model="numpy")
def _divide_finite(num, den, lo, hi):  # pragma: no cover - compiled
    z = num.dtype.type(0)
    for y in range(lo, hi):
        n, d = num[y], den[y]
        for x in range(n.size):
            v = n[x] / d[x]
            n[x] = v if np.isfinite(v) else z


def zero_where(num, cnt, det) -> None:
    """``num[det] = 0; cnt[det] = 0`` in place, in bands of rows (2-D arrays of one
    shape)."""
    in_bands(_zero_where, det.shape[0], num, cnt, det, grain=_ROWS)


@njit(cache=True, nogil=True)
def _zero_where(num, cnt, det, lo, hi):  # pragma: no cover - compiled
    zn, zc = num.dtype.type(0), cnt.dtype.type(0)
    for y in range(lo, hi):
        d, n, c = det[y], num[y], cnt[y]
        for x in range(d.size):
            if d[x]:
                n[x] = zn
                c[x] = zc


def covered_block_sum_into(num, cnt, excluded, b, out_num, out_cnt) -> None:
    """:func:`block_sum_into` ``(num, 2, out_num)`` and ``(cnt, 2, out_cnt)`` (the same
    sums in the same order) with ``num``, ``cnt`` (a map binned by ``b``) read as 0 at
    each block whose ``b`` x ``b`` pixels of ``excluded`` (what the image holds of it
    at the far edges) are all excluded: where the masked block sums of the image with
    ``excluded`` are 0 (:class:`~skymap.masking.hysteresis._SumsChain` zeroes them)."""
    in_bands(_covered_block_sum, out_num.shape[0], num, cnt, excluded.view(np.uint8), b,
             out_num, out_cnt, grain=-(-_ROWS // (2 * b)))  # fmt: skip


@njit(cache=True, nogil=True)
def _covered_block_sum(num, cnt, excluded, b, on, oc, lo, hi):  # pragma: no cover
    ny, nx = excluded.shape
    w = num.shape[1]
    vn, vc = np.empty(w, num.dtype), np.empty(w, cnt.dtype)
    zn, zc = num.dtype.type(0), cnt.dtype.type(0)
    cols, cov = np.empty(nx, np.uint8), np.empty(w, np.uint8)
    full = nx // b
    for by in range(lo, hi):
        orn, orc = on[by], oc[by]
        for y in range(2 * by, min(num.shape[0], 2 * by + 2)):
            # whether each column of the block row is all excluded, then each block
            # (no branches: the loops vectorise)
            first = excluded[y * b]
            for xx in range(nx):
                cols[xx] = first[xx]
            for yy in range(y * b + 1, min(ny, (y + 1) * b)):
                row = excluded[yy]
                for xx in range(nx):
                    cols[xx] &= row[xx]
            if b == 2:
                for x in range(full):
                    cov[x] = cols[2 * x] & cols[2 * x + 1]
            elif b == 4:
                for x in range(full):
                    cov[x] = (cols[4 * x] & cols[4 * x + 1]) & (cols[4 * x + 2] & cols[4 * x + 3])
            else:
                for x in range(full):
                    c = cols[x * b]
                    for xx in range(x * b + 1, (x + 1) * b):
                        c &= cols[xx]
                    cov[x] = c
            if full < w:  # the partial block at the far edge
                c = cols[full * b]
                for xx in range(full * b + 1, nx):
                    c &= cols[xx]
                cov[full] = c
            nrow, crow = num[y], cnt[y]
            for x in range(w):
                vn[x] = zn if cov[x] else nrow[x]
                vc[x] = zc if cov[x] else crow[x]
            # block_sum's order (b == 2)
            h = w // 2
            for bx in range(h):
                orn[bx] = (orn[bx] + vn[2 * bx]) + vn[2 * bx + 1]
                orc[bx] = (orc[bx] + vc[2 * bx]) + vc[2 * bx + 1]
            if w % 2:
                orn[h] += vn[w - 1]
                orc[h] += vc[w - 1]


def expand_mask_into(small, b, out, src=None):
    """``out = src | small[y // b, x // b]`` at full resolution (``src`` default
    ``out``: in place); returns ``out``. With ``src`` the copy of ``src`` is made in
    the same pass (a fresh ``out`` is written once, not copied into and then OR-ed)."""
    if b == 1:
        return np.logical_or(out if src is None else src, small, out=out)
    # in place, the loop reads and writes one row (two views of one row would not
    # vectorise: the compiler's overlap check fails and it runs the scalar loop)
    inplace = src is None or src is out
    src = out if inplace else src
    in_bands(_expand_mask_into, out.shape[0], small, b, src, inplace, out, grain=_ROWS)
    return out


@njit(cache=True, nogil=True)
def _expand_mask_into(small, b, src, inplace, out, lo, hi):  # pragma: no cover - compiled
    nx = out.shape[1]
    gx = small.shape[1]
    # A small row expanded once into a row of bytes (2 or 4 at a time, as one 16- or
    # 32-bit product), then OR-ed into each of its b rows: both loops vectorise (a
    # branch per small pixel, per row, did not: ~10x slower).
    wide = np.zeros(gx * max(b, 4) + 8, np.uint8)
    w16 = wide[: gx * 2].view(np.uint16)
    w32 = wide[: gx * 4].view(np.uint32)
    flags = wide.view(np.bool_)
    sy = -1
    for y in range(lo, hi):
        if y // b != sy:
            sy = y // b
            row = small[sy]
            if b == 2:
                for bx in range(gx):
                    w16[bx] = np.uint16(row[bx]) * np.uint16(0x0101)
            elif b == 4:
                for bx in range(gx):
                    w32[bx] = np.uint32(row[bx]) * np.uint32(0x01010101)
            else:
                for bx in range(gx):
                    v = np.uint8(row[bx])
                    for j in range(b):
                        wide[bx * b + j] = v
        dst = out[y]
        if inplace:
            for x in range(nx):
                dst[x] = dst[x] | flags[x]
        else:
            row0 = src[y]
            for x in range(nx):
                dst[x] = row0[x] | flags[x]


def hysteresis_codes(snr, grow, low, high, out):
    """uint8 map ``out``: 2 where ``snr > high`` (seeds), 1 where ``grow > low``, else 0;
    one byte a pixel instead of the seed, growth and union masks."""
    in_bands(_hysteresis_codes, snr.shape[0], snr, grow, low, high, out, grain=_ROWS)
    return out


@njit(cache=True, nogil=True)
def _hysteresis_codes(snr, grow, low, high, out, lo, hi):  # pragma: no cover - compiled
    nx = snr.shape[1]
    for y in range(lo, hi):
        for x in range(nx):
            if snr[y, x] > high:
                out[y, x] = 2
            elif grow[y, x] > low:
                out[y, x] = 1
            else:
                out[y, x] = 0


def keep_seeded(labels, codes, n):
    """Overwrite ``codes`` (as 0/1) with the pixels whose label (1..n) holds a seed
    (code 2); returns it."""
    # One pass on one thread: many pixels of one region would race on the same flag.
    keep = _seeded_labels(labels, codes, n)
    in_bands(_keep_labels, labels.shape[0], labels, codes, keep, grain=_ROWS)
    return codes


@njit(cache=True, nogil=True)
def _seeded_labels(labels, codes, n):  # pragma: no cover - compiled
    """Flags of the labels 1..n that hold a seed (index 0, the background: False)."""
    ny, nx = labels.shape
    keep = np.zeros(n + 1, np.bool_)
    for y in range(ny):
        for x in range(nx):
            if codes[y, x] == 2:
                keep[labels[y, x]] = True
    keep[0] = False
    return keep


@njit(cache=True, nogil=True)
def _keep_labels(labels, codes, keep, lo, hi):  # pragma: no cover - compiled
    nx = labels.shape[1]
    for y in range(lo, hi):
        for x in range(nx):
            codes[y, x] = 1 if keep[labels[y, x]] else 0


def flood_seeded(codes):
    """Overwrite ``codes`` (2 seed, 1 growth, 0 neither) with 1 on the pixels
    8-connected through codes >= 1 to a seed, 0 elsewhere; returns it. The same
    pixels as labelling the regions and keeping those that hold a seed
    (:func:`keep_seeded`), without a label map (an image of int32)."""
    none = np.zeros((0, 0), np.bool_)
    _flood_banded(codes, np.zeros((0, 2), np.int64), none)
    return codes


def flood_seeded_into(codes, offsets, into):
    """``into |=`` the pixels :func:`flood_seeded` finds, dilated by the ``offsets``
    (``(k, 2)`` int (dy, dx), a symmetric footprint), in place; returns ``into``.
    Each pixel reached paints its footprint as the flood reaches it, so neither the
    detections' map nor a dilated copy is made. ``codes`` is left overwritten."""
    # The kernel paints through a flat view of ``into``: a strided map goes through a
    # contiguous copy.
    target = into if into.flags.c_contiguous else np.ascontiguousarray(into)
    _flood_banded(codes, np.ascontiguousarray(offsets, np.int64), target)
    if target is not into:
        into[...] = target
    return into


def _flood_banded(codes, offsets, into):
    """The flood of :func:`flood_seeded` (``into`` of shape (0, 0)) or
    :func:`flood_seeded_into`, in bands of rows on numba's threads
    (:func:`skymap._util.in_bands`): each band floods from its own seeds without
    leaving its rows (and paints its rows only), then one thread carries the flood
    across the seams between bands (reached pixels next to growth pixels of the next
    band) and paints the footprints that cross them. A pixel is reached when it
    connects to a seed, whichever band finds it, and ``into`` is the OR of the
    reached pixels' footprints: the same result as one flood."""
    ny, nx = codes.shape
    flat, words = _flat_words(codes)
    bands = max(1, min(numba.get_num_threads(), ny // _FLOOD_ROWS))
    edges = np.array([ny * i // bands for i in range(bands + 1)], np.int64)
    in_bands(_flood_rows, bands, codes, flat, words, offsets, into, edges, grain=1)
    if bands > 1:
        _flood_seams(codes, flat, offsets, into, edges)
    if into.shape[0] != ny or into.shape[1] != nx:
        # reached (3) -> 1, else 0: numpy's comparison into the same bytes (a tenth of
        # the time of the compiled loop, which does not vectorise)
        np.equal(flat, 3, out=flat.view(np.bool_))


#: Rows a band of :func:`_flood_banded` holds at least.
_FLOOD_ROWS = 256


@njit(cache=True, nogil=True)
def _flood_setup(offsets, nx):  # pragma: no cover - compiled
    reach = 0
    for k in range(offsets.shape[0]):
        reach = max(reach, abs(offsets[k, 0]), abs(offsets[k, 1]))
    return reach, offsets[:, 0] * nx + offsets[:, 1]


@njit(cache=True, nogil=True)
def _flood_rows(codes, flat, words, offsets, into, edges, jlo, jhi):  # pragma: no cover
    """Bands ``jlo:jhi`` of :func:`_flood_banded` (rows ``edges[j]:edges[j + 1]``):
    the seeds, then the flood and the painting, within the band's rows."""
    ny, nx = codes.shape
    paint = into.shape[0] == ny and into.shape[1] == nx
    reach, steps = _flood_setup(offsets, nx)
    painted = into.reshape(into.size) if paint else np.zeros(0, np.bool_)
    # Code 3 marks a pixel reached (and pushed once). Codes are 0-2 here: a seed is a
    # byte with bit 1 set.
    seed_bits = np.uint64(0x0202020202020202)
    for j in range(jlo, jhi):
        y0, y1 = edges[j], edges[j + 1]
        stack = np.empty(1 << 16, np.int64)
        n = 0
        first, last = y0 * nx, y1 * nx
        for start in range(first // 8 * 8, last, 8):
            if start // 8 < words.size and not words[start // 8] & seed_bits:
                continue
            for i in range(max(start, first), min(start + 8, last)):
                if flat[i] == 2:
                    flat[i] = 3
                    if n == stack.size:
                        stack = grown(stack)
                    stack[n] = i
                    n += 1
        while n:
            n = _flood_stack(flat, nx, y0, y1, stack, n, paint, offsets, steps, reach, painted)
            if n:
                stack = grown(stack)


@njit(cache=True, nogil=True)
def _flood_seams(codes, flat, offsets, into, edges):  # pragma: no cover - compiled
    """The flood across the seams between :func:`_flood_rows`' bands, on the whole
    image, then the footprints of the reached pixels within ``reach`` rows of a seam
    (each band painted only its own rows of them)."""
    ny, nx = codes.shape
    paint = into.shape[0] == ny and into.shape[1] == nx
    reach, steps = _flood_setup(offsets, nx)
    painted = into.reshape(into.size) if paint else np.zeros(0, np.bool_)
    stack = np.empty(1 << 16, np.int64)
    n = 0
    for j in range(1, edges.size - 1):
        b = edges[j]
        for y, other in ((b - 1, b), (b, b - 1)):
            for x in range(nx):
                if flat[y * nx + x] != 3:
                    continue
                for xx in range(max(0, x - 1), min(nx, x + 2)):
                    k = other * nx + xx
                    if flat[k] == 1 or flat[k] == 2:
                        flat[k] = 3
                        if n + 1 > stack.size:
                            stack = grown(stack)
                        stack[n] = k
                        n += 1
    while n:
        n = _flood_stack(flat, nx, 0, ny, stack, n, paint, offsets, steps, reach, painted)
        if n:
            stack = grown(stack)
    if not paint:
        return
    for j in range(1, edges.size - 1):
        b = edges[j]
        for y in range(max(0, b - reach), min(ny, b + reach)):
            for x in range(nx):
                if flat[y * nx + x] == 3:
                    for k in range(offsets.shape[0]):
                        yy, xx = y + offsets[k, 0], x + offsets[k, 1]
                        if 0 <= yy < ny and 0 <= xx < nx:
                            painted[yy * nx + xx] = True


def _flat_words(codes):
    flat = codes.reshape(-1)
    # The seeds are looked for eight codes at a time (words without one are skipped).
    whole = flat.size // 8 * 8
    return flat, flat[:whole].view(np.uint64)


@njit(cache=True, nogil=True)
def _flood_stack(flat, nx, y0, y1, stack, n, paint, offsets, steps, reach, painted):
    # pragma: no cover - compiled
    """Pops the first ``n`` entries of a flood's ``stack`` and pushes the neighbours
    they reach within rows ``y0:y1``, painting their footprints within those rows,
    until it is empty (returns 0) or could overflow (returns the count left, for the
    caller to grow it). The stack is never reassigned here, so the loop holds no
    reference counting (which cost more than the flood)."""
    one = np.uint8(1)
    while n:
        if n + 8 > stack.size:
            return n
        n -= 1
        i = stack[n]
        y = i // nx
        x = i - y * nx
        if paint:
            if y0 + reach <= y < y1 - reach and reach <= x < nx - reach:
                for k in range(steps.size):
                    painted[i + steps[k]] = True
            else:
                for k in range(offsets.shape[0]):
                    yy, xx = y + offsets[k, 0], x + offsets[k, 1]
                    if y0 <= yy < y1 and 0 <= xx < nx:
                        painted[yy * nx + xx] = True
        if y0 < y < y1 - 1 and 0 < x < nx - 1:
            # Inside the rows: the 8 neighbours without bounds, codes 1 and 2 (growth,
            # seed) in one unsigned comparison.
            for j0 in (i - nx - 1, i - 1, i + nx - 1):
                for j in range(j0, j0 + 3):
                    if np.uint8(flat[j] - one) <= one:
                        flat[j] = 3
                        stack[n] = j
                        n += 1
            continue
        for yy in range(max(y0, y - 1), min(y1, y + 2)):
            for xx in range(max(0, x - 1), min(nx, x + 2)):
                j = yy * nx + xx
                if flat[j] == 1 or flat[j] == 2:
                    flat[j] = 3
                    stack[n] = j
                    n += 1
    return 0


@njit(cache=True, nogil=True)
def grown(stack):  # pragma: no cover - compiled
    """``stack`` copied into one twice as long."""
    out = np.empty(2 * stack.size, stack.dtype)
    for i in range(stack.size):
        out[i] = stack[i]
    return out


def dog_sampled(num, cnt, excluded, g, g2, local, bw, noise, b, q, ys, xs):
    """``(snr[ys], snr[:, xs])`` of :func:`dog_snr`'s snr map, without the map: the x
    pass of the rows each sampled row's y pass reads (whole rows), and of every row at
    the sampled columns only, then the y pass at the sampled pixels. The same float32
    operations in the same order as :func:`dog_snr` (every row as a row with excluded
    pixels is computed: a clean row's constant weights are those same sums), so the
    same values bit for bit; a few per cent of the full pass's work. The sampled rows,
    the columns' x pass and their y pass each run in bands of rows (each output's sums
    are its own, so the bands change nothing)."""
    ny, nx = num.shape
    rows = np.empty((ys.size, nx), np.float32)
    cols = np.empty((ny, xs.size), np.float32)
    direct = excluded.shape == num.shape
    in_bands(_dog_sampled_rows, ys.size, num, cnt, excluded, direct, g, g2, local, bw, noise,
             b, q, ys, rows, grain=1)  # fmt: skip
    xn, xc, xv = (np.empty((ny, xs.size), np.float32) for _ in range(3))
    in_bands(_dog_columns_x, ny, num, cnt, excluded, direct, g, g2, xs, xn, xc, xv, grain=_ROWS)
    in_bands(_dog_columns_y, ny, xn, xc, xv, g, g2, local, bw, noise, b, q, xs, cols,
             grain=_ROWS)  # fmt: skip
    return rows, cols


@njit(cache=True, nogil=True, inline="always")
def _columns_of(xs, b, q, nqx, bw):  # pragma: no cover - compiled
    """The noise and local-mean columns of the columns ``xs`` (once each, not an
    integer division per pixel)."""
    qcol = np.empty(xs.size, np.int64)
    lcol = np.empty(xs.size, np.int64)
    for k in range(xs.size):
        qcol[k] = min((xs[k] * b + b // 2) // q, nqx - 1)
        lcol[k] = xs[k] // bw
    return qcol, lcol


@njit(cache=True, nogil=True, inline="always")
def _snr_of(an, ac, av, s2, m):  # pragma: no cover - compiled
    """One snr value from the y pass's sums, as :func:`_dog_strip` finishes it."""
    v = av * s2
    a = np.float32(1.0 / np.sqrt(v) if v > 0 else 0.0)
    return (an - ac * m) * a


@njit(cache=True, nogil=True, inline="always")
def _y_sums(tn, tc, tv, i0, t0, n, g, g2, an, ac, av):  # pragma: no cover - compiled
    """``an[x] = sum_i g[t0 + i] * tn[i0 + i, x]`` over ``i < n``, summed from 0 in
    that order (``ac`` from ``tc`` alike, ``av`` from ``tv`` with ``g2``): the y pass
    of :func:`_dog_sampled_rows` and :func:`_dog_columns_y` for all columns at once
    (the loop over them vectorises)."""
    z = np.float32(0.0)
    for x in range(an.size):
        an[x] = z
        ac[x] = z
        av[x] = z
    for i in range(n):
        w = g[t0 + i]
        w2 = g2[t0 + i]
        sn, sc, sv = tn[i0 + i], tc[i0 + i], tv[i0 + i]
        for x in range(an.size):
            an[x] += w * sn[x]
            ac[x] += w * sc[x]
            av[x] += w2 * sv[x]


@njit(cache=True, nogil=True)
def _dog_sampled_rows(
    num, cnt, excluded, direct, g, g2, local, bw, noise, b, q, ys, rows, klo, khi
):  # pragma: no cover - compiled
    """Sampled rows ``ys[klo:khi]``: the x pass of the rows of each one's window,
    whole rows, then the y pass and the snr."""
    ny, nx = num.shape
    r = g.size // 2
    w = 2 * r + 1
    nqy, nqx = noise.shape
    z = np.float32(0.0)
    one = np.float32(1.0)
    tn = np.empty((w, nx), np.float32)
    tc = np.empty((w, nx), np.float32)
    tv = np.empty((w, nx), np.float32)
    pn = np.zeros(nx + 2 * r, np.float32)
    pc = np.zeros(nx + 2 * r, np.float32)
    an_r = np.empty(nx, np.float32)
    ac_r = np.empty(nx, np.float32)
    av_r = np.empty(nx, np.float32)
    qcol, lcol = _columns_of(np.arange(nx), b, q, nqx, bw)
    for k in range(klo, khi):
        y = ys[k]
        lo, hi = max(0, y - r), min(ny - 1, y + r)
        for i in range(lo, hi + 1):
            for x in range(nx):
                if direct:
                    e = excluded[i, x]
                    pn[x + r] = z if e else num[i, x]
                    pc[x + r] = z if e else one
                else:
                    pn[x + r] = num[i, x]
                    pc[x + r] = cnt[i, x]
            _correlate_row(pn, g, tn[i - lo])
            _correlate_row(pc, g, tc[i - lo])
            _correlate_row(pc, g2, tv[i - lo])
        qy = min((y * b + b // 2) // q, nqy - 1)
        lrow = local[y // bw]
        out = rows[k]
        # The y pass over whole rows (each column's sums in the same order), then
        # the snr per column.
        _y_sums(tn, tc, tv, 0, lo - y + r, hi - lo + 1, g, g2, an_r, ac_r, av_r)
        for x in range(nx):
            sigma = noise[qy, qcol[x]]
            out[x] = _snr_of(an_r[x], ac_r[x], av_r[x], sigma * sigma, lrow[lcol[x]])


@njit(cache=True, nogil=True)
def _dog_columns_x(
    num, cnt, excluded, direct, g, g2, xs, xn, xc, xv, ilo, ihi
):  # pragma: no cover - compiled
    """Sampled columns: the x pass of rows ``ilo:ihi`` at those columns."""
    nx = num.shape[1]
    r = g.size // 2
    w = 2 * r + 1
    z = np.float32(0.0)
    one = np.float32(1.0)
    m = xs.size
    for i in range(ilo, ihi):
        for k in range(m):
            x = xs[k]
            sn, sc, sv = z, z, z
            for j in range(w):
                xx = x + j - r
                vn, vc = z, z
                if 0 <= xx < nx:
                    if direct:
                        if not excluded[i, xx]:
                            vn, vc = num[i, xx], one
                    else:
                        vn, vc = num[i, xx], cnt[i, xx]
                sn = sn + g[j] * vn
                sc = sc + g[j] * vc
                sv = sv + g2[j] * vc
            xn[i, k], xc[i, k], xv[i, k] = sn, sc, sv


@njit(cache=True, nogil=True)
def _dog_columns_y(
    xn, xc, xv, g, g2, local, bw, noise, b, q, xs, cols, ylo, yhi
):  # pragma: no cover - compiled
    """Sampled columns: the y pass of rows ``ylo:yhi`` from the whole x pass, and the
    snr."""
    ny, m = xn.shape
    r = g.size // 2
    nqy, nqx = noise.shape
    an_c = np.empty(m, np.float32)
    ac_c = np.empty(m, np.float32)
    av_c = np.empty(m, np.float32)
    qcol, lcol = _columns_of(xs, b, q, nqx, bw)
    for y in range(ylo, yhi):
        lo, hi = max(0, y - r), min(ny - 1, y + r)
        qy = min((y * b + b // 2) // q, nqy - 1)
        lrow = local[y // bw]
        _y_sums(xn, xc, xv, lo, lo - y + r, hi - lo + 1, g, g2, an_c, ac_c, av_c)
        for k in range(m):
            sigma = noise[qy, qcol[k]]
            cols[y, k] = _snr_of(an_c[k], ac_c[k], av_c[k], sigma * sigma, lrow[lcol[k]])
