"""Compiled row kernels behind :mod:`skymap.stats`.

Every kernel takes a C-contiguous 2-D array with one row per sample set (a mesh, an
aperture), treats non-finite values as missing, and works on the rows in parallel. Sums
are accumulated in float64 whatever the input dtype, so float32 input loses nothing.
Callers go through :mod:`skymap.stats`; nothing here validates its arguments.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# 1 / Phi^-1(3/4): MAD -> standard deviation of a Gaussian (the constant astropy uses).
MAD_TO_STD = 1.482602218505602


@njit(cache=True, nogil=True)
def _gather_sorted(row, buf):
    """Copy the finite values of ``row`` into ``buf``, sort them, return how many."""
    n = 0
    for v in row:
        if np.isfinite(v):
            buf[n] = v
            n += 1
    buf[:n].sort()
    return n


@njit(cache=True, nogil=True)
def _sorted_median(s, a, b):
    """Median of the sorted slice ``s[a:b]`` (b > a)."""
    m = b - a
    h = a + m // 2
    if m % 2 == 1:
        return s[h]
    return 0.5 * (s[h] + s[h - 1])


@njit(cache=True, nogil=True)
def _search_left(s, a, b, x):
    """First index i in [a, b] with s[i] >= x (s sorted)."""
    lo, hi = a, b
    while lo < hi:
        mid = (lo + hi) // 2
        if s[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def _sorted_mad(s, a, b, med):
    """Median absolute deviation from ``med`` of the sorted slice ``s[a:b]``.

    In a sorted slice the deviations fall on two sorted runs that meet at ``med``
    (decreasing to its left, increasing to its right); merging them outwards yields the
    deviations in increasing order, so the k-th one needs no second sort.
    """
    m = b - a
    right = _search_left(s, a, b, med)
    left = right - 1
    k_hi = m // 2
    k_lo = k_hi - 1 if m % 2 == 0 else k_hi
    prev = 0.0
    d = 0.0
    for k in range(k_hi + 1):
        if left >= a and (right >= b or med - s[left] <= s[right] - med):
            d = med - s[left]
            left -= 1
        else:
            d = s[right] - med
            right += 1
        if k == k_lo:
            prev = d
    return 0.5 * (prev + d)


@njit(cache=True, nogil=True)
def _mean_std(s, a, b):
    """Two-pass mean and population standard deviation of ``s[a:b]``."""
    m = b - a
    tot = 0.0
    for i in range(a, b):
        tot += s[i]
    mean = tot / m
    ss = 0.0
    for i in range(a, b):
        d = s[i] - mean
        ss += d * d
    return mean, np.sqrt(ss / m)


@njit(cache=True, nogil=True)
def _search_right(s, a, b, x):
    """First index i in [a, b] with s[i] > x (s sorted)."""
    lo, hi = a, b
    while lo < hi:
        mid = (lo + hi) // 2
        if s[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def _clip_row(row, buf, use_median, use_mad, maxiters, sigma_lower, sigma_upper, out):
    """Clip one row (see `sigma_clip_rows`); return its final (lower, upper) bounds."""
    n = _gather_sorted(row, buf)
    if n == 0:
        out[:] = np.nan
        return np.nan, np.nan
    a = 0
    b = n
    it = 0
    blo = np.nan
    bhi = np.nan
    while True:
        med = 0.0
        mean = 0.0
        std = 0.0
        if use_median or use_mad:
            med = _sorted_median(buf, a, b)
        if not (use_median and use_mad):
            mean, std = _mean_std(buf, a, b)
        cen = med if use_median else mean
        if use_mad:
            std = _sorted_mad(buf, a, b, med) * MAD_TO_STD
        blo = cen - sigma_lower * std
        bhi = cen + sigma_upper * std
        na = _search_left(buf, a, b, blo)
        nb = _search_right(buf, a, b, bhi)
        if nb - na == b - a or nb <= na:
            break
        a = na
        b = nb
        it += 1
        if maxiters >= 0 and it >= maxiters:
            break
    for j in range(row.size):
        v = row[j]
        # NaN compares False, so missing values come out NaN too
        if v >= blo and v <= bhi:
            out[j] = v
        else:
            out[j] = np.nan
    return blo, bhi


@njit(cache=True, nogil=True, parallel=True)
def _sigma_clip_rows_parallel(data, use_median, use_mad, maxiters, sl, su, out, lo, hi):
    for r in prange(data.shape[0]):
        buf = np.empty(data.shape[1], dtype=np.float64)
        lo[r], hi[r] = _clip_row(data[r], buf, use_median, use_mad, maxiters, sl, su, out[r])


@njit(cache=True, nogil=True)
def _sigma_clip_rows_serial(data, use_median, use_mad, maxiters, sl, su, out, lo, hi):
    buf = np.empty(data.shape[1], dtype=np.float64)
    for r in range(data.shape[0]):
        lo[r], hi[r] = _clip_row(data[r], buf, use_median, use_mad, maxiters, sl, su, out[r])


def sigma_clip_rows(data, use_median, use_mad, maxiters, sigma_lower, sigma_upper, out, lo, hi):
    """Iterated sigma clipping of each row of ``data``.

    Follows astropy's compiled path exactly: each iteration computes the centre and
    width of the surviving values, keeps those inside ``[cen - sl*std, cen + su*std]``,
    and stops when nothing changes, nothing survives, or after ``maxiters`` iterations
    (``maxiters < 0``: no limit). The final bounds are then applied to every finite value
    of the row, which is what astropy returns. Each row is sorted once; the survivors
    are always a contiguous run of the sorted row, so an iteration costs two binary
    searches plus one pass for the mean/std.

    ``out`` receives the row with clipped and missing values set to NaN; ``lo``/``hi``
    receive the final bounds (NaN for a row with no finite value).
    """
    kernel = _sigma_clip_rows_parallel if _worth_threads(data) else _sigma_clip_rows_serial
    kernel(data, use_median, use_mad, maxiters, sigma_lower, sigma_upper, out, lo, hi)


def _worth_threads(data) -> bool:
    # Starting the thread pool costs ~0.1-10 ms (more on a busy machine): small stacks
    # run faster serially.
    return data.shape[0] >= 2 and data.size >= PARALLEL_MIN_SIZE


PARALLEL_MIN_SIZE = 1 << 16


@njit(cache=True, nogil=True)
def _stats_row(row, buf, sort, want_mad):
    """(count, mean, std, median, mad) of the finite values of one row."""
    if sort:
        n = _gather_sorted(row, buf)
        if n == 0:
            return 0, np.nan, np.nan, np.nan, np.nan
        mu, sd = _mean_std(buf, 0, n)
        med = _sorted_median(buf, 0, n)
        mad = _sorted_mad(buf, 0, n, med) if want_mad else np.nan
        return n, mu, sd, med, mad
    n = 0
    tot = 0.0
    for v in row:
        if np.isfinite(v):
            n += 1
            tot += v
    if n == 0:
        return 0, np.nan, np.nan, np.nan, np.nan
    mu = tot / n
    ss = 0.0
    for v in row:
        if np.isfinite(v):
            d = v - mu
            ss += d * d
    return n, mu, np.sqrt(ss / n), np.nan, np.nan


@njit(cache=True, nogil=True, parallel=True)
def _row_stats_parallel(data, sort, want_mad, count, mean, std, median, mad):
    for r in prange(data.shape[0]):
        buf = np.empty(data.shape[1] if sort else 0, dtype=np.float64)
        count[r], mean[r], std[r], median[r], mad[r] = _stats_row(data[r], buf, sort, want_mad)


@njit(cache=True, nogil=True)
def _row_stats_serial(data, sort, want_mad, count, mean, std, median, mad):
    buf = np.empty(data.shape[1] if sort else 0, dtype=np.float64)
    for r in range(data.shape[0]):
        count[r], mean[r], std[r], median[r], mad[r] = _stats_row(data[r], buf, sort, want_mad)


def row_stats(data, want_median, want_mad, count, mean, std, median, mad):
    """Count, mean, population std, and optionally median and MAD of each row.

    Missing values are skipped. A row with no finite value gets count 0 and NaN
    elsewhere. The MAD is about the row's median; median and MAD are NaN unless asked
    for (computing them sorts the row).
    """
    kernel = _row_stats_parallel if _worth_threads(data) else _row_stats_serial
    kernel(data, want_median or want_mad, want_mad, count, mean, std, median, mad)
