"""The signals injected into a real image by :mod:`skymap.quality.injection`.

All amplitudes are in units of the image's pixel noise ``sigma`` and all sizes in
fractions of the frame's shorter side, so that scores compare across images:

* ``sky``: a gradient (end-to-end change 1-3 sigma, random direction) plus circular
  Gaussian bumps and dips (peak 1-3 sigma, Gaussian sigma 5-25% of the shorter side),
  four per square of the shorter side, half of them dips;
* ``galaxies``: exponential discs, surface brightness at the effective radius 0.3-1
  sigma, r_e 3-10% of the shorter side, axis ratio 0.4-1, three per square, not
  overlapping within 2 r_e; their footprint (where ``leak`` is measured) is within
  2 r_e;
* ``stars``: one bright star (Moffat core, FWHM 3 px, beta 2.5, peak 300-1000 sigma)
  with a power-law aureole (r^-2.5, 3% of the flux, out to 12% of the shorter side),
  the footprint being the aureole's disc;
* ``deep``: a deep field's galaxy population all over the frame: Sersic profiles of
  index 1 (discs) and 4 (spheroids), effective radius 1.5-6 px, surface brightness at
  the effective radius 0.1-1 sigma (log-uniform), at random positions, as many as add
  0.25 sigma of light to the mean pixel. Their cores are bright enough to detect (a
  spheroid's centre is ~2000 times its effective surface brightness); much of their
  light is in wings under the noise. No footprint: their light is everywhere, and
  ``deep`` is the mean rise of the background over the whole frame (0.25 would be all
  of it).

:func:`make_injections` is deterministic for ``(shape, sigma, seed, trial)``, and each
kind draws from its own stream, so asking for more kinds does not move the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["KINDS", "MIN_SIZE", "Injection", "make_injections"]

KINDS = ("sky", "galaxies", "stars", "deep")
#: Smallest image side (pixels): below it the smallest disc (3% of the frame) would be
#: under 2 px and the narrowest bump (5%) about 3 px, no longer "extended" or "broad".
MIN_SIZE = 64

# Injection ranges, as fractions of the frame's shorter side and in pixel-noise sigma.
_BUMP_AMPLITUDE = (1.0, 3.0)
_BUMP_WIDTH = (0.05, 0.25)
_GRADIENT_SPAN = (1.0, 3.0)
_BUMPS_PER_SQUARE = 4
_DISC_SB = (0.3, 1.0)
_DISC_RADIUS = (0.03, 0.10)
_DISC_AXIS_RATIO = (0.4, 1.0)
_DISCS_PER_SQUARE = 3
_DISC_FOOTPRINT = 2.0  # "under the disc": within this many effective radii
_EXP_B1 = 1.6783469900166606  # Sersic b_n for n = 1: half the light inside r_e
_STAR_PEAK = (300.0, 1000.0)
_STAR_FWHM = 3.0
_STAR_BETA = 2.5
_HALO_FRACTION = 0.03  # share of the star's flux in its power-law aureole
_HALO_RADIUS = 0.12
#: The deep population's mean light per pixel (sigma); its Sersic indices, effective
#: radii (px) and surface brightnesses at the effective radius (sigma, log-uniform).
DEEP_LIGHT = 0.25
_DEEP_INDEX = (1.0, 4.0)
_DEEP_RE = (1.5, 3.0, 6.0)
_DEEP_SB = (0.1, 1.0)


@dataclass(frozen=True, kw_only=True, eq=False)
class Injection:
    """One injected signal: the map (in image units) and the pixels its score reads.

    ``footprint`` is None for ``sky`` (scored over all valid pixels) and the disc or
    halo area for ``galaxies`` and ``stars``."""

    kind: str
    signal: np.ndarray = field(repr=False)
    footprint: np.ndarray | None = field(repr=False, default=None)


def _frame(shape) -> tuple[float, int]:
    ny, nx = shape
    short, long = min(ny, nx), max(ny, nx)
    # an elongated frame gets as many features per short-side square as a square one
    return float(short), max(1, round(long / short))


def _sky(rng, shape, sigma) -> np.ndarray:
    ny, nx = shape
    short, squares = _frame(shape)
    y = np.arange(ny, dtype=np.float64)
    x = np.arange(nx, dtype=np.float64)
    theta = rng.uniform(0, 2 * np.pi)
    span = rng.uniform(*_GRADIENT_SPAN) * sigma
    # span = end-to-end change along the direction; coordinates normalised per axis
    sky = span * (
        np.cos(theta) * (x / max(nx - 1, 1) - 0.5)[None, :]
        + np.sin(theta) * (y / max(ny - 1, 1) - 0.5)[:, None]
    )
    n = _BUMPS_PER_SQUARE * squares
    signs = rng.permutation(np.resize([1.0, -1.0], n))
    for s in signs:
        amp = s * rng.uniform(*_BUMP_AMPLITUDE) * sigma
        w = rng.uniform(*_BUMP_WIDTH) * short
        yc, xc = rng.uniform(0, ny), rng.uniform(0, nx)
        # a circular Gaussian is separable: two 1-D profiles, one outer product
        sky += amp * np.outer(
            np.exp(-0.5 * ((y - yc) / w) ** 2), np.exp(-0.5 * ((x - xc) / w) ** 2)
        )
    return sky


def _box(yc, xc, half, shape):
    y0, y1 = max(0, int(yc - half)), min(shape[0], int(yc + half) + 2)
    x0, x1 = max(0, int(xc - half)), min(shape[1], int(xc + half) + 2)
    return slice(y0, y1), slice(x0, x1)


def _galaxies(rng, shape, sigma) -> tuple[np.ndarray, np.ndarray]:
    ny, nx = shape
    short, squares = _frame(shape)
    signal = np.zeros(shape)
    footprint = np.zeros(shape, dtype=bool)
    placed: list[tuple[float, float, float]] = []
    for _ in range(_DISCS_PER_SQUARE * squares):
        re = rng.uniform(*_DISC_RADIUS) * short
        sb = rng.uniform(*_DISC_SB) * sigma
        q = rng.uniform(*_DISC_AXIS_RATIO)
        pa = rng.uniform(0, np.pi)
        # centres at least r_e inside the frame, discs not overlapping within 2 r_e
        for _try in range(50):
            yc, xc = rng.uniform(re, ny - re), rng.uniform(re, nx - re)
            if all(np.hypot(yc - y, xc - x) > _DISC_FOOTPRINT * (re + r) for y, x, r in placed):
                break
        placed.append((yc, xc, re))
        sy, sx = _box(yc, xc, 6 * re, shape)
        yy, xx = np.mgrid[sy, sx]
        dy, dx = yy - yc, xx - xc
        u = dx * np.cos(pa) + dy * np.sin(pa)
        v = -dx * np.sin(pa) + dy * np.cos(pa)
        r = np.hypot(u, v / q) / re
        signal[sy, sx] += sb * np.exp(-_EXP_B1 * (r - 1.0))
        footprint[sy, sx] |= r <= _DISC_FOOTPRINT
    return signal, footprint


def _star(rng, shape, sigma) -> tuple[np.ndarray, np.ndarray]:
    ny, nx = shape
    short, _ = _frame(shape)
    R = _HALO_RADIUS * short
    yc, xc = rng.uniform(R, ny - R), rng.uniform(R, nx - R)
    peak = rng.uniform(*_STAR_PEAK) * sigma
    alpha = _STAR_FWHM / (2 * np.sqrt(2 ** (1 / _STAR_BETA) - 1))
    sy, sx = _box(yc, xc, 1.5 * R, shape)
    yy, xx = np.mgrid[sy, sx]
    r = np.hypot(yy - yc, xx - xc)
    core = peak * (1 + (r / alpha) ** 2) ** -_STAR_BETA
    # Moffat total flux = peak * pi alpha^2 / (beta - 1); the aureole ~ r^-2.5 from one
    # FWHM out to R carries _HALO_FRACTION of it
    flux = peak * np.pi * alpha**2 / (_STAR_BETA - 1)
    r0 = _STAR_FWHM
    norm = 2 * np.pi * (r0**-0.5 - R**-0.5) / 0.5  # integral of r^-2.5 2 pi r dr
    aureole = np.where(r <= R, _HALO_FRACTION * flux / norm * np.maximum(r, r0) ** -2.5, 0.0)
    signal = np.zeros(shape)
    signal[sy, sx] = core + aureole
    footprint = np.zeros(shape, dtype=bool)
    footprint[sy, sx] = r <= R
    return signal, footprint


def _sersic_kernel(n: float, re: float) -> tuple[np.ndarray, float]:
    """A Sersic profile of index ``n`` and effective radius ``re`` (px) out to 8 ``re``,
    scaled to unit sum, and its analytic flux per unit surface brightness at ``re``."""
    from scipy.special import gamma, gammaincinv

    b = float(gammaincinv(2.0 * n, 0.5))
    half = int(np.ceil(8 * re))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    k = np.exp(-b * ((np.hypot(yy, xx) / re) ** (1.0 / n) - 1.0))
    flux = 2.0 * np.pi * n * np.exp(b) * gamma(2.0 * n) / b ** (2.0 * n) * re * re
    return k / k.sum(), float(flux)


def _deep(rng, shape, sigma) -> np.ndarray:
    from scipy.signal import fftconvolve

    ny, nx = shape
    kinds = [(n, re) for n in _DEEP_INDEX for re in _DEEP_RE]
    kernels = [_sersic_kernel(n, re) for n, re in kinds]
    lo, hi = np.log(_DEEP_SB[0]), np.log(_DEEP_SB[1])
    # as many galaxies as make DEEP_LIGHT per pixel on average
    mean_sb = (_DEEP_SB[1] - _DEEP_SB[0]) / (hi - lo)
    mean_flux = mean_sb * np.mean([f for _, f in kernels])
    count = rng.poisson(DEEP_LIGHT * ny * nx / mean_flux)
    sb = np.exp(rng.uniform(lo, hi, count)) * sigma
    which = rng.integers(0, len(kinds), count)
    y, x = rng.uniform(0, ny - 1, count), rng.uniform(0, nx - 1, count)
    iy, ix = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = y - iy, x - ix
    signal = np.zeros(shape)
    for j, (kernel, flux) in enumerate(kernels):
        sel = which == j
        # each galaxy's flux shared bilinearly between its four nearest pixels, then
        # one convolution per profile
        points = np.zeros((ny + 1, nx + 1))
        for dy, wy in ((0, 1 - fy[sel]), (1, fy[sel])):
            for dx, wx in ((0, 1 - fx[sel]), (1, fx[sel])):
                np.add.at(points, (iy[sel] + dy, ix[sel] + dx), flux * sb[sel] * wy * wx)
        signal += fftconvolve(points[:ny, :nx], kernel, mode="same")
    return signal


def make_injections(
    shape, sigma: float, *, kinds=("sky", "galaxies"), seed: int = 0, trial: int = 0
):
    """The injections of one trial: ``{kind: Injection}``, deterministic for
    ``(seed, trial)``.

    Examples
    --------
    >>> inj = make_injections((100, 100), 2.0, kinds=("sky",), seed=1)
    >>> sky = inj["sky"].signal
    >>> bool(1.0 < (sky.max() - sky.min()) / 2.0 < 12.0)
    True
    """
    rng = np.random.default_rng([int(seed), int(trial)])
    out = {}
    for kind in KINDS:
        # one draw per kind, in a fixed order, so a kind's map does not depend on which
        # other kinds were asked for
        sub = np.random.default_rng(rng.integers(2**63))
        if kind not in kinds:
            continue
        if kind == "sky":
            out[kind] = Injection(kind=kind, signal=_sky(sub, shape, sigma))
        elif kind == "galaxies":
            s, fp = _galaxies(sub, shape, sigma)
            out[kind] = Injection(kind=kind, signal=s, footprint=fp)
        elif kind == "deep":
            out[kind] = Injection(kind=kind, signal=_deep(sub, shape, sigma))
        else:
            s, fp = _star(sub, shape, sigma)
            out[kind] = Injection(kind=kind, signal=s, footprint=fp)
    return out
