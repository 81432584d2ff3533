"""Faint light around and between sources: :class:`WingMasker`, the pipeline's last
masker, grows the detections of :class:`~skymap.masking.hysteresis.HysteresisMasker`
into the faint light that surrounds them, below what a per-pixel threshold reaches.

Two principles decide where the faint light is source and not sky:

* Source light falls off with distance from its source; sky does not know where the
  sources are. The mean residual of the unmasked pixels, in rings of distance from the
  nearest detection (all detections stacked: millions of pixels in a crowded field),
  falls for as long as the sources' wings reach. The growth is confined to the
  distance out to which that profile still falls significantly (:func:`wing_reach`);
  a flat profile (sparse sources, or a sky bump that the detections sit on) stops it
  at once.
* Within that reach, a block is grown into when its residual, smoothed at ``scale``
  pixels with no surround subtraction (a surround mean would take away the very
  pedestal of overlapping wings the step is after), exceeds ``threshold`` times the
  noise that smoothing leaves, and it is connected to a detection.

The step works on the residual binned in ``block`` x ``block`` sums of the pixels not
yet excluded, so it is cheap, and the tiled back end computes the same sums per tile
(:func:`wing_sums`, tiles aligned to the block) and runs the step in the driver.

References
----------
Akhlaghi, M. & Ichikawa, T. 2015, ApJS 220, 1 (NoiseChisel: detection of faint
extended light below the per-pixel noise), https://doi.org/10.1088/0067-0049/220/1/1.
Akhlaghi, M. 2019, arXiv:1909.11230 (carving the outskirts of galaxies out of the
sky), https://doi.org/10.48550/arXiv.1909.11230.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from skymap._validate import as_image, as_mask, check_positive
from skymap.backends.base import block_sums
from skymap.masking import _hysteresis_kernels as _hk
from skymap.masking import _wings_kernels as _wk
from skymap.masking.hysteresis import (
    CoarseRMS,
    HysteresisMasker,
    noise_excess,
    noise_grid,
    residual_rms,
)

__all__ = [
    "FREE",
    "PEDESTAL_BLOCK",
    "SEED",
    "WingMasker",
    "pedestal_codes",
    "pedestal_of",
    "residual_sums",
    "wing_pedestal",
    "wing_reach",
    "wing_step",
    "wing_sums",
]

log = logging.getLogger(__name__)

#: Significance (in standard errors) by which a ring's mean must exceed the mean of all
#: the rings beyond it for the profile to count as still falling there.
FALL_SIGMA = 3.0
#: Fewest unmasked blocks beyond a ring for the comparison to be made: this many, and
#: this share of all the free blocks. The blocks beyond the reach stand for the frame's
#: sky (:func:`wing_pedestal` reads its level there), so they must be more than the few
#: in its emptiest corner: on a nebula whose sky is fainter away from its sources the
#: profile falls on and on, and one bright star added to the Galactic-centre MIPS frame
#: took the reach a ring further, onto 0.4% of its free blocks, and doubled its
#: pedestal (0.72 -> 1.45 sigma).
MIN_OUTER = 32
MIN_OUTER_SHARE = 0.005
#: Block (pixels) by which :func:`wing_pedestal`'s caller bins the residual: that of
#: :class:`WingMasker`'s default ``wing_scale``.
PEDESTAL_BLOCK = 4


def wing_sums(values, excluded, bad, b: int, origin=(0, 0), minus=None) -> np.ndarray:
    """Per ``b`` x ``b`` block: the sum and count of the ``values`` not ``excluded``,
    and the count of ``bad`` pixels, stacked as (3, gy, gx) float64. Each block is
    summed in one order wherever it lies, so tiles aligned to ``b`` give the whole
    image's sums bit for bit (the signature of a back end's ``cell_grid`` functions).
    ``minus``, if given, is subtracted from ``values`` first (:func:`block_sums`).

    Examples
    --------
    >>> v = np.ones((4, 4)); ex = np.zeros((4, 4), bool); ex[0, :2] = True
    >>> wing_sums(v, ex, ex, 2)[:, 0, 0]
    array([2., 2., 2.])
    """
    ny, nx = np.shape(values)
    out = np.zeros((3, -(-ny // b), -(-nx // b)))  # one allocation (memory)
    block_sums(values, excluded, b, minus=minus, out=out[:2])
    flags = np.asarray(bad, bool)
    if flags.any():  # most images and tiles have none: no pass for a count of zeros
        # the bad pixels' count: the count of what a mask of all but them leaves
        out[2] = block_sums(values, ~flags, b)[1]
    return out


def residual_sums(image, background, excluded, bad, b: int, origin=(0, 0)) -> np.ndarray:
    """:func:`wing_sums` of ``image - background`` (per tile, the signature of a back
    end's ``cell_grid`` functions).

    Examples
    --------
    >>> img = np.full((4, 4), 3.0); ex = np.zeros((4, 4), bool)
    >>> residual_sums(img, np.ones((4, 4)), ex, ex, 4)[:, 0, 0]
    array([32., 16.,  0.])
    """
    # in the image's dtype, as the loop's residuals (the sums are float64); bad pixels
    # (excluded) may be non-finite
    with np.errstate(invalid="ignore", over="ignore"):
        return wing_sums(image, excluded, bad, b, origin, minus=background)


def _block_noise(noise: Any, shape, b: int) -> np.ndarray | float:
    """The pixel noise at the centre of each block (a scalar stays a scalar)."""
    if np.ndim(noise) == 0 and not isinstance(noise, CoarseRMS):
        return float(noise)
    values, step = noise_grid(noise)
    if values.shape == (1, 1):
        return float(values[0, 0])
    gy, gx = -(-shape[0] // b), -(-shape[1] // b)
    ys = np.minimum((b * np.arange(gy) + b // 2) // step, values.shape[0] - 1)
    xs = np.minimum((b * np.arange(gx) + b // 2) // step, values.shape[1] - 1)
    return values[np.ix_(ys, xs)].astype(np.float64)


def _smooth(a: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    out = ndi.correlate1d(a, kernel, axis=1, mode="constant")
    return ndi.correlate1d(out, kernel, axis=0, mode="constant")


def wing_reach(mean, weight, dist, unit: float) -> float:
    """Distance (pixels) out to which the stacked ring profile still falls.

    ``mean``, ``weight``: the unmasked blocks' mean residual and pixel count; ``dist``:
    their distance in pixels from the nearest detection. Rings are ``unit`` wide out to
    4 units, then grow by a factor 1.5. Going outwards, a ring counts as still falling
    while its weighted mean exceeds that of all the blocks beyond it by more than
    ``FALL_SIGMA`` standard errors (from the scatter of the block means, so correlated
    noise and crowding are in it), and while at least ``MIN_OUTER`` blocks and
    ``MIN_OUTER_SHARE`` of all lie beyond it; the reach is the outer edge of the last
    such ring, 0 when the first does not.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> d = rng.uniform(1, 60, 20000)
    >>> m = 2.0 * np.exp(-d / 5.0) + rng.normal(0, 0.3, d.size)
    >>> 10 <= wing_reach(m, np.ones(d.size), d, 2.0) <= 40
    True
    >>> wing_reach(rng.normal(0, 0.3, d.size), np.ones(d.size), d, 2.0)
    0.0
    """
    mean, weight, dist = (np.ravel(np.asarray(a, np.float64)) for a in (mean, weight, dist))
    edges = _ring_edges(float(np.max(dist)) if dist.size else 0.0, unit)
    every = np.zeros(0, bool)
    return _reach(edges, _wk.ring_sums(mean, np.ones(1), weight, dist, every, edges))


def _ring_edges(top: float, unit: float) -> np.ndarray:
    """:func:`wing_reach`'s ring edges: ``unit`` wide out to 4 units, then growing by
    1.5, past ``top``."""
    edges = [0.0, unit, 2 * unit, 3 * unit, 4 * unit]
    while edges[-1] <= top:
        edges.append(edges[-1] * 1.5)
    return np.asarray(edges)


def _reach(edges, stats) -> float:
    """:func:`wing_reach` from the rings' sums (:func:`_wk.ring_sums`)."""
    w, s, s2, k = stats
    n = edges.size
    reach = 0.0
    fewest = max(MIN_OUTER, MIN_OUTER_SHARE * k.sum())  # k.sum(): all the free blocks
    for i in range(n - 1):
        wo, ko = w[i + 1 :].sum(), k[i + 1 :].sum()
        if ko < fewest:
            break
        if k[i] < 2:  # an empty ring (distances come in steps of a block)
            continue
        mi, mo = s[i] / w[i], s[i + 1 :].sum() / wo
        vi = max(s2[i] / w[i] - mi**2, 0.0) / k[i]
        vo = max(s2[i + 1 :].sum() / wo - mo**2, 0.0) / ko
        if mi - mo <= FALL_SIGMA * math.sqrt(vi + vo):
            break
        reach = float(edges[i + 1])
    return reach


def wing_step(sums, noise, shape, *, b: int, scale: float, threshold: float) -> np.ndarray:
    """The blocks (bool, binned by ``b``) that :class:`WingMasker` grows into, from the
    :func:`wing_sums` of the residual with the detections excluded.

    Blocks mostly excluded, not by bad pixels, are the detections; the others are
    grown into where the smoothed residual (Gaussian ``scale`` pixels, a normalised
    convolution of the unexcluded pixels) exceeds ``threshold`` times its noise (times
    the excess its scatter shows over white noise, from pair differences of blocks too
    far apart to correlate), within the :func:`wing_reach` of the detections, and
    connected to one.
    """
    num, cnt, _ = sums
    seeds, free = _seeds_free(sums, shape, b)
    if not seeds.any() or not free.any():
        return np.zeros(num.shape, bool)
    sigma = _block_noise(noise, shape, b)
    g = np.exp(-0.5 * (np.arange(-3 * math.ceil(scale / b), 3 * math.ceil(scale / b) + 1)
                       * b / scale) ** 2)  # fmt: skip
    g /= g.sum()
    smooth_num, var = _smooth(num, g), _smooth(cnt, g * g)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = smooth_num / (sigma * np.sqrt(var))
    snr[~free] = np.nan
    # the scatter of the block snr over white noise's, at least 1
    excess = max(1.0, noise_excess(snr, ~np.isfinite(snr), math.ceil(3.0 * scale / b)))
    dist, reach = _profile(sums, seeds, free, b)
    log.debug("wings: smoothed-noise excess %.3f, profile falls out to %g px", excess, reach)
    if reach <= 0:
        return np.zeros(num.shape, bool)
    near = free & (dist <= reach)
    with np.errstate(invalid="ignore"):
        above = snr > threshold * excess
    grown = _connected(near & above, seeds)
    log.debug("wings: %d blocks grown", int(grown.sum()))
    return grown


def _seeds_free(sums, shape, b: int, origin=(0, 0)):
    """The detections (blocks mostly excluded, not by bad pixels) and the free blocks
    (some pixel not excluded, not a detection) of :func:`wing_sums` (of the part of an
    image of ``shape`` whose first pixel is at ``origin``, on the blocks' grid)."""
    _, cnt, nbad = sums
    ny, nx = shape
    by, bx = (int(o) // b for o in origin)
    # pixels per block along each axis (partial blocks at the far edges), as float64
    hy = np.minimum(b, ny - b * np.arange(by, by + cnt.shape[0])).astype(np.float64)
    hx = np.minimum(b, nx - b * np.arange(bx, bx + cnt.shape[1])).astype(np.float64)
    return _wk.seeds_free(cnt, nbad, hy, hx)


#: :func:`pedestal_codes`' bits: a detection, a free block.
SEED, FREE = np.uint8(1), np.uint8(2)


def pedestal_codes(sums, shape, *, b: int, origin=(0, 0)) -> np.ndarray:
    """The blocks of :func:`wing_sums` as :data:`SEED` (a detection), :data:`FREE`
    (a free block) or 0, one byte each (uint8), for :func:`pedestal_of`: of the part of
    an image of ``shape`` whose first pixel is at ``origin`` (per tile, the tiles
    aligned to ``b``).

    Examples
    --------
    >>> sums = np.array([[[0.0, 5.0]], [[0.0, 16.0]], [[0.0, 0.0]]])
    >>> pedestal_codes(sums, (4, 8), b=4)
    array([[1, 2]], dtype=uint8)
    """
    seeds, free = _seeds_free(sums, shape, b, origin)
    return seeds.view(np.uint8) * SEED | free.view(np.uint8) * FREE


def pedestal_of(codes, read, rows, *, b: int) -> float:
    """:func:`wing_pedestal` from the blocks' :func:`pedestal_codes` (the whole grid)
    and their :func:`wing_sums` read in bands: ``read(k)`` gives band ``k``, the
    sums' block rows ``rows[k]`` = (r0, r1) (the bands in order, covering the grid;
    the sums and counts first). Only the codes and a band at a time are held: the
    tiled back end reads a band (a row of tiles) from the workers, and the sums of the
    whole grid never come to one place (:meth:`ArrayBackend.cell_grid_bands
    <skymap.backends.base.ArrayBackend.cell_grid_bands>`). Bit for bit the same
    whatever the bands.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> sums = np.stack([rng.normal(0, 4, (64, 64)), np.full((64, 64), 16.0),
    ...                  np.zeros((64, 64))])
    >>> sums[1, ::8, ::8] = 0  # detections
    >>> codes = pedestal_codes(sums, (256, 256), b=4)
    >>> halves = [(0, 32), (32, 64)]
    >>> pedestal_of(codes, lambda k: sums[:, slice(*halves[k])], halves, b=4) == (
    ...     wing_pedestal(sums, (256, 256), b=4))
    True
    """
    codes = np.asarray(codes)
    seeds = (codes & SEED) != 0
    if not seeds.any() or not np.any(codes & FREE):
        return 0.0

    def band(r0, r1):
        """The free blocks of rows r0:r1 and their distances."""
        return (codes[r0:r1] & FREE) != 0, _wk.distances(seeds, b, rows=(r0, r1))

    # the rings reach past the farthest free block (a first pass; the distances of a
    # band are made again in the second, which costs less than keeping them, but for
    # one band)
    kept = band(*rows[0]) if len(rows) == 1 else None
    top = max(
        float(np.max(d, where=f, initial=0.0))
        for f, d in ([kept] if kept is not None else (band(*r) for r in rows))
    )
    edges = _ring_edges(top, float(b))
    stats = np.zeros((5, edges.size))
    for k, r in enumerate(rows):
        free, dist = kept if kept is not None else band(*r)
        sums = read(k)
        num, cnt = sums[0], sums[1]
        _wk.ring_sums(num.ravel(), cnt.ravel(), cnt.ravel(), dist.ravel(), free.ravel(),
                      edges, stats)  # fmt: skip
    reach = _reach(edges, stats[:4])
    if reach <= 0:
        return 0.0
    # the free blocks beyond the reach (rings start at its edge): the sky alone
    beyond = edges >= reach
    level = float(stats[4, beyond].sum() / stats[0, beyond].sum())
    log.debug("wing pedestal: profile falls out to %g px, sky beyond it at %.4g", reach, level)
    return max(0.0, -level)


def _profile(sums, seeds, free, b: int):
    """The blocks' distance (pixels) from the nearest detection, and the
    :func:`wing_reach` of the free blocks' stacked profile (their mean residual,
    weighted by their pixel counts), read from the grids in one pass."""
    num, cnt, _ = sums
    dist = _wk.distances(seeds, b)  # scipy's exact transform, without its indices
    edges = _ring_edges(float(np.max(dist, where=free, initial=0.0)), float(b))
    stats = _wk.ring_sums(num.ravel(), cnt.ravel(), cnt.ravel(), dist.ravel(), free.ravel(), edges)
    return dist, _reach(edges, stats)


def wing_pedestal(sums, shape, *, b: int) -> float:
    """How far a background sits above the sky that the free pixels beyond the wings'
    reach show, from the :func:`wing_sums` of its residual with the final mask
    excluded (0 when the profile does not fall, or that sky is not below it).

    Source light falls off with distance from its source and sky does not know where
    the sources are, so beyond the distance out to which the stacked ring profile of
    the free blocks still falls (:func:`wing_reach`), the free pixels hold sky alone.
    A fit through all the free pixels takes in the wings nearer the detections (and
    the sources too faint to detect, that crowd around them): its residual beyond the
    reach is negative by that pedestal. The profile is the whole frame's, so the
    pedestal is one number for the frame, and sky structure that no profile ties to
    the detections (a broad bump, a gradient) moves it no more than it moves the
    free pixels' mean level beyond the reach. It only ever lowers the fit: source
    light left unmasked only ever raises it.

    Examples
    --------
    Exponential wings around point sources on a flat sky of 0, the residual of a fit
    that took in 0.2 of their light: the pedestal brings it back.

    >>> rng = np.random.default_rng(1)
    >>> yy, xx = np.mgrid[:512, :512]
    >>> light = np.zeros((512, 512)); mask = np.zeros((512, 512), bool)
    >>> for y, x in rng.uniform(20, 492, (40, 2)):
    ...     r = np.hypot(yy - y, xx - x)
    ...     light += 3.0 * np.exp(-r / 5.0); mask |= r < 6
    >>> res = light - 0.2 + rng.normal(0, 0.3, light.shape)
    >>> ped = wing_pedestal(wing_sums(res, mask, np.zeros_like(mask), 4), res.shape, b=4)
    >>> bool(0.15 < ped < 0.25)
    True
    """
    sums = np.asarray(sums)
    codes = pedestal_codes(sums, shape, b=b)
    return pedestal_of(codes, lambda k: sums, [(0, codes.shape[0])], b=b)


def _connected(grow: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The pixels of ``grow`` 8-connected to ``seeds`` (through ``grow``)."""
    lab, _ = ndi.label(grow | seeds, structure=np.ones((3, 3), bool))
    keep = np.zeros(lab.max() + 1, bool)
    keep[lab[seeds]] = True
    keep[0] = False
    return keep[lab] & grow


@dataclass(frozen=True, kw_only=True)
class WingMasker(HysteresisMasker):
    """:class:`~skymap.masking.hysteresis.HysteresisMasker` whose detections are then
    grown into the faint light around and between them (see the module docstring).

    Parameters
    ----------
    wing_scale : float
        Gaussian sigma (pixels) at which the faint light is sought; the step runs on
        blocks of the largest power of two <= it.
    wing_threshold : float
        In units of the noise left after that smoothing (times its measured excess).
    (the others)
        As for :class:`~skymap.masking.hysteresis.HysteresisMasker`.

    References
    ----------
    Akhlaghi, M. & Ichikawa, T. 2015, ApJS 220, 1,
    https://doi.org/10.1088/0067-0049/220/1/1.

    Examples
    --------
    A source with exponential wings: the growth reaches further than the plain masker,
    and empty sky far from it stays free.

    >>> rng = np.random.default_rng(2)
    >>> yy, xx = np.mgrid[:256, :256]
    >>> r = np.hypot(yy - 128, xx - 128)
    >>> img = 6.0 * np.exp(-r / 6.0) + rng.normal(size=r.shape)
    >>> plain = HysteresisMasker()(img, 1.0)
    >>> deep = WingMasker()(img, 1.0)
    >>> bool(deep.sum() > plain.sum()), bool(deep[r > 80].mean() < 0.01)
    (True, True)
    """

    wing_scale: float = 4.0
    wing_threshold: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_positive("wing_scale", self.wing_scale)
        check_positive("wing_threshold", self.wing_threshold)

    def wing_block(self, shape) -> int:
        """The block (pixels) the wing step bins the residual by."""
        return self.binning(self.wing_scale, shape)

    def tile_unit(self, shape) -> tuple[int, int]:
        unit = math.lcm(super().tile_unit(shape)[0], self.wing_block(shape))
        return unit, unit

    def __call__(self, residual: Any, rms: Any = None, mask: Any = None) -> np.ndarray:
        """Source mask (True = source) of ``residual``, not OR-ed with ``mask``."""
        res = as_image(residual, "residual")
        given = as_mask(mask, res.shape)
        out = self.mask_with(res, rms, given)
        out &= np.isfinite(res)
        if given is not None:
            np.greater(out, given, out=out)
        return out

    def mask_with(self, residual: Any, rms: Any = None, mask: Any = None) -> np.ndarray:
        """``mask | self(residual, rms, mask)``, a new array."""
        res = as_image(residual, "residual")
        given = as_mask(mask, res.shape)
        excluded = super().mask_with(res, rms, given)
        bad = ~np.isfinite(res) if given is None else given | ~np.isfinite(res)
        b = self.wing_block(res.shape)
        sums = wing_sums(res, excluded, bad, b)
        if rms is None:
            rms = residual_rms(res, excluded)
        det = self._step(sums, rms, res.shape)
        return _hk.expand_mask_into(det, b, excluded)

    def mask_on(self, backend, residual, noise, excluded, window_of):
        """:meth:`HysteresisMasker.mask_on`, then the wing step on the block sums the
        tiles give (the same as in memory, bit for bit), painted per tile."""
        excluded = super().mask_on(backend, residual, noise, excluded, window_of)
        shape = backend.shape
        b = self.wing_block(shape)
        sums = backend.cell_grid(wing_sums, [residual, excluded, backend.bad], (b, b), 3, b=b)
        det = self._step(sums, noise, shape)
        (out,) = backend.persist(
            backend.map_tiles(_tile_expand, [excluded], dtype=bool, det=det, b=b)
        )
        return out

    def _step(self, sums, noise, shape) -> np.ndarray:
        return wing_step(
            sums, noise, shape, b=self.wing_block(shape), scale=self.wing_scale,
            threshold=self.wing_threshold,
        )  # fmt: skip


def _tile_expand(excluded, *, window, core, det, b):
    """A tile's exclusion OR the wing blocks over it (tiles align to ``b``)."""
    (r0, r1), (c0, c1) = core
    sub = det[r0 // b : -(-r1 // b), c0 // b : -(-c1 // b)]
    core_excl = excluded[r0 - window[0][0] : r1 - window[0][0],
                         c0 - window[1][0] : c1 - window[1][0]]  # fmt: skip
    # written in one pass into a new block (the exclusion's is persisted: never written)
    return _hk.expand_mask_into(sub, b, np.empty(core_excl.shape, bool), src=core_excl)
