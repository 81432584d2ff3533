"""Does the background know where the masks are? The source-tracking statistic the
pipeline uses to decide how stiff its smoothing must be.

Sky structure, however complex, does not know where the sources are: scattered light,
cirrus, a nebula or a detector's vignetting lie wherever they lie, and the sources of
the field are scattered over them independently. So a background that departs from a
stiffer fit of the same cells in step with the masked share is wrong in one of two
ways:

* higher where the masks are: it follows source light left in the unmasked pixels (the
  faint outskirts of galaxies, the wings of stars, a faint disc whose core was all that
  was detected, intracluster light);
* lower where the masks are: it bends into the masked holes, which are too large for
  its smoothing to bridge.

Both call for a longer smoothing. :func:`source_tracking` measures the correlation
between the fit minus a fit ``stiffer`` times longer and the masked share of the cells,
smoothed over the fit's own length. It is near 0 (within about ``1 / sqrt(n_eff)``)
for sky that is independent of the sources, whatever its shape; bumps and dips need
not balance (which the earlier bump-versus-dip asymmetry test assumed, wrongly for a
scattered-light bump or a halo).

The premise fails where sources cluster on bright sky (stars and knots on a nebula's
filaments) or where the masker takes the sky's own sharp structure for sources: masks
and sky then correlate, and a stiffer fit would cut through sky that is there. What
tells the two apart is the sign of what the stiffer fit leaves in the unmasked data:
source light only adds to the sky, so it leaves departures on one side (above, near
the sources, and a shallow skirt below); sky structure that the stiffer fit cannot
follow leaves extended departures both above and below, far beyond the noise. When
both tails of the unmasked data about the stiffer fit, smoothed over the fit's length,
reach past ``structure_limit`` times the pixel noise, the test reports sky
(``TrackingTest.sky``) and does not ask for stiffening.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

__all__ = ["TrackingTest", "source_tracking"]


@dataclass(frozen=True, kw_only=True)
class TrackingTest:
    """What :func:`source_tracking` measured: the correlation and the limit it is
    compared with; ``tracking`` is True when the correlation's size is above the
    limit (either sign: source light followed, or masked holes bent into), unless
    ``sky`` says the stiffer fit would cut through sky structure."""

    correlation: float
    limit: float
    #: The smaller of the two tails (5th and 95th percentiles, in pixel noise) of the
    #: unmasked data about the stiffer fit, smoothed over the fit's length: how far
    #: beyond the noise the sky departs from the stiffer fit on BOTH sides.
    structure: float = float("nan")
    structure_limit: float = float("inf")

    @property
    def sky(self) -> bool:
        """Sky structure the stiffer fit cannot follow, above and below it: the
        correlation may come from sources that cluster on that sky."""
        return bool(self.structure > self.structure_limit)

    @property
    def tracking(self) -> bool:
        return bool(abs(self.correlation) > self.limit) and not self.sky


def source_tracking(
    model,
    valid,
    *,
    stiffer: float = 8.0,
    floor: float = 0.1,
    significance: float = 3.0,
    structure_limit: float = 1.0,
) -> TrackingTest:
    """Correlation between where a thin-plate background departs from a stiffer fit and
    where its masks are.

    Parameters
    ----------
    model : SmoothResult
        A :class:`~skymap.background.smooth.ThinPlateSmoother` fit: its cells, their
        unmasked pixel counts (``cell_pixels``) and its smoothing.
    valid : ndarray
        Per cell of ``model``'s grid, the number of pixels that are neither given as
        bad nor non-finite: the masked share of a cell is ``1 - cell_pixels / valid``,
        so that a border of blank pixels is not mistaken for sources.
    stiffer : float
        The reference fit's smoothing length, in units of the model's.
    floor, significance : float
        The limit the correlation is compared with: the larger of ``floor`` and
        ``significance / sqrt(n_eff)``, ``n_eff`` being the number of independent
        patches of the fit's length (the correlation's scatter for sky unrelated to
        the sources is about ``1 / sqrt(n_eff)``).
    structure_limit : float
        In units of the pixel noise (the median of the fit's ``rms_grid``): when the
        unmasked cells' departures from the stiffer fit, smoothed over the fit's
        length, reach past this both above (95th percentile) and below (5th), the
        sky has structure the stiffer fit cannot follow and ``.tracking`` is False.
        Smoothed over the fit's length, noise alone departs by a few hundredths of a
        sigma; source light left in the unmasked pixels departs on one side.

    Returns
    -------
    TrackingTest
        ``.correlation`` and ``.limit``; ``.tracking`` says whether the background knows
        where the masks are (``abs(correlation) > limit``). The correlation is NaN (and
        ``.tracking`` False) when fewer than 16 cells hold valid pixels or nothing
        varies.

    Examples
    --------
    >>> from skymap.background.smooth import ThinPlateSmoother
    >>> rng = np.random.default_rng(0)
    >>> yy, xx = np.mgrid[:256, :256]
    >>> centres = rng.uniform(20, 236, (12, 2))
    >>> disc = sum(2 * np.exp(-np.hypot(yy - y, xx - x) / 10) for y, x in centres)
    >>> img = rng.normal(size=(256, 256)) + disc
    >>> valid = np.full(ThinPlateSmoother().fit(img).grid.shape, 4.0)
    >>> mask = disc > 1.0  # the discs' cores are masked, their outskirts are not
    >>> source_tracking(ThinPlateSmoother().fit(img, mask), valid).tracking
    True
    >>> sky = 3 * np.sin(xx / 20.0) + rng.normal(size=(256, 256))
    >>> source_tracking(ThinPlateSmoother().fit(sky, mask), valid).tracking
    False
    """
    n = np.asarray(model.cell_pixels, dtype=float)
    valid = np.asarray(valid, dtype=float)
    if valid.shape != n.shape:
        raise ValueError(f"valid must have the model's grid shape {n.shape}, got {valid.shape}")
    ok = valid > 0
    if np.count_nonzero(ok) < 16:
        return TrackingTest(correlation=float("nan"), limit=floor)
    cy, cx = model.cell_size
    # a correlation of two smooth maps needs no tighter solve than this
    stiff = model.stiffer_grid(stiffer, rtol=1e-4)
    d = (np.asarray(model.grid) - stiff)[ok]
    # The masked share, smoothed over the fit's length by normalised convolution over
    # the valid cells: what the fit at a cell "sees" of the masks around it.
    share = np.where(ok, 1.0 - np.minimum(n, valid) / np.where(ok, valid, 1.0), 0.0)
    sigma = (model.scale / (2.0 * cy), model.scale / (2.0 * cx))
    num = ndi.gaussian_filter(share, sigma, mode="nearest")
    den = ndi.gaussian_filter(ok.astype(float), sigma, mode="nearest")
    fs = (num / np.maximum(den, 1e-12))[ok]
    n_eff = max(1.0, np.count_nonzero(ok) * cy * cx / (math.pi * model.scale**2))
    limit = max(floor, significance / math.sqrt(n_eff))
    if d.std() <= 0 or fs.std() <= 0:
        return TrackingTest(correlation=float("nan"), limit=limit)
    return TrackingTest(
        correlation=float(np.corrcoef(d, fs)[0, 1]),
        limit=limit,
        structure=_structure(model, stiff, ok, sigma),
        structure_limit=structure_limit,
    )


def _structure(model, stiff, ok, sigma) -> float:
    """The smaller of the two tails of the unmasked cell means about ``stiff``,
    smoothed over the fit's length (``sigma`` in cells, weighted by pixel counts), in
    units of the median pixel noise: 0 when either side stays within the noise."""
    n = np.where(ok, np.asarray(model.cell_pixels, dtype=float), 0.0)
    has = n > 0
    r = np.where(has, np.asarray(model.cell_values, dtype=float) - stiff, 0.0)
    num = ndi.gaussian_filter(r * n, sigma, mode="nearest")
    den = ndi.gaussian_filter(n, sigma, mode="nearest")
    noise = float(np.median(np.asarray(model.rms_grid)[has])) if has.any() else 0.0
    if not noise > 0:
        return float("nan")
    low, high = np.percentile((num / np.maximum(den, 1e-12))[has] / noise, [5.0, 95.0])
    return float(max(0.0, min(-low, high)))
