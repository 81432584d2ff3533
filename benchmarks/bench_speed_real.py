"""CPU seconds per Mpix of the default ``skymap.fit`` on the shared real images and the
simulated scenes, with a per-step breakdown (issue 13, item 5: at most 2 s/Mpix).

Every shared real image (``/work/shared/data/real/*.fits`` or ``--data``: the first 2-D
HDU, non-finite pixels masked) and every scene of :mod:`skymap.quality.simulate`
(``scene_by_name(name, seed=1)`` at its default 1024^2, and ``notebook_scene()``) is
fitted once after a warm-up fit that compiles the kernels. CPU time is
``time.process_time``; run with ``NUMBA_NUM_THREADS=1`` so that it is the work done
(the machine is shared). Per image: s/Mpix, converged, iterations, and the CPU seconds
of the loop's steps (``profile_fit.py``'s wrappers) and, inside the thin-plate fits, of
the GCV searches and of every grid solve (their count, and the largest grid).

Run:  NUMBA_NUM_THREADS=1 python benchmarks/bench_speed_real.py [--scenes-only|--real-only]
      [names...]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import functools
import glob
import json
import time
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from profile_fit import instrument

DATA = Path("/work/shared/data/real")
TARGET = 2.0  # CPU s per Mpix


def load(path):
    """First 2-D HDU as float32 (leading axes of a cube: first plane)."""
    with fits.open(path) as h:
        for hdu in h:
            if hdu.data is not None and hdu.data.ndim >= 2:
                d = np.asarray(hdu.data, dtype=np.float32)
                while d.ndim > 2:
                    d = d[0]
                return d
    raise ValueError(f"{path}: no 2-D HDU")


def images(args):
    """(name, image, mask) for the selected real images and scenes, lazily."""
    from skymap.quality.simulate import SCENE_NAMES, notebook_scene, scene_by_name

    if not args.scenes_only:
        for path in sorted(glob.glob(str(args.data / "*.fits"))):
            name = Path(path).stem
            if args.names and name not in args.names:
                continue
            img = load(path)
            yield name, img, ~np.isfinite(img)
    if not args.real_only:
        scenes = [("notebook_scene", None)] + [(n, n) for n in SCENE_NAMES]
        for label, name in scenes:
            if args.names and label not in args.names:
                continue
            s = notebook_scene() if name is None else scene_by_name(name, seed=1)
            img = np.asarray(s.image, dtype=np.float32)
            yield label, img, getattr(s, "mask", None)


def smoother_probes(table):
    """Wrap the GCV searches and the grid solves (CPU s, calls, iterations, grid)."""
    from skymap.background import smooth

    extra = {"grid": (0, 0), "iterations": 0}

    def wrap(owner, name, label, count_iter=False):
        f = getattr(owner, name)

        @functools.wraps(f)
        def timed(*a, **k):
            c = time.process_time()
            try:
                out = f(*a, **k)
            finally:
                row = table[label]
                row[0] += 1
                row[1] += time.process_time() - c
            if count_iter:
                extra["iterations"] += int(out[1])
                shape = a[1].shape if len(a) > 1 else k["y"].shape
                if shape[0] * shape[1] > extra["grid"][0] * extra["grid"][1]:
                    extra["grid"] = shape
            return out

        setattr(owner, name, timed)

    wrap(smooth, "_gcv_search", "  GCV searches")
    wrap(smooth, "smooth_grid", "  smooth_grid")
    wrap(smooth._System, "solve", "  grid solves", count_iter=True)
    return extra


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="image stems / scene names (default: all)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--scenes-only", action="store_true")
    p.add_argument("--real-only", action="store_true")
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    p.add_argument("--steps", action="store_true", help="print each image's step table")
    args = p.parse_args()
    import skymap

    rng = np.random.default_rng(0)
    skymap.fit(rng.normal(size=(300, 300)).astype(np.float32))  # compile outside
    table = instrument(0, 1)
    extra = smoother_probes(table)
    rows = []
    print(
        f"{'image':<28}{'shape':>12}{'Mpix':>6}{'CPU s':>8}{'s/Mpix':>8}{'conv':>6}{'it':>4}"
        f"{'fits':>7}{'GCV':>7}{'solves':>8}{'CG it':>7}{'grid':>10}"
    )
    for name, img, mask in images(args):
        for row in table.values():
            row[:] = [0, 0.0, 0.0]
        extra.update(grid=(0, 0), iterations=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c = time.process_time()
            r = skymap.fit(img, mask)
            cpu = time.process_time() - c
        mpix = img.size / 1e6
        iters = sum(1 for h in r.history if 0 <= h.stage < len(r.config.stages))
        steps = {k: (v[0], round(v[1], 3)) for k, v in table.items()}
        fits_s = table["thin-plate fits"][1]
        row = {
            "name": name,
            "shape": img.shape,
            "cpu": round(cpu, 3),
            "s_per_mpix": round(cpu / mpix, 3),
            "converged": bool(r.converged),
            "iterations": iters,
            "steps": steps,
            "cg_iterations": extra["iterations"],
            "grid": extra["grid"],
        }
        rows.append(row)
        print(
            f"{name[:27]:<28}{'x'.join(map(str, img.shape)):>12}{mpix:>6.2f}{cpu:>8.2f}"
            f"{cpu / mpix:>8.2f}{'yes' if r.converged else 'NO':>6}{iters:>4}{fits_s:>7.2f}"
            f"{table['  GCV searches'][1]:>7.2f}{table['  grid solves'][0]:>8}"
            f"{extra['iterations']:>7}{'x'.join(map(str, extra['grid'])):>10}",
            flush=True,
        )
        if args.steps:
            for label, (n, s, _) in sorted(table.items(), key=lambda kv: -kv[1][1]):
                if n:
                    print(f"    {label:<20}{n:>6}{s:>8.3f}")
    worst = max(rows, key=lambda r: r["s_per_mpix"])
    print(
        f"worst: {worst['name']} {worst['s_per_mpix']:.2f} s/Mpix (target {TARGET}); "
        f"over target: {[r['name'] for r in rows if r['s_per_mpix'] > TARGET]}"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
