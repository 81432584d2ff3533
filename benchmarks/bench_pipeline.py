"""Accuracy and speed of ``skymap.fit`` against its peers.

Accuracy (``--accuracy``): on the STScI notebook's scene (``notebook_scene()``) and on the
named robustness scenes, the RMS of ``background - true sky`` in units of the noise
sigma, the mean residual under the catalogued sources (3x3 boxes) and the RMS-vs-scale
ratio to the perfect curve at 4, 8 and 16 px, for

* ``skymap``: ``skymap.fit(image, mask)`` with no options;
* ``recipe``: the notebook's hand-tuned five-step recipe, rebuilt on photutils 3 (ring
  median mask, 10-px meshes, IDW, a three-scale 1.5-sigma mask, 6-px meshes with IDW);
* ``B2D``: one pass of photutils ``Background2D`` (50-px boxes, 3x3 filter);
* ``SEP``: ``sep.Background`` with its defaults (64-px boxes, 3x3 filter);
* ``truemask``: ``Background2D`` given the TRUE source mask (sources brighter than
  0.05 sigma), at the best of a grid of box and filter sizes (notebook scene only).

Speed (``--speed``): ``skymap.fit`` against the recipe on the 1000x1000 notebook scene,
and against one pass of SEP on a 4096x4096 float32 scene, interleaved, medians of
``--repeat`` runs; peak extra memory of each (in a fresh subprocess, from the peak RSS
above the RSS after loading the image).

Run:  python benchmarks/bench_pipeline.py --accuracy --speed --speed-large
"""

from __future__ import annotations

import os

# photutils' compiled code leaves OpenMP worker threads spin-waiting after each call; on
# two cores they starve numba's OpenMP pool, and every later skymap kernel runs ~10x
# slower (measured: a 1000x1000 block sum, 1.3 ms -> 16 ms, after one Background2D).
# Passive waiting makes the interleaved timings fair to both. Must precede the imports.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
from _memory import blobs, reset_peak, status_kb

WIDTHS = (4, 8, 16)


# --------------------------------------------------------------------------- peers


def notebook_recipe(image):
    """The notebook's five steps on photutils 3; returns (background, mask)."""
    from astropy.convolution import Gaussian2DKernel, Ring2DKernel, Tophat2DKernel, convolve
    from astropy.stats import SigmaClip
    from photutils.background import (
        Background2D,
        BkgIDWInterpolator,
        BkgZoomInterpolator,
        MedianBackground,
    )
    from photutils.segmentation import detect_sources, detect_threshold
    from scipy.ndimage import median_filter

    def dilate(mask, size):
        kernel = Tophat2DKernel(size)
        return convolve(mask.astype(float), kernel) >= 1.0 / (np.pi * size**2)

    def background(img, box, mask, interp=None, filter_size=1, exclude_percentile=10):
        return Background2D(
            img,
            box,
            mask=mask,
            filter_size=filter_size,
            sigma_clip=SigmaClip(sigma=3.0),
            bkg_estimator=MedianBackground(),
            interpolator=interp or BkgZoomInterpolator(),
            exclude_percentile=exclude_percentile,
        )

    def source_mask(img, nsigma, fwhm, npixels=3):
        # photutils < 1.6 make_source_mask: sigma-clipped threshold on the raw image, a
        # 3x3 Gaussian kernel of the given FWHM, npixels connected pixels.
        threshold = detect_threshold(img, nsigma)
        kernel = Gaussian2DKernel(fwhm / 2.3548, x_size=3, y_size=3).array
        smoothed = convolve(img, kernel, normalize_kernel=True)
        segm = detect_sources(smoothed, threshold, npixels=npixels)
        return np.zeros(img.shape, bool) if segm is None else segm.data > 0

    # 1. ring-median first cut and a 1-sigma mask of the smoothed difference.
    filtered = median_filter(image, footprint=Ring2DKernel(15, 5).array.astype(bool))
    smoothed = convolve(image - filtered, Gaussian2DKernel(3))
    mask = smoothed > smoothed.std()
    # 2-3. 10-px meshes with a 5x5 filter, then inverse-distance weighting.
    idw = BkgIDWInterpolator(n_neighbors=20, power=1, regularization=30)
    bkg4 = background(image, 10, mask, interp=idw, filter_size=5, exclude_percentile=90)
    # 4. a deeper mask on three scales, OR-ed.
    resid = image - bkg4.background
    mask = np.zeros(image.shape, bool)
    for fwhm, tophat in zip((1, 3, 5), (4, 2, 1), strict=True):
        mask |= dilate(source_mask(resid, 1.5, fwhm), tophat)
    # 5. 6-px meshes, 3x3 filter, IDW with power 0.
    idw = BkgIDWInterpolator(n_neighbors=20, power=0, regularization=30)
    bkg5 = background(image, 6, mask, interp=idw, filter_size=3, exclude_percentile=90)
    return bkg5.background, mask


