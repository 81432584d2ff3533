"""Compiled kernels behind :mod:`skymap.mesh` and :class:`skymap.interpolate.SExtractorSpline`.

The mesh kernels read the image in place, one mesh at a time (no copy of the image into
a (mesh, pixel) stack), in parallel over rows of meshes. Sums run in float64. Callers go
through :mod:`skymap.mesh`; nothing here validates its arguments.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numba
import numpy as np
from numba import njit, prange

from skymap.stats._kernels import MAD_TO_STD, sextractor_mode

# location codes of mesh_clip_stats
LOC_MEAN, LOC_MEDIAN, LOC_SEXTRACTOR, LOC_PEARSON = 0, 1, 2, 3
# scale codes
SCALE_STD, SCALE_MADSTD = 0, 1


# Below this many pixels a parallel launch costs more than it saves (thread wake-up,
# and far worse on a loaded machine), so the kernels run on the calling thread.
SERIAL_BELOW = 1 << 16


@contextmanager
def threads_for(npix):
    """Run the compiled kernels inside on one thread when the job is small."""
    before = numba.get_num_threads()
    if npix < SERIAL_BELOW:
        numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


# ----------------------------------------------------------------------------- helpers


_SIGN = np.uint64(1) << np.uint64(63)


@njit(cache=True, nogil=True, error_model="numpy")
def _radix_sort(vals, n, tmp, counts):
    """Sort the finite float64 values ``vals[:n]`` in place (``tmp``: scratch of n).

    LSD radix sort on the order-preserving unsigned image of the IEEE bits, one byte
    per pass. Passes on a byte that is the same in every key are skipped: values read
    from a float32 image have three zero low bytes, and values of similar magnitude
    share the top one, so a float32 mesh usually needs four passes, O(n) each.
    """
    keys = vals[:n].view(np.uint64)
    aux = tmp[:n].view(np.uint64)
    for t in range(n):
        k = keys[t]
        keys[t] = ~k if k & _SIGN else k | _SIGN
    counts[:, :] = 0
    for t in range(n):
        k = keys[t]
        for b in range(8):
            counts[b, (k >> np.uint64(8 * b)) & np.uint64(255)] += 1
    src, dst = keys, aux
    for b in range(8):
        c = counts[b]
        if c.max() == n:  # one digit value: nothing to reorder
            continue
        total = 0
        for d in range(256):
            m = c[d]
            c[d] = total
            total += m
        shift = np.uint64(8 * b)
        for t in range(n):
            k = src[t]
            d = (k >> shift) & np.uint64(255)
            dst[c[d]] = k
            c[d] += 1
        src, dst = dst, src
    for t in range(n):
        k = src[t]
        keys[t] = k & ~_SIGN if k & _SIGN else ~k


@njit(cache=True, nogil=True, error_model="numpy")
def _sorted_median(s, a, b):
    """Median of the sorted slice ``s[a:b]`` (b > a); mean of the middle two if even."""
    h = a + (b - a) // 2
    if (b - a) % 2 == 1:
        return s[h]
    return 0.5 * (s[h - 1] + s[h])


@njit(cache=True, nogil=True, error_model="numpy")
def _sorted_mad(s, a, b, med):
    """Median absolute deviation from ``med`` of the sorted slice ``s[a:b]``.

    The deviations form two sorted runs meeting at ``med``; merging them outwards
    yields them in increasing order, so the middle one(s) need no second sort.
    """
    m = b - a
    left = _first_at_least(s, a, b, med) - 1
    right = left + 1
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


@njit(cache=True, nogil=True, error_model="numpy")
def _first_at_least(s, a, b, x):
    """First index in sorted ``s[a:b]`` whose value is >= x (b if none)."""
    while a < b:
        mid = (a + b) // 2
        if s[mid] < x:
            a = mid + 1
        else:
            b = mid
    return a


@njit(cache=True, nogil=True, error_model="numpy")
def _first_above(s, a, b, x):
    """First index in sorted ``s[a:b]`` whose value is > x (b if none)."""
    while a < b:
        mid = (a + b) // 2
        if s[mid] <= x:
            a = mid + 1
        else:
            b = mid
    return a


@njit(cache=True, nogil=True, error_model="numpy")
def _prefix_sums(vals, p1, p2, a, b):
    """Prefix sums of the offsets of ``vals[a:b]`` from their middle value, based at
    ``a`` (``p1[a] = p2[a] = 0``); returns that reference value."""
    ref = vals[(a + b) // 2]
    p1[a] = 0.0
    p2[a] = 0.0
    for t in range(a, b):
        d = vals[t] - ref
        p1[t + 1] = p1[t] + d
        p2[t + 1] = p2[t] + d * d
    return ref


@njit(cache=True, nogil=True, error_model="numpy")
def _range_mean_std(p1, p2, ref, a, b):
    """Mean and population std of sorted values ``a:b`` from prefix sums of their
    offsets from ``ref`` (the offsets keep the one-pass variance well conditioned)."""
    cnt = b - a
    m = (p1[b] - p1[a]) / cnt
    var = (p2[b] - p2[a]) / cnt - m * m
    return ref + m, math.sqrt(var) if var > 0.0 else 0.0


@njit(cache=True, nogil=True, error_model="numpy")
def _gather(image, mask, use_mask, y0, y1, x0, x1, buf):
    """Copy the finite, unmasked pixels of a box into ``buf``; return how many."""
    n = 0
    for y in range(y0, y1):
        for x in range(x0, x1):
            v = image[y, x]
            if math.isfinite(v) and not (use_mask and mask[y, x]):
                buf[n] = v
                n += 1
    return n


# ------------------------------------------- numpy's float32 arithmetic (photutils)


@njit(cache=True, nogil=True, error_model="numpy")
def _block_sum32(a, lo, n):
    """numpy's float32 sum of at most 128 values: 8 interleaved accumulators."""
    if n < 8:
        res = np.float32(0.0)
        for i in range(n):
            res += a[lo + i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(cache=True, nogil=True, error_model="numpy")
def _pairwise32(a, n):
    """numpy's float32 sum of ``a[:n]``, what ``np.sum`` of a float32 row gives: blocks
    of up to 128 values (:func:`_block_sum32`), above that the sum of two halves (the
    first a multiple of 8 long). Walked with an explicit stack: numba cannot reload a
    recursive function from its cache."""
    los = np.empty(64, dtype=np.int64)
    ns = np.empty(64, dtype=np.int64)
    stage = np.zeros(64, dtype=np.int64)
    sums = np.empty(64, dtype=a.dtype)
    top = 0
    los[0] = 0
    ns[0] = n
    nsum = 0
    while top >= 0:
        lo, m = los[top], ns[top]
        if m <= 128:
            sums[nsum] = _block_sum32(a, lo, m)
            nsum += 1
            top -= 1
            continue
        half = m // 2
        half -= half % 8
        if stage[top] == 0:  # first the left half
            stage[top] = 1
            top += 1
            los[top], ns[top], stage[top] = lo, half, 0
        elif stage[top] == 1:  # then the right half
            stage[top] = 2
            top += 1
            los[top], ns[top], stage[top] = lo + half, m - half, 0
        else:  # both done: left + right
            nsum -= 1
            sums[nsum - 1] = sums[nsum - 1] + sums[nsum]
            top -= 1
    return sums[0]


@njit(cache=True, nogil=True, error_model="numpy")
def _box_positions(image, mask, use_mask, y0, y1, x0, x1, col_major, lo, hi, pos, keep):
    """The box in photutils' memory order (row-major; column-major for the partial edge
    meshes it reshapes), kept values in ``pos`` and 0 elsewhere, as numpy's nan-functions
    see a clipped row. Returns the number of positions."""
    h, w = y1 - y0, x1 - x0
    for k in range(h * w):
        if col_major:
            y, x = y0 + k % h, x0 + k // h
        else:
            y, x = y0 + k // w, x0 + k % w
        v = image[y, x]
        ok = math.isfinite(v) and not (use_mask and mask[y, x]) and v >= lo and v <= hi
        keep[k] = ok
        pos[k] = v if ok else 0.0
    return h * w


@njit(cache=True, nogil=True, error_model="numpy")
def _numpy32_estimates(pos, keep, npos, vals, a, b, loc_code, mf, meanf, skew, scale_code):
    """photutils' estimators on a float32 box, in numpy's float32 arithmetic.

    ``pos``/``keep``: the box from :func:`_box_positions`; ``vals[a:b]``: the kept
    values, sorted (float64 copies of float32 values). Mirrors ``np.nanmean`` (float32
    pairwise sum, divided in float64), ``np.nanstd`` (float32 deviations and squares),
    ``np.nanmedian`` (float32 mean of the middle two), ``astropy.stats.mad_std`` and the
    float32 expressions of photutils' location estimators.
    """
    cnt = b - a
    mean = np.float32(np.float64(_pairwise32(pos, npos)) / cnt)
    for k in range(npos):
        if keep[k]:
            d = pos[k] - mean
            pos[k] = d * d
    var = np.float32(np.float64(_pairwise32(pos, npos)) / cnt)
    std = np.float32(math.sqrt(np.float64(var)))
    h = a + cnt // 2
    if cnt % 2 == 1:
        med = np.float32(vals[h])
    else:
        med = (np.float32(vals[h - 1]) + np.float32(vals[h])) / np.float32(2.0)
    if loc_code == LOC_MEAN:
        loc = mean
    elif loc_code == LOC_MEDIAN:
        loc = med
    elif loc_code == LOC_PEARSON:
        loc = np.float32(mf) * med - np.float32(meanf) * mean
    elif std == 0:
        loc = mean
    elif abs(mean - med) / std >= np.float32(skew):
        loc = med
    else:
        loc = np.float32(mf) * med - np.float32(meanf) * mean
    if scale_code == SCALE_STD:
        return loc, std
    # median of |x - med| in float32: the deviations fall on two sorted runs that meet
    # at med, merged outwards
    left = _first_at_least(vals, a, b, np.float64(med)) - 1
    right = left + 1
    k_hi = cnt // 2
    k_lo = k_hi - 1 if cnt % 2 == 0 else k_hi
    prev = np.float32(0.0)
    dev = np.float32(0.0)
    for k in range(k_hi + 1):
        dl = abs(np.float32(vals[left]) - med) if left >= a else np.float32(np.inf)
        dr = abs(np.float32(vals[right]) - med) if right < b else np.float32(np.inf)
        if dl <= dr:
            dev = dl
            left -= 1
        else:
            dev = dr
            right += 1
        if k == k_lo:
            prev = dev
    mad = dev if cnt % 2 == 1 else (prev + dev) / np.float32(2.0)
    return loc, mad * np.float32(MAD_TO_STD)


# ------------------------------------------------------------- clip + estimator kernel


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def mesh_clip_stats(
    image,
    mask,
    use_mask,
    by,
    bx,
    clip,
    cen_median,
    std_mad,
    maxiters,
    sig_lo,
    sig_hi,
    loc_code,
    median_factor,
    mean_factor,
    skew_limit,
    scale_code,
    numpy32,
    loc_out,
    scale_out,
    nvalid_out,
    ngood_out,
):
    """Per mesh: gather valid pixels, sigma clip (astropy semantics), then estimate.

    The mesh is sorted once (:func:`_radix_sort`); every clipping iteration and the
    final estimates then read a contiguous range of the sorted values: medians directly,
    means and standard deviations from prefix sums, bounds by binary search.

    Clipping follows ``astropy.stats.sigma_clip``: each iteration takes the centre
    (median or mean) and width (population std or MAD std) of the surviving values and
    keeps those within ``[centre - sig_lo * width, centre + sig_hi * width]``; it stops
    when nothing changes, nothing survives, or after ``maxiters`` iterations (-1: no
    limit), and the last bounds then select among *all* the valid values.

    Locations: mean, median, SExtractor mode (``median_factor * median - mean_factor *
    mean``; the mean where std == 0, the median where ``|mean - median| / std >=
    skew_limit``), Pearson mode (no switches). Scales: population std, MAD std.
    ``nvalid_out`` counts valid pixels before clipping, ``ngood_out`` after; a mesh with
    none left gets NaN. ``numpy32`` (float32 images only) computes the estimates in
    numpy's float32 arithmetic, as photutils does (:func:`_numpy32_estimates`).
    """
    ny, nx = image.shape
    my, mx = loc_out.shape
    nbox = by * bx
    for j in prange(my):
        pos = np.empty(nbox, dtype=image.dtype)
        keep = np.empty(nbox, dtype=np.bool_)
        vals = np.empty(nbox)
        tmp = np.empty(nbox)
        p1 = np.empty(nbox + 1)
        p2 = np.empty(nbox + 1)
        counts = np.empty((8, 256), dtype=np.int64)
        y0 = j * by
        y1 = min(ny, y0 + by)
        for i in range(mx):
            x0 = i * bx
            x1 = min(nx, x0 + bx)
            n = _gather(image, mask, use_mask, y0, y1, x0, x1, vals)
            nvalid_out[j, i] = n
            if n == 0:
                ngood_out[j, i] = 0
                loc_out[j, i] = np.nan
                scale_out[j, i] = np.nan
                continue
            _radix_sort(vals, n, tmp, counts)
            ref = _prefix_sums(vals, p1, p2, 0, n)
            a, b = 0, n
            # [wa, wb): where the prefix sums are based (differences inside it are valid)
            wa, wb = 0, n
            lo, hi = -np.inf, np.inf
            if clip:
                it = 0
                while True:
                    mean, std = _range_mean_std(p1, p2, ref, a, b)
                    med = _sorted_median(vals, a, b)
                    cen = med if cen_median else mean
                    width = _sorted_mad(vals, a, b, med) * MAD_TO_STD if std_mad else std
                    lo = cen - sig_lo * width
                    hi = cen + sig_hi * width
                    na = _first_at_least(vals, a, b, lo)
                    nb = _first_above(vals, na, b, hi)
                    if nb - na == b - a or nb == na:
                        break
                    a, b = na, nb
                    # A clipped extreme value (1e38 in a mesh of unit noise) leaves the
                    # kept range's sums as the difference of two huge prefix sums, all
                    # rounding: rebase them on the kept range.
                    if p2[a] - p2[wa] > 1e6 * (p2[b] - p2[a]):
                        ref = _prefix_sums(vals, p1, p2, a, b)
                        wa, wb = a, b
                    it += 1
                    if maxiters != -1 and it >= maxiters:
                        break
                a = _first_at_least(vals, 0, n, lo)
                b = _first_above(vals, a, n, hi)
                if a < wa or b > wb:
                    ref = _prefix_sums(vals, p1, p2, a, b)
            n = b - a
            ngood_out[j, i] = n
            if n == 0:
                loc_out[j, i] = np.nan
                scale_out[j, i] = np.nan
                continue
            if numpy32:
                # photutils reshapes its partial edge meshes column-major, except the
                # corner one
                col_major = (y1 - y0 < by) != (x1 - x0 < bx)
                npos = _box_positions(
                    image, mask, use_mask, y0, y1, x0, x1, col_major, lo, hi, pos, keep
                )
                loc32, scale32 = _numpy32_estimates(
                    pos, keep, npos, vals, a, b, loc_code, median_factor, mean_factor,
                    skew_limit, scale_code,
                )  # fmt: skip
                loc_out[j, i] = loc32
                scale_out[j, i] = scale32
                continue
            mean, std = _range_mean_std(p1, p2, ref, a, b)
            med = _sorted_median(vals, a, b)
            if loc_code == LOC_MEAN:
                loc = mean
            elif loc_code == LOC_MEDIAN:
                loc = med
            elif loc_code == LOC_PEARSON:
                loc = median_factor * med - mean_factor * mean
            else:
                loc = sextractor_mode(mean, med, std, median_factor, mean_factor, skew_limit)
            loc_out[j, i] = loc
            if scale_code == SCALE_STD:
                scale_out[j, i] = std
            else:
                scale_out[j, i] = _sorted_mad(vals, a, b, med) * MAD_TO_STD


# ----------------------------------------------------------- SExtractor histogram mode

# Histogram of a mesh spans +-5 sigma of its 2-sigma-clipped values, with about one bin
# per sqrt(2/pi) * 5 / 4 pixels (at most 4096 bins): SExtractor's quantisation.
_HIST_NSIGMA = 5.0
_HIST_MAXBINS = 4096
_HIST_STEP = math.sqrt(2.0 / math.pi) * _HIST_NSIGMA / 4.0


@njit(cache=True, nogil=True, error_model="numpy")
def _split_point(p, lcut, hcut):
    """Where SExtractor's two-ended walk over bins ``lcut..hcut`` stops.

    The walk adds one bin at a time to the low or the high partial sum, to the low one
    only while it is strictly smaller, until the two ends meet. That is a merge of the
    two increasing sequences of partial sums (ties: high first), so the meeting bin is
    the number of low sums among the first ``hcut - lcut + 1`` merged, found by binary
    search on the prefix counts ``p`` (``p[x]`` = counts below bin x). Returns the first
    bin of the high side.
    """
    count = hcut - lcut + 1
    base = p[lcut]
    top = p[hcut + 1]
    lo, hi = 0, count
    while lo < hi:
        i = (lo + hi) // 2  # low sums taken; count - i high sums
        j = count - i
        # the i-th low sum (0-based) must come before the last high sum taken
        if j > 0 and i < count and top - p[hcut + 1 - (j - 1)] <= p[lcut + i] - base:
            hi = i
        else:
            lo = i + 1
    return lcut + lo


@njit(cache=True, nogil=True, error_model="numpy")
def _histogram_mode(histo, nbins, start_mean, median_factor, mean_factor, skew_limit):
    """Iterated 3-sigma clipped mode and sigma of a histogram, in bin units.

    The median is interpolated within the bin where counts summed from both ends meet
    (:func:`_split_point`). Iterates (at most 100 times) until sigma changes by less
    than 1e-4 relative or drops below 0.1 bin. Window sums come from prefix sums, so an
    iteration costs O(log nbins). Returns (mode, sigma, pixels in the final window).
    """
    last = nbins - 1
    p = np.zeros(nbins + 1, dtype=np.int64)
    p1 = np.zeros(nbins + 1, dtype=np.int64)
    p2 = np.zeros(nbins + 1, dtype=np.int64)
    for b in range(nbins):
        c = histo[b]
        p[b + 1] = p[b] + c
        p1[b + 1] = p1[b] + c * b
        p2[b + 1] = p2[b] + c * b * b
    lcut, hcut = 0, last
    sig = 10.0 * last
    sig_prev = 1.0
    mea = start_mean
    med = start_mean
    total = p[nbins]
    it = 0
    while it < 100 and sig >= 0.1 and abs(sig / sig_prev - 1.0) > 1e-4:
        it += 1
        sig_prev = sig
        if hcut >= lcut:
            lo = _split_point(p, lcut, hcut)
            hi = lo - 1
            low_sum = p[lo] - p[lcut]
            high_sum = p[hcut + 1] - p[lo]
            total = p[hcut + 1] - p[lcut]
            s1 = p1[hcut + 1] - p1[lcut]
            s2 = p2[hcut + 1] - p2[lcut]
        else:
            lo, hi = lcut, hcut
            low_sum = high_sum = total = s1 = s2 = 0
        if hi >= 0:
            peak = max(histo[lo], histo[hi])
            med = hi + 0.5 + (high_sum - low_sum) / (2.0 * peak)
        else:
            med = 0.0
        if total > 0:
            mea = s1 / total
            sig = s2 / total - mea * mea
        else:
            mea = 0.0
            sig = 0.0
        sig = math.sqrt(sig) if sig > 0.0 else 0.0
        t = med - 3.0 * sig
        lcut = int(t + 0.5) if t > 0.0 else 0
        t = med + 3.0 * sig
        hcut = int(t + 0.5 if t > 0.0 else t - 0.5) if t < last else last
    if sig > 0.0:
        if abs((mea - med) / sig) < skew_limit:
            mode = median_factor * med - mean_factor * mea
        else:
            mode = med
    else:
        mode = mea
    return mode, sig, total


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def mesh_sextractor_stats(
    image,
    mask,
    use_mask,
    by,
    bx,
    median_factor,
    mean_factor,
    skew_limit,
    loc_out,
    scale_out,
    nvalid_out,
    ngood_out,
):
    """SExtractor's background estimate of each mesh (Bertin & Arnouts 1996, sec. 2).

    Mean and sigma of the valid pixels; again within mean +- 2 sigma; a histogram over
    +- 5 of those sigmas; then the iterated 3-sigma clipped histogram mode
    (:func:`_histogram_mode`). Pixel values are binned in the image's own precision
    (float32 for float32 images, as SExtractor does). ``nvalid_out`` counts the valid
    pixels, ``ngood_out`` those in the final histogram window.
    """
    ny, nx = image.shape
    my, mx = loc_out.shape
    for j in prange(my):
        histo = np.zeros(_HIST_MAXBINS, dtype=np.int64)
        # SExtractor keeps the cuts and the histogram scale in single precision, its
        # pixel type; we keep them in the image's own type (float32 -> SExtractor's
        # exact binning, float64 -> no rounding): writing into this buffer rounds
        cast = np.empty(4, dtype=image.dtype)
        vals = np.empty(by * bx, dtype=image.dtype)
        y0 = j * by
        y1 = min(ny, y0 + by)
        for i in range(mx):
            x0 = i * bx
            x1 = min(nx, x0 + bx)
            # the valid pixels, gathered once: the next two passes run over them alone
            nv = _gather(image, mask, use_mask, y0, y1, x0, x1, vals)
            n = nv
            nvalid_out[j, i] = n
            if n == 0:
                loc_out[j, i] = np.nan
                scale_out[j, i] = np.nan
                ngood_out[j, i] = 0
                continue
            # One-pass sums as SExtractor's, but about the mesh's first pixel: the
            # same mean and sigma in exact arithmetic, without the cancellation of
            # mean-of-squares minus squared mean when the level is far above the
            # noise (a sky of 1e3 with a noise of 0.06 lost 8 digits: its 2-sigma
            # cut moved with the image's offset).
            ref = np.float64(vals[0])
            s1 = 0.0
            s2 = 0.0
            for t in range(nv):
                v = np.float64(vals[t]) - ref
                s1 += v
                s2 += v * v
            mean = s1 / n
            var = s2 / n - mean * mean
            mean += ref
            sigma = math.sqrt(var) if var > 0.0 else 0.0
            cast[0] = mean - 2.0 * sigma
            cast[1] = mean + 2.0 * sigma
            lcut = np.float64(cast[0])
            hcut = np.float64(cast[1])
            n = 0
            s1 = 0.0
            s2 = 0.0
            for t in range(nv):
                v = np.float64(vals[t])
                if v >= lcut and v <= hcut:
                    v -= ref
                    s1 += v
                    s2 += v * v
                    n += 1
            if n > 0:
                # (a float64 image can leave no pixel inside its float32-rounded cuts)
                mean = s1 / n
                var = s2 / n - mean * mean
                mean += ref
                sigma = math.sqrt(var) if var > 0.0 else 0.0
            nbins = min(int(_HIST_STEP * n + 1), _HIST_MAXBINS)
            cast[0] = 2.0 * _HIST_NSIGMA * sigma / nbins if sigma > 0.0 else 1.0
            cast[1] = mean - _HIST_NSIGMA * sigma
            cast[2] = cast[1] / cast[0]
            cast[3] = 0.499999 - np.float64(cast[2])
            qs = cast[0]
            off = cast[3]
            qscale = np.float64(cast[0])
            qzero = np.float64(cast[1])
            histo[:nbins] = 0
            for t in range(nv):
                b = vals[t] / qs + off
                # int() truncates towards zero like SExtractor's C cast, so (-1, 0)
                # lands in bin 0
                if b > -1.0 and b < nbins:
                    histo[int(b)] += 1
            mode, sig, total = _histogram_mode(
                histo, nbins, (mean - qzero) / qscale, median_factor, mean_factor, skew_limit
            )
            loc_out[j, i] = qzero + mode * qscale
            scale_out[j, i] = sig * qscale
            ngood_out[j, i] = total


# ------------------------------------------------------------------------ mesh filter


@njit(cache=True, nogil=True, error_model="numpy")
def median_filter_shrink(back, rms, fy, fx, threshold, back_out, rms_out):
    """SExtractor's mesh median filter: windows of ``(fy, fx)`` meshes shrink
    symmetrically at the grid edges (a corner mesh is its own window); a mesh takes the
    window medians of both maps where ``|median - value| >= threshold``."""
    my, mx = back.shape
    hy, hx = fy // 2, fx // 2
    bwin = np.empty(fy * fx)
    swin = np.empty(fy * fx)
    for j in range(my):
        ry = min(hy, j, my - 1 - j)
        for i in range(mx):
            rx = min(hx, i, mx - 1 - i)
            n = 0
            for y in range(j - ry, j + ry + 1):
                for x in range(i - rx, i + rx + 1):
                    bwin[n] = back[y, x]
                    swin[n] = rms[y, x]
                    n += 1
            # odd window sizes: the median is the middle value
            med = np.sort(bwin[:n])[n // 2]
            if abs(med - back[j, i]) >= threshold:
                back_out[j, i] = med
                rms_out[j, i] = np.sort(swin[:n])[n // 2]
            else:
                back_out[j, i] = back[j, i]
                rms_out[j, i] = rms[j, i]


# --------------------------------------------------------------------- bicubic spline


@njit(cache=True, nogil=True, error_model="numpy")
def _second_derivs_1d(f, exact, out, c, u):
    """Natural cubic spline through ``f`` at unit spacing: ``out`` = y'' / 6.

    ``exact`` reproduces SExtractor's back-substitution, which divides the whole update
    by six at every step instead of only the right-hand side.
    """
    n = f.shape[0]
    for i in range(n):
        out[i] = 0.0
    if n < 3:
        return
    c[0] = 0.0
    u[0] = 0.0
    for i in range(1, n - 1):
        c[i] = -1.0 / (c[i - 1] + 4.0)
        u[i] = c[i] * (u[i - 1] - 6.0 * (f[i + 1] + f[i - 1] - 2.0 * f[i]))
    for i in range(n - 2, 0, -1):
        if exact:
            out[i] = (c[i] * out[i + 1] + u[i]) / 6.0
        else:
            out[i] = c[i] * out[i + 1] + u[i] / 6.0


@njit(cache=True, nogil=True, error_model="numpy")
def spline_second_derivatives(rows, exact):
    """:func:`_second_derivs_1d` of every row of a 2-D array."""
    nr, n = rows.shape
    out = np.zeros((nr, n))
    c = np.empty(n)
    u = np.empty(n)
    for r in range(nr):
        _second_derivs_1d(rows[r], exact, out[r], c, u)
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def _interval(t, n):
    """Spline interval of coordinate ``t`` (mesh units) among ``n`` nodes, and the
    offset in it; the end intervals extend outwards (extrapolation)."""
    k = int(math.floor(t))
    if k < 0:
        k = 0
    elif k > n - 2:
        k = n - 2
    return k, t - k


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def spline_eval(grid, d2y, ty, tx, exact, out):
    """Bicubic spline map: for each image row, the node values along y, a natural
    spline along x through them, evaluated at every column.

    ``ty`` / ``tx`` are the rows' / columns' coordinates in mesh units (node k at k),
    ``tx`` increasing. With a single row of nodes ``exact`` keeps SExtractor's linear
    interpolation in x.
    """
    my, mx = grid.shape
    ny, nx = out.shape
    # per column: the cubic's four weights, and where each interval's columns start,
    # so that the inner loop runs over contiguous columns with the nodes fixed
    wa = np.empty(nx)
    wb = np.empty(nx)
    wc = np.empty(nx)
    wd = np.empty(nx)
    # start[k]: the first column in interval k or beyond
    start = np.full(max(mx, 2), nx, dtype=np.int64)
    start[0] = 0
    if mx > 1:
        for x in range(nx - 1, -1, -1):
            k, d = _interval(tx[x], mx)
            cd = 1.0 - d
            wa[x] = cd
            wb[x] = d
            wc[x] = cd * (cd * cd - 1.0)
            wd[x] = d * (d * d - 1.0)
            for kk in range(1, k + 1):
                start[kk] = x
    for y in prange(ny):
        node = np.empty(mx)
        dnode = np.zeros(mx)
        c = np.empty(mx)
        u = np.empty(mx)
        if my > 1:
            k, d = _interval(ty[y], my)
            cd = 1.0 - d
            a3 = cd * cd * cd - cd
            b3 = d * d * d - d
            for i in range(mx):
                node[i] = (
                    cd * grid[k, i] + d * grid[k + 1, i] + a3 * d2y[k, i] + b3 * d2y[k + 1, i]
                )
            _second_derivs_1d(node, exact, dnode, c, u)
        else:
            for i in range(mx):
                node[i] = grid[0, i]
            if not exact:
                _second_derivs_1d(node, exact, dnode, c, u)
        if mx == 1:
            for x in range(nx):
                out[y, x] = node[0]
            continue
        row = out[y]
        for k in range(mx - 1):
            n0, n1, d0, d1 = node[k], node[k + 1], dnode[k], dnode[k + 1]
            for x in range(start[k], start[k + 1]):
                row[x] = wa[x] * n0 + wb[x] * n1 + wc[x] * d0 + wd[x] * d1
