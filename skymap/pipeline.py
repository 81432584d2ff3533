"""The iterative multi-scale background pipeline and :func:`fit`, its automatic default.

An :class:`IterativeBackground` starts from a first guess (a thin-plate smooth of the
whole image, a coarse mesh or a ring median), then runs its :class:`Stage` s in order.
Each stage masks sources in ``image - background`` with its masker and refits the
background with its estimator on the unmasked pixels, and repeats until the mask has
settled and the background moves by less than a tolerance in units of the background
RMS, or by less than its own statistical error, or its iteration cap is hit; the masks
go deeper from stage to stage. In the last stage, a fit found following source light
(bumps without matching dips against a stiffer fit) is held stiffer from then on. An
optional final estimator refits once with the converged mask.

Every iteration is kept in :attr:`BackgroundResult.history` as an
:class:`IterationRecord` (background, rms, mask, mask fraction, change); the maps are
rebuilt on access from compact forms, so a long history costs little memory.

:func:`fit` runs :func:`default_pipeline`: thin-plate smoothing of masked cell means
(:mod:`skymap.smooth`) whose smoothing length GCV chooses at every refit, and
:class:`HysteresisMasker` s whose thresholds are in units of the measured noise after
smoothing, so nothing in it is a pixel number tuned to one scene.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import numba
import numpy as np
import scipy.ndimage as ndi
from scipy.special import ndtri

from . import _pipeline_kernels as _k
from ._validate import as_image, as_mask, check_positive, combine_masks
from .masking import disk_footprint, grow_mask
from .smooth import SmoothResult, ThinPlateSmoother, upsample

__all__ = [
    "BackgroundEstimator",
    "BackgroundResult",
    "CoarseRMS",
    "HysteresisMasker",
    "IterationRecord",
    "IterativeBackground",
    "RingMedianGuess",
    "Stage",
    "default_pipeline",
    "fit",
]

log = logging.getLogger(__name__)

_MAD_TO_STD = 1.482602218505602


@runtime_checkable
class BackgroundEstimator(Protocol):
    """Anything with ``fit(image, mask) -> result`` whose result has ``background`` and
    ``rms`` maps: :class:`~skymap.smooth.ThinPlateSmoother`,
    :class:`~skymap.mesh.MeshBackground`, :class:`RingMedianGuess`, ..."""

    def fit(self, image: Any, mask: Any = None) -> Any: ...


# --------------------------------------------------------------------------- masker


def _block_sum(a: np.ndarray, b: int) -> np.ndarray:
    return a if b == 1 else _k.block_sum(a, b)


# Large outputs of the kernels are allocated here, by numpy, and passed in: numpy
# asks for huge pages for big arrays and numba does not, and on the machines we
# measured the page faults of fresh memory cost as much as the arithmetic.


def _dog_work(shape, r, strip=64):
    """The x-pass buffer of dog_snr: a few bands per thread (balance), each swept in
    strips of ``strip`` rows (small buffers)."""
    bands = max(1, min(-(-shape[0] // strip), 4 * numba.get_num_threads()))
    return np.empty((bands, 3, strip + 2 * r, shape[1]), np.float32)


def _masked_block_sums(values, excluded, b):
    shape = (-(-values.shape[0] // b), -(-values.shape[1] // b))
    num, cnt = np.empty(shape, np.float32), np.empty(shape, np.float32)
    return _k.masked_block_sums(values, excluded, b, num, cnt)


def _pow2_at_most(value: float, *limits: int) -> int:
    """Largest power of two <= value (at least 1, at most min(limits))."""
    b = 1 << max(0, int(math.floor(math.log2(max(value, 1.0)))))
    return max(1, min(b, *limits))


def _dilate_disk(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation by a small disk, as shifted ORs (cheaper than a generic
    structuring-element pass for the few offsets of a small disk)."""
    out = mask.copy()
    ny, nx = mask.shape
    half = disk_footprint(radius).shape[0] // 2
    for dy, dx in np.argwhere(disk_footprint(radius)) - half:
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


