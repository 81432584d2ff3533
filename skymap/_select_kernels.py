"""Exact selection kernels: order statistics and medians equal to numpy's bit for bit,
without numpy's partition. Not public: :mod:`skymap._util`, :mod:`skymap.stats` and the
maskers' kernels call them. Nothing here imports from skymap at import time (only
:func:`skymap._util.in_bands`, within calls), so every layer may.

numba's on-disk cache of a caller is keyed on the caller's source file only: after
editing a kernel here, clear the ``__pycache__`` of ``skymap`` before testing.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def kth_smallest(a, n, k):
    """Return the k-th smallest (0-based) of ``a[:n]``, reordering ``a[:n]`` so that
    everything left of ``k`` is <= it and everything right of it is >= it.

    Hoare's selection in Wirth's form (pivot ``a[k]``), narrowed to the side holding
    ``k``: O(n) on average, no allocation, and equal values split evenly, so ties cost
    nothing extra. The returned value does not depend on the pivot; the order it
    leaves ``a[:n]`` in does, and callers that sum the reordered values afterwards
    (:mod:`skymap.local`) round the same way only with this pivot.
    """
    lo = 0
    hi = n - 1
    while lo < hi:
        pivot = a[k]
        i = lo
        j = hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while pivot < a[j]:
                j -= 1
            if i <= j:
                t = a[i]
                a[i] = a[j]
                a[j] = t
                i += 1
                j -= 1
        if j < k:
            lo = i
        if k < i:
            hi = j
    return a[k]


# Order statistics of large sets go through histogram levels (see `order_stats`);
# below this many values, quickselect finishes the job.
HIST_BINS = 256
SMALL_SET = 64


@njit(cache=True, nogil=True)
def finish_small(buf, m, r0, r1):
    """Values of ranks r0 and r1 (r1 - r0 in {0, 1}) of ``buf[:m]``, reordering it."""
    v1 = kth_smallest(buf, m, r1)
    if r0 == r1:
        return v1, v1
    # after the selection everything left of r1 is <= v1: rank r0 = r1 - 1 is their max
    v0 = buf[0]
    for i in range(1, r1):
        if buf[i] > v0:
            v0 = buf[i]
    return v0, v1


@njit(cache=True, nogil=True)
def order_stats(a, n, r0, r1, scratch, lo, hi):
    """Exact values of ranks ``r0`` and ``r1 = r0`` or ``r0 + 1`` (0-based) of ``a[:n]``.

    ``a`` is only read; ``scratch`` is a (2, >= n) float64 work array. ``lo``/``hi``
    bound all the values when known (NaN: find them), saving a pass. Quickselect on
    noise-like data mispredicts about half of its comparisons, so large sets are
    narrowed first by counting values into ``HIST_BINS`` equal bins between the min
    and the max (a pass with no data-dependent branch), keeping only the bins that hold
    the wanted ranks, and repeating on the survivors; quickselect finishes once at most
    ``SMALL_SET`` values remain.
    """
    counts = np.empty(HIST_BINS, dtype=np.int64)
    src = a
    m = n
    level = 0
    while True:
        if m > SMALL_SET:
            if level == 0 and lo <= hi:  # False for NaN bounds
                mn = lo
                mx = hi
            else:
                mn = src[0]
                mx = src[0]
                for i in range(1, m):
                    v = src[i]
                    mn = min(mn, v)
                    mx = max(mx, v)
            if mn == mx:
                return mn, mn
            scale = HIST_BINS / (mx - mn)
            if np.isfinite(scale) and scale > 0.0:
                counts[:] = 0
                for i in range(m):
                    b = min(int((src[i] - mn) * scale), HIST_BINS - 1)
                    counts[b] += 1
                cum = 0
                b0 = -1
                b1 = HIST_BINS - 1
                below = 0
                for b in range(HIST_BINS):
                    c = counts[b]
                    if b0 < 0 and cum + c > r0:
                        b0 = b
                        below = cum
                    if cum + c > r1:
                        b1 = b
                        break
                    cum += c
                if below > 0 or b1 < HIST_BINS - 1:  # progress: fewer candidates
                    dst = scratch[level % 2]
                    kept = 0
                    for i in range(m):
                        v = src[i]
                        b = min(int((v - mn) * scale), HIST_BINS - 1)
                        # branch-free keep: always write, advance only for a wanted bin
                        # (kept <= i, so the write stays inside the survivors' room)
                        dst[kept] = v
                        kept += (b >= b0) & (b <= b1)
                    src = dst
                    m = kept
                    r0 -= below
                    r1 -= below
                    level += 1
                    continue
        # small set, or no progress possible (extreme range): quickselect in scratch
        if level == 0:
            buf = scratch[0]
            buf[:m] = src[:m]
        else:
            buf = src
        return finish_small(buf, m, r0, r1)


def median_rows(a, out):
    """``np.median(a, axis=1)`` (2-D float ``a``) into ``out`` for the rows without a
    NaN, bit for bit (the middle values found exactly by :func:`order_stats`, their
    mean in ``a``'s dtype); returns which rows hold no NaN (the others' ``out`` is
    left as it was). Many rows run in bands of rows (:func:`skymap._util.in_bands`;
    each median is exact, so the bands change no value)."""
    from skymap._util import in_bands

    a = np.ascontiguousarray(a)
    full = np.empty(a.shape[0], np.bool_)
    # Bands of at least ~64k values: below that a band costs more than it saves.
    in_bands(_median_rows, a.shape[0], a, out, full, grain=max(1, (1 << 16) // max(1, a.shape[1])))
    return full


#: Rows at least this long take their middle ranks by :func:`sampled_pair` first.
SAMPLED_ROW = 1 << 14


@njit(cache=True, nogil=True)
def _median_rows(a, out, full, lo, hi):  # pragma: no cover - compiled
    n = a.shape[1]
    buf = np.empty(n, np.float64)
    scratch = np.empty((2, 0), np.float64)  # made when needed (memory: 2 rows' worth)
    mid = np.empty(2, a.dtype)
    k = n // 2
    r0 = k if n % 2 == 1 else k - 1
    for i in range(lo, hi):
        row = a[i]
        state, lower, upper = -1, np.nan, np.nan
        if n >= SAMPLED_ROW:
            state, lower, upper = sampled_pair(row, r0, k, buf)
        if state < 0:
            if scratch.shape[1] < n:
                scratch = np.empty((2, n), np.float64)
            ok = n > 0
            for j in range(n):
                v = row[j]
                if np.isnan(v):
                    ok = False
                    break
                buf[j] = v
            state = 1 if ok else 0
            if ok:
                lower, upper = order_stats(buf, n, r0, k, scratch, np.nan, np.nan)
        full[i] = state == 1
        if state != 1:
            continue
        if r0 == k:
            out[i] = upper
        else:
            mid[0] = lower
            mid[1] = upper
            # the sum in a's dtype, as numpy's mean takes it; halving is exact
            out[i] = (mid[0] + mid[1]) / 2


@njit(cache=True, nogil=True)
def sampled_pair(row, r0, r1, buf):  # pragma: no cover - compiled
    """``(state, v0, v1)``: the values of ranks ``r0`` and ``r1 = r0`` or ``r0 + 1``
    of ``row`` in one pass over it, or ``state`` 0 if it holds a NaN, -1 if the
    sample missed (the caller then takes the ranks another way).

    Floyd & Rivest's selection: bounds on the wanted values from the order
    statistics of a sample (``4 sqrt(s)`` sample ranks either side: a miss about
    once in 10^4), then one branch-free pass counts the values below the lower bound
    and keeps those between the bounds (``buf``, float64, at least the row's length),
    whose ranks :func:`order_stats` finds. The values are float64,
    and exact, as every other way here: they do not depend on the sample.

    References
    ----------
    Floyd, R. W. & Rivest, R. L. 1975, Commun. ACM 18, 165,
    https://doi.org/10.1145/360680.360691.
    """
    n = row.size
    s = min(n, 8192, max(1024, n >> 6))
    sample = np.empty(s, np.float64)
    for i in range(s):
        # spread over the row by a multiplicative hash, not a stride that rows of an
        # image flattened into it could alias
        v = np.float64(row[(i * 2654435761) % n])
        if np.isnan(v):
            return 0, np.nan, np.nan
        sample[i] = v
    margin = 4.0 * np.sqrt(s)
    klo = int(np.floor(r0 * s / n - margin))
    khi = int(np.ceil(r1 * s / n + margin))
    lo = -np.inf if klo < 0 else kth_smallest(sample, s, klo)
    hi = np.inf if khi >= s else kth_smallest(sample, s, khi)
    below = 0
    finite = 0
    m = 0
    for i in range(n):
        v = np.float64(row[i])
        below += v < lo
        finite += v == v
        # branch-free keep (noise-like rows would mispredict a branch half the time)
        buf[m] = v
        m += (v >= lo) & (v <= hi)
    if finite < n:
        return 0, np.nan, np.nan
    if below > r0 or below + m <= r1:
        return -1, np.nan, np.nan
    scratch = np.empty((2, m), np.float64)
    v0, v1 = order_stats(buf, m, r0 - below, r1 - below, scratch, np.nan, np.nan)
    return 1, v0, v1


def exact_median(values) -> float:
    """``float(np.median(values))`` of a 1-D float array bit for bit, by exact
    selection (:func:`order_stats`) when it is float32 or float64, finite and not
    empty: a pass or two over the values instead of numpy's partition."""
    v = np.asarray(values)
    if v.ndim != 1 or v.size == 0 or v.dtype not in (np.float32, np.float64):
        return float(np.median(v))
    out = np.empty(1, v.dtype)
    if not median_rows(v.reshape(1, -1), out)[0] or not np.isfinite(out[0]):
        return float(np.median(v))
    return float(out[0])


def median_mad32(d) -> tuple[np.float32, np.float32]:
    """``(np.median(d), np.median(np.abs(d - np.median(d))))`` of a finite float32 1-D
    array with at least one value, as numpy computes them bit for bit: two
    :func:`exact_median` s, the deviations taken in float32 as numpy takes them."""
    d = np.ascontiguousarray(d, dtype=np.float32)
    med = np.float32(exact_median(d))
    return med, np.float32(exact_median(np.abs(d - med)))
