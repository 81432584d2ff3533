"""Compiled kernels behind :mod:`skymap.local`.

One pass per source, all sources in parallel: select the pixels whose centres fall in
the source's region, sigma-clip them in place and reduce them to a location, without
ever building a (source, pixel) stack. Sums are accumulated in float64 whatever the
image dtype. Callers go through :mod:`skymap.local`; nothing here validates its input.

Region of source ``i``, from row ``i`` of ``geometry`` = ``(x, y, hx, hy, rin2, rout2)``:
pixel centres (px, py) with ``|px - x| <= hx``, ``|py - y| <= hy`` and
``rin2 <= d2 <= rout2`` (``rin2 < d2`` when ``strict_inner``), where
``d2 = (px - x)**2 + (py - y)**2``.

Pixel classes (``cls``, uint8, image-shaped): 0 = good, 1 = usable only in the relaxed
pass (e.g. source-flagged), 2 = never usable; source ``i`` uses the classes up to
``allowed[i]``. Non-finite pixels are never usable.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from skymap.stats._kernels import (
    MAD_TO_STD,
    gather_finite,
    mean_std,
    median_inplace,
    sextractor_mode,
)

# location statistics; the Pearson forms read (median_factor, mean_factor, skew_limit)
STAT_MEAN = 0
STAT_MEDIAN = 1
STAT_PEARSON = 2  # median_factor * median - mean_factor * mean
STAT_SEXTRACTOR = 3  # the same, with SExtractor's switches to the median and the mean


@njit(cache=True, nogil=True)
def _select(image, cls, use_cls, allowed, geometry, strict_inner, buf):
    """Copy the usable pixel values of one region into ``buf``.

    ``geometry`` is the region's row ``x, y, hx, hy, rin2, rout2``.

    Returns ``(n_selected, n_outside)``: how many usable values were copied, and how
    many region pixels fell outside the image.
    """
    x, y, hx, hy, rin2, rout2 = (
        geometry[0],
        geometry[1],
        geometry[2],
        geometry[3],
        geometry[4],
        geometry[5],
    )
    ny, nx = image.shape
    # The box's bounds keep a pixel of margin: y + hy can round up onto the next
    # integer; the exact tests |iy - y| <= hy and |ix - x| <= hx decide.
    # Outside the image only the ring of pixels next to it is visited: it tells whether
    # the region crosses the edge (n_outside > 0) at a cost that does not grow with
    # the region (an annulus of 3e4 px around a 128 px image is no slower than one
    # that fits).
    ix0 = max(math.floor(x - hx), -1)
    ix1 = min(math.ceil(x + hx), nx)
    n = 0
    n_out = 0
    for iy in range(max(math.floor(y - hy), -1), min(math.ceil(y + hy), ny) + 1):
        dy2 = (iy - y) * (iy - y)
        if dy2 > rout2 or abs(iy - y) > hy:
            continue
        # Visit only the columns the circle can reach, skipping the hole's interior;
        # both bounds keep a margin of at least one pixel, and the exact test below
        # decides the pixels near them.
        lo, hi = ix0, ix1
        if rout2 < np.inf:
            w = math.sqrt(rout2 - dy2)
            lo = max(lo, math.floor(x - w))
            hi = min(hi, math.ceil(x + w))
        hole_lo, hole_hi = hi + 1, hi
        if dy2 < rin2:
            wi = math.sqrt(rin2 - dy2) - 1.0
            if wi > 0.0:
                hole_lo = math.ceil(x - wi)
                hole_hi = math.floor(x + wi)
        row_inside = 0 <= iy < ny
        ix = lo
        while ix <= hi:
            if ix == hole_lo and hole_hi >= hole_lo:
                ix = hole_hi + 1
                continue
            d2 = (ix - x) * (ix - x) + dy2
            ix += 1
            if d2 > rout2 or d2 < rin2 or (strict_inner and d2 == rin2):
                continue
            if abs(ix - 1 - x) > hx:
                continue
            if not row_inside or ix - 1 < 0 or ix - 1 >= nx:
                n_out += 1
                continue
            if use_cls and cls[iy, ix - 1] > allowed:
                continue
            v = image[iy, ix - 1]
            if not np.isfinite(v):
                continue
            buf[n] = v
            n += 1
    return n, n_out


@njit(cache=True, nogil=True)
def _clip(buf, n, work, cen_median, std_mad, sigma_lower, sigma_upper, maxiters):
    """Sigma-clip ``buf[:n]`` in place (astropy semantics); return the kept count.

    Each iteration computes the centre and the spread of the values still kept and
    drops those outside ``[cen - sigma_lower * std, cen + sigma_upper * std]``; it stops
    when an iteration drops nothing, when the spread is zero or after ``maxiters``
    iterations (``maxiters < 0``: no limit).
    """
    it = 0
    while n > 0 and (maxiters < 0 or it < maxiters):
        it += 1
        mean, std = mean_std(buf, n)
        cen = median_inplace(buf, n) if cen_median else mean
        if std_mad:
            for k in range(n):
                work[k] = abs(buf[k] - cen)
            std = MAD_TO_STD * median_inplace(work, n)
        if std == 0.0:
            break
        lo = cen - sigma_lower * std
        hi = cen + sigma_upper * std
        m = 0
        for k in range(n):
            v = buf[k]
            if lo <= v <= hi:
                buf[m] = v
                m += 1
        if m == n:
            break
        n = m
    return n


@njit(cache=True, nogil=True)
def _location(buf, n, stat, factors):
    """Return ``(location, std)`` of ``buf[:n]`` (reordering it)."""
    mean, std = mean_std(buf, n)
    if stat == STAT_MEAN:
        return mean, std
    med = median_inplace(buf, n)
    if stat == STAT_MEDIAN:
        return med, std
    if stat == STAT_PEARSON:
        return factors[0] * med - factors[1] * mean, std
    return sextractor_mode(mean, med, std, factors[0], factors[1], factors[2]), std


@njit(cache=True, nogil=True, parallel=True)
def region_stats(
    image,
    cls,
    use_cls,
    allowed,
    geometry,
    strict_inner,
    maxpix,
    stat,
    factors,
    do_clip,
    cen_median,
    std_mad,
    sigma_lower,
    sigma_upper,
    maxiters,
    background,
    std,
    n_selected,
    n_used,
    n_outside,
):
    """Per-source location of the (clipped) usable region pixels, written to the outputs.

    Sources with no usable pixel get NaN location and spread.
    """
    for i in prange(geometry.shape[0]):
        buf = np.empty(maxpix, dtype=np.float64)
        work = np.empty(maxpix, dtype=np.float64)
        n, n_out = _select(image, cls, use_cls, allowed[i], geometry[i], strict_inner, buf)
        n_selected[i] = n
        n_outside[i] = n_out
        if do_clip:
            n = _clip(buf, n, work, cen_median, std_mad, sigma_lower, sigma_upper, maxiters)
        n_used[i] = n
        if n == 0:
            background[i] = np.nan
            std[i] = np.nan
        else:
            background[i], std[i] = _location(buf, n, stat, factors)


@njit(cache=True, nogil=True, parallel=True)
def region_counts(
    image,
    cls,
    use_cls,
    allowed,
    geometry,
    strict_inner,
    maxpix,
    n_selected,
    n_outside,
):
    """Usable and outside-image pixel counts of each region."""
    for i in prange(geometry.shape[0]):
        buf = np.empty(maxpix, dtype=np.float64)
        n_selected[i], n_outside[i] = _select(
            image, cls, use_cls, allowed[i], geometry[i], strict_inner, buf
        )


@njit(cache=True, nogil=True, parallel=True)
def region_stack(image, cls, use_cls, allowed, geometry, strict_inner, stack):
    """Fill row ``i`` of ``stack`` (pre-filled with NaN) with source ``i``'s usable values."""
    for i in prange(geometry.shape[0]):
        _select(image, cls, use_cls, allowed[i], geometry[i], strict_inner, stack[i])


