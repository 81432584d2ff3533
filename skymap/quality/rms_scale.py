"""RMS of block means against block width: how much large-scale structure a residual holds.

:func:`rms_vs_scale` is the curve defined in the STScI "Complex 2D Background" notebook;
its references are :func:`perfect_curve` (when the noise is known) and
:func:`white_noise_curve` (from the pixel-to-pixel sigma, :func:`pixel_sigma`).
"""

from __future__ import annotations

import numpy as np
from astropy.nddata import block_reduce

from skymap._util import MAD_TO_STD
from skymap._validate import as_image, as_mask, combine_masks

__all__ = ["as_widths", "perfect_curve", "pixel_sigma", "rms_vs_scale", "white_noise_curve"]

# Pixel pairs used by pixel_sigma at most (rows are subsampled above this).
_SIGMA_PAIRS = 1 << 20


def as_widths(widths) -> np.ndarray:
    """Block widths as int64, checked: a 1-D sequence of integers >= 1."""
    w = np.atleast_1d(np.asarray(widths, dtype=np.float64))
    if (
        w.ndim != 1
        or w.size == 0
        or not np.all(np.isfinite(w))
        or np.any(w != np.round(w))
        or np.any(w < 1)
    ):
        raise ValueError(f"widths must be a 1-D sequence of integers >= 1, got {widths!r}")
    return w.astype(np.int64)


def rms_vs_scale(residual, mask=None, widths=range(3, 30), *, return_counts: bool = False):
    """RMS of the block means of ``residual`` for each block width, over clean blocks.

    This is the notebook's definition, step by step, for each width ``w``:

    1. mask a border of width ``w/2`` (pixels with ``row < w/2``, ``row > nrow - w/2``,
       and likewise for columns) on top of ``mask``;
    2. ``block_reduce`` the mask by sum and the residual by mean in ``w`` x ``w`` blocks
       (trailing rows and columns that do not fill a block are dropped);
    3. return the standard deviation (``ddof=0``) of the block means over the blocks that
       contain no masked pixel.

    For white noise of pixel sigma ``s`` the curve is ``s / w``; a residual that still
    holds background structure stays above it at large ``w``.

    Parameters
    ----------
    residual : array_like
        2-D residual, typically ``image - background``.
    mask : array_like of bool, optional
        True = excluded. Non-finite residual pixels are excluded too.
    widths : sequence of int
        Block widths in pixels (the notebook uses 3..29).
    return_counts : bool
        Also return the number of clean blocks behind each RMS: a standard deviation of
        a handful of block means says little (with one block it is 0).

    Returns
    -------
    ndarray of float64
        One RMS per width; NaN where no clean block remains.
    ndarray of int64
        With ``return_counts``: the number of clean blocks at each width.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> noise = rng.normal(0.0, 1.0, (600, 600))
    >>> rms = rms_vs_scale(noise, widths=[1, 10])
    >>> np.round(rms * [1, 10], 1)
    array([1., 1.])
    """
    res = as_image(residual, "residual")
    m = combine_masks(res, as_mask(mask, res.shape))
    ws = as_widths(widths)
    ny, nx = res.shape
    zero = res.dtype.type(0)
    out = np.full(ws.size, np.nan)
    counts_out = np.zeros(ws.size, dtype=np.int64)
    for i, w in enumerate(ws):
        w = int(w)
        if w > ny or w > nx:
            continue
        nby, nbx = ny // w, nx // w
        # The notebook's border (row < w/2 or row > nrow - w/2, same for columns) only
        # depends on the block's row or column range: flag whole block rows/columns.
        half = w / 2
        brow = block_reduce((np.arange(ny) < half) | (np.arange(ny) > ny - half), w) > 0
        bcol = block_reduce((np.arange(nx) < half) | (np.arange(nx) > nx - half), w) > 0
        # One block row at a time: masked-pixel counts and float64 block sums without a
        # full-size temporary (the residual may be as large as memory allows).
        clean = np.zeros((nby, nbx), dtype=bool)
        means = np.zeros((nby, nbx))
        for j in range(nby):
            if brow[j]:
                continue
            rows = slice(j * w, (j + 1) * w)
            m_rows = m[rows, : nbx * w]
            clean[j] = ~m_rows.reshape(w, nbx, w).any(axis=(0, 2)) & ~bcol
            vals = np.where(m_rows, zero, res[rows, : nbx * w])
            means[j] = vals.reshape(w, nbx, w).sum(axis=(0, 2), dtype=np.float64)
        counts_out[i] = int(clean.sum())
        if not clean.any():
            continue
        means /= w * w
        out[i] = float(np.std(means[clean], dtype=np.float64))
    return (out, counts_out) if return_counts else out


def pixel_sigma(residual, mask=None) -> float:
    """Robust pixel-to-pixel noise sigma from differences of horizontal neighbours.

    ``sigma = 1.4826 * MAD(r[y, x+1] - r[y, x]) / sqrt(2)`` over pairs with both pixels
    unmasked. Differencing neighbours cancels any background structure that is smooth on
    the pixel scale, so this measures the white-noise part of the residual.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> img = rng.normal(0, 2.0, (400, 400)) + np.linspace(0, 50, 400)[None, :]
    >>> round(pixel_sigma(img), 1)
    2.0
    """
    res = as_image(residual, "residual")
    m = combine_masks(res, as_mask(mask, res.shape))
    # Every k-th row on large images: a million pairs give sigma to 0.1%, and the
    # differences need not cost several copies of the image.
    step = max(1, -(-res.size // _SIGMA_PAIRS))
    res, m = res[::step], m[::step]
    ok = ~(m[:, 1:] | m[:, :-1])
    d = (res[:, 1:] - res[:, :-1])[ok].astype(np.float64)
    if d.size < 2:
        return float("nan")
    return float(MAD_TO_STD * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def white_noise_curve(sigma: float, widths=range(3, 30)) -> np.ndarray:
    """The white-noise expectation ``sigma / w`` of :func:`rms_vs_scale`."""
    return float(sigma) / as_widths(widths).astype(np.float64)


def perfect_curve(noise, mask=None, widths=range(3, 30)) -> np.ndarray:
    """The "perfect" reference of :func:`rms_vs_scale`: the curve of the noise alone.

    On a simulation the noise is known (``Scene.noise``, i.e. noisy sky minus noiseless
    sky); a background model that recovered the sky exactly would leave exactly this
    residual in the unmasked blocks. Use the same ``mask`` as for the residual so that the
    same blocks are compared.
    """
    return rms_vs_scale(noise, mask, widths)
