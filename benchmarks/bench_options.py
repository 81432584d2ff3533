"""The default fit against variants of its options, on the simulated scenes (truth
known) and by injection-recovery on the shared real images.

Each variant is a JSON object of :func:`skymap.fit` options; ``{}`` is the default.

* ``--scenes``: ``skymap.fit(scene.image, scene.mask, **options)`` on
  ``scene_by_name(name, seed=s)`` (1024^2) for each ``--seeds`` value, and on the
  notebook scene; RMS error against the true sky in noise sigma, converged, masked share,
  CPU seconds.
* ``--real``: :func:`skymap.quality.injection.compare` with the variants as methods on
  each image of the data folder (``bench_real.read_real``: first 2-D HDU, non-finite
  pixels masked), ``--trials`` trials of ``--seed``; track, leak, score.

Run:  python benchmarks/bench_options.py '{"off": {"tracking_scale": null}}'
      [--scenes [NAMES ...]] [--seeds 1-4] [--real [STEMS ...]] [--seed 0] [--trials 1]

The default fit is always included as ``default``. One JSON line per row is printed.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from bench_real import DATA, read_real

from skymap.quality.simulate import SCENE_NAMES as SCENES


def _seeds(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def scenes(variants, names, seeds):
    import skymap
    from skymap.quality.simulate import notebook_scene, scene_by_name

    for name in names:
        for seed in [0] if name == "notebook" else seeds:
            sc = notebook_scene() if name == "notebook" else scene_by_name(name, seed=seed)
            for label, options in variants.items():
                t = time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = skymap.fit(sc.image, sc.mask, **options)
                cpu = time.process_time() - t
                err = np.sqrt(np.mean((np.asarray(res.background) - sc.sky) ** 2))
                yield {
                    "scene": name,
                    "seed": seed,
                    "variant": label,
                    "err": round(float(err / sc.noise_sigma), 4),
                    "converged": bool(res.converged),
                    "mask": round(float(np.mean(res.source_mask)), 3),
                    "cpu": round(cpu, 2),
                }


def real(variants, stems, data, seed, trials):
    from skymap.quality.injection import compare

    files = sorted(Path(data).glob("*.fits"))
    if stems:
        files = [f for f in files if any(s in f.stem for s in stems)]
    for path in files:
        image, bad, _ = read_real(path)
        image = np.where(bad, np.nan, image)
        table = compare(image, variants, n_trials=trials, seed=seed)
        for row in table:
            yield {
                "image": path.stem,
                "variant": row["method"],
                "track": round(float(row["track"]), 3),
                "leak": round(float(row["leak"]), 3),
                "score": round(float(row["score"]), 3),
                "cpu": round(float(row["cpu_seconds"]), 2),
            }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", help='JSON object {"label": {fit options}, ...}')
    ap.add_argument("--scenes", nargs="*", help=f"scene names (default all: {SCENES})")
    ap.add_argument("--seeds", default="1", help="scene seeds, '1-4' or '1,3' (1)")
    ap.add_argument("--real", nargs="*", help="real image stems (substrings; default all)")
    ap.add_argument("--data", type=Path, default=DATA, help=f"folder of FITS images ({DATA})")
    ap.add_argument("--seed", type=int, default=0, help="injection seed (0)")
    ap.add_argument("--trials", type=int, default=1, help="injection trials (1)")
    args = ap.parse_args(argv)
    try:
        given = json.loads(args.variants)
    except json.JSONDecodeError as exc:
        ap.error(f"variants must be a JSON object of fit options: {exc}")
    if not isinstance(given, dict) or not all(isinstance(v, dict) for v in given.values()):
        ap.error('variants must be a JSON object {"label": {fit options}}')
    variants = {"default": {}, **given}
    if args.scenes is None and args.real is None:
        ap.error("give --scenes and/or --real")
    if args.scenes is not None:
        for row in scenes(variants, args.scenes or SCENES, _seeds(args.seeds)):
            print(json.dumps(row), flush=True)
    if args.real is not None:
        for row in real(variants, args.real, args.data, args.seed, args.trials):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
