"""Ring median: skymap.filters vs scipy.ndimage.median_filter and skimage rank.median.

Usage::

    python benchmarks/bench_ring_median.py [--sizes 512 1024 2048 4096] [--repeat 3]
        [--radius 15] [--width 5] [--scipy-full-max 1024] [--strip 128]

For each square size, one float32 image (sky + noise + sources) is filtered by

- skymap ``ring_median`` on 1 and on 2 numba threads (exact);
- skymap ``approximate_ring_median(factor=4)`` on 2 threads (approximate);
- ``scipy.ndimage.median_filter(footprint=ring, mode="reflect")`` (exact, one core). Up
  to ``--scipy-full-max`` it runs on the whole image; above, on a full-width strip of
  ``--strip`` rows, and its time is scaled by ``ny / strip`` (scipy's cost is linear in
  the number of pixels) and marked "extrapolated";
- ``skimage.filters.rank.median`` on the image clipped to its 0.1-99.9 percentiles and
  quantised to 8 bits, and to 12 bits up to 1024^2 (approximate by construction: float
  data must be binned to integers).

Runs are interleaved (every method once per round) and medians reported, as wall-clock
seconds and, for the one-thread runs, also as process CPU seconds: on a shared machine
the CPU figures are the less disturbed ones. Exactness is
checked before timing: skymap equals scipy bit for bit (on the strip's inner rows when
scipy runs on a strip). Errors of the approximate methods against the exact ring median
are given as [median, max] of |difference| in units of the noise sigma.
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
import scipy.ndimage as ndi
from skimage.filters.rank import median as sk_median

from skymap.stats.filters import approximate_ring_median, ring_footprint, ring_median

SIGMA = 1.0


def make_image(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n].astype(np.float32)
    img = 100.0 + 3.0 * np.sin(xx / 300.0) + 0.002 * yy + SIGMA * rng.normal(size=(n, n))
    nsrc = n * n // 2000
    ys = rng.integers(0, n, nsrc)
    xs = rng.integers(0, n, nsrc)
    img[ys, xs] += rng.pareto(1.5, nsrc) * 50.0
    return ndi.gaussian_filter(img, 0.7).astype(np.float32) + SIGMA * rng.normal(
        size=(n, n)
    ).astype(np.float32)


def quantise(img: np.ndarray, bits: int) -> tuple[np.ndarray, float, float]:
    """Integer image for skimage: clip to the 0.1-99.9 percentiles, then bin linearly.

    Clipping first is the kind thing to do for skimage: with the full range of an image
    with bright sources, a bin would span many noise sigmas.
    """
    lo, hi = (float(v) for v in np.percentile(img, [0.1, 99.9]))
    scale = (2**bits - 1) / (hi - lo)
    q = np.round((np.clip(img, lo, hi) - lo) * scale).astype(np.uint8 if bits <= 8 else np.uint16)
    return q, lo, scale


def timed(fn):
    """Wall-clock and process CPU seconds of ``fn()``, and its result."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--radius", type=float, default=15.0)
    ap.add_argument("--width", type=float, default=5.0)
    ap.add_argument("--scipy-full-max", type=int, default=1024)
    ap.add_argument("--strip", type=int, default=128)
    args = ap.parse_args()

    r, w = args.radius, args.width
    fp = ring_footprint(r, w)
    half = fp.shape[0] // 2
    ring_median(make_image(64), r, w)  # compile outside the timings
    print(
        f"ring r={r} w={w} ({int(fp.sum())} pixels), {numba.config.NUMBA_NUM_THREADS} "
        f"numba threads available, repeat={args.repeat}"
    )
    header = (
        "| size | scipy wall / CPU (s) | skymap 1 thr wall / CPU (s) | skymap 2 thr wall (s) "
        "| scipy / skymap 1 thr (wall / CPU) | scipy / skymap 2 thr (wall) "
        "| skimage 8-bit wall (s) [err] | skimage 12-bit wall (s) [err] "
        "| approx f=4, 2 thr wall (s) [err] |"
    )
    print(header)
    print("|" + " --- |" * 9)
    for n in args.sizes:
        img = make_image(n)
        full_scipy = n <= args.scipy_full_max
        strip = img if full_scipy else img[: args.strip]
        scale = 1.0 if full_scipy else n / args.strip

        # Exactness first.
        exact = ring_median(img, r, w)
        ref = ndi.median_filter(strip, footprint=fp, mode="reflect")
        inner = slice(None) if full_scipy else slice(0, args.strip - half)
        if not np.array_equal(exact[inner], ref[inner]):
            raise SystemExit(f"{n}: skymap ring_median differs from scipy")
        q8, lo8, s8 = quantise(img, 8)
        do12 = n <= 1024
        if do12:
            q12, lo12, s12 = quantise(img, 12)

        times: dict[str, list[float]] = {}
        cpus: dict[str, list[float]] = {}
        outs = {}

        def run(name, fn, times=times, cpus=cpus, outs=outs):
            dt, dc, out = timed(fn)
            times.setdefault(name, []).append(dt)
            cpus.setdefault(name, []).append(dc)
            outs[name] = out

        for _ in range(args.repeat):
            numba.set_num_threads(1)
            run("sky1", lambda img=img: ring_median(img, r, w))
            numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
            run("sky2", lambda img=img: ring_median(img, r, w))
            run("approx", lambda img=img: approximate_ring_median(img, r, w, factor=4))
            run("scipy", lambda s=strip: ndi.median_filter(s, footprint=fp, mode="reflect"))
            run("sk8", lambda q=q8: sk_median(q, footprint=fp))
            if do12:
                run("sk12", lambda q=q12: sk_median(q, footprint=fp))
        med = {k: float(np.median(v)) for k, v in times.items()}
        cpu = {k: float(np.median(v)) for k, v in cpus.items()}
        scipy_t = med["scipy"] * scale
        scipy_c = cpu["scipy"] * scale

        def err(a, exact=exact):
            d = np.abs(a - exact) / SIGMA
            return f"{np.median(d):.2g}, {d.max():.2g}"

        e8 = err(outs["sk8"] / s8 + lo8)
        e12 = f"{med['sk12']:.2f} [{err(outs['sk12'] / s12 + lo12)}]" if do12 else "-"
        ea = err(outs["approx"])
        tag = "" if full_scipy else " (extrapolated)"
        print(
            f"| {n}^2 | {scipy_t:.2f} / {scipy_c:.2f}{tag} | {med['sky1']:.3f} / "
            f"{cpu['sky1']:.3f} | {med['sky2']:.3f} | {scipy_t / med['sky1']:.1f}x / "
            f"{scipy_c / cpu['sky1']:.1f}x | {scipy_t / med['sky2']:.1f}x "
            f"| {med['sk8']:.2f} [{e8}] | {e12} | {med['approx']:.3f} [{ea}] |",
            flush=True,
        )


if __name__ == "__main__":
    main()
