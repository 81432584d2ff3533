"""Images of varying depth: ``skymap.fit`` with and without the error map (issue 15).

Each scene is 192 x 192 (``--size``): a sky of 100 + 0.02 x + 3 sin(y / 60), 40
Gaussian sources (sigma 1.5 px, peaks 5-80) and white noise of 1 on the left half and
``ratio`` on the right (the test in ``tests/test_inputs.py``, seed 3, is one of these).
For each seed the default fit runs without ``error=``, with ``error=`` (the true
noise map), and (``--oracle``) the final mask of each is refitted by a
:class:`~skymap.background.smooth.ThinPlateSmoother` at fixed smoothing lengths, to
show which length each half would have wanted.

Reported per half, in units of that half's noise: the RMS of (background - sky), and
the fraction of pure-noise pixels (source flux < 0.01) masked; the last rows give the
mean over the seeds and the mean change with ``error=``. The fits are deterministic:
timings are not the point, so none are printed.

Run: ``python benchmarks/bench_depth.py --seeds 0-13 --ratio 4``.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

import skymap
from skymap.background.smooth import ThinPlateSmoother


def scene(seed: int, n: int = 192, ratio: float = 4.0, nsrc: int = 40):
    """(image, sky, noise map, source flux, right-half mask) of one varying-depth scene."""
    noise = np.ones((n, n))
    noise[:, n // 2 :] = ratio
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    sky = 100 + 0.02 * xx + 3 * np.sin(yy / 60.0)
    src = np.zeros((n, n))
    for _ in range(nsrc):
        y, x = rng.uniform(0, n, 2)
        src += rng.uniform(5, 80) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 4.5)
    img = sky + src + rng.normal(size=(n, n)) * noise
    return img, sky, noise, src, xx >= n // 2


def halves(background, sky, noise, right):
    e = (np.asarray(background) - sky) / noise
    return float(np.sqrt(np.mean(e[right] ** 2))), float(np.sqrt(np.mean(e[~right] ** 2)))


def seeds_of(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0-13")
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--oracle", action="store_true", help="refit at fixed lengths (slow)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    print(f"ratio {args.ratio:g}, {args.size}^2; RMS error in each half's sigma")
    print("seed  noisy: plain  error  (change) | deep: plain  error  (change) | masked noisy")
    for seed in seeds_of(args.seeds):
        img, sky, noise, src, right = scene(seed, args.size, args.ratio)
        plain = skymap.fit(img)
        weighted = skymap.fit(img, error=noise)
        (r0, l0), (r1, l1) = (
            halves(plain.background, sky, noise, right),
            halves(weighted.background, sky, noise, right),
        )
        pure = (src < 0.01) & right
        m0, m1 = plain.mask[pure].mean(), weighted.mask[pure].mean()
        rows.append((r0, r1, l0, l1))
        print(
            f"{seed:4d}  {r0:.4f} {r1:.4f} ({r1 - r0:+.4f}) | {l0:.4f} {l1:.4f} "
            f"({l1 - l0:+.4f}) | {m0:.3f} -> {m1:.3f}  scales {plain.history[-1].scale:.1f}"
            f" / {weighted.history[-1].scale:.1f}"
        )
        if args.oracle:
            for name, res, err in (("plain", plain, None), ("error", weighted, noise)):
                w = None if err is None else 1.0 / err**2 / np.mean(1.0 / err[~res.mask] ** 2)
                cells = res.history[-1].model.cell_size
                out = []
                for length in (8, 10, 12, 14, 16, 20, 24, 28):
                    tps = ThinPlateSmoother(smoothing=float(length) ** 4, cell_size=cells)
                    r, l = halves(tps.fit(img, res.mask, weight=w).background, sky, noise, right)
                    out.append(f"{length}:{r:.3f}/{l:.3f}")
                print(f"      {name} at fixed lengths (noisy/deep): " + " ".join(out))
    a = np.array(rows)
    print(
        f"mean  {a[:, 0].mean():.4f} {a[:, 1].mean():.4f} ({(a[:, 1] - a[:, 0]).mean():+.4f}) | "
        f"{a[:, 2].mean():.4f} {a[:, 3].mean():.4f} ({(a[:, 3] - a[:, 2]).mean():+.4f})"
    )
    worse = int(np.sum(a[:, 1] > a[:, 0]))
    print(f"noisy half worse with error= on {worse} of {len(a)} seeds")


if __name__ == "__main__":
    main()
