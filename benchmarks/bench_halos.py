"""Bright stars on real images: does the background rise near them?

For each image, the brightest sources are taken from the image itself
(``HaloMasker.find`` on the image minus its median, the same stars for every run).
Around each, the local sky is the sigma-clipped median of the IMAGE in a ring of
150-200 px, and the figure is the largest excess of the fitted background over it within
``--near`` px of the star, in units of the fit's noise: ``max(bkg - sky) / noise``.
The issue's target: below 1 sigma. Runs ``skymap.fit`` with and without halo masking
(``halos=False`` is the pipeline before it) and reports both, with the fit's time.

    python benchmarks/bench_halos.py [--near 60] [--stars 5] [FILES ...]
    python benchmarks/bench_halos.py --scenes saturated_halos cluster_icl

``--scenes``: RMS and mean of ``background - sky`` (noise sigma) on the named simulated
scenes (1024 x 1024, seed 1, the scene's bad-pixel mask passed to every method) for
``skymap.fit`` (with and without halo masking) and the peers of
:mod:`skymap.quality.peers` (photutils and SEP one and two passes, NoiseChisel with its
defaults and its structured configuration), with wall-clock seconds per fit.
"""

from __future__ import annotations

import argparse
import glob
import os

# photutils' OpenMP threads spin-wait after each call and starve numba's.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import time

import numpy as np
from astropy.io import fits
from astropy.stats import sigma_clipped_stats

REAL = "/work/shared/data/real"


def load(path):
    with fits.open(path) as hdul:
        for hdu in hdul:
            if hdu.data is not None and hdu.data.ndim == 2:
                return np.asarray(hdu.data, dtype=np.float32)
    raise ValueError(f"{path}: no 2-D image")


def stars(img, k):
    from skymap.masking import HaloMasker

    ok = np.isfinite(img)
    med = np.median(img[ok])
    sig = 1.4826 * np.median(np.abs(img[ok] - med))
    found = HaloMasker().find(img - med, sig)
    return list(zip(found.y[:k], found.x[:k], found.saturated[:k], found.radius[:k], strict=True))


def excess(img, bkg, noise, y, x, near):
    ny, nx = img.shape
    yy, xx = np.ogrid[:ny, :nx]
    r = np.hypot(yy - y, xx - x)
    ring = (r >= 150) & (r < 200) & np.isfinite(img)
    _, sky, _ = sigma_clipped_stats(img[ring], sigma=3.0)
    inner = r <= near
    return float(np.nanmax(bkg[inner] - sky) / noise)


def scenes(names):
    import skymap
    from skymap.quality import peers
    from skymap.quality.simulate import scene_by_name

    methods = {
        "skymap": skymap.fit,
        "skymap (halos=False)": lambda im, m: skymap.fit(im, m, halos=False),
        **peers.peers(),
    }
    print("| scene | method | RMS error | mean error | s/fit |")
    print("| --- | --- | --- | --- | --- |")
    for name in names:
        sc = scene_by_name(name, seed=1)
        valid = np.ones(sc.shape, bool) if sc.mask is None else ~sc.mask
        for label, f in methods.items():
            t = time.perf_counter()
            try:
                out = f(sc.image, sc.mask)
            except Exception as exc:  # a peer that fails is reported, not fatal
                print(f"| {name} | {label} | failed: {str(exc)[:60]} | | |", flush=True)
                continue
            dt = time.perf_counter() - t
            bkg = np.asarray(getattr(out, "background", out), np.float64)
            err = (bkg - sc.sky)[valid] / sc.noise_sigma
            print(
                f"| {name} | {label} | {np.sqrt(np.mean(err**2)):.3f} | {err.mean():+.3f} "
                f"| {dt:.1f} |",
                flush=True,
            )


def main():
    import skymap

    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*")
    ap.add_argument("--near", type=float, default=60.0)
    ap.add_argument("--stars", type=int, default=5)
    ap.add_argument("--scenes", nargs="+", default=None)
    args = ap.parse_args()
    if args.scenes:
        scenes(args.scenes)
        return
    files = args.files or sorted(glob.glob(f"{REAL}/*.fits"))
    skymap.fit(np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32))
    print("| image | star (x, y) | sat | halo r | excess before | excess after |")
    print("| --- | --- | --- | --- | --- | --- |")
    for path in files:
        img = load(path)
        name = path.rsplit("/", 1)[-1]
        sel = stars(img, args.stars)
        fits_ = {}
        for halos in (False, True):
            t = time.perf_counter()
            res = skymap.fit(img, halos=halos)
            fits_[halos] = (res, time.perf_counter() - t)
        for y, x, sat, rad in sel:
            e0 = excess(img, fits_[False][0].background, fits_[False][0].noise, y, x, args.near)
            e1 = excess(img, fits_[True][0].background, fits_[True][0].noise, y, x, args.near)
            print(
                f"| {name} | ({x:.0f}, {y:.0f}) | {'yes' if sat else 'no'} | {rad:.0f} "
                f"| {e0:+.2f} | {e1:+.2f} |",
                flush=True,
            )
        mp = img.size / 1e6
        print(
            f"| {name} | times | | | {fits_[False][1] / mp:.2f} s/Mpix, mask "
            f"{fits_[False][0].source_mask.mean():.3f} | {fits_[True][1] / mp:.2f} s/Mpix, "
            f"mask {fits_[True][0].source_mask.mean():.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
