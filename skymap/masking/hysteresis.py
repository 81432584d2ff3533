"""The pipeline's masker: multi-scale matched filtering with hysteresis thresholds in
units of the smoothed noise (:class:`HysteresisMasker`), and :class:`CoarseRMS`, the
slowly varying noise map it reads.

Each scale's work is split into a global statistic (the noise excess, from the
signal-to-noise map's pair differences), local hysteresis codes, and a global
labelling followed by a local dilation (:meth:`HysteresisMasker.scale_mask`,
:meth:`HysteresisMasker._detect_sampled`), so that the dask back end can do the local
steps tile by tile (:meth:`HysteresisMasker.mask_on`: the pairs from the sampled rows
and columns of each tile, the codes from the fused pass). It follows the
:class:`skymap.masking.Masker` protocol.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from scipy.special import ndtri

from skymap._select_kernels import median_mad32
from skymap._util import MAD_TO_STD, pow2_at_most
from skymap._validate import as_image, as_mask, check_positive
from skymap.backends.dask import core_of
from skymap.backends.windows import Pieces
from skymap.masking import _hysteresis_kernels as _k
from skymap.masking.maskers import disk_footprint, grow_mask

__all__ = ["CoarseRMS", "HysteresisMasker"]

log = logging.getLogger(__name__)


def _block_sum(a: np.ndarray, b: int) -> np.ndarray:
    return a if b == 1 else _k.block_sum(a, b)


# Large outputs of the kernels are allocated here, by numpy, and passed in: numpy
# asks for huge pages for big arrays and numba does not, and on the machines we
# measured the page faults of fresh memory cost as much as the arithmetic.


def _dog_work(shape, r, strip=64):
    """How dog_snr sweeps the rows: ``(bands, strip)``, a few bands per thread
    (balance), each swept in strips of ``strip`` rows through one small x-pass buffer
    per thread."""
    return max(1, min(-(-shape[0] // strip), 4 * numba.get_num_threads())), strip


def masked_block_sums(values, excluded, b):
    """Sums and counts of the values not ``excluded`` in ``b`` x ``b`` blocks (float32
    maps of the binned shape; partial blocks at the far edges sum what they hold).
    A power of two above 2 sums the 2 x 2 sums, halved in turn (:func:`halved_sums`),
    so that a coarser scale's sums can come from a finer scale's without reading the
    image again (:class:`_SumsChain`), equal bit for bit."""
    if b > 2 and _pow2(b):
        return halved_sums(*masked_block_sums(values, excluded, 2), b // 2)
    shape = (-(-values.shape[0] // b), -(-values.shape[1] // b))
    num, cnt = np.empty(shape, np.float32), np.empty(shape, np.float32)
    return _k.masked_block_sums(values, excluded, b, num, cnt)


def halved_sums(num, cnt, f: int):
    """The block sums ``num``, ``cnt`` summed over 2 x 2 blocks until they are ``f``
    (a power of two) times coarser."""
    while f > 1:
        num, cnt, f = _k.block_sum(num, 2), _k.block_sum(cnt, 2), f // 2
    return num, cnt


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


class _SumsChain:
    """The binned scales of one masking call, from a finer to a coarser one, without
    re-reading the full-resolution image and mask at each (:meth:`HysteresisMasker._excluded`).

    A binned scale's (dilated) detections cover whole blocks of its grid, so the next
    scale's masked block sums are this scale's with the detected blocks set to zero,
    summed 2 x 2 (what :func:`masked_block_sums` computes from the image once the
    detections are excluded, bit for bit); and no later binned scale reads the
    full-resolution mask, so the detections are gathered on the first binned grid and
    OR-ed into it once (:meth:`flush`), before a scale that reads it (unbinned, or
    whose blocks the chain cannot make) or at the end."""

    def __init__(self, into: np.ndarray):
        self.into = into
        self.b = self.num = self.cnt = None
        self.b0 = self.found = None

    def start(self, b: int, num, cnt) -> None:
        """Start from ``num``, ``cnt``: the masked sums of blocks ``b`` of the image
        with the mask as it is."""
        self.b, self.num, self.cnt = b, num, cnt

    def sums(self, b: int):
        """(num, cnt) of binning ``b`` from the chain, or None (after a :meth:`flush`:
        the caller sums the image)."""
        if self.num is not None and b >= self.b and b % self.b == 0 and _pow2(b // self.b):
            sums = halved_sums(self.num, self.cnt, b // self.b)
            # The finer sums go (memory): the scale adds its own.
            self.num = self.cnt = None
            return sums
        self.flush()
        return None

    def add(self, b: int, num, cnt, det) -> None:
        """Scale of binning ``b`` done: its sums ``num``, ``cnt`` (zeroed in place where
        its dilated binned detections ``det`` are) go on, ``det`` is kept (the chain
        takes it over and may OR into it: the caller hands a map of its own)."""
        if self.found is not None and not (b % self.b0 == 0 and _pow2(b // self.b0)):
            self.flush()
        _k.zero_where(num, cnt, det)
        if self.found is None:
            self.b0, self.found = b, det
        else:
            _k.expand_mask_into(det, b // self.b0, self.found)
        self.b, self.num, self.cnt = b, num, cnt

    def paint(self) -> None:
        """OR the gathered detections, if any, into the full-resolution mask (a
        :meth:`flush`); without any, the sums the chain holds stay."""
        if self.found is not None:
            self.flush()

    def flush(self) -> None:
        """OR the gathered detections into the full-resolution mask; the chain restarts."""
        if self.found is not None:
            _k.expand_mask_into(self.found, self.b0, self.into)
        self.b = self.num = self.cnt = None
        self.b0 = self.found = None


def _disk_offsets(radius: float) -> np.ndarray:
    """The (dy, dx) offsets of :func:`disk_footprint` ``(radius)``, shape (k, 2)."""
    foot = disk_footprint(radius)
    return np.argwhere(foot) - foot.shape[0] // 2


def _dilate_disk(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation by a small disk, as shifted ORs (cheaper than a generic
    structuring-element pass for the few offsets of a small disk)."""
    out = mask.copy()
    ny, nx = mask.shape
    for dy, dx in _disk_offsets(radius):
        if dy == 0 and dx == 0:
            continue
        out[max(0, dy) : ny + min(0, dy), max(0, dx) : nx + min(0, dx)] |= mask[
            max(0, -dy) : ny + min(0, -dy), max(0, -dx) : nx + min(0, -dx)
        ]
    return out


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(3.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return (g / g.sum()).astype(np.float32)


def _separable(a: np.ndarray, kernel: np.ndarray, out=None) -> np.ndarray:
    """``a`` correlated with ``kernel`` along x then y into ``out`` (which may be ``a``
    itself)."""
    out = np.empty(a.shape, np.float32) if out is None else out
    return _k.gaussian_separable(a, kernel, out)


def _noise_step(shape) -> int:
    """Row/column stride of the pairs :func:`_pair_differences` samples: about 250 000
    pairs, so that the MAD is good to ~0.3% and the medians stay cheap."""
    return max(1, (shape[0] * shape[1]) // 125_000)


def _pair_differences(snr, excluded, lag: int, step: int):
    """Differences of unexcluded pixels ``lag`` apart, along x on every ``step``-th
    row, then along y on every ``step``-th column: far enough apart to be independent,
    they cancel any smooth offset or wing the background has not followed yet, and
    their MAD (:func:`_excess_of`) ignores the sources that touch a minority of the
    pairs. The tiled path (:meth:`HysteresisMasker.mask_on`) gathers the same pairs tile by
    tile."""
    return _pairs_of(snr[::step], excluded[::step], snr[:, ::step], excluded[:, ::step], lag)


def _pairs_of(rows, rows_bad, cols, cols_bad, lag: int):
    """:func:`_pair_differences` from the sampled rows and columns of the maps only."""
    parts = []
    if lag < rows.shape[1]:
        d = rows[:, lag:] - rows[:, :-lag]
        parts.append(d[~(rows_bad[:, lag:] | rows_bad[:, :-lag])])
    if lag < cols.shape[0]:
        d = cols[lag:] - cols[:-lag]
        parts.append(d[~(cols_bad[lag:] | cols_bad[:-lag])])
    return parts


def _samples_pay(shape, b: int) -> bool:
    """Whether :meth:`HysteresisMasker._detect_sampled` is used at binning ``b``: when
    the binned maps hold 2^22 pixels or more (16 MB each), where the sampled rows and
    columns (:func:`_sampled_snr`: stacks of ``2 r + 1`` every :func:`_noise_step`,
    at least 33) cost a fraction of a pass."""
    return -(-shape[0] // b) * -(-shape[1] // b) >= 1 << 22


def _sampled_snr(inputs, ys, xs):
    """``(snr[ys], snr[:, xs])`` of :func:`_k.dog_snr`'s maps, from their ``inputs``
    (:meth:`HysteresisMasker._dog_inputs`), computed at those pixels only
    (:func:`_k.dog_sampled`): the same float32 values as the full maps there."""
    num, cnt, direct, g, local, bw, sigma, q, b = inputs
    return _k.dog_sampled(
        num, num if cnt is None else cnt, direct, g, g * g, local, bw, sigma, b, q, ys, xs
    )


def _dog_codes(inputs, factor, masker):
    """The hysteresis codes (uint8: 2 seed, 1 growth, 0 neither) of :func:`_k.dog_snr`'s
    maps divided by ``factor``, from their ``inputs`` in the same fused pass
    (:func:`_k.dog_codes`), without the float maps."""
    num, cnt, direct, g, local, bw, sigma, q, b = inputs
    return _k.dog_codes(
        num, num if cnt is None else cnt, direct, g, g * g, local, bw, sigma, b, q,
        factor, masker.low, masker.high, masker.grow_plain, np.empty(num.shape, np.uint8),
        _dog_work(num.shape, g.size // 2),
    )  # fmt: skip


def _excess_of(parts, white: float) -> float:
    """Scatter of a signal-to-noise map relative to ``white`` (the scatter it has for
    white noise of the stated rms), from the MAD of its pair differences ``parts``; 1.0
    when fewer than 200 pairs are left."""
    d = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if d.size < 200:
        return 1.0
    if d.dtype == np.float32 and np.isfinite(d).all():
        # numpy's medians bit for bit, at a quarter of the cost (12 a fit)
        mad = float(median_mad32(d)[1])
    else:
        mad = float(np.median(np.abs(d - np.median(d))))
    return MAD_TO_STD * mad / math.sqrt(2.0) / white


def residual_rms(residual: np.ndarray, excluded: np.ndarray) -> float:
    """The rms a masker assumes when it is given none: the MAD-based sigma of the
    ``residual`` pixels not ``excluded`` (1.0 when there are none).

    Examples
    --------
    >>> r = np.random.default_rng(0).normal(0, 2, (100, 100))
    >>> round(residual_rms(r, np.zeros(r.shape, bool)), 1)
    2.0
    """
    v = residual[~excluded]
    return MAD_TO_STD * float(np.median(np.abs(v - np.median(v)))) if v.size else 1.0


def noise_excess(snr, excluded, lag: int, step: int = 1, white: float = 1.0) -> float:
    """Scatter of the signal-to-noise map ``snr`` over ``white`` (its scatter for white
    noise of the stated rms), from the MAD of the differences of pixels not
    ``excluded``, ``lag`` apart along x on every ``step``-th row and along y on every
    ``step``-th column (:func:`_pair_differences`); 1.0 with fewer than 200 pairs.

    Examples
    --------
    >>> snr = np.random.default_rng(0).normal(size=(200, 200))
    >>> round(noise_excess(snr, np.zeros(snr.shape, bool), 5), 1)
    1.0
    """
    return _excess_of(_pair_differences(snr, excluded, lag, step), white)


def _hysteresis(snr: np.ndarray, low: float, high: float, grow=None) -> np.ndarray:
    """Connected regions (8-connected) of ``grow`` (default ``snr``) above ``low`` that
    hold a pixel of ``snr`` above ``high``."""
    grow = snr if grow is None else grow
    # One byte a pixel (seed / above low / neither) is all the flood fill needs: at
    # full resolution the separate seed and growth masks would sit on top of the maps.
    codes = _k.hysteresis_codes(
        snr, grow, np.float32(low), np.float32(high), np.empty(snr.shape, np.uint8)
    )
    return _k.flood_seeded(codes).view(bool)


@dataclass(frozen=True, kw_only=True, eq=False)
class CoarseRMS:
    """A slowly varying rms map held at one value per ``step`` x ``step`` block of an
    image of ``shape``: ``values[i, j]`` is the rms at the centre of block (i, j).

    The pipeline hands the maskers its noise this way: a smoothed noise map varies over
    many pixels, and the full-resolution map (an image of memory, and a pass to
    interpolate it) is not needed to threshold a signal-to-noise map.
    :class:`HysteresisMasker` reads it as it is; ``np.asarray`` expands it to the
    full shape (nearest block) for any other masker.

    Examples
    --------
    >>> c = CoarseRMS(values=np.array([[1.0, 2.0]]), step=2, shape=(2, 3))
    >>> np.asarray(c)
    array([[1., 1., 2.],
           [1., 1., 2.]])
    """

    values: np.ndarray
    step: int
    shape: tuple[int, int]

    def __post_init__(self):
        if int(self.step) != self.step or self.step < 1:
            raise ValueError(f"step must be an integer >= 1, got {self.step!r}")
        shape = tuple(int(n) for n in self.shape)
        want = tuple(-(-n // int(self.step)) for n in shape)
        values = np.asarray(self.values)
        if values.shape != want:
            raise ValueError(
                f"values must have shape {want} (shape {shape} in blocks of {self.step}), "
                f"got {values.shape}"
            )
        object.__setattr__(self, "shape", shape)

    def __array__(self, dtype=None, copy=None):
        q = int(self.step)
        ny, nx = self.shape
        full = np.repeat(np.repeat(np.asarray(self.values), q, axis=0), q, axis=1)[:ny, :nx]
        return full if dtype is None else full.astype(dtype, copy=False)


def noise_grid(noise) -> tuple[np.ndarray, int]:
    """(values, step) for the kernels from a scalar, a full map or a CoarseRMS."""
    if isinstance(noise, CoarseRMS):
        return np.ascontiguousarray(noise.values, dtype=np.float32), int(noise.step)
    values = np.asarray(noise, dtype=np.float32)
    return values.reshape(values.shape or (1, 1)), 1


@dataclass(frozen=True, kw_only=True)
class HysteresisMasker:
    """Multi-scale matched-filter detection with hysteresis, thresholds in units of the
    smoothed noise.

    At each Gaussian scale ``s`` (pixels, small to large) the residual is smoothed by
    normalised convolution over the pixels not yet excluded (the input mask and the
    earlier scales' detections), divided by the noise that smoothing leaves
    (``rms / (2 sqrt(pi) s)`` for full kernel support, more where the kernel is
    partly masked), and thresholded with hysteresis: regions above ``low`` that reach
    ``high`` somewhere. A source's faint outskirts are thus masked as far as they are
    significant at any scale, while isolated noise peaks need ``high``. Detections are
    grown by ``dilate`` pixels plus ``dilate_per_scale * s``. Each scale is computed on
    the image binned by the largest power of two <= ``s``, which keeps large scales
    cheap; the detections are repeated back to full resolution.

    Follows the :class:`skymap.masking.Masker` protocol: returns the detections only
    (True = source), not OR-ed with ``mask``. ``rms`` is the noise of one pixel: a
    scalar, a full map, or a :class:`CoarseRMS`; the noise is taken as constant over
    each kernel's reach (it must vary slowly), so the noise the smoothing leaves is
    ``rms * sqrt(G2 * weights)``.

    Parameters
    ----------
    scales : sequence of float
        Gaussian sigmas in pixels.
    high, low : float
        Seed and growth thresholds in units of the smoothed noise, ``high >= low``.
    dilate : float
        Radius in pixels added around every detection.
    dilate_per_scale : float
        Extra radius per pixel of the detecting scale.
    surround : float
        At each scale, the masked local mean over a Gaussian ``surround`` times wider is
        subtracted before thresholding (a difference of Gaussians), so that sky
        structure broader than that, which the background has not followed yet, is not
        mistaken for sources: without it a misfit bump gets masked, the refit drops
        further under it, and the mask runs away. 0 switches it off.
    grow_plain : bool
        Seeds must pass ``high`` after the surround subtraction, but regions grow over
        the plain smoothed residual above ``low``, so that a compact source's faint
        extended wings are masked too.
    false_rate : float
        Share of pure-noise pixels allowed to pass ``high`` at each scale. The snr
        assumes white noise of the given ``rms``; correlated noise (resampled mosaics)
        or an rms measured on a masked, truncated sample make the smoothed noise
        larger, and then noise peaks pass as sources, the refit sinks, the rms
        shrinks, and the mask runs away. So the scatter of the snr is measured (from
        differences of pixels too far apart to correlate) and, where it would let more
        than this share of noise pixels pass ``high``, both maps are divided down until
        ``high`` sits at that share of the measured noise (at ``high`` in
        measured-noise units if ``high`` is below that share's quantile). The
        thresholds are never lowered. Default 1e-4 (3.72 sigma): on pure noise
        correlated over 0.7-3 px (drizzled, resampled), 1e-3 let the default pipeline
        mask 1.6-2.1% of the image, 1e-4 masks under 1% (``benchmarks/README.md``,
        masking).

    References
    ----------
    Canny, J. 1986, IEEE Trans. PAMI 8, 679 (hysteresis thresholding),
    https://doi.org/10.1109/TPAMI.1986.4767851.
    Bertin, E. & Arnouts, S. 1996, A&AS 117, 393 (detection on a filtered image),
    https://doi.org/10.1051/aas:1996164.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> img = rng.normal(size=(128, 128))
    >>> yy, xx = np.mgrid[:128, :128]
    >>> img += 2.0 * np.exp(-((yy - 64) ** 2 + (xx - 64) ** 2) / 50.0)
    >>> m = HysteresisMasker()(img, 1.0)
    >>> bool(m[64, 64]), bool(m[64, 72]), float(m[:32, :32].mean()) < 0.02
    (True, True, True)
    """

    scales: Sequence[float] = (1.0, 2.0, 4.0, 8.0)
    high: float = 4.0
    low: float = 2.0
    dilate: float = 1.0
    dilate_per_scale: float = 0.5
    surround: float = 4.0
    grow_plain: bool = False
    false_rate: float = 1e-4

    def __post_init__(self):
        scales = tuple(float(s) for s in self.scales)
        if not scales:
            raise ValueError("scales must hold at least one Gaussian sigma (pixels)")
        for s in scales:
            check_positive("scales", s)
        object.__setattr__(self, "scales", scales)
        check_positive("high", self.high)
        check_positive("low", self.low)
        if self.low > self.high:
            raise ValueError(f"low must be <= high, got low={self.low!r}, high={self.high!r}")
        check_positive("dilate", self.dilate, allow_zero=True)
        check_positive("dilate_per_scale", self.dilate_per_scale, allow_zero=True)
        check_positive("surround", self.surround, allow_zero=True)
        if 0 < self.surround <= 1:
            raise ValueError(f"surround must be 0 (off) or > 1, got {self.surround!r}")
        if not 0 < self.false_rate < 0.5:
            raise ValueError(f"false_rate must be in (0, 0.5), got {self.false_rate!r}")

    def reads_coarse_noise(self) -> bool:
        """True: a :class:`CoarseRMS` is read as it is (no full-resolution noise map)."""
        return True

    def __call__(self, residual: Any, rms: Any = None, mask: Any = None) -> np.ndarray:
        """Source mask (True = source) of ``residual``; see the class docstring."""
        res, given, excluded, _ = self._excluded(residual, rms, mask)
        excluded &= np.isfinite(res)
        if given is not None:
            # a > b is a & ~b for booleans, without a temporary.
            np.greater(excluded, given, out=excluded)
        return excluded

    def mask_with(self, residual: Any, rms: Any = None, mask: Any = None) -> np.ndarray:
        """``mask | self(residual, rms, mask)``, a new array: what an in-memory back end
        excludes after masking. Where every non-finite pixel of ``residual`` is in
        ``mask`` (the pipeline's case), the masker's own map is that union already, and
        the passes that take the given and non-finite pixels back out, and the OR that
        puts them in again, are skipped.

        Examples
        --------
        >>> rng = np.random.default_rng(1)
        >>> img = rng.normal(size=(64, 64))
        >>> img[30:34, 30:34] += 20
        >>> given = np.zeros(img.shape, bool)
        >>> given[:4] = True
        >>> m = HysteresisMasker()
        >>> bool(np.array_equal(m.mask_with(img, 1.0, given), given | m(img, 1.0, given)))
        True
        """
        res, given, excluded, outside = self._excluded(residual, rms, mask)
        if outside:  # non-finite pixels that are not given: not excluded by the masker
            excluded &= np.isfinite(res)
            if given is not None:
                excluded |= given
        return excluded

    def _excluded(self, residual, rms, mask):
        """(residual, given mask, the given mask OR the non-finite pixels OR the
        detections, whether a non-finite pixel lies outside the given mask) of
        :meth:`__call__`."""
        res = as_image(residual, "residual")
        given = as_mask(mask, res.shape)
        # One full-resolution mask only (memory): the detections are what ends up
        # excluded beyond the given mask and the non-finite pixels.
        excluded = np.empty(res.shape, bool)
        chain = _SumsChain(excluded)
        # given OR non-finite, and how many non-finite pixels are not given: one pass,
        # which also sums 2 x 2 blocks of the pixels left when the first scale reads
        # sums built on them (its binned values, or the surround of an unbinned one)
        if self._first_sums_block(res.shape) >= 2:
            half = (-(-res.shape[0] // 2), -(-res.shape[1] // 2))
            num, cnt = np.empty(half, np.float32), np.empty(half, np.float32)
            outside = _k.nonfinite_or_sums(res, given, excluded, num, cnt) > 0
            chain.start(2, num, cnt)
            del num, cnt
        else:
            outside = _k.nonfinite_or(res, given, excluded) > 0
        if rms is None:
            rms = residual_rms(res, excluded)
        if isinstance(rms, CoarseRMS):
            if rms.shape != res.shape:
                raise ValueError(
                    f"rms must describe an image of shape {res.shape}, got {rms.shape}"
                )
            noise = rms
        else:
            noise = np.asarray(rms, dtype=np.float32)
            if noise.ndim and noise.shape != res.shape:
                raise ValueError(
                    f"rms must be a scalar or a map of shape {res.shape}, got {noise.shape}"
                )
        for s in self.scales:
            self._detect(res, noise, excluded, s, into=excluded, chain=chain)
        chain.flush()
        return res, given, excluded, outside

    def _detect(self, res, noise, excluded, s, into=None, chain=None):
        """Detections at one scale, dilated, at full resolution. Three steps, so that a
        tiled run (:meth:`mask_on`) can do the local ones tile by tile and
        the global ones (the noise excess, the labelling) once. With ``chain`` (a
        :class:`_SumsChain` OR-ing into ``into``), a binned scale's sums may come from
        the previous binned scale's and its detections go to the chain."""
        b = self.binning(s, res.shape)
        if chain is not None and b == 1:
            # An unbinned scale reads the mask itself: the chain's detections go in
            # first; sums the chain holds of the mask as it is serve the surround, and
            # go stale once this scale paints its detections.
            chain.paint()
            inputs = self._dog_inputs(res, noise, excluded, s, chain=chain)
            chain.flush()
            chain = None
        else:
            sums = None if chain is None else chain.sums(b)
            inputs = self._dog_inputs(res, noise, excluded, s, sums)
        # Where the scale's maps are large, the sampled rows and columns of the noise
        # excess are few: the maps themselves are not needed (memory).
        if _samples_pay(res.shape, b):
            return self._detect_sampled(inputs, s, excluded, into=into, chain=chain)
        maps = self._maps_of(*inputs)
        factor = self.snr_factor(maps.snr, maps.invalid, s, maps.block)
        if chain is None:
            return self.scale_mask(maps, factor, s, excluded, into=into)
        chain.add(b, inputs[0], inputs[1], self.dilated(self._regions(maps, factor), s, b))
        return into

    def _first_sums_block(self, shape) -> int:
        """The block of the masked sums the first scale reads first: its binning, or
        an unbinned scale's surround block (1: none)."""
        s = self.scales[0]
        b = self.binning(s, shape)
        return b if b > 1 or not self.surround else self.surround_block(s, shape)

    def binning(self, s: float, shape: tuple[int, int]) -> int:
        """Bin factor of scale ``s``: the largest power of two <= s (the kernel keeps a
        sigma of 1-2 bins), at most the image size."""
        return pow2_at_most(s, *shape)

    def scale_maps(self, res, noise, excluded, s) -> _ScaleMaps:
        """Signal-to-noise maps of scale ``s`` on the binned grid (local: each binned
        pixel depends on the residual within the kernels' reach only)."""
        return self._maps_of(*self._dog_inputs(res, noise, excluded, s))

    def _maps_of(self, num, cnt, direct, g, local, bw, sigma, q, b) -> _ScaleMaps:
        """:meth:`scale_maps` from :meth:`_dog_inputs`."""
        snr = np.empty(num.shape, np.float32)
        plain = np.empty(num.shape if self.grow_plain else (1, 1), np.float32)
        _k.dog_snr(
            num, num if cnt is None else cnt, direct, g, g * g, local, bw, sigma, b, q,
            snr, plain, _dog_work(num.shape, g.size // 2),
        )  # fmt: skip
        # No copy at full resolution: the excluded mask is the invalid map there.
        invalid = direct if cnt is None else cnt <= 0
        return _ScaleMaps(
            snr=snr, plain=plain if self.grow_plain else None, invalid=invalid, block=b
        )

    def _dog_inputs(self, res, noise, excluded, s, sums=None, chain=None):
        """What :func:`_k.dog_snr` reads at scale ``s``: (values, counts or None when
        unbinned, the mask it reads directly, kernel, surround mean, its block, noise
        grid, its step, binning). ``sums``: the binned scale's masked block sums, when
        the caller has them; ``chain``: a :class:`_SumsChain` that may hold an unbinned
        scale's surround sums."""
        b = self.binning(s, res.shape)
        sigma, q = noise_grid(noise)
        if sums is not None:
            num, cnt = sums
        elif b == 1:
            # Unbinned: the fused pass reads the residual and the mask directly, and
            # only the wide surround needs the masked sums (computed binned below).
            # In float32 (the kernel's row buffers round to float32 anyway, so the
            # result is the same bit for bit): one compiled signature of dog_snr for
            # every input dtype, which saves ~12 s of first-run compilation.
            num, cnt = res.astype(np.float32, copy=False), None
        else:
            num, cnt = masked_block_sums(res, excluded, b)
        g = _gaussian_kernel(s / b)
        if self.surround:
            # Subtract the masked local mean over a Gaussian `surround` times wider (a
            # difference of Gaussians): structure broader than that, sky the background
            # has not followed yet, must not be mistaken for sources. The wide mean is
            # smooth, so it is computed on a coarser grid.
            wide = self.surround * s
            bw = pow2_at_most(wide / (2.0 * b), *num.shape)
            if cnt is None:
                held = None if chain is None else chain.sums(bw)
                numw, cntw = masked_block_sums(res, excluded, bw) if held is None else held
            else:
                numw, cntw = _block_sum(num, bw), _block_sum(cnt, bw)
            k = _gaussian_kernel(wide / (b * bw))
            # In place where the sums are our own (not num and cnt themselves, bw 1).
            own = cnt is None or bw > 1
            local = _separable(numw, k, numw if own else None)
            del numw
            weight = _separable(cntw, k, cntw if own else None)
            del cntw
            _k.divide_finite(local, weight)
            del weight
        else:
            local, bw = np.zeros((1, 1), np.float32), max(num.shape)
        # snr of the normalised convolution: the weight sum cancels between the
        # smoothed value and its noise.
        direct = excluded if cnt is None else np.zeros((1, 1), bool)
        return num, cnt, direct, g, local, bw, sigma, q, b

    def _detect_sampled(self, inputs, s, excluded, into=None, chain=None):
        """:meth:`_detect` without the scale's float maps (two images of memory
        unbinned): the noise excess from the snr of the sampled rows and columns only
        (:func:`_sampled_snr`), then the hysteresis codes straight from the fused pass
        (:func:`_k.dog_codes`) and a flood fill from the seeds. The same detections
        bit for bit (the same float32 values, divided and thresholded alike)."""
        num, cnt, b = inputs[0], inputs[1], inputs[-1]
        step = _noise_step(num.shape)
        ys, xs = np.arange(0, num.shape[0], step), np.arange(0, num.shape[1], step)
        rows, cols = _sampled_snr(inputs, ys, xs)
        invalid = excluded if cnt is None else cnt <= 0
        parts = _pairs_of(rows, invalid[::step], cols, invalid[:, ::step], self.noise_lag(s, b))
        del rows, cols, invalid
        factor = self.factor_from_differences(parts, s)
        codes = _dog_codes(inputs, factor, self)
        if chain is not None:
            chain.add(b, num, cnt, self.dilated(_k.flood_seeded(codes).view(bool), s, b))
            return into
        del inputs, num, cnt
        radius = self.dilation(s) / b
        if b == 1 and into is not None and radius <= 3:
            # Unbinned, a small disk: each pixel the flood reaches paints its disk into
            # the mask (the same pixels as grow's dilation and OR, without the
            # detections' map, its dilated copy and their passes).
            return _k.flood_seeded_into(codes, _disk_offsets(radius), into)
        return self.grow(_k.flood_seeded(codes).view(bool), s, b, excluded, into=into)

    def snr_factor(self, snr, invalid, s, b) -> float:
        """What the snr maps of scale ``s`` (binned by ``b``) are divided by so that
        noise peaks stay rare (see ``false_rate``): 1 or more (global: a statistic of
        the whole map)."""
        parts = _pair_differences(snr, invalid, self.noise_lag(s, b), _noise_step(snr.shape))
        return self.factor_from_differences(parts, s)

    def noise_lag(self, s: float, b: int) -> int:
        """Distance in binned pixels between the pixels :meth:`snr_factor` differences
        at scale ``s`` (binned by ``b``): far enough apart to be independent."""
        return math.ceil(3.0 * max(self.surround, 1.0) * s / b)

    def factor_from_differences(self, parts, s: float) -> float:
        """:meth:`snr_factor` from its sample of pair differences (a list of arrays, in
        any order): the part a tiled run computes in the driver."""
        k = self.surround
        white = math.sqrt(1.0 + 1.0 / k**2 - 4.0 / (1.0 + k**2)) if k else 1.0
        excess = _excess_of(parts, white)
        # In units of the noise measured at this scale, seeds need at least
        # z(false_rate) sigma, whatever the noise's correlation.
        factor = excess * min(self.high, -float(ndtri(self.false_rate))) / self.high
        log.debug("scale %g: smoothed-noise excess %.3f, snr divided by %.3f", s, excess, factor)
        return max(1.0, factor)

    def scale_mask(self, maps, factor, s, excluded, into=None) -> np.ndarray:
        """Full-resolution detections of scale ``s`` from its snr maps: hysteresis
        (global: connected regions), dilation, expansion; not OR-ed with ``excluded``.
        Consumes ``maps``. With ``into`` (a bool map of the full shape, which may be
        ``excluded`` itself), the detections are OR-ed into it in place and it is
        returned, without a full-size temporary."""
        return self.grow(self._regions(maps, factor), s, maps.block, excluded, into=into)

    def _regions(self, maps, factor) -> np.ndarray:
        """The binned hysteresis regions of :meth:`scale_mask` (consumes ``maps``)."""
        snr, plain = maps.snr, maps.plain
        maps.snr = maps.plain = maps.invalid = None  # the labels reuse snr's memory
        if factor > 1.0:
            snr /= np.float32(factor)
            if plain is not None:
                plain /= np.float32(factor)
        return _hysteresis(snr, self.low, self.high, plain)

    def grow(self, det, s, b, excluded, into=None) -> np.ndarray:
        """The last local step of :meth:`scale_mask`: the binned detections ``det`` of
        scale ``s`` dilated, expanded to full resolution and (without ``into``) cut to
        pixels not ``excluded``."""
        det = self.dilated(det, s, b)
        if into is not None:
            return _k.expand_mask_into(det, b, into)
        out = _k.expand_mask_into(det, b, np.zeros(excluded.shape, bool))
        # a > b is a & ~b for booleans, without a temporary.
        return np.greater(out, excluded, out=out)

    def dilated(self, det, s, b) -> np.ndarray:
        """The binned detections ``det`` of scale ``s`` grown by :meth:`dilation`
        (binned by ``b``); ``det`` itself when nothing grows."""
        radius = self.dilation(s) / b
        if radius > 0 and det.any():
            return grow_mask(det, radius) if radius > 3 else _dilate_disk(det, radius)
        return det

    def dilation(self, s: float) -> float:
        """Radius in full-resolution pixels by which detections of scale ``s`` grow."""
        return self.dilate + self.dilate_per_scale * s

    # -- tile by tile (skymap.backends.dask): the local steps per tile with halos, the
    # noise excess and the labelling finished in the driver

    def surround_block(self, s: float, shape) -> int:
        """The surround's block on the binned grid of scale ``s``, as
        :meth:`scale_maps` picks it for the whole image (a tile's window is never
        smaller than one such block); 1 without a surround."""
        if not self.surround:
            return 1
        b = self.binning(s, shape)
        binned = (-(-shape[0] // b), -(-shape[1] // b))
        return pow2_at_most(self.surround * s / (2.0 * b), *binned)

    def tile_unit(self, shape) -> tuple[int, int]:
        """Tiles align to every scale's binning block times its surround block, so
        that each block lies inside one tile."""
        unit = math.lcm(
            *(self.binning(s, shape) * self.surround_block(s, shape) for s in self.scales)
        )
        return unit, unit

    def halos(self, s: float, shape) -> tuple[int, int]:
        """(maps, dilation) halos in pixels of scale ``s``: the reach of the matched
        filter and of the surround mean, ``r(sigma)`` being the radius of the Gaussian
        kernel of that sigma in its grid's units (``int(3 sigma + 0.5)``, at least 1):
        ``max(b * r(s / b), b * bw * r(surround * s / (b * bw)))``; and the dilation's
        reach, ``b * (ceil(dilation(s) / b) + 1)``."""
        b = self.binning(s, shape)
        maps = b * _kernel_radius(s / b)
        if self.surround:
            bw = self.surround_block(s, shape)
            maps = max(maps, b * bw * _kernel_radius(self.surround * s / (b * bw)))
        return maps, b * (math.ceil(self.dilation(s) / b) + 1)

    def mask_on(self, backend, residual, noise, excluded, window_of):
        """:meth:`__call__` through a tiled back end
        (:class:`~skymap.backends.base.SplitMasker`): per scale, the noise excess from
        the very same pixel pairs, read per tile from the snr of its sampled rows and
        columns only; the hysteresis codes per tile from the fused pass (no float
        maps), labelled per tile and joined across tiles; and the dilation per tile.
        The noise is put on the cluster once (``backend.share``), not into every
        scale's graph. Returns ``excluded`` OR the detections, equal to the in-memory
        masking bit for bit."""
        noise = backend.share(noise)
        bins = [self.binning(s, backend.shape) for s in self.scales]
        sums = None
        for k, s in enumerate(self.scales):
            # a binned scale's sums go on to the next scale when it can sum them 2 x 2
            # (as _SumsChain does in memory)
            chains = k + 1 < len(bins) and _chains(bins[k], bins[k + 1])
            excluded, sums = self._scale_on(
                backend, s, residual, noise, excluded, window_of, sums, chains
            )
        return excluded

    def _scale_on(self, backend, s, residual, noise, excluded, window_of, prev, chains):
        """One scale of :meth:`mask_on`: (the lazy exclusion after it, and with
        ``chains`` the persisted masked block sums of its tiles' cores for the next
        scale, binned by this scale's binning, with it). ``prev``: the previous
        scale's such sums, or None."""
        shape = backend.shape
        b = self.binning(s, shape)
        maps_halo, dilate_halo = self.halos(s, shape)
        lag = self.noise_lag(s, b)
        step = _noise_step((-(-shape[0] // b), -(-shape[1] // b)))
        maps_kw = {"masker": self, "s": s, "noise": noise, "window_of": window_of}
        # The noise excess is a task of the graph (one driver round trip per scale):
        # the windows reach lag binned pixels past the tile, for the pairs that start
        # in it, plus the kernels' reach there.
        # The pairs' tasks keep the scale's inputs over their windows, from which the
        # codes are made where they are (not computed again from the same pixels).
        # A binned scale after another whose blocks tile its own sums the previous
        # scale's sums (not the full-resolution window) 2 x 2 (_chained_sums).
        # Such a task does not read the residual (the inputs of a task cost the
        # scheduler's bookkeeping).
        func, arrays, bins = _tile_pairs_kept, [residual, excluded], [1, 1]
        if prev is not None and _chains(prev[0], b):
            func, arrays, bins = _tile_pairs_chained, [excluded, prev[1]], [1, prev[0]]
            maps_kw["prev_b"] = prev[0]
        factor, inputs = backend.reduce_windows(
            func, arrays, functools.partial(_factor_of, self, s),
            halo=maps_halo + lag * b, keep=True, pieces=True, binning=bins, lag=lag,
            step=step, **maps_kw,
        )  # fmt: skip
        codes = backend.map_kept(
            _kept_codes, inputs, dtype=np.uint8, block=b, masker=self, factor=factor
        )
        # The sums the next scale reads: made by the label tasks, kept with the labels.
        carry = None
        if chains:
            carry = backend.map_kept(_kept_sums, inputs, dtype=np.float32, block=b, layers=2)
        # One submission to the cluster: the (lazy) exclusion of the last scale, the
        # pairs, the codes and their labels, and the sums (each graph sent costs as
        # much as several tasks).
        det, (excluded, *sums) = backend.label_seeded(
            codes, seeded_codes, block=b, keep=[excluded], carry=carry
        )
        del codes
        # Dilation and expansion to full resolution: scale_mask on each tile's window
        # of the (already global) detections. Lazy: persisted with the next scale's
        # labels, or by the caller.
        excluded = backend.map_tiles(
            _tile_dilate, [det, excluded], binning=(b, 1), halo=dilate_halo, dtype=bool,
            pieces=True, own=(1,), masker=self, s=s, b=b,
        )  # fmt: skip
        return excluded, (b, sums[0]) if sums else None


@dataclass(kw_only=True, eq=False)
class _ScaleMaps:
    """The binned maps of one masking scale (mutable: consumed by scale_mask)."""

    snr: np.ndarray | None
    plain: np.ndarray | None
    invalid: np.ndarray | None
    block: int


def _factor_of(masker, s, parts) -> float:
    """:meth:`HysteresisMasker.factor_from_differences` of the pairs gathered per tile
    (a list per tile of lists of arrays)."""
    return masker.factor_from_differences([p for ps in parts for p in ps], s)


def _kernel_radius(sigma: float) -> int:
    # the radius of scale_maps' Gaussian kernels, in grid units
    return _gaussian_kernel(sigma).size // 2


def _window_inputs(res, excl, window, masker, s, noise, window_of, prev=None, prev_b=None):
    """:meth:`HysteresisMasker._dog_inputs` of scale ``s`` on a tile's window (arrays,
    or :class:`~skymap.backends.windows.Pieces`: a binned scale's masked block sums
    are then summed part by part, and the full-resolution window is never copied
    out; the tiles align to the blocks, so the sums are the same bit for bit). With
    ``prev`` (the window of the previous scale's sums, binned by ``prev_b``) they are
    summed from those (:func:`_chained_sums`)."""
    rms = window_of(noise, window)
    if not isinstance(rms, CoarseRMS):
        rms = np.asarray(rms, dtype=np.float32)  # as HysteresisMasker.__call__ does
    if prev is not None:
        b = masker.binning(s, res.shape)
        return masker._dog_inputs(res, rms, None, s, _chained_sums(prev, excl, prev_b, b))
    if isinstance(res, Pieces):
        b = masker.binning(s, res.shape)
        sums = None if b == 1 else res.binned_into(functools.partial(_sums_into, b=b), b, 2, excl)
        if sums is not None:
            # only the window's shape is read from res, and excl not at all
            return masker._dog_inputs(res, rms, None, s, sums)
        res, excl = res.whole(), excl.whole()
    return masker._dog_inputs(res, rms, excl, s)


def _chains(b0: int, b: int) -> bool:
    """Whether binning ``b``'s masked block sums are ``b0``'s summed 2 x 2 (``b0`` > 1,
    ``b`` ``b0`` times a power of two above 1): :func:`_chained_sums`."""
    return 1 < b0 < b and b % b0 == 0 and _pow2(b // b0)


def _chained_sums(prev, excl, b0: int, b: int):
    """:func:`masked_block_sums` (binning ``b``) of a window from the previous scale's
    over it, ``prev`` ((num, cnt) binned by ``b0``, :func:`_kept_sums`; ``excl`` the
    window's exclusion after that scale). The previous scale's detections cover whole
    blocks of ``b0`` and exclude nothing else, so its sums read as 0 at the blocks now
    wholly excluded (as :class:`_SumsChain` zeroes the detected ones) are the masked
    sums with the new exclusion; summed 2 x 2 (:func:`halved_sums`) they are binning
    ``b``'s, bit for bit (masked_block_sums sums 2 x 2 blocks alike). Part by part
    (views of the tiles' blocks, nothing copied) where the parts of both windows
    start on the edges of the ``2 b0`` blocks."""
    if not (isinstance(prev, Pieces) and isinstance(excl, Pieces)):
        prev, excl = _one_part(prev), _one_part(excl)
    elif not all(
        np.array_equal(pe[1:-1] * b0, e[1:-1]) and not np.any(e[1:-1] % (2 * b0))
        for pe, e in zip(prev.edges, excl.edges, strict=True)
    ):
        prev, excl = _one_part(prev.whole()), _one_part(excl.whole())
    # one array (see _kept_sums)
    num, cnt = np.zeros((2, *(-(-n // 2) for n in prev.shape[-2:])), np.float32)
    (ey, ex) = (e // 2 for e in prev.edges)
    for i, row in enumerate(prev.parts):
        for j, part in enumerate(row):
            sl = (slice(ey[i], ey[i] + -(-part.shape[-2] // 2)),
                  slice(ex[j], ex[j] + -(-part.shape[-1] // 2)))  # fmt: skip
            # the parts as they are (views: a core of the kept sums, a strip of a
            # block): the kernel's row loops vectorise on rows of unit stride, so a
            # copy first only costs its pass and its fresh pages
            _k.covered_block_sum_into(part[0], part[1], excl.parts[i][j], b0, num[sl], cnt[sl])
    return halved_sums(num, cnt, b // (2 * b0))


def _one_part(a) -> Pieces:
    """An array as a :class:`~skymap.backends.windows.Pieces` of one part."""
    return Pieces([[a]], (slice(0, a.shape[-2]), slice(0, a.shape[-1])))


def _sums_into(values, excluded, *, b, out):
    """:func:`masked_block_sums` of ``values`` written into ``out`` = (num, cnt) (zeros,
    views of the joined maps of a window: :meth:`~skymap.backends.windows.Pieces.binned_into`),
    the last 2 x 2 summing step writing there: the same sums bit for bit."""
    num, cnt = out
    if b == 2:
        _k.masked_block_sums(values, excluded, 2, num, cnt)
        return
    half = halved_sums(*masked_block_sums(values, excluded, 2), b // 4)
    for a, into in zip(half, out, strict=True):
        _k.block_sum_into(a, 2, into)


def tile_sampled_pairs(res, excl, *, window, core, masker, s, noise, window_of, lag, step):
    """The pairs of :func:`_pair_differences` (binned grid of scale ``s``) that start in
    the tile ``core``: along x on the rows ``y % step == 0``, along y on the columns
    ``x % step == 0``, ``lag`` apart, both ends valid, from the snr of those rows and
    columns only (:func:`_sampled_snr`, as :meth:`HysteresisMasker._detect_sampled`
    reads them). ``window`` (full resolution) must reach ``lag`` binned pixels past
    the core plus the kernels' reach (cut at the image's edge)."""
    inputs = _window_inputs(res, excl, window, masker, s, noise, window_of)
    return _sampled_pairs(inputs, window, core, lag, step)


def _tile_pairs_kept(res, excl, *, window, core, masker, s, noise, window_of, lag, step):
    """:func:`tile_sampled_pairs` and the scale's inputs over the window (for
    :func:`_kept_codes`, :func:`_kept_sums`)."""
    inputs = _window_inputs(res, excl, window, masker, s, noise, window_of)
    return _sampled_pairs(inputs, window, core, lag, step), (inputs, window)


def _tile_pairs_chained(
    excl, prev, *, window, core, masker, s, noise, window_of, lag, step, prev_b
):
    """:func:`_tile_pairs_kept` of a scale whose sums come from the previous scale's
    ``prev`` (binned by ``prev_b``, :func:`_chained_sums`): the residual is not read
    (only the window's shape, given by a stub)."""
    res = np.broadcast_to(np.float32(0), tuple(e - a for a, e in window))
    inputs = _window_inputs(res, excl, window, masker, s, noise, window_of, prev, prev_b)
    return _sampled_pairs(inputs, window, core, lag, step), (inputs, window)


def _sampled_pairs(inputs, window, core, lag, step):
    num, cnt, b = inputs[0], inputs[1], inputs[-1]
    ny, nx = num.shape
    w0, u0 = window[0][0] // b, window[1][0] // b
    (r0, r1), (c0, c1) = ((a // b, -(-e // b)) for a, e in core)
    ys = np.arange(r0 + (-r0) % step, r1, step) - w0
    xs = np.arange(c0 + (-c0) % step, c1, step) - u0
    rows, cols = _sampled_snr(inputs, ys, xs)
    # unbinned, the mask the fused pass reads directly is the window's exclusion
    invalid = inputs[2] if cnt is None else cnt <= 0
    # the pairs that start in the core: its columns (rows) and lag more
    xa, xb = c0 - u0, min(c1 - u0 + lag, nx)
    ya, yb = r0 - w0, min(r1 - w0 + lag, ny)
    return _pairs_of(rows[:, xa:xb], invalid[ys, xa:xb], cols[ya:yb], invalid[ya:yb][:, xs], lag)


def _tile_codes(res, excl, *, window, core, masker, s, noise, window_of, factor):
    """The tile's hysteresis codes of scale ``s`` (uint8 on its binned grid: 2 seed, 1
    growth, 0 neither) after the division by the noise ``factor``, from the fused
    pass over its window (:func:`_dog_codes`)."""
    inputs = _window_inputs(res, excl, window, masker, s, noise, window_of)
    codes = _dog_codes(inputs, factor, masker)
    return np.ascontiguousarray(codes[core_of(window, core, inputs[-1])])


def _kept_codes(kept, *, core, masker, factor):
    """:func:`_tile_codes` from the inputs kept by :func:`_tile_pairs_kept` (over a
    wider window: the core's codes are the same)."""
    inputs, window = kept
    codes = _dog_codes(inputs, factor, masker)
    # a view: only the labelling reads it, through seeded_codes' fresh maps
    return codes[core_of(window, core, inputs[-1])]


def _kept_sums(kept, *, core):
    """The masked block sums of the tile's core (num, cnt stacked: float32, binned)
    from the inputs kept by :func:`_tile_pairs_kept`, for the next scale's
    :func:`_chained_sums`."""
    inputs, window = kept
    num, cnt = inputs[0], inputs[1]
    sl = core_of(window, core, inputs[-1])
    both = num.base
    if (
        both is not None
        and both.shape == (2, *num.shape)
        and _is_layer(num, both, 0)
        and (_is_layer(cnt, both, 1))
    ):
        # the layers of one array (Pieces.binned_into's, _chained_sums'): a view, no
        # copy (the label task keeps it until the next scale)
        return both[(slice(None), *sl)]
    return np.stack((num[sl], cnt[sl]))


def _is_layer(a, both, k: int) -> bool:
    """Whether ``a`` is the whole layer ``k`` of ``both``."""
    return a.base is both and a.ctypes.data == both[k].ctypes.data and a.strides == both[k].strides


def seeded_codes(codes, *, which):
    """Seeds (code 2) or regions (codes 1 and 2) of the hysteresis ``codes``, the
    labelling's input (:meth:`~skymap.backends.dask.DaskBackend.label_seeded`)."""
    return codes == 2 if which == "seed" else codes != 0


def _tile_dilate(det, excl, *, window, core, masker, s, b):
    """The tile's exclusion OR its (dilated, expanded) detections of scale ``s``, as
    :meth:`HysteresisMasker.grow` gives them: the window of the globally labelled
    detections ``det`` dilated (the dilation reaches ``halo`` pixels, so the core is
    exact), then only the core expanded and OR-ed with the core's exclusion into a new
    block (``det`` a :class:`~skymap.backends.windows.Pieces`, ``excl`` the tile's
    block, never written)."""
    grown = masker.dilated(np.ascontiguousarray(det.whole()), s, b)
    # the core's exclusion OR its detections written in one pass into a new block
    # (the exclusion's block is persisted: never written)
    out = np.empty(excl.shape, bool)
    return _k.expand_mask_into(grown[core_of(window, core, b)], b, out, src=excl)
