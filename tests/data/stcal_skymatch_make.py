"""Deterministic 3x3 mosaic for the sky-matching tests, and stcal's skies for it.

``build_mosaic()`` needs only numpy and astropy, so the tests, the benchmark and this
script build the very same images. Run as a script, in an environment where stcal is
installed (it is heavy: see tests/data/README.md), it runs ``stcal.skymatch`` on the
mosaic and writes ``stcal_skymatch_skies.json`` beside itself:

    /work/stcalvenv/bin/python tests/data/stcal_skymatch_make.py

Mosaic: 3x3 images of 1024x1024 pixels on one TAN grid, neighbours overlapping by 60
pixels; each image = 100 + its own offset + the common sources + its own Gaussian noise
(sigma = 1). Sources (stars and a few extended blobs) are drawn once on the sky, so the
overlaps hold the same sources in both images.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from astropy.wcs import WCS

SEED = 20261121
SIZE = 1024
OVERLAP = 60
GRID = 3
BASE_SKY = 100.0
PIXEL_DEG = 0.1 / 3600.0
ENSEMBLE_SEEDS = tuple(range(1, 9))
ENSEMBLE_SIZE = 512
OUT = Path(__file__).with_name("stcal_skymatch_skies.json")


def _wcs(crpix_x: float, crpix_y: float) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.cdelt = [-PIXEL_DEG, PIXEL_DEG]
    w.wcs.crpix = [crpix_x, crpix_y]
    return w


def _render(shape, rng, n_stars, n_blobs):
    ny, nx = shape
    img = np.zeros(shape)
    yy, xx = np.mgrid[0:ny, 0:nx]
    # Stars: compact and bright; blobs: faint and extended (they bias a plain mean).
    populations = ((n_stars, (1.0, 2.5), (3.0, 3000.0)), (n_blobs, (15, 40), (1, 5)))
    for n, sig_rng, peak_rng in populations:
        ys = rng.uniform(0, ny, n)
        xs = rng.uniform(0, nx, n)
        sig = rng.uniform(*sig_rng, n)
        peak = np.exp(rng.uniform(np.log(peak_rng[0]), np.log(peak_rng[1]), n))
        for y, x, s, p in zip(ys, xs, sig, peak, strict=True):
            r = int(np.ceil(6 * s))
            y0, y1 = max(int(y) - r, 0), min(int(y) + r + 1, ny)
            x0, x1 = max(int(x) - r, 0), min(int(x) + r + 1, nx)
            dy = yy[y0:y1, x0:x1] - y
            dx = xx[y0:y1, x0:x1] - x
            img[y0:y1, x0:x1] += p * np.exp(-0.5 * (dx * dx + dy * dy) / (s * s))
    return img


def build_mosaic(seed: int = SEED, size: int = SIZE, overlap: int = OVERLAP, grid: int = GRID):
    """Return ``(images, wcs_list, offsets)``: float32 arrays in row-major order, their
    WCS, and each image's true sky offset (added to ``BASE_SKY``)."""
    rng = np.random.default_rng(seed)
    step = size - overlap
    full = step * (grid - 1) + size
    sources = _render((full, full), rng, n_stars=60 * grid * grid, n_blobs=3 * grid * grid)
    offsets = rng.uniform(-3.0, 3.0, grid * grid)
    centre = (full - 1) / 2.0
    images, wcss = [], []
    for k in range(grid * grid):
        r, c = divmod(k, grid)
        oy, ox = r * step, c * step
        cut = sources[oy : oy + size, ox : ox + size]
        noise = rng.standard_normal((size, size))
        images.append((BASE_SKY + offsets[k] + cut + noise).astype(np.float32))
        # FITS CRPIX is 1-based: the mosaic centre seen from this image's origin.
        wcss.append(_wcs(centre - ox + 1.0, centre - oy + 1.0))
    return images, wcss, offsets


def checksum(images) -> str:
    h = hashlib.sha256()
    for im in images:
        h.update(np.ascontiguousarray(im, dtype="<f4").tobytes())
    return h.hexdigest()


def stcal_skies(images, wcss, *, method: str, statistic: str, match_down: bool = True):
    """Skies from ``stcal.skymatch`` (only importable where stcal is installed)."""
    from stcal.skymatch import SkyImage, SkyStats, skymatch

    stats = SkyStats(skystat=statistic, lower=None, upper=None, nclip=5, lsig=4.0, usig=4.0)
    sky_images = []
    for k, (im, w) in enumerate(zip(images, wcss, strict=True)):

        def fwd(x, y, with_bounding_box=False, w=w):
            return w.all_pix2world(x, y, 0)

        def inv(ra, dec, with_bounding_box=False, w=w):
            return w.all_world2pix(ra, dec, 0)

        sky_images.append(
            SkyImage(
                image=im,
                mask=np.ones(im.shape, dtype=bool),
                wcs_fwd=fwd,
                wcs_inv=inv,
                skystat=stats,
                sky_id=k,
            )
        )
    skymatch(sky_images, skymethod=method, match_down=match_down, subtract=False)
    return [float(s.sky) for s in sky_images]


def _run_all(images, wcss):
    return {
        f"{method}|{statistic}": stcal_skies(images, wcss, method=method, statistic=statistic)
        for method in ("match", "global+match")
        for statistic in ("mode", "median", "mean")
    }


def main() -> int:
    import stcal

    images, wcss, offsets = build_mosaic()
    payload = {
        "stcal_version": stcal.__version__,
        "numpy_version": np.__version__,
        "seed": SEED,
        "size": SIZE,
        "overlap": OVERLAP,
        "grid": GRID,
        "checksum": checksum(images),
        "true_offsets": offsets.tolist(),
        "skies": _run_all(images, wcss),
        # Smaller mosaics over several noise draws: one draw cannot rank two estimators
        # that use the same pixels.
        "ensemble": [],
    }
    for seed in ENSEMBLE_SEEDS:
        images, wcss, offsets = build_mosaic(seed=seed, size=ENSEMBLE_SIZE)
        payload["ensemble"].append(
            {
                "seed": seed,
                "size": ENSEMBLE_SIZE,
                "checksum": checksum(images),
                "true_offsets": offsets.tolist(),
                "skies": _run_all(images, wcss),
            }
        )
    OUT.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
