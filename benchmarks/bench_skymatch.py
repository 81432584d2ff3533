"""Sky matching: skymap.skymatch.match against stcal.skymatch, on the same images.

The mosaic is ``grid x grid`` images of ``size`` pixels (float32, Gaussian noise of 1,
a different sky offset per image, stars from one catalogue), neighbours overlapping by
``overlap`` pixels. Every image gets a TAN WCS with a sub-pixel shift and a small
rotation, so that no overlap is a plain integer translation (the general, slow path).

Run (stcal needs its own environment, see benchmarks/README.md)::

    python benchmarks/bench_skymatch.py                      # skymap only, 10x10 x 1k^2
    /work/stcalvenv/bin/python benchmarks/bench_skymatch.py --grid 3 --stcal

With ``--stcal`` both run in one process, interleaved, ``--repeats`` times each; the
script prints each one's median time, the ratio, and each one's error on the true
relative offsets.
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


def build(grid: int, size: int, overlap: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    step = size - overlap
    full = step * (grid - 1) + size
    centre = (full - 1) / 2.0
    offsets = rng.uniform(-3.0, 3.0, grid * grid)
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
        xs, ys = w.world_to_pixel_values(*stars_world)
        inside = (xs > 8) & (xs < size - 9) & (ys > 8) & (ys < size - 9)
        for x, y, p in zip(xs[inside], ys[inside], peaks[inside], strict=True):
            iy, ix = int(round(y)), int(round(x))
            g = (sx + ix - x) ** 2 + (sy + iy - y) ** 2
            img[iy - 8 : iy + 9, ix - 8 : ix + 9] += (p * np.exp(-0.5 * g / 4.0)).astype(
                np.float32
            )
        images.append(img)
        wcss.append(w)
    return images, wcss, offsets


def rel_error(sky, truth):
    err = (np.asarray(sky) - np.mean(sky)) - (truth - np.mean(truth))
    return float(np.max(np.abs(err)))


def run_skymap(images, wcss):
    return match([NDData(im, wcs=w) for im, w in zip(images, wcss, strict=True)]).sky


def run_stcal(images, wcss):
    return np.array(_maker().stcal_skies(images, wcss, method="global+match", statistic="mode"))


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
    args = ap.parse_args()

    t0 = time.perf_counter()
    images, wcss, offsets = build(args.grid, args.size, args.overlap)
    print(
        f"{args.grid}x{args.grid} images of {args.size}^2, overlap {args.overlap} px "
        f"(built in {time.perf_counter() - t0:.1f} s)"
    )
    runners = {"skymap": run_skymap}
    if args.stcal:
        runners["stcal"] = run_stcal
    run_skymap(images[:2], wcss[:2])  # compile the kernels outside the timing
    times = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    errors = {}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            t, c = time.perf_counter(), time.process_time()
            sky = fn(images, wcss)
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
            errors[name] = rel_error(sky, offsets)
    # CPU time is printed too: on a shared machine the wall time also counts waiting.
    for name in runners:
        print(
            f"{name:>7}: median wall {statistics.median(times[name]):8.2f} s, "
            f"cpu {statistics.median(cpu[name]):8.2f} s over {args.repeats} runs; "
            f"max relative-offset error {errors[name]:.4f} sigma"
        )
    if args.stcal:
        for label, t in (("wall", times), ("cpu", cpu)):
            ratio = statistics.median(t["stcal"]) / statistics.median(t["skymap"])
            print(f"stcal / skymap {label} time ratio: {ratio:.1f}")


if __name__ == "__main__":
    main()
