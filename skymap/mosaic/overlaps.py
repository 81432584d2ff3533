"""Where images overlap: frames, footprints, candidate pairs and resampled samples.

The geometry under :func:`skymap.mosaic.skymatch.match`. Each input becomes a
:class:`Frame` (data, valid pixels, WCS, footprint box). With a WCS, footprints are
boxes on a gnomonic projection about the mosaic's centre, so that candidate pairs are
found without testing every pair on the sphere; without one, every image sits on one
pixel grid. :func:`overlap_samples` returns one image's valid pixels inside another and
the other's values there, resampled bilinearly through the sky.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from astropy.nddata import NDData

from skymap._inputs import read_image
from skymap.mosaic import _skymatch_kernels as _k

__all__ = [
    "EFFICIENCY",
    "Frame",
    "clip_sample",
    "clipped_statistic",
    "flatten",
    "prepare",
    "candidate_pairs",
    "overlap_samples",
    "parallel_map",
    "nanmin",
]

log = logging.getLogger(__name__)

# A bilinear weight below this does not let a masked neighbour spoil the sample: WCS
# round trips put integer shifts a hair off the grid.
WEIGHT_EPS = 1e-3


@dataclass(frozen=True, kw_only=True, eq=False)
class Frame:
    data: np.ndarray
    valid: np.ndarray
    wcs: Any
    # Footprint bounding box: pixel rows/cols on the common grid (no WCS) or a box on the
    # tangent plane (WCS), as (y0, y1, x0, x1).
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    border: np.ndarray | None = None  # (2, n) world coordinates of the outline


def flatten(images):
    out = []
    for item in images:
        if isinstance(item, list | tuple):
            out.extend(item)
        else:
            out.append(item)
    return out


def prepare(images, exposures):
    if isinstance(images, np.ndarray | NDData) or not isinstance(images, Sequence):
        raise TypeError("images must be a list of NDData or 2-D arrays (or lists of them)")
    nested = any(isinstance(item, list | tuple) for item in images)
    flat = flatten(images)
    if not flat:
        raise ValueError("images must contain at least one image")
    if nested and exposures is not None:
        raise ValueError("exposures cannot be given when images is nested; use one or the other")
    if nested:
        exposures, k = [], 0
        for item in images:
            size = len(item) if isinstance(item, list | tuple) else 1
            if size == 0:
                raise ValueError("images must not contain an empty group")
            exposures.append(list(range(k, k + size)))
            k += size
    elif exposures is None:
        exposures = [[i] for i in range(len(flat))]
    else:
        exposures = [[int(i) for i in m] for m in exposures]
        seen = sorted(i for m in exposures for i in m)
        if seen != list(range(len(flat))) or any(len(m) == 0 for m in exposures):
            raise ValueError(
                "exposures must list every image index 0..n-1 exactly once, in non-empty "
                f"groups; got {exposures} for {len(flat)} images"
            )
    frames = []
    for i, item in enumerate(flat):
        # arrays, MaskedArrays, Quantities, NDData/CCDData alike (masks ORed in)
        inp = read_image(item, name=f"images[{i}]")
        data, mask, wcs = inp.data, inp.mask, inp.wcs
        valid = np.isfinite(data)
        if mask is not None:
            valid &= ~mask
        frames.append(Frame(data=data, valid=valid, wcs=_low_level(wcs)))
    has_wcs = [f.wcs is not None for f in frames]
    if any(has_wcs) and not all(has_wcs):
        raise ValueError(
            "either every image must have a WCS or none (then all share one pixel grid); "
            f"images without WCS: {[i for i, h in enumerate(has_wcs) if not h]}"
        )
    if all(has_wcs):
        frames = _tangent_boxes(frames)
    else:
        shapes = {f.data.shape for f in frames}
        if len(shapes) > 1:
            raise ValueError(
                "images without a WCS must share one pixel grid (one shape); got shapes "
                f"{sorted(shapes)}"
            )
        frames = [replace(f, box=_valid_box(f.valid)) for f in frames]
    return frames, exposures


def _low_level(wcs):
    if wcs is None:
        return None
    if getattr(wcs, "has_celestial", True) is False:
        # An astropy WCS built from a header without sky axes maps pixels to "degrees"
        # one for one: it says nothing about where the image is on the sky.
        log.info("a WCS without celestial axes is ignored: the image is on the common grid")
        return None
    return getattr(wcs, "low_level_wcs", wcs)


def _valid_box(valid):
    rows = np.flatnonzero(valid.any(axis=1))
    cols = np.flatnonzero(valid.any(axis=0))
    if rows.size == 0:
        return (0.0, -1.0, 0.0, -1.0)
    return (float(rows[0]), float(rows[-1]), float(cols[0]), float(cols[-1]))


def _outline(shape, step=64):
    """Pixel (x, y) points along the outer edge of an image, corners included."""
    ny, nx = shape
    xs = np.linspace(-0.5, nx - 0.5, max(2, int(np.ceil(nx / step)) + 1))
    ys = np.linspace(-0.5, ny - 0.5, max(2, int(np.ceil(ny / step)) + 1))
    x = np.concatenate([xs, np.full(ys.size, nx - 0.5), xs[::-1], np.full(ys.size, -0.5)])
    y = np.concatenate([np.full(xs.size, -0.5), ys, np.full(xs.size, ny - 0.5), ys[::-1]])
    return x, y


def _unit(lon, lat):
    lon, lat = np.radians(lon), np.radians(lat)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)])


def _tangent_boxes(frames):
    borders = []
    for f in frames:
        x, y = _outline(f.data.shape)
        lon, lat = f.wcs.pixel_to_world_values(x, y)
        borders.append(np.array([lon, lat], dtype=float))
    vecs = [_unit(b[0], b[1]) for b in borders]
    centre = np.sum([np.nanmean(v, axis=1) for v in vecs], axis=0)
    centre /= np.linalg.norm(centre)
    # Gnomonic projection about the mosaic's centre: great circles become straight lines,
    # so a box around the projected outline contains the whole footprint.
    east = np.cross([0.0, 0.0, 1.0], centre)
    if np.linalg.norm(east) < 1e-12:
        east = np.array([0.0, 1.0, 0.0])
    east /= np.linalg.norm(east)
    north = np.cross(centre, east)
    out = []
    for f, b, v in zip(frames, borders, vecs, strict=True):
        z = centre @ v
        if np.any(z <= 0):
            raise ValueError("images span more than a hemisphere; cannot place them on one plane")
        u, w = (east @ v) / z, (north @ v) / z
        # A WCS may return NaN outside its valid region: such points bound nothing.
        box = (nanmin(w), -nanmin(-w), nanmin(u), -nanmin(-u))
        out.append(replace(f, box=box, border=b))
    return out


# ----------------------------------------------------------------------------- overlaps


def candidate_pairs(frames):
    box = np.array([f.box for f in frames])
    y0, y1, x0, x1 = box.T
    tol = 1e-9 * max(1.0, float(np.nanmax(np.abs(box))))
    hit = (
        (y0[:, None] <= y1[None, :] + tol)
        & (y0[None, :] <= y1[:, None] + tol)
        & (x0[:, None] <= x1[None, :] + tol)
        & (x0[None, :] <= x1[:, None] + tol)
    )
    ii, jj = np.nonzero(np.triu(hit, k=1))
    return ii, jj


def parallel_map(fn, items, n_threads: int | None) -> list:
    """``[fn(x) for x in items]``, spread over ``n_threads`` threads (None: one per CPU;
    the kernels and numpy's selection release the GIL); the order of results is kept."""
    n = n_threads if n_threads is not None else (os.cpu_count() or 1)
    if n <= 1 or len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(n, len(items))) as pool:
        return list(pool.map(fn, items))


