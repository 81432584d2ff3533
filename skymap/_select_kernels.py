"""Exact selection kernels: order statistics and medians equal to numpy's bit for bit,
without numpy's partition. Not public: :mod:`skymap._util`, :mod:`skymap.stats` and the
maskers' kernels call them. Nothing here imports from skymap, so every layer may.

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
    left as it was)."""
    full = np.empty(a.shape[0], np.bool_)
    _median_rows(np.ascontiguousarray(a), out, full)
    return full


@njit(cache=True, nogil=True)
def _median_rows(a, out, full):  # pragma: no cover - compiled
    n = a.shape[1]
    buf = np.empty(n, np.float64)
    scratch = np.empty((2, n), np.float64)
    mid = np.empty(2, a.dtype)
    k = n // 2
    for i in range(a.shape[0]):
        row = a[i]
        ok = n > 0
        for j in range(n):
            v = row[j]
            if np.isnan(v):
                ok = False
                break
            buf[j] = v
        full[i] = ok
        if not ok:
            continue
        if n % 2 == 1:
            out[i] = order_stats(buf, n, k, k, scratch, np.nan, np.nan)[1]
        else:
            lower, upper = order_stats(buf, n, k - 1, k, scratch, np.nan, np.nan)
            mid[0] = lower
            mid[1] = upper
            # the sum in a's dtype, as numpy's mean takes it; halving is exact
            out[i] = (mid[0] + mid[1]) / 2


def exact_median(values) -> float:
    """``float(np.median(values))`` of a 1-D float array bit for bit, by exact
    selection (:func:`order_stats`) when it is float32 or float64, finite and not
    empty: a pass or two over the values instead of numpy's partition."""
    v = np.asarray(values)
    if v.ndim != 1 or v.size == 0 or v.dtype not in (np.float32, np.float64):
        return float(np.median(v))
    if not np.isfinite(v).all():
        return float(np.median(v))
    out = np.empty(1, v.dtype)
    median_rows(v.reshape(1, -1), out)
    return float(out[0])


def median_mad32(d) -> tuple[np.float32, np.float32]:
    """``(np.median(d), np.median(np.abs(d - np.median(d))))`` of a finite float32 1-D
    array with at least one value, as numpy computes them bit for bit: two
    :func:`exact_median` s, the deviations taken in float32 as numpy takes them."""
    d = np.ascontiguousarray(d, dtype=np.float32)
    med = np.float32(exact_median(d))
    return med, np.float32(exact_median(np.abs(d - med)))
