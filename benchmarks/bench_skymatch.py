"""Sky matching: skymap.mosaic.skymatch.match against stcal.skymatch, on the same images.

The mosaic is ``grid x grid`` images of ``size`` pixels (float32, Gaussian noise of 1,
a different sky offset per image, stars from one catalogue), neighbours overlapping by
``overlap`` pixels. Every image gets a TAN WCS with a sub-pixel shift and a small
rotation, so that no overlap is a plain integer translation (the general, slow path).
With ``--gradient G`` each image's sky also has its own gradient, uniform in [-G, G]
sigma across the image along x and along y.

Run (stcal needs its own environment, see benchmarks/README.md)::

    python benchmarks/bench_skymatch.py                      # skymap only, 10x10 x 1k^2
    python benchmarks/bench_skymatch.py --model plane        # planes, gradients 1.5 sigma
    /tmp/stcalvenv/bin/python benchmarks/bench_skymatch.py --grid 3 --stcal
    /tmp/stcalvenv/bin/python benchmarks/bench_skymatch.py --grid 3 --size 256 \
        --overlap 66 --model plane --stcal

With ``--stcal`` both run in one process, interleaved, ``--repeats`` times each; the
script prints each one's median time, the ratio, and each one's error: on the true
relative offsets (offsets), and, with ``--model plane``/``poly2``, the RMS over the
pixels of every image of its fitted sky minus the true sky once the one plane common to
all images on the sky (which matching cannot fix) is removed. stcal fits constants only.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np
from astropy.nddata import NDData
from astropy.wcs import WCS

from skymap.mosaic.skymatch import match

PIXEL_DEG = 0.1 / 3600.0


def _tan(crpix_x, crpix_y, theta=0.0):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    cos, sin = np.cos(theta), np.sin(theta)
    w.wcs.cd = PIXEL_DEG * np.array([[-cos, sin], [sin, cos]])
    w.wcs.crpix = [crpix_x, crpix_y]
    return w


def build(grid: int, size: int, overlap: int, seed: int = 1, gradient: float = 0.0):
    rng = np.random.default_rng(seed)
    step = size - overlap
    full = step * (grid - 1) + size
    centre = (full - 1) / 2.0
    offsets = rng.uniform(-3.0, 3.0, grid * grid)
    # Change of the sky across the image along x and y; u, v span [-1, 1]: slope G/2.
    slopes = rng.uniform(-gradient, gradient, (grid * grid, 2)) / 2.0
    u = (np.arange(size) - (size - 1) / 2.0) / (size / 2.0)
    # One star catalogue on the sky (50 stars per image area), seen by every image that
    # covers it, so that overlaps hold the same stars as in a real mosaic.
    n_stars = 50 * grid * grid
    ref = _tan(centre + 1.0, centre + 1.0)
    stars_world = ref.pixel_to_world_values(*rng.uniform(0, full, (2, n_stars)))
    peaks = np.exp(rng.uniform(np.log(5.0), np.log(500.0), n_stars))
    sy, sx = np.mgrid[-8:9, -8:9]
    images, wcss = [], []
    for k in range(grid * grid):
        r, c = divmod(k, grid)
        dy, dx = rng.uniform(-0.5, 0.5, 2)
        theta = np.radians(rng.uniform(-0.05, 0.05))
        w = _tan(centre - c * step + dx + 1.0, centre - r * step + dy + 1.0, theta)
        img = rng.standard_normal((size, size), dtype=np.float32)
        img += np.float32(100.0 + offsets[k])
        if gradient:
            img += (slopes[k, 0] * u[None, :] + slopes[k, 1] * u[:, None]).astype(np.float32)
        xs, ys = w.world_to_pixel_values(*stars_world)
        # Every star whose 17x17 stamp touches the image, cut at the image's edge: a star
        # left out near one image's edge but present in its neighbour would bias the
        # cells along that edge.
        inside = (xs > -9) & (xs < size + 8) & (ys > -9) & (ys < size + 8)
        for x, y, p in zip(xs[inside], ys[inside], peaks[inside], strict=True):
            iy, ix = int(round(y)), int(round(x))
            g = (sx + ix - x) ** 2 + (sy + iy - y) ** 2
            stamp = (p * np.exp(-0.5 * g / 4.0)).astype(np.float32)
            y0, x0 = max(iy - 8, 0), max(ix - 8, 0)
            y1, x1 = min(iy + 9, size), min(ix + 9, size)
            img[y0:y1, x0:x1] += stamp[y0 - iy + 8 : y1 - iy + 8, x0 - ix + 8 : x1 - ix + 8]
        images.append(img)
        wcss.append(w)
    truth = np.c_[offsets, slopes]  # each image's true plane in its own frame
    return images, wcss, truth, ref


def plane_error(coefficients, truth, wcss, ref, size: int, step: int = 8) -> float:
    """RMS over every ``step``-th pixel of every image of (fitted - true) sky, after
    removing by least squares the one plane common to all images on the sky (in the
    pixels of the mosaic's reference WCS)."""
    g = np.arange(0, size, step, dtype=float)
    xx, yy = np.meshgrid(g, g)
    u = (xx - (size - 1) / 2.0) / (size / 2.0)
    v = (yy - (size - 1) / 2.0) / (size / 2.0)
    res, cols = [], []
    for c, t, w in zip(coefficients, truth, wcss, strict=True):
        c = np.r_[c, np.zeros(3 - len(c))] if len(c) < 3 else c
        fitted = c[0] + c[1] * u + c[2] * v
        if len(c) == 6:
            fitted = fitted + c[3] * u * u + c[4] * u * v + c[5] * v * v
        res.append((fitted - (t[0] + t[1] * u + t[2] * v)).ravel())
        mx, my = ref.world_to_pixel_values(*w.pixel_to_world_values(xx.ravel(), yy.ravel()))
        cols.append(np.stack([np.ones(mx.size), mx / size, my / size], axis=1))
    r, a = np.concatenate(res), np.concatenate(cols)
    return float(np.sqrt(np.mean((r - a @ np.linalg.lstsq(a, r, rcond=None)[0]) ** 2)))


def rel_error(sky, truth):
    err = (np.asarray(sky) - np.mean(sky)) - (truth - np.mean(truth))
    return float(np.max(np.abs(err)))


def run_skymap(images, wcss, model="offset", statistic="mode"):
    nd = [NDData(im, wcs=w) for im, w in zip(images, wcss, strict=True)]
    return match(nd, model=model, statistic=statistic).coefficients


def run_stcal(images, wcss, model="offset", statistic="mode"):
    skies = _maker().stcal_skies(images, wcss, method="global+match", statistic=statistic)
    return np.array(skies)[:, None]  # constants: stcal has no sky gradients


def _maker():
    # The stcal call lives with the script that made the test reference, so that the
    # benchmark and the tests drive stcal the same way.
    path = Path(__file__).resolve().parents[1] / "tests" / "data" / "stcal_skymatch_make.py"
    spec = importlib.util.spec_from_file_location("stcal_skymatch_make", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, default=10)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--overlap", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stcal", action="store_true", help="also run stcal (must be importable)")
    ap.add_argument("--model", default="offset", choices=("offset", "plane", "poly2"))
    ap.add_argument(
        "--gradient",
        type=float,
        default=None,
        help="largest sky change across an image, sigma (default 0; 1.5 with --model plane)",
    )
    ap.add_argument("--statistic", default=None, help="default mode; mean for plane/poly2")
    args = ap.parse_args()
    gradient = args.gradient if args.gradient is not None else (args.model != "offset") * 1.5
    statistic = args.statistic or ("mode" if args.model == "offset" else "mean")

    t0 = time.perf_counter()
    images, wcss, truth, ref = build(args.grid, args.size, args.overlap, gradient=gradient)
    print(
        f"{args.grid}x{args.grid} images of {args.size}^2, overlap {args.overlap} px, "
        f"gradients up to {gradient} sigma, model {args.model}, statistic {statistic} "
        f"(built in {time.perf_counter() - t0:.1f} s)"
    )
    runners = {"skymap": run_skymap}
    if args.stcal:
        runners["stcal"] = run_stcal
    if args.model != "offset":
        runners["skymap-offset"] = run_skymap  # what constants leave on the same images
    run_skymap(images[:2], wcss[:2])  # compile the kernels outside the timing
    times = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    errors = {}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            model = args.model if name == "skymap" else "offset"
            t, c = time.perf_counter(), time.process_time()
            coef = fn(images, wcss, model=model, statistic=statistic)
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
            if args.model == "offset":
                err = rel_error(coef[:, 0], truth[:, 0])
                errors[name] = f"max relative-offset error {err:.4f} sigma"
            else:
                err = plane_error(coef, truth, wcss, ref, args.size)
                errors[name] = f"map error after the common plane {err:.4f} sigma"
    # CPU time is printed too: on a shared machine the wall time also counts waiting.
    for name in runners:
        print(
            f"{name:>13}: median wall {statistics.median(times[name]):8.2f} s, "
            f"cpu {statistics.median(cpu[name]):8.2f} s over {args.repeats} runs; "
            f"{errors[name]}"
        )
    if args.stcal:
        for label, t in (("wall", times), ("cpu", cpu)):
            ratio = statistics.median(t["stcal"]) / statistics.median(t["skymap"])
            print(f"stcal / skymap {label} time ratio: {ratio:.1f}")


if __name__ == "__main__":
    main()
