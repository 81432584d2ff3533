"""What an injection score cannot see: the sky a fit leaves in its residual.

Injection-recovery (:mod:`skymap.quality.injection`) scores what a fit does to signal
*added* to a real image: the fit of the image itself cancels from every score. So a
method that does not follow the image's own sky (a nebula, dust lanes, a galaxy
filling the frame) loses nothing there, and a stiff one wins ``leak``: the fixed 64-px
meshes of photutils and SEP beat skymap's injection scores on such frames while their
residual keeps 1-5 sigma of structure in 16-px blocks that skymap's does not
(``benchmarks/README.md``, thirteenth wave).

:func:`structure_left` measures that: the RMS, above the noise, of the 16-px block
means of ``image - background`` over pixels no bright source reaches
(:func:`free_pixels`, by a rule of no fitting method's: the pixels more than 5 sigma
above a coarse median sky, grown by 3 px, are out). A background that misses sky
structure leaves it there. It is not a score to minimise: the faint light of sources
below that cut (a crowded field's wings, a galaxy's outskirts) is in those pixels too,
so a background that stays out of it leaves it there and one that takes it in (a worse
``leak``) leaves less: on the shared crowded frames skymap's fit leaves more than the
peers' (M6707HH 1.27 against 0.78-0.97 sigma), on frames filled by emission far less
(HorseHead 1.05 against 2.3-2.6). Read it with ``leak``. Correlated noise adds the same
floor to every method.
"""

from __future__ import annotations

import numpy as np
from astropy.nddata import block_reduce
from scipy import ndimage as ndi

from skymap.background.cells import reference_level, reference_step
from skymap.masking.bright import filled_blocks, sky_blocks

__all__ = ["BLOCK", "free_pixels", "structure_left"]

#: Block width (pixels) of :func:`structure_left`: twice the default masker's largest
#: scale, and under the smallest injected sky bump of a 256-px frame (5% = 13 px
#: sigma).
BLOCK = 16

#: The coarse sky of :func:`free_pixels`: medians of blocks this wide (half
#: SExtractor's default mesh, unfiltered, so that a sky bump's crest does not pass for
#: a source), interpolated bilinearly.
SKY_BLOCK = 32

#: A source pixel of :func:`free_pixels` is this many sigma above the coarse sky: well
#: above the noise's tail (which 3 sigma, grown by 3 px, turned into 5% of a frame).
SOURCE_SIGMA = 5.0


def free_pixels(image, bad, sigma: float) -> np.ndarray:
    """Pixels that no source reaches, by a rule of no fitting method's: valid, and not
    within 3 px of a pixel more than 5 ``sigma`` above the coarse sky (the medians of
    32-px blocks, as the halo masker's coarse sky takes them, interpolated bilinearly).

    Examples
    --------
    >>> img = np.zeros((128, 128)); img[60:64, 60:64] = 10.0
    >>> free = free_pixels(img, np.zeros(img.shape, bool), 1.0)
    >>> bool(free[0, 0]), bool(free[62, 62]), bool(free[62, 66]), bool(free[62, 68])
    (True, False, False, True)
    """
    img = np.asarray(image, dtype=np.float64)
    bad = np.asarray(bad, dtype=bool) | ~np.isfinite(img)
    if bad.all():
        return ~bad
    # about zero before the block medians (taken in float32): a large offset must not
    # round away the noise
    step = reference_step(img.shape)
    ref = reference_level(img[::step, ::step], bad[::step, ::step])
    img = img - (img[~bad][0] if ref is None else ref)
    ny, nx = img.shape
    b = SKY_BLOCK
    grid = filled_blocks(sky_blocks(img, bad, b))
    gy, gx = grid.shape
    # bilinear between block centres (the edges held), so that a broad sky
    # bump's crest is not cut off as a source
    yc = np.clip((np.arange(ny) + 0.5) / b - 0.5, 0, gy - 1)
    xc = np.clip((np.arange(nx) + 0.5) / b - 0.5, 0, gx - 1)
    sky = ndi.map_coordinates(grid, np.meshgrid(yc, xc, indexing="ij"), order=1)
    with np.errstate(invalid="ignore"):
        source = ~bad & (img - sky > SOURCE_SIGMA * sigma)
    source = ndi.binary_dilation(source, iterations=3)
    return ~bad & ~source


def structure_left(residual, free, sigma: float, block: int = BLOCK) -> float:
    """The RMS of the ``block`` x ``block`` means of ``residual`` over the ``free``
    pixels, above what white noise of pixel ``sigma`` gives them, in units of
    ``sigma`` (blocks with at least half their pixels free; NaN with fewer than 4).

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> noise = rng.normal(size=(256, 256))
    >>> free = np.ones(noise.shape, bool)
    >>> round(structure_left(noise, free, 1.0), 2)
    0.0
    >>> yy = np.mgrid[:256, :256][0]
    >>> round(structure_left(noise + np.sin(yy / 20.0), free, 1.0), 1)  # RMS of a sine
    0.7
    """
    res = np.asarray(residual, dtype=np.float64)
    ok_px = np.asarray(free, dtype=bool) & np.isfinite(res)
    if min(res.shape) < block:
        return float("nan")
    # block sums (the trailing rows and columns that fill no block are dropped)
    total = block_reduce(np.where(ok_px, res, 0.0), block)
    count = block_reduce(ok_px.astype(np.float64), block)
    keep = count >= block * block / 2.0
    if np.count_nonzero(keep) < 4:
        return float("nan")
    means = total[keep] / count[keep]
    spread = np.mean((means - np.median(means)) ** 2) - np.mean(sigma**2 / count[keep])
    return float(np.sqrt(max(spread, 0.0)) / sigma)