def overlap_samples(fi: Frame, fj: Frame, step: int, positions: bool = False) -> tuple:
    """Values of frame i at its valid pixels inside frame j, j's values there, and the
    fraction of j's noise variance that survives the resampling (1 without it); with
    ``positions``, also a (4, n) array of each sample's (y, x) in i and in j.

    Without WCS the frames share one grid. With WCS, i's pixels are mapped into j and j
    is sampled bilinearly (exactly, when the mapping lands on j's pixel centres).
    """
    nothing = (np.empty(0), np.empty(0), 1.0) + ((np.empty((4, 0)),) if positions else ())
    if fi.wcs is None:
        y0 = int(max(fi.box[0], fj.box[0]))
        y1 = int(min(fi.box[1], fj.box[1]))
        x0 = int(max(fi.box[2], fj.box[2]))
        x1 = int(min(fi.box[3], fj.box[3]))
        if y1 < y0 or x1 < x0:
            return nothing
        sl = (slice(y0, y1 + 1), slice(x0, x1 + 1))
        ok = fi.valid[sl] & fj.valid[sl]
        out = (fi.data[sl][ok], fj.data[sl][ok], 1.0)
        if positions:
            yy, xx = np.nonzero(ok)
            yx = np.stack([yy + y0, xx + x0]).astype(float)
            out += (np.concatenate([yx, yx]),)
        return out
    region = _region_in(fi, fj)
    if region is None:
        return nothing
    y0, y1, x0, x1 = region
    gy = np.linspace(y0, max(y1, y0 + 1), max(2, int(np.ceil((y1 - y0) / step)) + 1))
    gx = np.linspace(x0, max(x1, x0 + 1), max(2, int(np.ceil((x1 - x0) / step)) + 1))
    xx, yy = np.meshgrid(gx, gy)
    world = fi.wcs.pixel_to_world_values(xx.ravel(), yy.ravel())
    cx, cy = fj.wcs.world_to_pixel_values(*world)
    cx = np.asarray(cx, dtype=float).reshape(xx.shape)
    cy = np.asarray(cy, dtype=float).reshape(xx.shape)
    return _k.overlap_samples(
        fi.data,
        fi.valid,
        fj.data,
        fj.valid,
        y0,
        y1,
        x0,
        x1,
        gy[0],
        gy[1] - gy[0],
        gx[0],
        gx[1] - gx[0],
        cy,
        cx,
        WEIGHT_EPS,
        positions,
    )[: 4 if positions else 3]


