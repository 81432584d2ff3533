"""Compiled row kernels behind :mod:`skymap.stats`.

Every kernel takes a C-contiguous 2-D array with one row per sample set (a mesh, an
aperture), treats non-finite values as missing, and works on the rows in parallel. Sums
are accumulated in float64 whatever the input dtype, so float32 input loses nothing.
Callers go through :mod:`skymap.stats`; nothing here validates its arguments.

The scalar helpers `gather_finite`, `kth_smallest`, `median_inplace`, `mean_std` and
`sextractor_mode` are shared with the kernels of :mod:`skymap.local` and
:mod:`skymap.mesh`, which import them. numba's on-disk cache of those callers is keyed
on their own source file only, so after editing a shared helper here, clear the
``__pycache__`` of ``skymap`` (or touch the callers) before testing or measuring.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from skymap._select_kernels import HIST_BINS, SMALL_SET, exact_median, kth_smallest, median_rows
from skymap._select_kernels import finish_small as _finish_small
from skymap._select_kernels import order_stats as _order_stats
from skymap._util import MAD_TO_STD

__all__ = ["HIST_BINS", "SMALL_SET", "exact_median", "kth_smallest", "median_rows"]


@njit(cache=True, nogil=True)
def gather_finite(row, buf):
    """Copy the finite values of ``row`` into ``buf``; return how many."""
    n = 0
    for v in row:
        # branch-free: a few NaN among many values would otherwise cost mispredictions
        buf[n] = v
        n += np.isfinite(v)
    return n


@njit(cache=True, nogil=True)
def median_inplace(a, n):
    """Median of ``a[:n]`` (n > 0; mean of the two middle values when n is even),
    reordering ``a[:n]`` (see `kth_smallest`); unlike `_median` it needs no scratch."""
    k = n // 2
    if n % 2 == 1:
        return kth_smallest(a, n, k)
    lower, upper = _finish_small(a, n, k - 1, k)
    return 0.5 * (upper + lower)


@njit(cache=True, nogil=True)
def _median(a, n, scratch, lo, hi):
    """Median of ``a[:n]`` (n > 0; mean of the two middle values when n is even);
    ``lo``/``hi`` bound the values, or are NaN."""
    k = n // 2
    if n % 2 == 1:
        return _order_stats(a, n, k, k, scratch, lo, hi)[1]
    lower, upper = _order_stats(a, n, k - 1, k, scratch, lo, hi)
    return 0.5 * (upper + lower)


@njit(cache=True, nogil=True)
def _mad(a, n, med, work, lo, hi):
    """Median absolute deviation of ``a[:n]`` about ``med``; ``work`` is (3, >= n);
    ``lo``/``hi`` bound the values of ``a``, or are NaN."""
    dev = work[0]
    for i in range(n):
        dev[i] = abs(a[i] - med)
    # rounding is monotone, so the deviations cannot exceed those of the bounds
    return _median(dev, n, work[1:], 0.0, max(med - lo, hi - med))


@njit(cache=True, nogil=True)
def mean_std(a, n):
    """Two-pass mean and population standard deviation of ``a[:n]``."""
    tot = 0.0
    for i in range(n):
        tot += a[i]
    mean = tot / n
    return mean, _std_about(a, n, mean)


@njit(cache=True, nogil=True)
def _std_about(a, n, mean):
    """Population standard deviation of ``a[:n]`` about its (given) mean."""
    ss = 0.0
    for i in range(n):
        d = a[i] - mean
        ss += d * d
    return np.sqrt(ss / n)


@njit(cache=True, nogil=True)
def sextractor_mode(mean, med, std, median_factor, mean_factor, skew_limit):
    """SExtractor's mode of a set from its mean, median and std: ``median_factor * med -
    mean_factor * mean``, except the mean for a constant set (``std == 0``) and the
    median for one too skewed for that relation (``|mean - med| / std >= skew_limit``),
    photutils' ``SExtractorBackground`` switches."""
    if std == 0.0:
        return mean
    if abs(mean - med) / std >= skew_limit:
        return med
    return median_factor * med - mean_factor * mean


@njit(cache=True, nogil=True)
def _clip_row(row, buf, work, use_median, use_mad, maxiters, sigma_lower, sigma_upper, out):
    """Clip one row (see `sigma_clip_rows`); return its final (lower, upper) bounds."""
    n = gather_finite(row, buf)
    if n == 0:
        out[:] = np.nan
        return np.nan, np.nan
    it = 0
    blo = np.nan
    bhi = np.nan
    # after the first iteration the survivors lie in the previous bounds, and their
    # sum comes from the compaction pass (same values, same order: same rounding)
    rlo = np.nan
    rhi = np.nan
    tot = np.nan
    while True:
        med = 0.0
        mean = 0.0
        std = 0.0
        if use_median or use_mad:
            med = _median(buf, n, work[1:], rlo, rhi)
        if not (use_median and use_mad):
            if it == 0:
                mean, std = mean_std(buf, n)
            else:
                mean = tot / n
                std = _std_about(buf, n, mean)
        cen = med if use_median else mean
        if use_mad:
            std = _mad(buf, n, med, work, rlo, rhi) * MAD_TO_STD
        blo = cen - sigma_lower * std
        bhi = cen + sigma_upper * std
        kept = 0
        tot = 0.0
        for i in range(n):
            v = buf[i]
            keep = (v >= blo) & (v <= bhi)
            buf[kept] = v
            tot += v if keep else 0.0
            kept += keep
        if kept == n or kept == 0:
            break
        n = kept
        rlo = blo
        rhi = bhi
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
        work = np.empty((3, data.shape[1]), dtype=np.float64)
        lo[r], hi[r] = _clip_row(data[r], buf, work, use_median, use_mad, maxiters, sl, su, out[r])