def _separable(a: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    tmp, out = np.empty(a.shape, np.float32), np.empty(a.shape, np.float32)
    return _k.gaussian_separable(a, kernel, tmp, out)


def _noise_step(shape) -> int:
    """Row/column stride of the pairs :func:`_pair_differences` samples: about 250 000
    pairs, so that the MAD is good to ~0.3% and the medians stay cheap."""
    return max(1, (shape[0] * shape[1]) // 125_000)


def _pair_differences(snr, excluded, lag: int, step: int):
    """Differences of unexcluded pixels ``lag`` apart, along x on every ``step``-th
    row, then along y on every ``step``-th column: far enough apart to be independent,
    they cancel any smooth offset or wing the background has not followed yet, and
    their MAD (:func:`_excess_of`) ignores the sources that touch a minority of the
    pairs. The tiled path (:mod:`skymap.distributed`) gathers the same pairs tile by
    tile."""
    ny, nx = snr.shape
    parts = []
    for axis, n in ((1, nx), (0, ny)):
        if lag >= n:
            continue
        if axis == 1:
            v, bad = snr[::step], excluded[::step]
            d = v[:, lag:] - v[:, :-lag]
            ok = ~(bad[:, lag:] | bad[:, :-lag])
        else:
            v, bad = snr[:, ::step], excluded[:, ::step]
            d = v[lag:] - v[:-lag]
            ok = ~(bad[lag:] | bad[:-lag])
        parts.append(d[ok])
    return parts


def _excess_of(parts, white: float) -> float:
    """Scatter of a signal-to-noise map relative to ``white`` (the scatter it has for
    white noise of the stated rms), from the MAD of its pair differences ``parts``; 1.0
    when fewer than 200 pairs are left."""
    d = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if d.size < 200:
        return 1.0
    mad = float(np.median(np.abs(d - np.median(d))))
    return _MAD_TO_STD * mad / math.sqrt(2.0) / white


def _hysteresis(snr: np.ndarray, low: float, high: float, grow=None) -> np.ndarray:
    """Connected regions (8-connected) of ``grow`` (default ``snr``) above ``low`` that
    hold a pixel of ``snr`` above ``high``. A float32 ``snr`` is overwritten (its memory
    holds the labels)."""
    grow = snr if grow is None else grow
    # One byte a pixel (seed / above low / neither) is all the labelling needs: at full
    # resolution the separate seed and growth masks would sit on top of the float maps.
    codes = _k.hysteresis_codes(
        snr, grow, np.float32(low), np.float32(high), np.empty(snr.shape, np.uint8)
    )
    # The labels take the memory of the signal-to-noise map, no longer needed.
    labels = snr.view(np.int32) if snr.dtype == np.float32 else None
    if labels is None:
        labels, n = ndi.label(codes, structure=np.ones((3, 3), bool))
    else:
        n = ndi.label(codes, structure=np.ones((3, 3), bool), output=labels)
    if n == 0:
        return codes.view(bool)
    return _k.keep_seeded(labels, codes, n).view(bool)


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


def _noise_grid(noise) -> tuple[np.ndarray, int]:
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
        ``high`` sits at that share (or at ``high`` in measured-noise units, if that is
        stricter). The thresholds are never lowered. Default 1e-3 (3.09 sigma).

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
    false_rate: float = 1e-3

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

    def __call__(self, residual: Any, rms: Any = None, mask: Any = None) -> np.ndarray:
        """Source mask (True = source) of ``residual``; see the class docstring."""
        res = as_image(residual, "residual")
        given = as_mask(mask, res.shape)
        # One full-resolution mask only (memory): the detections are what ends up
        # excluded beyond the given mask and the non-finite pixels.
        excluded = combine_masks(res, given)
        if rms is None:
            v = res[~excluded]
            rms = _MAD_TO_STD * float(np.median(np.abs(v - np.median(v)))) if v.size else 1.0
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
            self._detect(res, noise, excluded, s, into=excluded)
        excluded &= np.isfinite(res)
        if given is not None:
            # a > b is a & ~b for booleans, without a temporary.
            np.greater(excluded, given, out=excluded)
        return excluded

    def _detect(self, res, noise, excluded, s, into=None):
        """Detections at one scale, dilated, at full resolution. Three steps, so that a
        tiled run (:mod:`skymap.distributed`) can do the local ones tile by tile and
        the global ones (the noise excess, the labelling) once."""
        maps = self.scale_maps(res, noise, excluded, s)
        factor = self.snr_factor(maps.snr, maps.invalid, s, maps.block)
        return self.scale_mask(maps, factor, s, excluded, into=into)

    def binning(self, s: float, shape: tuple[int, int]) -> int:
        """Bin factor of scale ``s``: the largest power of two <= s (the kernel keeps a
        sigma of 1-2 bins), at most the image size."""
        return _pow2_at_most(s, *shape)

    def scale_maps(self, res, noise, excluded, s) -> _ScaleMaps:
        """Signal-to-noise maps of scale ``s`` on the binned grid (local: each binned
        pixel depends on the residual within the kernels' reach only)."""
        b = self.binning(s, res.shape)
        sigma, q = _noise_grid(noise)
        if b == 1:
            # Unbinned: the fused pass reads the residual and the mask directly, and
            # only the wide surround needs the masked sums (computed binned below).
            num, cnt = res, None
        else:
            num, cnt = _masked_block_sums(res, excluded, b)
        g = _gaussian_kernel(s / b)
        if self.surround:
            # Subtract the masked local mean over a Gaussian `surround` times wider (a
            # difference of Gaussians): structure broader than that, sky the background
            # has not followed yet, must not be mistaken for sources. The wide mean is
            # smooth, so it is computed on a coarser grid.
            wide = self.surround * s
            bw = _pow2_at_most(wide / (2.0 * b), *num.shape)
            if cnt is None:
                numw, cntw = _masked_block_sums(res, excluded, bw)
            else:
                numw, cntw = _block_sum(num, bw), _block_sum(cnt, bw)
            k = _gaussian_kernel(wide / (b * bw))
            local = _separable(numw, k)
            del numw
            weight = _separable(cntw, k)
            del cntw
            with np.errstate(invalid="ignore", divide="ignore"):
                np.divide(local, weight, out=local)
            del weight
            local[~np.isfinite(local)] = 0
        else:
            local, bw = np.zeros((1, 1), np.float32), max(num.shape)
        # snr of the normalised convolution: the weight sum cancels between the
        # smoothed value and its noise.
        direct = excluded if cnt is None else np.zeros((1, 1), bool)
        snr = np.empty(num.shape, np.float32)
        plain = np.empty(num.shape if self.grow_plain else (1, 1), np.float32)
        _k.dog_snr(
            num, num if cnt is None else cnt, direct, g, g * g, local, bw, sigma, b, q,
            snr, plain, _dog_work(num.shape, g.size // 2),
        )  # fmt: skip
        # No copy at full resolution: the excluded mask is the invalid map there.
        invalid = excluded if cnt is None else cnt <= 0
        return _ScaleMaps(
            snr=snr, plain=plain if self.grow_plain else None, invalid=invalid, block=b
        )

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
        factor = excess * min(self.high, -float(ndtri(self.false_rate))) / self.high
        log.debug("scale %g: smoothed-noise excess %.3f, snr divided by %.3f", s, excess, factor)
        return max(1.0, factor)

    def scale_mask(self, maps, factor, s, excluded, into=None) -> np.ndarray:
        """Full-resolution detections of scale ``s`` from its snr maps: hysteresis
        (global: connected regions), dilation, expansion; not OR-ed with ``excluded``.
        Consumes ``maps``. With ``into`` (a bool map of the full shape, which may be
        ``excluded`` itself), the detections are OR-ed into it in place and it is
        returned, without a full-size temporary."""
        snr, plain, b = maps.snr, maps.plain, maps.block
        maps.snr = maps.plain = maps.invalid = None  # the labels reuse snr's memory
        if factor > 1.0:
            snr /= np.float32(factor)
            if plain is not None:
                plain /= np.float32(factor)
        det = _hysteresis(snr, self.low, self.high, plain)
        # The labels in snr's memory and the growth map are done with (memory).
        del snr, plain
        radius = self.dilation(s) / b
        if radius > 0 and det.any():
            det = grow_mask(det, radius) if radius > 3 else _dilate_disk(det, radius)
        if into is not None:
            return _k.expand_mask_into(det, b, into)
        out = _k.expand_mask_into(det, b, np.zeros(excluded.shape, bool))
        # a > b is a & ~b for booleans, without a temporary.
        return np.greater(out, excluded, out=out)

    def dilation(self, s: float) -> float:
        """Radius in full-resolution pixels by which detections of scale ``s`` grow."""
        return self.dilate + self.dilate_per_scale * s


@dataclass(kw_only=True, eq=False)
class _ScaleMaps:
    """The binned maps of one masking scale (mutable: consumed by scale_mask)."""

    snr: np.ndarray | None
    plain: np.ndarray | None
    invalid: np.ndarray | None
    block: int


# --------------------------------------------------------------------------- first guess


@dataclass(frozen=True, kw_only=True)
class RingMedianGuess:
    """A ring-median first guess: each pixel's background is the median of the valid
    pixels in a ring around it (:func:`skymap.filters.ring_median`), so sources smaller
    than ``radius`` do not pull it up. The RMS is the MAD-based sigma of the residual.

    Parameters
    ----------
    radius, width : float
        Inner radius and width of the ring in pixels.

    Examples
    --------
    >>> img = np.ones((40, 40)); img[20, 20] = 100.0
    >>> res = RingMedianGuess(radius=4, width=2).fit(img)
    >>> float(res.background[20, 20])
    1.0
    """

    radius: float = 15.0
    width: float = 5.0

    def __post_init__(self):
        check_positive("radius", self.radius, allow_zero=True)
        check_positive("width", self.width)

    def fit(self, image, mask=None) -> _MapResult:
        """Ring-median background of ``image`` ignoring ``mask`` (True = excluded)."""
        from .filters import ring_median

        img = as_image(image)
        bad = combine_masks(img, as_mask(mask, img.shape))
        bkg = np.asarray(ring_median(img, self.radius, self.width, mask=bad), dtype=img.dtype)
        # Pixels whose ring holds no valid pixel take the global median.
        hole = ~np.isfinite(bkg)
        if hole.any():
            bkg[hole] = np.median(img[~bad])
        r = (img - bkg)[~bad]
        sigma = _MAD_TO_STD * float(np.median(np.abs(r - np.median(r))))
        return _MapResult(background=bkg, rms=np.full(img.shape, sigma, dtype=img.dtype))


@dataclass(frozen=True, kw_only=True, eq=False)
class _MapResult:
    background: np.ndarray
    rms: np.ndarray


# --------------------------------------------------------------------------- records


def _background_of(model: Any, step: int = 1) -> np.ndarray:
    # Uncached maps where the estimator offers them, so the history keeps only grids;
    # a thin-plate map is interpolated only where a subsample (``step``) needs it.
    if isinstance(model, SmoothResult):
        return model.background_map(step)
    f = getattr(model, "background_map", None)
    bkg = f() if callable(f) else np.asarray(model.background)
    return bkg[::step, ::step] if step > 1 else bkg


def _rms_of(model: Any) -> np.ndarray:
    f = getattr(model, "rms_map", None)
    return f() if callable(f) else np.asarray(model.rms)


@dataclass(frozen=True, kw_only=True, eq=False)
class _IterationFields:
    """The scalar fields of one iteration and the estimator's result (shared by
    :class:`IterationRecord` and the tiled fit's records)."""

    stage: int
    iteration: int
    mask_fraction: float
    mask_change: float
    change: float
    scale: float | None
    mask_growth: float = float("nan")
    error: float = float("nan")
    asymmetry: float = float("nan")
    min_scale: float | None = None
    model: Any = field(repr=False)

    def to_dict(self) -> dict:
        """The scalar fields, for tables and JSON."""
        return {
            f.name: getattr(self, f.name) for f in fields(_IterationFields) if f.name != "model"
        }


@dataclass(frozen=True, kw_only=True, eq=False)
class IterationRecord(_IterationFields):
    """One iteration of an :class:`IterativeBackground` fit.

    ``background``, ``rms`` and ``mask`` are rebuilt from compact forms on each access
    (the estimator's own result and a bit-packed mask), so keeping every iteration is
    cheap; the scalar fields describe the convergence.

    Attributes
    ----------
    stage : int
        -1 for the first guess, then the stage index; ``len(stages)`` for the final
        refit.
    iteration : int
        Iteration within the stage (0-based).
    mask_fraction : float
        Share of the image excluded (given mask, non-finite pixels and detections).
    mask_change : float
        Share of pixels whose mask state changed since the previous iteration.
    mask_growth : float
        Change of ``mask_fraction`` since the previous iteration (NaN for the first
        guess): near 0 while ``mask_change`` is not, the mask only flickers at its
        edges.
    change : float
        RMS over valid pixels of (new - previous background) / rms.
    error : float
        RMS statistical error of this background in units of its RMS, when the
        estimator reports one (``SmoothResult.error``), else NaN.
    scale : float or None
        Smoothing length in pixels, when the estimator reports one.
    asymmetry : float
        Upper-to-lower tail ratio of (background - a stiffer fit), when measured
        (see ``IterativeBackground.source_asymmetry``), else NaN.
    min_scale : float or None
        Smoothing floor in pixels this fit was held to (None: GCV's choice alone).
    model : object
        The estimator's result for this iteration.
    """

    packed_mask: np.ndarray = field(repr=False)
    shape: tuple[int, int]

    @property
    def background(self) -> np.ndarray:
        """Background map of this iteration."""
        return _background_of(self.model)

    @property
    def rms(self) -> np.ndarray:
        """RMS map of this iteration."""
        return _rms_of(self.model)

    @property
    def mask(self) -> np.ndarray:
        """Mask (True = excluded) this iteration's background was fitted with."""
        n = self.shape[0] * self.shape[1]
        return np.unpackbits(self.packed_mask, count=n).astype(bool).reshape(self.shape)


@dataclass(frozen=True, kw_only=True, eq=False)
class BackgroundResult:
    """What :meth:`IterativeBackground.fit` (and :func:`fit`) found.

    Attributes
    ----------
    background : ndarray (ny, nx)
        Final background, in the input's float dtype.
    rms : ndarray (ny, nx)
        Its RMS (pixel noise), interpolated on first access (a property).
    mask : ndarray of bool
        Everything the final fit excluded: ``bad_mask | source_mask``.
    source_mask : ndarray of bool
        The final detections (a property).
    bad_mask : ndarray of bool
        The given mask OR non-finite pixels.
    history : tuple of IterationRecord
        Every iteration, first guess included.
    config : IterativeBackground
        The configuration that made this result.
    noise : float
        Median of the final RMS.
    converged : bool
        Whether an iteration of the last stage met the tolerances
        (:meth:`IterativeBackground.settled`: the background moved by less than
        ``change_tol`` or ``error_tol`` times its statistical error, and the mask
        settled) within ``max_iter``. False means the last background may still be
        moving by more than the data can vouch for; the history shows how.
    """

    background: np.ndarray
    mask: np.ndarray
    bad_mask: np.ndarray
    history: tuple
    config: IterativeBackground
    noise: float
    converged: bool

    @cached_property
    def rms(self) -> np.ndarray:
        """Background RMS map (input dtype), interpolated on first access."""
        return np.asarray(self.history[-1].model.rms, dtype=self.background.dtype)

    @cached_property
    def source_mask(self) -> np.ndarray:
        """The final detections: ``mask & ~bad_mask``."""
        return self.mask & ~self.bad_mask

    @property
    def model(self) -> Any:
        """The final estimator result (mesh grid, smoothing, GCV scores, ...)."""
        return self.history[-1].model

    @property
    def scale(self) -> float | None:
        """Final smoothing length in pixels, when the estimator reports one."""
        return self.history[-1].scale

    @cached_property
    def table(self):
        """The convergence history as an astropy Table (one row per iteration)."""
        from astropy.table import Table

        return Table(rows=[r.to_dict() for r in self.history])


# --------------------------------------------------------------------------- pipeline


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One scale of the pipeline: a masker (``(residual, rms, mask) -> detections``)
    and a background estimator (``fit(image, mask) -> result``); ``max_iter`` overrides
    the pipeline's iteration cap for this stage."""

    masker: Any
    estimator: Any
    max_iter: int | None = None

    def __post_init__(self):
        if self.max_iter is not None and (
            int(self.max_iter) != self.max_iter or self.max_iter < 1
        ):
            raise ValueError(f"max_iter must be None or an integer >= 1, got {self.max_iter!r}")
        if not callable(self.masker):
            raise ValueError(f"masker must be a Masker (callable), got {self.masker!r}")
        if not callable(getattr(self.estimator, "fit", None)):
            raise ValueError(
                f"estimator must have a fit(image, mask) method, got {self.estimator!r}"
            )


@dataclass(frozen=True, kw_only=True)
class IterativeBackground:
    """First guess, then stages of (mask, refit), each iterated to convergence.

    Parameters
    ----------
    first_guess : BackgroundEstimator
        Fitted to the image with only the given mask: a stiff
        :class:`~skymap.smooth.ThinPlateSmoother`, a coarse
        :class:`~skymap.mesh.MeshBackground`, or a :class:`RingMedianGuess`.
    stages : sequence of Stage
        Run in order; usually the smoothing shrinks and the masks deepen.
    final : BackgroundEstimator or None
        Refitted once with the last stage's converged mask, without masking again: the
        place for a smoothing that must not feed back into the masks (a stiffer one
        would let the masks creep into sky it does not follow).
    max_iter : int
        Iteration cap per stage (counted afresh when the smoothing floor is raised,
        see ``source_asymmetry``).
    change_tol : float
        A stage has converged when the background moved by less than this RMS (in
        units of the background RMS), or by less than ``error_tol`` times its own
        statistical error if that is larger ...
    mask_tol : float
        ... and the mask has settled: fewer than this share of the pixels changed mask
        state, or the masked share grew or shrank by less than this (a plateau, where
        pixels at the thresholds only flip back and forth).
    error_tol : float
        See ``change_tol``. The statistical error is the RMS error the pixel noise
        leaves in the fitted background (``SmoothResult.error``, in units of the
        background RMS; estimators that do not report one use ``change_tol`` alone): a
        change well inside it is one the data cannot tell from none, however many
        iterations are run. 0 switches it off.
    source_asymmetry : float or None
        In the last stage, after each refit by a
        :class:`~skymap.smooth.ThinPlateSmoother`, the upper-to-lower tail ratio of
        (background - a fit ``stiffen`` times longer) is measured
        (:meth:`~skymap.smooth.SmoothResult.asymmetry`). Sky structure gives as many
        dips as bumps; a ratio above this means the background is following source
        light left unmasked (faint extended wings), which only ever raises it. The
        smoothing is then held at least ``stiffen`` times longer for the rest of the
        stage and the final refit, so that the wings stay in the residual and get
        masked. None switches it off.
    stiffen : float
        See ``source_asymmetry``.

    Examples
    --------
    >>> from skymap.smooth import ThinPlateSmoother
    >>> rng = np.random.default_rng(3)
    >>> img = 10 + rng.normal(size=(128, 128))
    >>> img[60:64, 60:64] += 50
    >>> pipe = IterativeBackground(
    ...     first_guess=ThinPlateSmoother(smoothing_range=(1e6, 1e16)),
    ...     stages=(Stage(masker=HysteresisMasker(), estimator=ThinPlateSmoother()),))
    >>> res = pipe.fit(img)
    >>> bool(res.source_mask[61, 61]), bool(abs(res.background[61, 61] - 10) < 0.2)
    (True, True)
    """

    first_guess: Any
    stages: Sequence[Stage]
    final: Any = None
    max_iter: int = 5
    change_tol: float = 0.01
    mask_tol: float = 0.002
    error_tol: float = 0.5
    source_asymmetry: float | None = None
    stiffen: float = 4.0

    def __post_init__(self):
        if not callable(getattr(self.first_guess, "fit", None)):
            raise ValueError(
                f"first_guess must have a fit(image, mask) method, got {self.first_guess!r}"
            )
        stages = tuple(self.stages)
        if not stages:
            raise ValueError("stages must hold at least one Stage")
        for i, st in enumerate(stages):
            if not isinstance(st, Stage):
                raise ValueError(f"stages[{i}] must be a Stage, got {st!r}")
        object.__setattr__(self, "stages", stages)
        if self.final is not None and not callable(getattr(self.final, "fit", None)):
            raise ValueError(
                f"final must be None or have a fit(image, mask) method, got {self.final!r}"
            )
        if int(self.max_iter) != self.max_iter or self.max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        check_positive("change_tol", self.change_tol, allow_zero=True)
        check_positive("mask_tol", self.mask_tol, allow_zero=True)
        check_positive("error_tol", self.error_tol, allow_zero=True)
        check_positive("source_asymmetry", self.source_asymmetry, allow_none=True)
        if self.source_asymmetry is not None and self.source_asymmetry <= 1:
            raise ValueError(
                f"source_asymmetry must be None or > 1, got {self.source_asymmetry!r}"
            )
        if not self.stiffen > 1:
            raise ValueError(f"stiffen must be > 1, got {self.stiffen!r}")

    def fit(self, image, mask=None) -> BackgroundResult:
        """Fit the background of ``image`` (y, x), ignoring ``mask`` (True = excluded).

        Raises
        ------
        ValueError
            For a non-2-D image, a mask of another shape, or no valid pixel.
        """
        img = as_image(image)
        bad = combine_masks(img, as_mask(mask, img.shape))
        if bad.all():
            raise ValueError("image has no valid pixel: everything is masked or non-finite")
        history: list[IterationRecord] = []
        # Our maskers read a coarse noise map; any other gets the full map.
        coarse = all(isinstance(st.masker, HysteresisMasker) for st in self.stages)
        model = _fit_estimator(self.first_guess, img, bad, None)
        bkg, rms = _background_of(model), _working_rms(model, coarse)
        current = bad
        history.append(_record(-1, 0, model, current, None, None, img.shape))
        converged = False
        # Smoothing floor in pixels, raised (never lowered) when the last stage's fit is
        # found following source light.
        floor = None
        last = len(self.stages) - 1
        for k, stage in enumerate(self.stages):
            converged = False
            cap = self.max_iter if stage.max_iter is None else stage.max_iter
            it = count = 0
            while count < cap:
                # Only the residual is kept through the masking (memory): the previous
                # background is rebuilt from its model for the change, and the previous
                # mask is in the history, bit-packed, for the mask change.
                resid = np.subtract(img, bkg, dtype=img.dtype)
                del bkg, current
                detections = np.asarray(stage.masker(resid, rms, bad), dtype=bool)
                del resid, rms
                new = bad | detections
                del detections
                previous = model
                model = _fit_estimator(stage.estimator, img, new, _scale_of(history[-1]), floor)
                new_bkg, new_rms = _background_of(model), _working_rms(model, coarse)
                change = _change(new_bkg, _background_of(previous, 2), new_rms, bad)
                del previous
                packed = np.packbits(new.ravel())
                flips = np.bitwise_count(packed ^ history[-1].packed_mask).sum(dtype=np.int64)
                mask_change = float(flips) / new.size
                asymmetry, raised = float("nan"), False
                if k == last and self.source_asymmetry is not None:
                    asymmetry, floor, raised = self._check_asymmetry(model, floor)
                history.append(
                    _record(
                        k,
                        it,
                        model,
                        new,
                        change,
                        mask_change,
                        img.shape,
                        packed,
                        previous=history[-1],
                        asymmetry=asymmetry,
                        floor=floor,
                    )
                )
                rec = history[-1]
                log.debug(
                    "stage %d iteration %d: change %.4g (error %.4g), mask change %.4g "
                    "(growth %+.4g), mask %.3f, asymmetry %.3g, floor %s",
                    k,
                    it,
                    change,
                    rec.error,
                    mask_change,
                    rec.mask_growth,
                    rec.mask_fraction,
                    asymmetry,
                    floor,
                )
                # Rebound, not copied: no second name may keep the old maps alive
                # through the next masking.
                bkg, rms, current = new_bkg, new_rms, new
                del new_bkg, new
                it += 1
                # A raised floor changes the fit the masks are made against: the stage
                # starts its count again (the floor can rise only a few times).
                count = 0 if raised else count + 1
                if not raised and self.settled(rec):
                    converged = True
                    break
        noise = _typical_noise(rms, img, bad)
        del rms
        if self.final is not None:
            # Only the subsample the change needs is kept through the refit (memory).
            old = bkg[::2, ::2].copy()
            del bkg
            model = _fit_estimator(self.final, img, current, _scale_of(history[-1]), floor)
            bkg, new_rms = _background_of(model), _working_rms(model, coarse)
            change = _change(bkg, old, new_rms, bad)
            history.append(
                _record(
                    len(self.stages),
                    0,
                    model,
                    current,
                    change,
                    0.0,
                    img.shape,
                    previous=history[-1],
                    floor=floor,
                )
            )
        return BackgroundResult(
            background=bkg,
            mask=current,
            bad_mask=bad,
            history=tuple(history),
            config=self,
            noise=float(noise),
            converged=converged,
        )

    def settled(self, rec: IterationRecord) -> bool:
        """Whether the iteration ``rec`` meets the tolerances (see ``change_tol``): a
        stage stops at the first that does, and the fit has converged if its last
        stage did."""
        tol = self.change_tol
        if self.error_tol and math.isfinite(rec.error):
            tol = max(tol, self.error_tol * rec.error)
        mask_ok = rec.mask_change <= self.mask_tol or abs(rec.mask_growth) <= self.mask_tol
        return rec.change <= tol and mask_ok

    def _check_asymmetry(self, model, floor):
        """(asymmetry, new floor, whether it was raised) after a last-stage refit."""
        if not isinstance(model, SmoothResult):
            return float("nan"), floor, False
        asymmetry = model.asymmetry(self.stiffen)
        if asymmetry <= self.source_asymmetry:
            return asymmetry, floor, False
        stiff = self.stiffen * model.scale
        # A fit already at the image's stiffest plane cannot be stiffened further.
        limit = 4.0 * max(model.shape)
        if stiff >= limit or (floor is not None and stiff <= floor):
            return asymmetry, floor, False
        return asymmetry, stiff, True


def _working_rms(model: Any, coarse: bool = False):
    """The noise handed to the maskers: a scalar when the model's RMS grid varies by
    less than 5%; with ``coarse``, a :class:`CoarseRMS` for a thin-plate model (its
    noise map is smooth over many cells, so one value per block of half a cell loses
    nothing, and no full-resolution map is made); else the full map. Maps are floored
    at half their median: the smoothed variance can undershoot to zero where few
    pixels are left (masked crowds, the rims of blank regions), and a near-zero noise
    there would turn every fluctuation into a detection and every background change
    into an enormous one."""
    grid = getattr(model, "rms_grid", None)
    if grid is not None:
        g = np.asarray(grid)
        g = g[np.isfinite(g)]
        if g.size and g.min() > 0 and g.max() <= 1.05 * g.min():
            return float(np.median(g))
    if coarse and isinstance(model, SmoothResult):
        q = _pow2_at_most(min(model.cell_size) / 2.0, *model.shape)
        if q > 1:
            values = upsample(
                model.rms_grid, model.cell_size, model.shape, np.float32, q, (q - 1) / 2.0
            )
            _floor_at_half_median(values)
            return CoarseRMS(values=values, step=q, shape=model.shape)
    f = getattr(model, "rms_map", None)
    # A fresh map of our own, floored in place: the masked copies and temporaries of
    # a vectorised floor were the fit's memory peak.
    rms = np.ascontiguousarray(f() if callable(f) else np.array(model.rms))
    if rms.ndim == 0:
        return rms  # a positive constant is its own floor
    _floor_at_half_median(rms)
    return rms


def _floor_at_half_median(rms: np.ndarray) -> None:
    sample = _k.positive_sample(rms, 250_000)
    if sample.size:
        _k.floor_in_place(rms, rms.dtype.type(0.5 * float(np.median(sample))))


def _typical_noise(rms, img, bad) -> float:
    """Median of the noise over the valid pixels (over the valid blocks for a
    CoarseRMS, so that no full-resolution map is made)."""
    if np.ndim(rms) == 0:
        return float(rms)
    if isinstance(rms, CoarseRMS):
        _, cnt = _masked_block_sums(img, bad, rms.step)
        return float(np.median(rms.values[cnt > 0]))
    # The selection is a fresh copy: the median may partition it in place.
    return float(np.median(np.asarray(rms)[~bad], overwrite_input=True))


def _scale_of(record: IterationRecord) -> float | None:
    return record.scale


def _fit_estimator(estimator, img, mask, scale, floor=None):
    if isinstance(estimator, ThinPlateSmoother) and (scale is not None or floor is not None):
        return estimator.fit(
            img,
            mask,
            smoothing_start=None if scale is None else scale**4,
            min_smoothing=None if floor is None else floor**4,
        )
    return estimator.fit(img, mask)


def _change(new, old_sub, rms, bad) -> float:
    """RMS over valid pixels of (new - old) / rms. A smooth map's change is well
    measured on every other pixel of every other row, at a quarter of the memory and
    time; ``old_sub`` is the old map's subsample."""
    sigma, q = _noise_grid(rms)
    return _k.subsampled_change(new, old_sub, bad, sigma, q)


def _record(
    stage,
    it,
    model,
    mask,
    change,
    mask_change,
    shape,
    packed=None,
    *,
    previous=None,
    asymmetry=float("nan"),
    floor=None,
) -> IterationRecord:
    scale = getattr(model, "scale", None)
    error = getattr(model, "error", None)
    fraction = float(np.count_nonzero(mask)) / mask.size
    return IterationRecord(
        stage=stage,
        iteration=it,
        mask_fraction=fraction,
        mask_change=float("nan") if mask_change is None else mask_change,
        mask_growth=float("nan") if previous is None else fraction - previous.mask_fraction,
        change=float("nan") if change is None else change,
        error=float("nan") if error is None else float(error),
        scale=None if scale is None else float(scale),
        asymmetry=float(asymmetry),
        min_scale=None if floor is None else float(floor),
        model=model,
        packed_mask=np.packbits(mask.ravel()) if packed is None else packed,
        shape=tuple(shape),
    )


# --------------------------------------------------------------------------- defaults


def default_pipeline(image, mask=None, **options) -> IterativeBackground:
    """The default :class:`IterativeBackground` for ``image``, chosen from the data.

    * First guess: a thin-plate smooth of the whole image with the smoothing chosen by
      GCV (:class:`~skymap.smooth.ThinPlateSmoother`).
    * Stage 1 masks the obvious sources: scales of 2 and 4 px (computed on binned
      images, so cheap), high thresholds; two iterations are enough, as stage 2
      remasks from scratch with the 1-px scale too.
    * Stage 2 masks deep: scales 1-8 px, seeds at 4 sigma of the smoothed noise after
      the surround subtraction, grown over the plain smoothed residual down to 2 sigma.
    * Final refit with the converged mask: GCV's smoothing, stiffened if needed until
      the residual is white in blocks twice the largest masking scale (16 px), so the
      background does not follow the noise on the scales of the sources it masked.
    * Stage 2 checks after each refit whether the background follows source light
      (``source_asymmetry=2.5``: bumps against a 4 times stiffer fit more than 2.5 times
      deeper than its dips, as unmasked galaxy wings give and sky structure does not);
      if so, the smoothing is held at least that stiff for the rest of the fit.
    * A stage stops when its mask has settled and the background moved by less than
      0.01 of its RMS or half its own statistical error (``error_tol=0.5``), or after
      8 iterations.

    Every refit chooses its smoothing length by GCV on the masked image, so the
    smoothing follows the data's structure scale and shrinks as the masks remove the
    sources that GCV would otherwise try to follow. Thresholds are in units of the noise
    after smoothing, so they carry over between images of any noise level; the cell
    size follows the image size.

    Parameters
    ----------
    image, mask
        As for :func:`fit`.
    **options
        ``high``, ``low`` (final hysteresis thresholds in smoothed-noise sigma),
        ``max_iter``, ``change_tol``, ``mask_tol``, ``error_tol``,
        ``source_asymmetry`` (None switches the stiffening off), ``cell_size``,
        ``gcv_inflation``.

    Examples
    --------
    >>> pipe = default_pipeline(np.zeros((256, 256)))
    >>> len(pipe.stages), pipe.stages[-1].masker.scales
    (2, (1.0, 2.0, 4.0, 8.0))
    """
    as_image(image)
    known = {
        "high",
        "low",
        "max_iter",
        "change_tol",
        "mask_tol",
        "error_tol",
        "source_asymmetry",
        "cell_size",
        "gcv_inflation",
    }
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; accepted: {sorted(known)}")
    high = float(options.get("high", 4.0))
    scales = (1.0, 2.0, 4.0, 8.0)
    low = float(options.get("low", 2.0))
    smoother_options = {"cell_size": options.get("cell_size")}
    if "gcv_inflation" in options:
        smoother_options["gcv_inflation"] = options["gcv_inflation"]
    smoother = ThinPlateSmoother(**smoother_options)
    stages = (
        Stage(
            masker=HysteresisMasker(scales=(2.0, 4.0), high=high + 1.0, low=low + 0.5),
            estimator=smoother,
            max_iter=2,
        ),
        Stage(
            masker=HysteresisMasker(scales=scales, high=high, low=low, grow_plain=True),
            estimator=smoother,
        ),
    )
    final = ThinPlateSmoother(**smoother_options, protect_scale=2.0 * max(scales))
    return IterativeBackground(
        first_guess=smoother,
        stages=stages,
        final=final,
        max_iter=options.get("max_iter", 8),
        change_tol=options.get("change_tol", 0.01),
        mask_tol=options.get("mask_tol", 0.002),
        error_tol=options.get("error_tol", 0.5),
        source_asymmetry=options.get("source_asymmetry", 2.5),
    )


def fit(image, mask=None, **options) -> BackgroundResult:
    """Fit the background of ``image`` with the default pipeline, tuned from the data.

    Parameters
    ----------
    image : array_like (ny, nx)
        Integer input becomes float32; float32 stays float32.
    mask : array_like of bool, optional
        True = excluded. NaN and inf pixels are excluded automatically.
    **options
        Passed to :func:`default_pipeline`.

    Returns
    -------
    BackgroundResult

    Examples
    --------
    >>> from skymap.simulate import notebook_scene
    >>> scene = notebook_scene(shrink_factor=8)
    >>> res = fit(scene.image)
    >>> err = np.sqrt(np.mean((res.background - scene.sky) ** 2)) / scene.noise_sigma
    >>> bool(err < 0.2)
    True
    """
    return default_pipeline(image, mask, **options).fit(image, mask)
