"""Speed of skymap.stats against astropy / photutils on a mesh-sized stack.

The stack is what a 4096 x 4096 float32 image cut into 64 x 64 meshes gives: 4096 rows
of 4096 samples, Gaussian noise plus a skewed tail of sources, 2% missing values. Each
pair (skymap, peer) runs interleaved in one process on the same data; the script prints
the median time of each and the ratio peer / skymap.

Usage: python benchmarks/bench_stats.py [--rows 4096] [--cols 4096] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
from astropy.stats import SigmaClip as AstropySigmaClip
from astropy.stats import biweight_location, mad_std
from photutils.background import SExtractorBackground, StdBackgroundRMS

from skymap.stats import estimators as S


def make_stack(rows: int, cols: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(100.0, 5.0, size=(rows, cols)).astype(np.float32)
    src = rng.random(x.shape) < 0.05
    x[src] += rng.exponential(50.0, size=src.sum()).astype(np.float32)
    x[rng.random(x.shape) < 0.02] = np.nan
    return x


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    x = make_stack(args.rows, args.cols)
    ours_clip = S.SigmaClip(sigma=3.0, maxiters=10)
    peer_clip = AstropySigmaClip(sigma=3.0, maxiters=10)
    clipped = ours_clip(x)
    sex_p = SExtractorBackground(sigma_clip=None)
    std_p = StdBackgroundRMS(sigma_clip=None)

    def peer_clip_fn():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer_clip(x, axis=1, masked=False)

    pairs = {
        "sigma_clip 3sigma x10 (astropy)": (lambda: ours_clip(x), peer_clip_fn),
        "SExtractor mode (photutils)": (
            lambda: S.SExtractorMode()(clipped),
            lambda: sex_p(clipped, axis=1),
        ),
        "std (photutils)": (lambda: S.StdDev()(clipped), lambda: std_p(clipped, axis=1)),
        "median (numpy nanmedian)": (
            lambda: S.Median()(clipped),
            lambda: np.nanmedian(clipped, axis=1),
        ),
        "mad_std (astropy)": (
            lambda: S.MADStd()(clipped),
            lambda: mad_std(clipped, axis=1, ignore_nan=True),
        ),
        "biweight_location (astropy)": (
            lambda: S.BiweightLocation()(clipped),
            lambda: biweight_location(clipped, axis=1, ignore_nan=True),
        ),
    }
    print(f"stack {args.rows} x {args.cols} float32, {args.repeat} interleaved repeats")
    print(f"{'statistic (peer)':34s} {'skymap s':>9s} {'peer s':>9s} {'peer/skymap':>12s}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, (ours, peer) in pairs.items():
            ours()  # compile / warm up
            peer()
            t_ours, t_peer = [], []
            for _ in range(args.repeat):
                t_ours.append(timed(ours))
                t_peer.append(timed(peer))
            mo, mp = statistics.median(t_ours), statistics.median(t_peer)
            print(f"{name:34s} {mo:9.3f} {mp:9.3f} {mp / mo:12.1f}")


if __name__ == "__main__":
    main()
