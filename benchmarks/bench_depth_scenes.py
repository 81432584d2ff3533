"""Varying depth on the robustness scenes: ``skymap.fit`` with and without ``error=``.

Each named scene (``bench_pipeline.py --accuracy``'s) gets extra white noise on its
right half, so that half is ``ratio`` times noisier (noise sigma ``ratio * s`` against
``s``, ``s`` the scene's ``noise_sigma``); the error map is that sigma map. Reported per
half, in that half's sigma: the RMS of (background - sky) over the scene's valid
pixels, for the default fit without and with ``error=``.

Run: ``python benchmarks/bench_depth_scenes.py --ratio 4``.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

import skymap
from skymap.quality.simulate import notebook_scene, scene_by_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument(
        "--scenes", default="notebook,crowded_stellar,galaxies_lsb,nebula,detector_artifacts"
    )
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print(f"ratio {args.ratio:g}; RMS error in each half's sigma")
    print("scene                noisy: plain  error  (change) | deep: plain  error  (change)")
    for name in args.scenes.split(","):
        scene = notebook_scene() if name == "notebook" else scene_by_name(name, seed=1)
        s = scene.noise_sigma
        ny, nx = scene.image.shape
        right = np.zeros((ny, nx), bool)
        right[:, nx // 2 :] = True
        rng = np.random.default_rng(args.seed)
        extra = rng.normal(0.0, s * np.sqrt(args.ratio**2 - 1.0), (ny, nx))
        img = np.where(right, scene.image + extra, scene.image).astype(scene.image.dtype)
        sigma = np.where(right, args.ratio * s, s)
        valid = np.ones((ny, nx), bool) if scene.mask is None else ~scene.mask
        out = []
        for kw in ({}, {"error": sigma}):
            res = skymap.fit(img, scene.mask, **kw)
            e = (np.asarray(res.background, np.float64) - scene.sky) / sigma
            out.append([float(np.sqrt(np.mean(e[part & valid] ** 2))) for part in (right, ~right)])
        (r0, l0), (r1, l1) = out
        print(
            f"{name:20s} {r0:.4f} {r1:.4f} ({r1 - r0:+.4f}) | {l0:.4f} {l1:.4f} ({l1 - l0:+.4f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
