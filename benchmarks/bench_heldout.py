"""Held-out scenes: ``skymap.fit`` against its peers on images it was not tuned on.

The scenes are drawn here, by a generator independent of :mod:`skymap.quality.simulate`
(it shares no code, conventions or parameter values with it): astropy.modeling's
profiles, numpy and scipy, every parameter drawn at random per seed from broad ranges.

Categories (``--categories``):

* ``halos``    saturated stars: Moffat cores (beta 1.5-3) plus a power-law aureole
  (r^-2 .. r^-3) that stays above 0.1 sigma out to 150-250 px, clipped at a full-well
  plateau (bleed columns on some), the saturation mask passed on some seeds and not on
  others; ordinary stars; a sky plane with a weak curvature.
* ``cluster``  a cluster core: an n=4 Sersic BCG, intracluster light (Re 10-30% of the
  frame), ~50 member galaxies, faint field galaxies and stars, a weak sky gradient. The
  ICL is SOURCE: the truth sky excludes it.
* ``bump``     extended galaxies (Sersic n 0.5-4, Re 10-80 px) on a sky with one broad
  Gaussian bump (FWHM 20-40% of the frame, 1-3 sigma) and a gradient.
* ``nebula``   an infrared-like nebula as SKY: a lognormal power-law Gaussian random
  field (spectral slope -2.5..-3.5) plus filaments, point sources denser where it is
  bright, white plus correlated noise.
* ``deep``     a deep flat field: thousands of faint galaxies, many near the noise, a
  tiny gradient.
* ``units``    one of the above rescaled to physical units (x 3e-19 + 1e-18, or MJy/sr
  near 1e-3), as big-endian float64 or float32.
* ``crowded``  a confusion-limited star field (a bulge or globular-cluster outskirt):
  5,000-40,000 stars per Mpix from a steep power-law luminosity function reaching well
  under the noise, Moffat PSF, a sky plane.
* ``counts``   a low-count photon image (X-ray, UV, narrow band): Poisson counts of a sky
  of 0.1-30 counts per pixel with a gradient, stars and galaxies; as integers, or divided
  by an exposure time (counts/s). sigma is the square root of the mean sky counts.
* ``vignette`` a frame whose sky falls off by 3-30 sigma towards the corners (vignetting
  or a flat field gone wrong: the sky, not a source), with stars and galaxies.

Galaxies are drawn sharp and blurred by the scene's Moffat PSF (stars are drawn with
it directly).

Truth is the smooth sky only. Scores, per method, over valid pixels (not flagged, not
saturated): ``rms`` of (background - sky) / sigma (sigma: the true per-pixel noise),
``bias``: the mean of the same under source pixels (sources > 1 sigma), ``masked``:
skymap's excluded fraction, ``conv``: skymap converged, ``s/Mpix``: wall-clock seconds
per megapixel (the machine's two cores are shared, so take it as a rough figure).
NoiseChisel counts as one peer, the better of its two configurations per image; its
failures are recorded, not raised.

    python benchmarks/bench_heldout.py [--categories halos cluster ...] [--seeds 0 1 2]
        [--size N] [--methods skymap,photutils_1pass,...] [--json out.json]

Without ``--size`` each image's side is drawn from 1024-2048 px. On ``units`` scenes
``skymap (native units)`` is the same fit on the scene before rescaling.
"""

from __future__ import annotations

import argparse
import json
import os

# photutils' OpenMP threads spin-wait after each call and starve numba's.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.modeling.functional_models import Gaussian2D, Moffat2D, Sersic2D
from bench_real import _commit  # the benchmarks folder is on sys.path when run as a script
from scipy import ndimage, signal

# new categories go at the end: a category's scenes are seeded by its index
CATEGORIES = (
    "halos",
    "cluster",
    "bump",
    "nebula",
    "deep",
    "units",
    "crowded",
    "counts",
    "vignette",
)
SEED_BASE = 7919  # scene seeds are (SEED_BASE, category index, seed)


@dataclass
class Scene:
    image: np.ndarray
    sky: np.ndarray  # truth, same units as image
    sigma: float  # true per-pixel noise, same units
    sources: np.ndarray  # bool: source light > 1 sigma
    valid: np.ndarray  # bool: pixels scored (not flagged, not saturated)
    mask: np.ndarray | None  # what the methods are given
    info: dict = field(default_factory=dict)
    native: Scene | None = None  # ``units``: the same scene before rescaling


