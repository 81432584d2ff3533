"""Scoring a background model: against truth on simulations, against statistics alone on
real data.

* :func:`rms_vs_scale` - the RMS of block means of a residual as a function of block
  width, as defined in the STScI "Complex 2D Background" notebook, with its two reference
  curves (:func:`perfect_curve` when the noise is known, :func:`white_noise_curve` from
  the measured pixel-to-pixel sigma otherwise).
* :func:`bias_under_sources` - the residual ``background - truth`` in a 3x3 box at each
  catalogued source, split by mask, with a random-position control and linear fits
  against flux and radius.
* :func:`masked_vs_unmasked` - is the background under masked pixels higher than
  elsewhere? A block-jackknife standard error accounts for the spatial correlation of a
  smooth map.
* :func:`evaluate` - all of the above in one :class:`Evaluation`, with a JSON-ready
  :meth:`Evaluation.to_dict`.

Masks follow the package convention: True = excluded; non-finite pixels are excluded
automatically. Arrays are (y, x).
"""

from __future__ import annotations

import numpy as np
from astropy.nddata import block_reduce

from ._validate import as_image, as_mask, combine_masks

__all__ = [
    "pixel_sigma",
    "rms_vs_scale",
    "white_noise_curve",
]

# 1 / Phi^-1(3/4): MAD to Gaussian sigma.
_MAD_TO_SIGMA = 1.482602218505602


def _widths(widths) -> np.ndarray:
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


def rms_vs_scale(residual, mask=None, widths=range(3, 30)) -> np.ndarray:
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

    Returns
    -------
    ndarray of float64
        One RMS per width; NaN where no clean block remains.

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
    ws = _widths(widths)
    ny, nx = res.shape
    row = np.arange(ny)[:, None]
    col = np.arange(nx)[None, :]
    # Fill masked pixels so that NaN/inf never reach a block mean that is kept anyway.
    filled = np.where(m, 0.0, res)
    out = np.full(ws.size, np.nan)
    for i, w in enumerate(ws):
        if w > ny or w > nx:
            continue
        half = w / 2
        border = (row < half) | (row > ny - half) | (col < half) | (col > nx - half)
        counts = block_reduce(m | border, int(w))
        means = block_reduce(filled, int(w), func=np.mean)
        good = means[counts == 0]
        if good.size:
            out[i] = float(np.std(good, dtype=np.float64))
    return out


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
    ok = ~(m[:, 1:] | m[:, :-1])
    d = (res[:, 1:] - res[:, :-1])[ok].astype(np.float64)
    if d.size < 2:
        return float("nan")
    return float(_MAD_TO_SIGMA * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def white_noise_curve(sigma: float, widths=range(3, 30)) -> np.ndarray:
    """The white-noise expectation ``sigma / w`` of :func:`rms_vs_scale`."""
    return float(sigma) / _widths(widths).astype(np.float64)
