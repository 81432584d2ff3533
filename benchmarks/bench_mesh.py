"""Mesh background: skymap against SEP and photutils on the same image.

One process, one float32 image (default 4096 x 4096: a sloped sky, Gaussian noise and
a few thousand stars), box 64, filter 3, SExtractor-style estimator everywhere:

- ``skymap-sex``: ``MeshBackground.like_sextractor(64, 3)`` (SExtractor's algorithm),
- ``skymap-phot``: ``MeshBackground.like_photutils(64)`` (photutils' algorithm),
- ``sep``: ``sep.Background(bw=64, bh=64, fw=3, fh=3)``,
- ``photutils``: ``Background2D(box_size=64, filter_size=3)`` (SExtractorBackground).

Each run produces the mesh statistics and both full-resolution maps (background and
RMS). Runs are interleaved (one of each method per round) and the medians and ratios
printed. With ``--memory`` each method also runs once in a fresh subprocess that
reports its peak extra memory over the call, in units of the image size: the peak of
the allocations tracemalloc traces (numpy, Python), and the peak rise of the resident
set size sampled every millisecond (which also sees C and numba allocations).

Usage::

    python benchmarks/bench_mesh.py [--size 4096] [--rounds 7] [--memory]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
import tracemalloc
import warnings

import numpy as np

BOX = 64
FILTER = 3


def make_image(size: int, seed: int = 0) -> np.ndarray:
    """float32 sky: 100 + gentle slopes, noise of sigma 5, ~size/2 Gaussian stars."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((size, size), dtype=np.float32)
    img *= 5.0
    ramp = np.linspace(0.0, 20.0, size, dtype=np.float32)
    img += ramp[:, None]
    img += 0.5 * ramp[None, :]
    img += 100.0
    # stars: a 9x9 Gaussian stamp (sigma 1.5 px) of random flux at random positions
    n = size // 2
    yy, xx = np.mgrid[-4:5, -4:5]
    stamp = np.exp(-(yy**2 + xx**2) / (2 * 1.5**2)).astype(np.float32)
    ys = rng.integers(4, size - 4, n)
    xs = rng.integers(4, size - 4, n)
    flux = rng.lognormal(5.0, 1.0, n).astype(np.float32)
    for dy in range(9):
        for dx in range(9):
            np.add.at(img, (ys + dy - 4, xs + dx - 4), flux * stamp[dy, dx])
    return img


def run_skymap_sex(img):
    from skymap.background.mesh import MeshBackground

    res = MeshBackground.like_sextractor(BOX, FILTER).fit(img)
    return res.background, res.rms


def run_skymap_phot(img):
    from skymap.background.mesh import MeshBackground

    res = MeshBackground.like_photutils(BOX).fit(img)
    return res.background, res.rms


def run_sep(img):
    import sep

    bkg = sep.Background(img, bw=BOX, bh=BOX, fw=FILTER, fh=FILTER)
    return bkg.back(), bkg.rms()


def run_photutils(img):
    from photutils.background import Background2D, SExtractorBackground

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bkg = Background2D(img, BOX, filter_size=FILTER, bkg_estimator=SExtractorBackground())
        return bkg.background, bkg.background_rms


METHODS = {
    "skymap-sex": run_skymap_sex,
    "skymap-phot": run_skymap_phot,
    "sep": run_sep,
    "photutils": run_photutils,
}


def time_all(img, rounds):
    # warm up: compile the numba kernels, import everything
    small = np.ascontiguousarray(img[:512, :512])
    for fn in METHODS.values():
        fn(small)
    wall = {name: [] for name in METHODS}
    cpu = {name: [] for name in METHODS}
    for _ in range(rounds):
        for name, fn in METHODS.items():
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn(img)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            del out
    med = {name: statistics.median(t) for name, t in wall.items()}
    return med, {name: statistics.median(t) for name, t in cpu.items()}


def memory_one(name, size):
    """Peak extra memory of one method, in this (fresh) process; prints JSON.

    ``traced``: peak of the allocations tracemalloc sees (numpy arrays, Python objects)
    during the call. ``rss``: peak resident set size sampled every millisecond, minus
    the resident size just before the call (sees C and numba allocations too).
    """
    import threading

    import psutil

    img = make_image(size)
    METHODS[name](np.ascontiguousarray(img[:256, :256]))  # compile / import first
    gc.collect()
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    peak = [rss0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    tracemalloc.start()
    out = METHODS[name](img)
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    done.set()
    sampler.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    del out
    print(json.dumps({"traced": traced / img.nbytes, "rss": (peak[0] - rss0) / img.nbytes}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--memory", action="store_true", help="also measure peak extra memory")
    ap.add_argument("--memory-one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_one:
        memory_one(args.memory_one, args.size)
        return

    import numba

    img = make_image(args.size)
    print(f"image {img.shape} {img.dtype}, box {BOX}, filter {FILTER}, "
          f"numba threads {numba.get_num_threads()}, rounds {args.rounds}")  # fmt: skip
    med, cpu = time_all(img, args.rounds)
    print("\nmedians (s), mesh statistics + background and RMS maps:")
    print(f"  {'':12s} {'wall':>8s} {'CPU':>8s}   (CPU: all threads of the process)")
    for name in METHODS:
        print(f"  {name:12s} {med[name]:8.3f} {cpu[name]:8.3f}")
    print("\nratios (wall, CPU):")
    for ours in ("skymap-sex", "skymap-phot"):
        for peer in ("sep", "photutils"):
            print(
                f"  {ours} / {peer:9s} {med[ours] / med[peer]:6.3f} {cpu[ours] / cpu[peer]:6.3f}"
            )
    if args.memory:
        print("\npeak extra memory / image size (fresh process each):")
        for name in METHODS:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-one", name, "--size", str(args.size)],
                capture_output=True,
                text=True,
                check=True,
            )
            m = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {name:12s} traced {m['traced']:5.2f}   rss {m['rss']:5.2f}")


if __name__ == "__main__":
    main()