# --------------------------------------------------------------------------- profiles


def _stamp(canvas, cx, cy, radius, func):
    """Add ``func(x, y)`` (absolute pixel coordinates) to ``canvas`` on the box of
    half-side ``radius`` around (cx, cy), clipped to the frame."""
    ny, nx = canvas.shape
    r = int(np.ceil(radius))
    x0, x1 = max(0, int(cx) - r), min(nx, int(cx) + r + 1)
    y0, y1 = max(0, int(cy) - r), min(ny, int(cy) + r + 1)
    if x0 >= x1 or y0 >= y1:
        return
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    canvas[y0:y1, x0:x1] += func(x, y)


def add_sersic(canvas, *, amp, re, n, cx, cy, ell, theta, reach=None):
    """Sersic profile, amplitude ``amp`` at the effective radius, drawn out to
    ``reach`` (default 8 Re, where an n=4 profile is at 0.5% of its Re value)."""
    reach = 8.0 * re if reach is None else reach
    _stamp(
        canvas,
        cx,
        cy,
        reach,
        lambda x, y: Sersic2D.evaluate(x, y, amp, re, n, cx, cy, ell, theta),
    )


def moffat_gamma(fwhm, beta):
    return fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def add_star(canvas, *, peak, cx, cy, fwhm, beta, floor, taper=None):
    """Moffat star drawn out to where it falls to ``floor``; ``taper``: a Gaussian
    roll-off radius for a core whose wing is drawn separately (the aureole)."""
    g = moffat_gamma(fwhm, beta)
    reach = min(2.0 * max(canvas.shape), g * (peak / floor) ** (1.0 / (2.0 * beta)))
    if taper is not None:
        reach = min(reach, 3.0 * taper)

    def f(x, y):
        v = Moffat2D.evaluate(x, y, peak, cx, cy, g, beta)
        if taper is not None:
            v = v * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / taper**2)
        return v

    _stamp(canvas, cx, cy, max(reach, 3.0 * fwhm), f)


def psf_blur(image, fwhm, beta):
    """``image`` seen through a Moffat PSF (galaxies are drawn sharp, then blurred: no
    real image holds structure sharper than its PSF)."""
    g = moffat_gamma(fwhm, beta)
    h = int(np.ceil(4 * fwhm))
    y, x = np.mgrid[-h : h + 1, -h : h + 1].astype(np.float64)
    k = Moffat2D.evaluate(x, y, 1.0, 0.0, 0.0, g, beta)
    return signal.fftconvolve(image, k / k.sum(), mode="same")


def plane(shape, rng, amplitude):
    """A plane tilted in a random direction, ``amplitude`` peak to peak over the frame."""
    ny, nx = shape
    phi = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[:ny, :nx]
    t = (np.cos(phi) * (x / nx - 0.5) + np.sin(phi) * (y / ny - 0.5)) / np.sqrt(0.5)
    return amplitude * 0.5 * t


def loguniform(rng, lo, hi, size=None):
    return np.exp(rng.uniform(np.log(lo), np.log(hi), size))


def field_stars(canvas, rng, sigma, count, fwhm, beta):
    """Ordinary stars, peaks from a power law between 1 and 300 sigma."""
    ny, nx = canvas.shape
    peaks = sigma * loguniform(rng, 1.0, 300.0, count) ** 1.0
    for p in peaks:
        add_star(
            canvas,
            peak=p,
            cx=rng.uniform(0, nx),
            cy=rng.uniform(0, ny),
            fwhm=fwhm,
            beta=beta,
            floor=0.01 * sigma,
        )


def field_galaxies(canvas, rng, sigma, count, re_range, amp_range, n_range=(0.5, 4.0)):
    ny, nx = canvas.shape
    for _ in range(count):
        re = loguniform(rng, *re_range)
        add_sersic(
            canvas,
            amp=sigma * loguniform(rng, *amp_range),
            re=re,
            n=rng.uniform(*n_range),
            cx=rng.uniform(0, nx),
            cy=rng.uniform(0, ny),
            ell=rng.uniform(0.0, 0.7),
            theta=rng.uniform(0, np.pi),
        )


