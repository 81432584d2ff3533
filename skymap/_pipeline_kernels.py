"""Compiled kernels for :mod:`skymap.pipeline`. Not public: call through pipeline.py."""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True, parallel=True)
def masked_block_sums(values, excluded, b, noise):  # pragma: no cover - compiled
    """Sums over b x b blocks of the valid ``values``, of the valid-pixel count, and of
    the valid ``noise**2`` (``noise`` an rms map of the values' shape; for a constant,
    shape (1, 1), the variance sums are not formed and a (1, 1) zero array is returned
    in their place). Partial blocks at the far edges sum what they hold."""
    ny, nx = values.shape
    gy = (ny + b - 1) // b
    gx = (nx + b - 1) // b
    scalar = noise.shape[0] == 1 and noise.shape[1] == 1
    num = np.zeros((gy, gx), np.float32)
    cnt = np.zeros((gy, gx), np.float32)
    # A constant noise needs no variance map: the caller scales the counts.
    var = np.zeros((1, 1) if scalar else (gy, gx), np.float32)
    for by in prange(gy):
        for y in range(by * b, min(ny, (by + 1) * b)):
            for x in range(nx):
                if not excluded[y, x]:
                    bx = x // b
                    num[by, bx] += values[y, x]
                    cnt[by, bx] += 1.0
                    if not scalar:
                        # Squared here: a full-resolution variance map would cost
                        # an image of memory.
                        var[by, bx] += noise[y, x] * noise[y, x]
    return num, cnt, var


@njit(cache=True, nogil=True, parallel=True)
def gaussian_separable(a, kernel):  # pragma: no cover - compiled
    """Correlate ``a`` with ``kernel`` along x then y, zero outside the array
    (scipy.ndimage.correlate1d with mode="constant", twice), in float32."""
    ny, nx = a.shape
    r = kernel.size // 2
    tmp = np.empty((ny, nx), np.float32)
    for y in prange(ny):
        for x in range(nx):
            s = 0.0
            for j in range(max(0, x - r), min(nx - 1, x + r) + 1):
                s += kernel[j - x + r] * a[y, j]
            tmp[y, x] = s
    out = np.zeros((ny, nx), np.float32)
    for y in prange(ny):
        for i in range(max(0, y - r), min(ny - 1, y + r) + 1):
            w = kernel[i - y + r]
            for x in range(nx):
                out[y, x] += w * tmp[i, x]
    return out