def background2d(image, mask=None):
    from astropy.stats import SigmaClip
    from photutils.background import Background2D, MedianBackground

    b = Background2D(
        image,
        50,
        mask=mask,
        filter_size=3,
        sigma_clip=SigmaClip(3.0),
        bkg_estimator=MedianBackground(),
    )
    return b.background


def sep_background(image, mask=None):
    import sep

    data = np.ascontiguousarray(image)
    if data.dtype not in (np.float32, np.float64):
        data = data.astype(np.float32)
    m = None if mask is None or not mask.any() else np.ascontiguousarray(mask)
    return sep.Background(data, mask=m).back()


def true_mask_mesh(image, true_mask, sky, sigma):
    """Background2D with the true mask at its best box and filter; (rms, box, filter)."""
    from astropy.stats import SigmaClip
    from photutils.background import Background2D, MedianBackground

    best = None
    for box in (8, 10, 12, 16, 20, 24, 32):
        for filt in (1, 3, 5):
            b = Background2D(
                image,
                box,
                mask=true_mask,
                filter_size=filt,
                sigma_clip=SigmaClip(3.0),
                bkg_estimator=MedianBackground(),
                exclude_percentile=90,
            )
            rms = float(np.sqrt(np.mean((b.background - sky) ** 2)) / sigma)
            if best is None or rms < best[0]:
                best = (rms, box, filt, b.background)
    return best


# --------------------------------------------------------------------------- metrics


def metrics(bkg, scene, mask):
    from skymap.quality.evaluate import bias_under_sources, perfect_curve, rms_vs_scale

    sigma = scene.noise_sigma
    valid = np.ones(bkg.shape, bool) if scene.mask is None else ~scene.mask
    err = (np.asarray(bkg, np.float64) - scene.sky)[valid] / sigma
    m = mask if scene.mask is None else (mask | scene.mask)
    ratio = rms_vs_scale(scene.image - bkg, m, WIDTHS) / perfect_curve(scene.noise, m, WIDTHS)
    bias = bias_under_sources(np.where(valid, bkg, np.nan), scene.sky, scene.catalog, m)
    under = np.nanmean(bias.residual) / sigma
    return {
        "rms_sigma": float(np.sqrt(np.mean(err**2))),
        "mean_sigma": float(err.mean()),
        "bias_under_sources_sigma": float(under),
        "ratio_4_8_16": [round(float(r), 3) for r in ratio],
    }