# --------------------------------------------------------------------------- scenes


def _side(rng, size):
    return int(size) if size else int(rng.integers(1024, 2049))


def _finish(sky, src, sigma, rng, *, mask=None, valid=None, extra_noise=None, info=None):
    noise = rng.normal(0.0, sigma, sky.shape) if extra_noise is None else extra_noise
    image = (sky + src + noise).astype(np.float32)
    valid = np.ones(sky.shape, bool) if valid is None else valid
    return Scene(image, sky, sigma, src > sigma, valid, mask, info or {})


def scene_halos(rng, size):
    n = _side(rng, size)
    sigma = loguniform(rng, 2.0, 30.0)
    level = rng.uniform(50.0, 3000.0)
    sky = level + plane((n, n), rng, rng.uniform(0.3, 2.0) * sigma)
    y, x = np.mgrid[:n, :n]
    curv = rng.uniform(-1.0, 1.0) * sigma
    sky += curv * (((x - n / 2) / n) ** 2 + ((y - n / 2) / n) ** 2) * 4
    src = np.zeros((n, n))
    fwhm, beta = rng.uniform(2.5, 5.0), rng.uniform(1.5, 3.0)
    field_stars(src, rng, sigma, int(rng.integers(150, 500) * (n / 1024) ** 2), fwhm, beta)
    full_well = level + sigma * loguniform(rng, 300.0, 3000.0)
    nbright = int(rng.integers(2, 6))
    halo_r = []
    bright = np.zeros((n, n))
    for _ in range(nbright):
        cx, cy = rng.uniform(0.1 * n, 0.9 * n), rng.uniform(0.1 * n, 0.9 * n)
        peak = (full_well - level) * loguniform(rng, 3.0, 300.0)
        bfwhm, bbeta = rng.uniform(3.0, 6.0), rng.uniform(1.5, 3.0)
        rh, k = rng.uniform(150.0, 250.0), rng.uniform(2.0, 3.0)
        rc = rng.uniform(5.0, 15.0)
        reach = min(2.0 * n, rh * 3.0)
        amp = 0.1 * sigma * ((rh**2 + rc**2) / rh**2) ** (k / 2)
        # the Moffat core rolls off inside the halo radius: the aureole is the wing
        add_star(
            bright,
            peak=peak,
            cx=cx,
            cy=cy,
            fwhm=bfwhm,
            beta=bbeta,
            floor=0.01 * sigma,
            taper=0.4 * rh,
        )
        _stamp(
            bright,
            cx,
            cy,
            reach,
            lambda xx, yy, cx=cx, cy=cy, amp=amp, rh=rh, rc=rc, k=k: (
                amp * (((xx - cx) ** 2 + (yy - cy) ** 2 + rc**2) / rh**2) ** (-k / 2)
            ),
        )
        halo_r.append(round(rh))
    src += bright
    image_f = sky + src + rng.normal(0.0, sigma, (n, n))
    sat = image_f >= full_well
    # bleed: the excess charge of a saturated column runs along it (some images only)
    if rng.uniform() < 0.5:
        lab, nlab = ndimage.label(sat)
        for sl in ndimage.find_objects(lab):
            h = sl[0].stop - sl[0].start
            extra = int(h * rng.uniform(0.5, 3.0))
            mid = (sl[1].start + sl[1].stop) // 2
            w = max(1, (sl[1].stop - sl[1].start) // 4)
            sat[max(0, sl[0].start - extra) : sl[0].stop + extra, max(0, mid - w) : mid + w] = True
    image_f[sat] = full_well
    given = sat.copy() if rng.uniform() < 0.5 else None
    info = {
        "n": n,
        "sigma": round(float(sigma), 2),
        "bright": nbright,
        "halo_r": halo_r,
        "dq": given is not None,
        "sat_frac": round(float(sat.mean()), 4),
    }
    return Scene(image_f.astype(np.float32), sky, sigma, src > sigma, ~sat, given, info)


def scene_cluster(rng, size):
    n = _side(rng, size)
    sigma = loguniform(rng, 1.0, 20.0)
    level = rng.uniform(10.0, 1000.0)
    sky = level + plane((n, n), rng, rng.uniform(0.2, 1.0) * sigma)
    cx, cy = rng.uniform(0.3 * n, 0.7 * n, 2)
    src = np.zeros((n, n))
    ell, theta = rng.uniform(0.0, 0.4), rng.uniform(0, np.pi)
    # the BCG: bright n=4, Re 15-60 px, and the ICL: broad, shallow, same centre
    add_sersic(
        src,
        amp=sigma * loguniform(rng, 20, 200),
        re=rng.uniform(15, 60),
        n=4.0,
        cx=cx,
        cy=cy,
        ell=ell,
        theta=theta,
        reach=1.5 * n,
    )
    icl_re = rng.uniform(0.10, 0.30) * n
    icl_n = rng.uniform(1.0, 4.0)
    icl_amp = sigma * rng.uniform(0.3, 1.5)
    add_sersic(
        src,
        amp=icl_amp,
        re=icl_re,
        n=icl_n,
        cx=cx,
        cy=cy,
        ell=ell * rng.uniform(0.5, 1.0),
        theta=theta,
        reach=1.5 * n,
    )
    nmem = int(rng.integers(40, 61))
    spread = rng.uniform(0.12, 0.25) * n
    for _ in range(nmem):
        gx, gy = rng.normal([cx, cy], spread)
        add_sersic(
            src,
            amp=sigma * loguniform(rng, 1.0, 60.0),
            re=loguniform(rng, 3.0, 20.0),
            n=rng.uniform(1.0, 4.0),
            cx=gx,
            cy=gy,
            ell=rng.uniform(0, 0.6),
            theta=rng.uniform(0, np.pi),
        )
    field_galaxies(src, rng, sigma, int(300 * (n / 1024) ** 2), (1.0, 6.0), (0.5, 10.0))
    fwhm = rng.uniform(2.5, 4.5)
    src = psf_blur(src, fwhm, 3.0)
    field_stars(src, rng, sigma, int(100 * (n / 1024) ** 2), fwhm, 3.0)
    info = {
        "n": n,
        "sigma": round(float(sigma), 2),
        "icl_re": round(icl_re),
        "icl_n": round(icl_n, 2),
        "icl_amp_sigma": round(float(icl_amp / sigma), 2),
        "members": nmem,
    }
    return _finish(sky, src, sigma, rng, info=info)


def scene_bump(rng, size):
    n = _side(rng, size)
    sigma = loguniform(rng, 1.0, 20.0)
    level = rng.uniform(10.0, 1000.0)
    sky = level + plane((n, n), rng, rng.uniform(0.3, 1.5) * sigma)
    bx, by = rng.uniform(0.2 * n, 0.8 * n, 2)
    fwhm = rng.uniform(0.2, 0.4) * n
    bamp = rng.uniform(1.0, 3.0) * sigma
    sky = sky + Gaussian2D.evaluate(
        *np.mgrid[:n, :n][::-1].astype(float),
        bamp,
        bx,
        by,
        fwhm / 2.3548,
        fwhm / 2.3548 * rng.uniform(0.7, 1.0),
        rng.uniform(0, np.pi),
    )
    src = np.zeros((n, n))
    nbig = int(rng.integers(20, 50) * (n / 1024) ** 2)
    field_galaxies(src, rng, sigma, nbig, (10.0, 80.0), (0.3, 5.0))
    field_galaxies(src, rng, sigma, int(400 * (n / 1024) ** 2), (1.0, 8.0), (0.5, 20.0))
    psf = rng.uniform(2.5, 4.5)
    src = psf_blur(src, psf, 3.0)
    field_stars(src, rng, sigma, int(100 * (n / 1024) ** 2), psf, 3.0)
    info = {
        "n": n,
        "sigma": round(float(sigma), 2),
        "bump_fwhm": round(fwhm),
        "bump_sigma": round(float(bamp / sigma), 2),
        "big_galaxies": nbig,
    }
    return _finish(sky, src, sigma, rng, info=info)


def grf(shape, rng, slope, smooth):
    """A Gaussian random field with power spectrum k^slope, unit variance, smoothed by a
    Gaussian of ``smooth`` px (the truth is a smooth sky)."""
    ny, nx = shape
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.rfftfreq(nx)[None, :]
    k = np.hypot(ky, kx)
    k[0, 0] = np.inf
    amp = k ** (slope / 2.0) * np.exp(-2 * (np.pi * k * smooth) ** 2)
    f = np.fft.irfft2(
        amp * (rng.normal(size=amp.shape) + 1j * rng.normal(size=amp.shape)), s=shape
    )
    return (f - f.mean()) / f.std()


def scene_nebula(rng, size):
    n = _side(rng, size)
    sigma = loguniform(rng, 0.5, 10.0)
    level = rng.uniform(10.0, 500.0)
    slope = rng.uniform(-3.5, -2.5)
    g = grf((n, n), rng, slope, smooth=rng.uniform(8.0, 16.0))
    contrast = rng.uniform(0.4, 1.0)
    neb = np.exp(contrast * g)
    neb *= rng.uniform(2.0, 15.0) * sigma / neb.std()
    # filaments: smoothed random walks
    fil = np.zeros((n, n))
    for _ in range(int(rng.integers(3, 9))):
        steps = int(rng.integers(n // 2, 2 * n))
        ang = np.cumsum(rng.normal(0.0, 0.05, steps)) + rng.uniform(0, 2 * np.pi)
        px = np.clip(rng.uniform(0, n) + np.cumsum(np.cos(ang)), 0, n - 1).astype(int)
        py = np.clip(rng.uniform(0, n) + np.cumsum(np.sin(ang)), 0, n - 1).astype(int)
        np.add.at(fil, (py, px), rng.uniform(0.5, 2.0))
    width = rng.uniform(8.0, 20.0)
    fil = ndimage.gaussian_filter(fil, width)
    if fil.max() > 0:
        fil *= rng.uniform(2.0, 10.0) * sigma / fil.max()
    sky = level + neb + fil
    src = np.zeros((n, n))
    fwhm = rng.uniform(3.0, 6.0)
    bright_w = (neb + fil) / (neb + fil).mean()
    nstars = int(rng.integers(300, 1200) * (n / 1024) ** 2)
    # more stars where the nebula is bright: positions drawn with weight 1 + brightness
    p = (1.0 + bright_w).ravel()
    idx = rng.choice(n * n, size=nstars, p=p / p.sum())
    for i in idx:
        pk = sigma * loguniform(rng, 1.0, 500.0)
        add_star(
            src,
            peak=pk,
            cx=i % n + rng.uniform(-0.5, 0.5),
            cy=i // n + rng.uniform(-0.5, 0.5),
            fwhm=fwhm,
            beta=rng.uniform(2.0, 4.0),
            floor=0.01 * sigma,
        )
    # noise: white plus a correlated part (resampling-like), total per-pixel sigma
    cfrac = rng.uniform(0.3, 0.6)
    corr = ndimage.gaussian_filter(rng.normal(size=(n, n)), rng.uniform(1.0, 2.0))
    corr /= corr.std()
    noise = sigma * (np.sqrt(1 - cfrac) * rng.normal(size=(n, n)) + np.sqrt(cfrac) * corr)
    info = {
        "n": n,
        "sigma": round(float(sigma), 2),
        "slope": round(slope, 2),
        "neb_std_sigma": round(float(neb.std() / sigma), 1),
        "stars": nstars,
        "corr_frac": round(cfrac, 2),
    }
    return _finish(sky, src, sigma, rng, extra_noise=noise, info=info)


def scene_deep(rng, size):
    n = _side(rng, size)
    sigma = loguniform(rng, 1.0, 20.0)
    level = rng.uniform(1.0, 300.0)
    sky = level + plane((n, n), rng, rng.uniform(0.05, 0.3) * sigma)
    src = np.zeros((n, n))
    ngal = int(rng.integers(3000, 6000) * (n / 1024) ** 2)
    # counts rise steeply to the faint end: most near or under the noise
    field_galaxies(src, rng, sigma, ngal, (0.8, 6.0), (0.1, 3.0))
    field_galaxies(src, rng, sigma, ngal // 20, (3.0, 20.0), (1.0, 30.0))
    fwhm = rng.uniform(2.5, 4.0)
    src = psf_blur(src, fwhm, 3.5)
    field_stars(src, rng, sigma, int(80 * (n / 1024) ** 2), fwhm, 3.5)
    info = {
        "n": n,
        "sigma": round(float(sigma), 2),
        "galaxies": ngal + ngal // 20,
        "src_frac": round(float((src > sigma).mean()), 3),
    }
    return _finish(sky, src, sigma, rng, info=info)


def scene_units(rng, size):
    base = str(rng.choice(["halos", "cluster", "bump", "nebula", "deep"]))
    sc = SCENES[base](rng, size)
    if rng.uniform() < 0.5:
        scale, offset, unit = 3e-19, 1e-18, "erg/s/cm2/A"
    else:
        # MJy/sr near 1e-3: the sky level maps to ~1e-3
        scale = 1e-3 / max(float(np.median(sc.sky)), 1e-3) * rng.uniform(0.5, 2.0)
        offset, unit = 0.0, "MJy/sr"
    dtype = str(rng.choice([">f8", ">f4"]))
    img = (sc.image.astype(np.float64) * scale + offset).astype(dtype)
    info = dict(base=base, unit=unit, dtype=dtype, **sc.info)
    return Scene(
        img, sc.sky * scale + offset, sc.sigma * scale, sc.sources, sc.valid, sc.mask, info, sc
    )


def _moffat_kernel(fwhm, beta, reach):
    g = moffat_gamma(fwhm, beta)
    h = int(np.ceil(reach))
    y, x = np.mgrid[-h : h + 1, -h : h + 1].astype(np.float64)
    k = Moffat2D.evaluate(x, y, 1.0, 0.0, 0.0, g, beta)
    return k / k.sum()


def point_sources(shape, rng, fluxes, fwhm, beta, reach):
    """Stars of total ``fluxes`` at random sub-pixel positions: each flux shared
    bilinearly between four pixels, then convolved with the Moffat PSF (FFT)."""
    ny, nx = shape
    x, y = rng.uniform(0, nx - 1, fluxes.size), rng.uniform(0, ny - 1, fluxes.size)
    ix, iy = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - ix, y - iy
    pts = np.zeros(shape)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            np.add.at(pts, (iy + dy, ix + dx), fluxes * wy * wx)
    return signal.fftconvolve(pts, _moffat_kernel(fwhm, beta, reach), mode="same")


def scene_crowded(rng, size):
    n = _side(rng, size)
    sigma = loguniform(rng, 1.0, 30.0)
    level = rng.uniform(10.0, 3000.0)
    sky = level + plane((n, n), rng, rng.uniform(0.2, 2.0) * sigma)
    fwhm, beta = rng.uniform(2.0, 4.5), rng.uniform(2.5, 4.5)
    density = loguniform(rng, 5000.0, 40000.0)
    count = int(density * n * n / 1e6)
    # N(>peak) ~ peak^-alpha from 0.2 to 3000 sigma: most stars are under the noise
    alpha = rng.uniform(0.5, 0.9)
    lo, hi = 0.2, 3000.0
    u = rng.uniform(0, 1, count)
    peaks = lo * (1 - u * (1 - (lo / hi) ** alpha)) ** (-1 / alpha)
    k = _moffat_kernel(fwhm, beta, 6 * fwhm)
    src = point_sources((n, n), rng, sigma * peaks / k.max(), fwhm, beta, 6 * fwhm)
    info = {
        "n": n,
        "sigma": round(float(sigma), 2),
        "stars_per_mpix": round(density),
        "alpha": round(float(alpha), 2),
        "fwhm": round(float(fwhm), 2),
        "mean_star_light_sigma": round(float(src.mean() / sigma), 3),
    }
    return _finish(sky, src, sigma, rng, info=info)


def scene_counts(rng, size):
    n = _side(rng, size)
    lam = loguniform(rng, 0.1, 30.0)
    sky = lam * (1.0 + plane((n, n), rng, rng.uniform(0.1, 0.5)))
    sigma = float(np.sqrt(lam))
    src = np.zeros((n, n))
    field_galaxies(src, rng, sigma, int(150 * (n / 1024) ** 2), (1.5, 25.0), (0.5, 20.0))
    fwhm = rng.uniform(2.0, 5.0)
    src = psf_blur(src, fwhm, 3.0)
    field_stars(src, rng, sigma, int(300 * (n / 1024) ** 2), fwhm, 3.0)
    counts = rng.poisson(sky + src)
    exptime = None
    if rng.uniform() < 0.5:
        image = counts.astype(str(rng.choice(["int32", "uint16"])))
    else:
        exptime = float(rng.uniform(100.0, 5000.0))
        image = (counts / exptime).astype(np.float32)
        sky, src, sigma = sky / exptime, src / exptime, sigma / exptime
    info = {
        "n": n,
        "sky_counts": round(float(lam), 3),
        "dtype": str(image.dtype),
        "exptime": None if exptime is None else round(exptime, 1),
    }
    valid = np.ones((n, n), bool)
    return Scene(image, sky, sigma, src > sigma, valid, None, info)


def scene_vignette(rng, size):
    n = _side(rng, size)
    sigma = loguniform(rng, 1.0, 30.0)
    level = rng.uniform(100.0, 5000.0)
    drop = rng.uniform(3.0, 30.0) * sigma  # sky fall-off from the optical axis to a corner
    cx, cy = rng.uniform(0.35 * n, 0.65 * n, 2)
    y, x = np.mgrid[:n, :n].astype(np.float64)
    r2 = ((x - cx) ** 2 + (y - cy) ** 2) / (0.5 * n * np.sqrt(2.0)) ** 2
    shape = r2 if rng.uniform() < 0.5 else r2**2  # cos^4-like or steeper
    sky = level + plane((n, n), rng, rng.uniform(0.0, 2.0) * sigma) - drop * shape
    src = np.zeros((n, n))
    field_galaxies(src, rng, sigma, int(200 * (n / 1024) ** 2), (1.5, 30.0), (0.5, 20.0))
    fwhm = rng.uniform(2.0, 5.0)
    src = psf_blur(src, fwhm, 3.0)
    field_stars(src, rng, sigma, int(400 * (n / 1024) ** 2), fwhm, 3.0)
    info = {"n": n, "sigma": round(float(sigma), 2), "drop_sigma": round(float(drop / sigma), 1)}
    return _finish(sky, src, sigma, rng, info=info)


SCENES = {
    "halos": scene_halos,
    "cluster": scene_cluster,
    "bump": scene_bump,
    "nebula": scene_nebula,
    "deep": scene_deep,
    "units": scene_units,
    "crowded": scene_crowded,
    "counts": scene_counts,
    "vignette": scene_vignette,
}


def make_scene(category, seed, size=None):
    rng = np.random.default_rng([SEED_BASE, CATEGORIES.index(category), seed])
    return SCENES[category](rng, size)


# --------------------------------------------------------------------------- methods


def methods(names):
    import skymap
    from skymap.quality import peers

    avail = peers.peers()
    out = {}
    for name in names:
        if name == "skymap":
            out[name] = lambda im, m: skymap.fit(im, mask=m)
        elif name in avail:
            out[name] = avail[name]
    return out


def _cpu():
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def run_one(fn, sc):
    from skymap.quality.peers import PeerFailed

    t0, c0 = time.perf_counter(), _cpu()
    try:
        res = fn(sc.image, sc.mask)
    except (PeerFailed, ValueError, RuntimeError) as err:
        return {"failed": str(err)[:120]}
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    bkg = res.background if hasattr(res, "background") else res
    bkg = np.asarray(getattr(bkg, "value", bkg), dtype=np.float64)
    err = (bkg - sc.sky) / sc.sigma
    ok = sc.valid & np.isfinite(err)
    row = {
        "rms": float(np.sqrt(np.mean(err[ok] ** 2))),
        "bias": float(np.mean(err[ok & sc.sources])) if (ok & sc.sources).any() else float("nan"),
        "s_mpix": wall / (sc.image.size / 1e6),
        "cpu_mpix": cpu / (sc.image.size / 1e6),
    }
    if hasattr(res, "converged"):
        row.update(
            masked=float(np.asarray(res.mask)[sc.valid].mean()),
            conv=bool(res.converged),
            iters=len(res.history),
            note=str(getattr(res, "convergence_note", ""))[:200],
        )
    return row


def _f(v, spec=".3f"):
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def table(category, rows, seeds):
    """One markdown table: per method the RMS per seed, the means, and skymap's ratio to
    the best peer (NoiseChisel = the better of its two configurations per image)."""
    names = sorted({r["method"] for r in rows}, key=lambda m: (not m.startswith("skymap"), m))
    per = {(r["method"], r["seed"]): r for r in rows}
    # NoiseChisel: the better configuration per image
    nc = [m for m in names if m.startswith("noisechisel")]
    if nc:
        for s in seeds:
            ok = [per[(m, s)] for m in nc if (m, s) in per and "rms" in per[(m, s)]]
            per[("noisechisel_best", s)] = (
                min(ok, key=lambda r: r["rms"])
                if ok
                else {
                    "failed": "; ".join(per[(m, s)].get("failed", "") for m in nc if (m, s) in per)
                }
            )
        names.append("noisechisel_best")
    lines = [
        f"### {category}",
        "",
        "| method | "
        + " | ".join(f"rms s{s}" for s in seeds)
        + " | mean rms | bias | masked | conv | s/Mpix |",
        "| --- | " + " | ".join("---" for _ in seeds) + " | --- | --- | --- | --- | --- |",
    ]
    means = {}
    for m in names:
        rs = [per.get((m, s), {}) for s in seeds]
        good = [r for r in rs if "rms" in r]
        cell = [_f(r["rms"]) if "rms" in r else ("FAIL" if "failed" in r else "-") for r in rs]
        mean = float(np.mean([r["rms"] for r in good])) if len(good) == len(seeds) else None
        means[m] = mean
        bias = np.mean([r["bias"] for r in good]) if good else None
        masked = np.mean([r["masked"] for r in good]) if good and "masked" in good[0] else None
        conv = f"{sum(r['conv'] for r in good)}/{len(good)}" if good and "conv" in good[0] else ""
        spm = np.mean([r["s_mpix"] for r in good]) if good else None
        lines.append(
            f"| {m} | " + " | ".join(cell) + f" | {_f(mean)} | {_f(bias, '+.3f')} | "
            f"{_f(masked, '.2f')} | {conv} | {_f(spm, '.2f')} |"
        )
    peer_means = {
        m: v
        for m, v in means.items()
        if not m.startswith("skymap") and v is not None and m not in nc
    }
    if means.get("skymap") is not None and peer_means:
        best = min(peer_means, key=peer_means.get)
        lines += ["", f"skymap / best peer ({best}): {means['skymap'] / peer_means[best]:.2f}"]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--categories", nargs="*", default=list(CATEGORIES), choices=CATEGORIES)
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--size", type=int, help="image side in px (default: drawn from 1024-2048)")
    ap.add_argument(
        "--methods",
        default="skymap,photutils_1pass,photutils_2pass,sep_1pass,"
        "sep_2pass,noisechisel,noisechisel_structured",
    )
    ap.add_argument("--json", type=Path, help="write every row to this JSON file")
    args = ap.parse_args(argv)

    import skymap

    fns = methods(args.methods.split(","))
    if "skymap" in fns:  # warm the JIT on a small image
        skymap.fit(np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32))
    print(f"commit {_commit()}; methods: {', '.join(fns)}; size {args.size or '1024-2048'}")
    all_rows = []
    for cat in args.categories:
        rows = []
        for s in args.seeds:
            sc = make_scene(cat, s, args.size)
            print(f"{cat} seed {s}: {sc.info}", flush=True)
            runs = [(name, fn, sc) for name, fn in fns.items()]
            if sc.native is not None and "skymap" in fns:
                # the same scene in its native units: any difference is the units' doing
                runs.append(("skymap (native units)", fns["skymap"], sc.native))
            for name, fn, scene in runs:
                r = dict(category=cat, seed=s, method=name, **run_one(fn, scene))
                rows.append(r)
                print(
                    "   ",
                    {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()},
                    flush=True,
                )
        all_rows += rows
        print()
        print(table(cat, rows, args.seeds))
        print(flush=True)
        if args.json:
            args.json.write_text(json.dumps(all_rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