@njit(cache=True, nogil=True, parallel=True)
def block_sum(a, b):  # pragma: no cover - compiled
    """Sums over b x b blocks (partial blocks at the far edges sum what they hold)."""
    ny, nx = a.shape
    gy = (ny + b - 1) // b
    gx = (nx + b - 1) // b
    out = np.zeros((gy, gx), np.float32)
    for by in prange(gy):
        for y in range(by * b, min(ny, (by + 1) * b)):
            for x in range(nx):
                out[by, x // b] += a[y, x]
    return out


@njit(cache=True, nogil=True, parallel=True)
def dog_snr(num, cnt, var, g, g2, local, bw, noise2, want_grow, excluded):  # pragma: no cover
    """Signal-to-noise maps of a normalised Gaussian smoothing, in one fused pass.

    With G the separable kernel ``g`` (and G2 that of ``g2 = g**2``):
    ``grow = G*num / sqrt(nv)`` and ``snr = (G*num - G*cnt * local) / sqrt(nv)``, where
    ``nv = G2*var``, or ``noise2 * G2*cnt`` when ``var`` has shape (1, 1) (a constant
    noise). ``local`` is sampled at ``[y // bw, x // bw]``. Zero where nv is 0. The
    x pass is buffered in strips of rows, so the temporaries stay small. Without
    ``want_grow`` the second map is a (1, 1) placeholder. When ``excluded`` has the
    shape of ``num`` (unbinned data), ``num`` is the raw residual, ``cnt`` is unused and
    a full-size ``var`` is the raw rms map (squared here): excluded pixels count as value
    0 and weight 0, which saves three full-size arrays.
    """
    ny, nx = num.shape
    direct = excluded.shape[0] == ny and excluded.shape[1] == nx
    r = g.size // 2
    use_var = var.shape[0] == ny and var.shape[1] == nx
    snr = np.zeros((ny, nx), np.float32)
    grow = np.zeros((ny, nx) if want_grow else (1, 1), np.float32)
    strip = 128
    tn = np.empty((strip + 2 * r, nx), np.float32)
    tc = np.empty((strip + 2 * r, nx), np.float32)
    tv = np.empty((strip + 2 * r, nx), np.float32)
    for y0 in range(0, ny, strip):
        y1 = min(ny, y0 + strip)
        a0 = max(0, y0 - r)
        a1 = min(ny, y1 + r)
        for k in prange(a1 - a0):
            y = a0 + k
            for x in range(nx):
                sn = 0.0
                sc = 0.0
                sv = 0.0
                for j in range(max(0, x - r), min(nx - 1, x + r) + 1):
                    if direct:
                        if excluded[y, j]:
                            continue
                        value = num[y, j]
                        count = 1.0
                    else:
                        value = num[y, j]
                        count = cnt[y, j]
                    w = g[j - x + r]
                    sn += w * value
                    sc += w * count
                    if use_var:
                        v2 = var[y, j]
                        if direct:
                            v2 = v2 * v2
                        sv += g2[j - x + r] * float(v2)
                    else:
                        sv += g2[j - x + r] * count
                tn[k, x] = sn
                tc[k, x] = sc
                tv[k, x] = sv
        for k in prange(y1 - y0):
            y = y0 + k
            an = np.zeros(nx)
            ac = np.zeros(nx)
            av = np.zeros(nx)
            for i in range(max(0, y - r), min(ny - 1, y + r) + 1):
                w = g[i - y + r]
                w2 = g2[i - y + r]
                for x in range(nx):
                    an[x] += w * tn[i - a0, x]
                    ac[x] += w * tc[i - a0, x]
                    av[x] += w2 * tv[i - a0, x]
            ly = y // bw
            for x in range(nx):
                v = av[x] if use_var else av[x] * noise2
                if v > 0:
                    sd = np.sqrt(v)
                    if want_grow:
                        grow[y, x] = an[x] / sd
                    snr[y, x] = (an[x] - ac[x] * local[ly, x // bw]) / sd
    return snr, grow


@njit(cache=True, nogil=True, parallel=True)
def expand_mask(small, b, excluded):  # pragma: no cover - compiled
    """Full-resolution ``small[y // b, x // b] & ~excluded``."""
    ny, nx = excluded.shape
    out = np.zeros((ny, nx), np.bool_)
    for y in prange(ny):
        for x in range(nx):
            out[y, x] = small[y // b, x // b] and not excluded[y, x]
    return out


@njit(cache=True, nogil=True, parallel=True)
def hysteresis_codes(snr, grow, low, high):  # pragma: no cover - compiled
    """uint8 map: 2 where ``snr > high`` (seeds), 1 where ``grow > low``, else 0; one
    byte a pixel instead of the seed, growth and union masks."""
    ny, nx = snr.shape
    out = np.empty((ny, nx), np.uint8)
    for y in prange(ny):
        for x in range(nx):
            if snr[y, x] > high:
                out[y, x] = 2
            elif grow[y, x] > low:
                out[y, x] = 1
            else:
                out[y, x] = 0
    return out


@njit(cache=True, nogil=True, parallel=True)
def keep_seeded(labels, codes, n):  # pragma: no cover - compiled
    """Overwrite ``codes`` (as 0/1) with the pixels whose label (1..n) holds a seed
    (code 2); returns it."""
    ny, nx = labels.shape
    keep = np.zeros(n + 1, np.bool_)
    # Serial: many pixels of one region would race on the same flag.
    for y in range(ny):
        for x in range(nx):
            if codes[y, x] == 2:
                keep[labels[y, x]] = True
    keep[0] = False
    for y in prange(ny):
        for x in range(nx):
            codes[y, x] = 1 if keep[labels[y, x]] else 0
    return codes


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


@njit(cache=True, nogil=True, parallel=True)
def floor_in_place(values, floor):  # pragma: no cover - compiled
    """``values = where(isfinite(values), maximum(values, floor), floor)``, in place."""
    flat = values.ravel()
    for i in prange(flat.size):
        v = flat[i]
        if not np.isfinite(v) or v < floor:
            flat[i] = floor
    return values