def accuracy(names):
    import skymap
    from skymap.quality.simulate import notebook_scene, scene_by_name

    rows = []
    for name in names:
        scene = notebook_scene() if name == "notebook" else scene_by_name(name, seed=1)
        bad = scene.mask
        res = skymap.fit(scene.image, bad)
        mask = res.mask
        entries = {"skymap": res.background}
        if name == "notebook":
            entries["recipe"], _ = notebook_recipe(scene.image)
        entries["B2D"] = background2d(scene.image, bad)
        entries["SEP"] = sep_background(scene.image, bad)
        for method, bkg in entries.items():
            rows.append({"scene": name, "method": method, **metrics(bkg, scene, mask)})
        if name == "notebook":
            true_mask = scene.sources > 0.05 * scene.noise_sigma
            rms, box, filt, bkg = true_mask_mesh(
                scene.image, true_mask, scene.sky, scene.noise_sigma
            )
            row = {"scene": name, "method": f"truemask(box {box}, filter {filt})"}
            rows.append({**row, **metrics(bkg, scene, mask)})
        for r in rows[-len(entries) - (name == "notebook") :]:
            print(json.dumps(r), flush=True)
    return rows


# --------------------------------------------------------------------------- speed


def _timed(f, *args):
    """Wall and CPU (all threads) seconds of one call."""
    t, c = time.perf_counter(), time.process_time()
    f(*args)
    return time.perf_counter() - t, time.process_time() - c


def _report(label, name_a, runs_a, name_b, runs_b):
    wa, ca = (statistics.median(v) for v in zip(*runs_a, strict=True))
    wb, cb = (statistics.median(v) for v in zip(*runs_b, strict=True))
    print(
        f"{label}: {name_a} {wa:.2f} s wall / {ca:.2f} s CPU, {name_b} {wb:.2f} s wall / "
        f"{cb:.2f} s CPU; ratio {wa / wb:.3f} (wall), {ca / cb:.3f} (CPU)"
    )


def speed(repeat):
    import skymap
    from skymap.quality.simulate import notebook_scene

    image = notebook_scene().image
    skymap.fit(image[:256, :256])  # compile the kernels outside the timing
    ts, tr = [], []
    for _ in range(repeat):
        ts.append(_timed(skymap.fit, image))
        tr.append(_timed(notebook_recipe, image))
    _report("1000x1000 notebook scene", "skymap.fit", ts, "recipe", tr)


def speed_large(repeat, n=4096):
    import skymap
    from skymap.quality.simulate import scene_by_name

    skymap.fit(
        np.zeros((256, 256), np.float32)
        + np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
    )
    big = scene_by_name("crowded_stellar", shape=(n, n), seed=0).image.astype(np.float32)
    ts, tp = [], []
    for _ in range(repeat):
        ts.append(_timed(skymap.fit, big))
        tp.append(_timed(sep_background, big))
    _report(f"{n}x{n} float32", "skymap.fit", ts, "SEP", tp)
    del big
    for which in ("skymap", "sep"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory", which, "--size", str(n)],
            capture_output=True,
            text=True,
            check=True,
        )
        print(out.stdout.strip())


def memory(which, n=4096):
    """Peak RSS above the RSS with the image loaded, in units of the image size (Linux:
    the peak is reset through /proc/self/clear_refs once the image is in memory). The
    image: noise, a gradient and 3000 5x5 sources per 4096^2."""
    import skymap

    image = blobs(n)
    run = (lambda a: skymap.fit(a)) if which == "skymap" else sep_background
    run(image[:256, :256].copy())
    base = reset_peak()
    run(image)
    peak = status_kb("VmHWM")
    print(
        f"{n}x{n} float32 {which}: peak extra memory {(peak - base) * 1024 / image.nbytes:.2f}"
        " x image"
    )


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--speed", action="store_true", help="1000x1000 against the recipe")
    p.add_argument("--speed-large", action="store_true", help="4096x4096 against SEP, memory")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--size", type=int, default=4096, help="side of --speed-large's image")
    p.add_argument(
        "--scenes",
        default="notebook,crowded_stellar,galaxies_lsb,nebula,detector_artifacts",
    )
    p.add_argument("--memory", choices=("skymap", "sep"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory:
        memory(args.memory, args.size)
        return
    if args.accuracy:
        accuracy(args.scenes.split(","))
    if args.speed:
        speed(args.repeat)
    if args.speed_large:
        speed_large(args.repeat, args.size)


if __name__ == "__main__":
    main()