@njit(cache=True, nogil=True)
def _sigma_clip_rows_serial(data, use_median, use_mad, maxiters, sl, su, out, lo, hi):
    buf = np.empty(data.shape[1], dtype=np.float64)
    work = np.empty((3, data.shape[1]), dtype=np.float64)
    for r in range(data.shape[0]):
        lo[r], hi[r] = _clip_row(data[r], buf, work, use_median, use_mad, maxiters, sl, su, out[r])


def sigma_clip_rows(data, use_median, use_mad, maxiters, sigma_lower, sigma_upper, out, lo, hi):
    """Iterated sigma clipping of each row of ``data``.

    Follows astropy's compiled path exactly: each iteration computes the centre and
    width of the surviving values, keeps those inside ``[cen - sl*std, cen + su*std]``,
    and stops when nothing changes, nothing survives, or after ``maxiters`` iterations
    (``maxiters < 0``: no limit). The final bounds are then applied to every finite value
    of the row, which is what astropy returns. Medians come from `_order_stats`, O(n)
    per iteration; sorting each row once instead measured twice as slow on
    4096-sample meshes.

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
def _stats_row(row, buf, work, want_median, want_mad):
    """(count, mean, std, median, mad) of the finite values of one row."""
    n = gather_finite(row, buf)
    if n == 0:
        return 0, np.nan, np.nan, np.nan, np.nan
    mu, sd = mean_std(buf, n)
    med = np.nan
    mad = np.nan
    if want_median or want_mad:
        med = _median(buf, n, work[1:], np.nan, np.nan)
    if want_mad:
        mad = _mad(buf, n, med, work, np.nan, np.nan)
    return n, mu, sd, med, mad


@njit(cache=True, nogil=True, parallel=True)
def _row_stats_parallel(data, want_median, want_mad, count, mean, std, median, mad):
    for r in prange(data.shape[0]):
        buf = np.empty(data.shape[1], dtype=np.float64)
        work = np.empty((3, data.shape[1]), dtype=np.float64)
        count[r], mean[r], std[r], median[r], mad[r] = _stats_row(
            data[r], buf, work, want_median, want_mad
        )


@njit(cache=True, nogil=True)
def _row_stats_serial(data, want_median, want_mad, count, mean, std, median, mad):
    buf = np.empty(data.shape[1], dtype=np.float64)
    work = np.empty((3, data.shape[1]), dtype=np.float64)
    for r in range(data.shape[0]):
        count[r], mean[r], std[r], median[r], mad[r] = _stats_row(
            data[r], buf, work, want_median, want_mad
        )


def row_stats(data, want_median, want_mad, count, mean, std, median, mad):
    """Count, mean, population std, and optionally median and MAD of each row.

    Missing values are skipped. A row with no finite value gets count 0 and NaN
    elsewhere. The MAD is about the row's median; median and MAD are left untouched
    unless asked for.
    """
    kernel = _row_stats_parallel if _worth_threads(data) else _row_stats_serial
    kernel(data, want_median, want_mad, count, mean, std, median, mad)


@njit(cache=True, nogil=True)
def _biweight_row(row, buf, work, c, scale, modify_sample_size):
    """Biweight location (``scale=False``) or scale of the finite values of one row,
    about the row's median, as astropy defines them."""
    n = gather_finite(row, buf)
    if n == 0:
        return np.nan
    med = _median(buf, n, work[1:], np.nan, np.nan)
    mad = _mad(buf, n, med, work, np.nan, np.nan)
    if mad == 0.0:
        return 0.0 if scale else med
    cm = c * mad
    num = 0.0
    den = 0.0
    inside = 0
    for i in range(n):
        d = buf[i] - med
        u = d / cm
        u2 = u * u
        if u2 < 1.0:
            one = 1.0 - u2
            inside += 1
            if scale:
                num += d * d * one**4
                den += one * (1.0 - 5.0 * u2)
            else:
                w = one * one
                num += d * w
                den += w
    if not scale:
        return med + num / den
    count = inside if modify_sample_size else n
    return np.sqrt(count * num / (den * den))


@njit(cache=True, nogil=True, parallel=True)
def _biweight_rows_parallel(data, c, scale, modify_sample_size, out):
    for r in prange(data.shape[0]):
        buf = np.empty(data.shape[1], dtype=np.float64)
        work = np.empty((3, data.shape[1]), dtype=np.float64)
        out[r] = _biweight_row(data[r], buf, work, c, scale, modify_sample_size)


@njit(cache=True, nogil=True)
def _biweight_rows_serial(data, c, scale, modify_sample_size, out):
    buf = np.empty(data.shape[1], dtype=np.float64)
    work = np.empty((3, data.shape[1]), dtype=np.float64)
    for r in range(data.shape[0]):
        out[r] = _biweight_row(data[r], buf, work, c, scale, modify_sample_size)


def biweight_rows(data, c, scale, modify_sample_size, out):
    """Biweight location (``scale=False``) or biweight scale of each row.

    ``M`` is the row's median and ``u = (x - M) / (c * MAD)``; samples with
    ``|u| >= 1`` get zero weight. A row whose MAD is 0 gives its median (location) or 0
    (scale); an empty row gives NaN. The scale's sample size is the number of valid
    samples, or of those with ``|u| < 1`` when ``modify_sample_size``.
    """
    kernel = _biweight_rows_parallel if _worth_threads(data) else _biweight_rows_serial
    kernel(data, float(c), scale, modify_sample_size, out)