@njit(cache=True, nogil=True, parallel=True)
def rows_location(stack, stat, factors, background, std, n_used):
    """Location, spread and count of the finite values of each row of ``stack``."""
    for i in prange(stack.shape[0]):
        buf = np.empty(stack.shape[1], dtype=np.float64)
        n = gather_finite(stack[i], buf)
        n_used[i] = n
        if n == 0:
            background[i] = np.nan
            std[i] = np.nan
        else:
            background[i], std[i] = _location(buf, n, stat, factors)


@njit(cache=True, nogil=True, parallel=True)
def weighted_sums(image, bad, use_bad, weights, offsets, widths, ixmin, iymin, sums, areas):
    """Sum ``weight * value`` and ``weight`` over each source's usable pixels.

    Source ``i`` has a ``(len / widths[i], widths[i])`` weight cutout stored flat in
    ``weights[offsets[i]:offsets[i + 1]]`` whose lower-left pixel is
    ``(iymin[i], ixmin[i])``. Pixels outside the image, masked or non-finite add
    nothing to either sum.
    """
    ny, nx = image.shape
    for i in prange(ixmin.size):
        s = 0.0
        a = 0.0
        w = widths[i]
        for k in range(offsets[i], offsets[i + 1]):
            wt = weights[k]
            if wt == 0.0:
                continue
            j = k - offsets[i]
            iy = iymin[i] + j // w
            ix = ixmin[i] + j % w
            if iy < 0 or iy >= ny or ix < 0 or ix >= nx:
                continue
            if use_bad and bad[iy, ix]:
                continue
            v = image[iy, ix]
            if not np.isfinite(v):
                continue
            s += wt * v
            a += wt
        sums[i] = s
        areas[i] = a
