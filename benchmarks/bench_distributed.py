"""The tiled default pipeline (``skymap.fit`` of a memory map) against ``skymap.fit`` in memory.

On a ``crowded_stellar`` scene (float32, ``--size`` px a side, saved as ``.npy`` and
read back as a memory map, so the tiled driver never loads it), each run in a fresh
subprocess:

* ``memory``: ``skymap.fit(image)`` on the loaded image;
* ``tiled``: ``skymap.fit(memmap, tile=--tile, client=...)`` on a LocalCluster of ``--workers``
  single-threaded worker processes.

Reported: wall time, the driver's peak extra memory (peak RSS above the RSS with the
image loaded or mapped, Linux ``/proc/self/clear_refs``), the workers' peak RSS, and how
far the tiled background is from the in-memory one (max |difference| over the noise) and
whether the final masks are identical.

Run:  python benchmarks/bench_distributed.py --size 2048 --tile 1024
"""

from __future__ import annotations

import os

# As in bench_pipeline: passive OpenMP waiting, so that idle numba pools do not spin.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import subprocess
import sys
import tempfile
import time

import numpy as np
from _memory import reset_peak, status_kb


def _worker_peak_kb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run(which, path, tile, workers):
    """One timed run in this process; prints a JSON line and saves the products."""
    import skymap

    if which == "memory":
        image = np.load(path)
        skymap.fit(image[:256, :256].copy())  # compile / load the kernels
        base = reset_peak()
        t0 = time.perf_counter()
        res = skymap.fit(image)
        seconds = time.perf_counter() - t0
        peak = status_kb("VmHWM")
        background, mask, noise, workers_kb = res.background, res.mask, res.noise, []
    else:
        from skymap.backends.distributed import cluster_client

        image = np.load(path, mmap_mode="r")
        with cluster_client(workers=workers) as client:
            warm = np.asarray(image[:256, :256])
            skymap.fit(warm, tile=128, client=client)  # workers load the kernels
            base = reset_peak()
            t0 = time.perf_counter()
            res = skymap.fit(image, tile=tile, client=client)
            seconds = time.perf_counter() - t0
            peak = status_kb("VmHWM")
            workers_kb = list(client.run(_worker_peak_kb).values())
            # Only now, for the comparison: the products in this process.
            background, mask = client.compute([res.background, res.mask], sync=True)
            noise = res.noise
    stem = path[: -len(".npy")] + f"_{which}"
    np.save(stem + "_background.npy", background)
    np.save(stem + "_mask.npy", mask)
    print(
        json.dumps(
            {
                "which": which,
                "seconds": seconds,
                "driver_extra_x_image": (peak - base) * 1024 / (image.size * image.itemsize),
                "worker_peak_mb": [kb / 1024 for kb in workers_kb],
                "noise": noise,
            }
        )
    )


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--run", choices=("memory", "tiled"), help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        run(args.run, args.path, args.tile, args.workers)
        return
    from skymap.quality.simulate import scene_by_name

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "image.npy")
        shape = (args.size, args.size)
        image = scene_by_name("crowded_stellar", shape=shape, seed=0).image.astype(np.float32)
        np.save(path, image)
        rows = {}
        for which in ("memory", "tiled"):
            out = subprocess.run(
                [sys.executable, __file__, "--run", which, "--path", path]
                + ["--tile", str(args.tile), "--workers", str(args.workers)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows[which] = json.loads(out.stdout.strip().splitlines()[-1])
        products = {
            which: [np.load(path[:-4] + f"_{which}_{k}.npy") for k in ("background", "mask")]
            for which in rows
        }
    (bm, mm), (bt, mt) = products["memory"], products["tiled"]
    m, t = rows["memory"], rows["tiled"]
    mb = args.size * args.size * 4 / 2**20
    print(f"{args.size}x{args.size} float32 crowded_stellar ({mb:.0f} MB), tile {args.tile}:")
    print(
        f"  skymap.fit in memory: {m['seconds']:.1f} s, peak extra "
        f"{m['driver_extra_x_image'] * mb:.0f} MB ({m['driver_extra_x_image']:.2f} x image)"
    )
    print(
        f"  tiled skymap.fit, {args.workers} worker processes: {t['seconds']:.1f} s, "
        "driver peak extra "
        f"{t['driver_extra_x_image'] * mb:.0f} MB ({t['driver_extra_x_image']:.3f} x image), "
        "worker peak RSS " + ", ".join(f"{w:.0f}" for w in t["worker_peak_mb"]) + " MB"
    )
    print(
        f"  max |tiled - in memory| = {np.abs(bt - bm).max() / m['noise']:.3g} x noise; "
        f"masks identical: {bool(np.array_equal(mt, mm))}; noise equal: {t['noise'] == m['noise']}"
    )


if __name__ == "__main__":
    main()