def _region_in(fi: Frame, fj: Frame):
    """Pixel box (y0, y1, x0, x1) of frame i that can overlap frame j, or None."""
    x, y = fi.wcs.world_to_pixel_values(fj.border[0], fj.border[1])
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    good = np.isfinite(x) & np.isfinite(y)
    if not good.any():
        return None
    ny, nx = fi.data.shape
    # One pixel of margin: the outline is sampled, and its edges may bow slightly.
    x0 = max(int(np.floor(x[good].min())) - 1, 0)
    x1 = min(int(np.ceil(x[good].max())) + 1, nx - 1)
    y0 = max(int(np.floor(y[good].min())) - 1, 0)
    y1 = min(int(np.ceil(y[good].max())) + 1, ny - 1)
    if x1 < x0 or y1 < y0:
        return None
    return y0, y1, x0, x1


def nanmin(x) -> float:
    """Smallest finite value of ``x``, or NaN (without numpy's all-NaN warning)."""
    x = np.asarray(x)
    finite = x[np.isfinite(x)]
    return float(finite.min()) if finite.size else np.nan


# Standard error of each statistic for Gaussian data, in units of sigma / sqrt(n):
# mean 1; median sqrt(pi/2); mode = 2.5 median - 1.5 mean, whose variance is
# 6.25 (pi/2) + 2.25 - 7.5 (the covariance of mean and median is sigma^2 / n).
EFFICIENCY = {
    "mean": 1.0,
    "median": float(np.sqrt(np.pi / 2)),
    "mode": float(np.sqrt(6.25 * np.pi / 2 + 2.25 - 7.5)),
}


def clipped_statistic(
    values: np.ndarray,
    *,
    statistic: str = "mode",
    lower: float | None = None,
    upper: float | None = None,
    nclip: int = 5,
    lsigma: float = 4.0,
    usigma: float = 4.0,
) -> tuple[float, float, int]:
    """Sky statistic of a 1-D sample with the original skymatch's clipping rules.

    Values outside ``[lower, upper]`` are dropped first. Then, ``nclip`` times, the mean
    and standard deviation (ddof=1) of the values inside the current limits are computed
    and the limits become ``[mean - lsigma*std, mean + usigma*std]`` (never wider than
    ``[lower, upper]``); each pass selects from the whole sample, as stsci.imagestats
    does. The statistic is taken from the final selection.

    Parameters
    ----------
    values : ndarray
        The sample (any shape; NaN must already be removed).
    statistic : {'mode', 'median', 'mean'}
        'mode' is Pearson's estimate ``2.5 median - 1.5 mean`` (SExtractor's factors),
        far less noisy than the histogram peak of stsci.imagestats.
    lower, upper : float or None
        Hard limits on usable values, in the units of the data.
    nclip : int
        Number of clipping passes (0 = none).
    lsigma, usigma : float
        Lower and upper clipping limits in standard deviations.

    Returns
    -------
    value : float
        The statistic (NaN when no value survives).
    error : float
        Its standard error for Gaussian data, ``efficiency * std / sqrt(n)``.
    n : int
        Number of values used.

    Examples
    --------
    >>> x = np.r_[np.zeros(99), 1000.0]
    >>> clipped_statistic(x, statistic="mean", nclip=1)[::2]
    (0.0, 99)
    """
    x = np.ascontiguousarray(np.asarray(values).ravel())
    n, mean, std, lo, hi = clip_sample(x, lower, upper, nclip, lsigma, usigma)
    if n == 0:
        return np.nan, np.nan, 0
    if statistic == "mean":
        value = mean
    else:
        median = float(np.median(_k.select_within(x, lo, hi)))
        value = median if statistic == "median" else 2.5 * median - 1.5 * mean
    error = EFFICIENCY[statistic] * std / np.sqrt(n) if n > 1 else np.inf
    return float(value), float(error), int(n)


def clip_sample(x, lower, upper, nclip, lsigma, usigma):
    """Count, mean, std and final limits of the clipping in :func:`clipped_statistic`
    (the same limits :class:`~skymap.mosaic.skymatch.SkyMatch` clips its cells with)."""
    lo = -np.inf if lower is None else float(lower)
    hi = np.inf if upper is None else float(upper)
    return _k.clip_limits(x, lo, hi, int(nclip), float(lsigma), float(usigma))
