"""Local background around many sources: skymap against astroapers and photutils.

Same process, same image and positions, runs interleaved; prints the median time of
each contender and skymap's ratio to it, and checks that the answers agree.

- annulus medians: ``skymap.local.annulus_background`` vs astroapers (``CircAn``'s
  centre-selected ``sampled_values`` plus a NumPy median per source, the notebook's
  recipe) vs ``photutils.background.LocalBackground`` with an unclipped median;
- aperture sums: ``skymap.local.aperture_sum`` vs astroapers ``apsum_exact`` vs
  photutils ``do_photometry`` + ``area_overlap`` (exact).

Usage: ``python benchmarks/bench_local.py [--n 10000] [--size 2048] [--repeat 5]``
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of sources")
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--no-photutils", action="store_true", help="skip the slow photutils runs")
    args = parser.parse_args()

    import astroapers as aap
    from photutils.aperture import CircularAperture
    from photutils.background import LocalBackground, MedianBackground

    from skymap.photometry.local import annulus_background, aperture_sum

    rng = np.random.default_rng(2048)
    image = rng.normal(100.0, 5.0, (args.size, args.size))
    positions = rng.uniform(16.0, args.size - 17.0, (args.n, 2))
    r_in, r_out, r_ap = 9.0, 15.0, 5.0

    annulus = aap.CircAn(positions, r_in=r_in, r_out=r_out)
    circle = aap.CircAp(positions, r=r_ap)
    local = LocalBackground(r_in, r_out, bkg_estimator=MedianBackground(sigma_clip=None))
    ap = CircularAperture(positions, r=r_ap)

    contenders = {
        "annulus median": {
            "skymap": lambda: annulus_background(image, positions, r_in, r_out).background,
            "astroapers": lambda: np.array([np.median(v) for v in annulus.sampled_values(image)]),
        },
        "aperture sum": {
            "skymap": lambda: aperture_sum(image, positions, r_ap),
            "astroapers": lambda: circle.apsum_exact(image),
            "photutils": lambda: (
                ap.do_photometry(image, method="exact")[0],
                ap.area_overlap(image, method="exact"),
            ),
        },
    }
    if not args.no_photutils:
        contenders["annulus median"]["photutils"] = lambda: local(
            image, positions[:, 0], positions[:, 1]
        )

    # compile and check the answers agree before timing anything
    for task, runners in contenders.items():
        answers = {name: fn() for name, fn in runners.items()}
        ref = np.asarray(answers["skymap"], dtype=float)
        for name, ans in answers.items():
            diff = np.max(np.abs(np.asarray(ans, dtype=float) - ref))
            print(f"{task:15s} {name:11s} max |difference| from skymap: {diff:.2e}")

    times: dict[tuple[str, str], list[float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(args.repeat):
            for task, runners in contenders.items():
                for name, fn in runners.items():
                    times.setdefault((task, name), []).append(_timed(fn)[0])

    print(
        f"\n{args.n} sources, {args.size}x{args.size} float64 image, r_ap {r_ap}, "
        f"annulus {r_in}-{r_out}, "
        f"{args.repeat} interleaved rounds (median seconds)"
    )
    for task, runners in contenders.items():
        ours = np.median(times[(task, "skymap")])
        for name in runners:
            t = np.median(times[(task, name)])
            ratio = "" if name == "skymap" else f"  skymap/{name} = {ours / t:.3f}"
            print(f"{task:15s} {name:11s} {t:8.3f} s{ratio}")


if __name__ == "__main__":
    main()
