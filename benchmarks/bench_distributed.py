"""The tiled default pipeline (``skymap.fit`` of a memory map) against ``skymap.fit`` in memory.

On a ``crowded_stellar`` scene (float32, ``--size`` px a side, saved as ``.npy`` and
read back as a memory map, so the tiled driver never loads it), each run in a fresh
subprocess:

* ``memory``: ``skymap.fit(image)`` on the loaded image;
* ``tiled``: ``skymap.fit(memmap, tile=--tile, client=...)`` on ``cluster_client(workers=
  --workers)``: a LocalCluster of single-threaded workers, threads of the run's process
  (``cluster_client``'s default), or worker processes with ``--processes`` or
  ``--memory-limit``.

Reported: wall time, the driver's peak extra memory (peak RSS above the RSS with the
image loaded or mapped, Linux ``/proc/self/clear_refs``; with threads the workers' data
is in it too), the workers' peak RSS (worker processes only), and how
far the tiled background is from the in-memory one (max |difference| over the noise) and
whether the final masks are identical.

Also reported: CPU time (driver plus workers, ``getrusage``), which stays meaningful
when other jobs load the machine, and the time per pixel.

Run:  python benchmarks/bench_distributed.py --size 2048 --tile 1024
      python benchmarks/bench_distributed.py --size 4096 --tile 2048 1024
      python benchmarks/bench_distributed.py --size 4096 --tile 2048 1024 --processes
      python benchmarks/bench_distributed.py --path big.npy --tile 2048 \\
          --memory-limit 4GiB --skip-memory       # an existing float32 .npy, tiled only
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


def _cpu_seconds():
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cluster(workers, memory_limit, processes=False):
    from skymap.backends.distributed import cluster_client

    if memory_limit is None:
        return cluster_client(workers=workers, processes=processes)
    return cluster_client(workers=workers, processes=True, memory_limit=memory_limit)


def run(which, path, tile, workers, memory_limit=None, save=True, processes=False):
    """One timed run in this process; prints a JSON line and saves the products."""
    import skymap

    if which == "memory":
        image = np.load(path)
        skymap.fit(image[:256, :256].copy())  # compile / load the kernels
        base = reset_peak()
        t0, c0 = time.perf_counter(), _cpu_seconds()
        res = skymap.fit(image)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        peak = status_kb("VmHWM")
        background, mask, noise, workers_kb = res.background, res.mask, res.noise, []
    else:
        image = np.load(path, mmap_mode="r")
        with _cluster(workers, memory_limit, processes) as client:
            warm = np.asarray(image[:256, :256])
            skymap.fit(warm, tile=128, client=client)  # workers load the kernels
            # threads of this process: their CPU and memory are this process's
            own = all(a.startswith("inproc://") for a in client.scheduler_info()["workers"])
            base = reset_peak()
            w0 = 0.0 if own else sum(client.run(_cpu_seconds).values())
            t0, c0 = time.perf_counter(), _cpu_seconds()
            res = skymap.fit(image, tile=tile, client=client)
            # a lazy result: its background and mask are computed (and kept) on the cluster
            lazy = client.persist([res.background, res.mask])
            distributed_wait(lazy)
            seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            if not own:
                cpu += sum(client.run(_cpu_seconds).values()) - w0
            peak = status_kb("VmHWM")
            workers_kb = [] if own else list(client.run(_worker_peak_kb).values())
            # Only now, for the comparison: the products in this process.
            noise = res.noise
            if not save:
                row = {"which": which, "seconds": seconds, "cpu_seconds": cpu, "noise": noise}
                row["driver_extra_x_image"] = (peak - base) * 1024 / image.nbytes
                row["worker_peak_mb"] = [kb / 1024 for kb in workers_kb]
                print(json.dumps(row))
                return
            background, mask = client.compute(lazy, sync=True)
    stem = path[: -len(".npy")] + f"_{which}"
    np.save(stem + "_background.npy", background)
    np.save(stem + "_mask.npy", mask)
    print(
        json.dumps(
            {
                "which": which,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "driver_extra_x_image": (peak - base) * 1024 / (image.size * image.itemsize),
                "worker_peak_mb": [kb / 1024 for kb in workers_kb],
                "noise": noise,
            }
        )
    )


def distributed_wait(futures):
    from distributed import wait

    wait(futures)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--tile", type=int, nargs="+", default=[1024])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--path", help="an existing float32 .npy instead of a generated scene")
    p.add_argument("--memory-limit", help="per worker process, e.g. 4GiB (default: dask's)")
    p.add_argument("--processes", action="store_true", help="worker processes (default: threads)")
    p.add_argument("--skip-memory", action="store_true", help="no in-memory run")
    p.add_argument("--run", choices=("memory", "tiled"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        run(
            args.run,
            args.path,
            args.tile[0],
            args.workers,
            args.memory_limit,
            not args.skip_memory,
            args.processes or args.memory_limit is not None,
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "image.npy")
        if args.path:
            os.symlink(os.path.abspath(args.path), path)
            name = os.path.basename(args.path)
        else:
            from skymap.quality.simulate import scene_by_name

            shape = (args.size, args.size)
            image = scene_by_name("crowded_stellar", shape=shape, seed=0).image
            np.save(path, image.astype(np.float32))
            del image
            name = "crowded_stellar"
        ny, nx = np.load(path, mmap_mode="r").shape
        mb = ny * nx * 4 / 2**20
        runs = ([] if args.skip_memory else [("memory", 0)]) + [("tiled", t) for t in args.tile]
        rows = {}
        for which, tile in runs:
            extra = ["--memory-limit", args.memory_limit] if args.memory_limit else []
            extra += ["--skip-memory"] if args.skip_memory else []
            extra += ["--processes"] if args.processes else []
            out = subprocess.run(
                [sys.executable, __file__, "--run", which, "--path", path, "--tile", str(tile)]
                + ["--workers", str(args.workers), *extra],
                capture_output=True,
                text=True,
                check=True,
            )
            rows[which, tile] = json.loads(out.stdout.strip().splitlines()[-1])
            if which == "tiled" and not args.skip_memory:
                for k in ("background", "mask"):
                    os.replace(path[:-4] + f"_tiled_{k}.npy", path[:-4] + f"_{tile}_{k}.npy")
        print(f"{ny}x{nx} float32 {name} ({mb:.0f} MB):")
        m = rows.get(("memory", 0))
        if m is not None:
            bm, mm = (np.load(path[:-4] + f"_memory_{k}.npy") for k in ("background", "mask"))
            print(
                f"  skymap.fit in memory: {m['seconds']:.1f} s wall, {m['cpu_seconds']:.1f} s "
                f"CPU, peak extra {m['driver_extra_x_image'] * mb:.0f} MB "
                f"({m['driver_extra_x_image']:.2f} x image)"
            )
        processes = args.processes or args.memory_limit is not None
        kind = "worker processes" if processes else "worker threads of the driver"
        for tile in args.tile:
            t = rows["tiled", tile]
            print(
                f"  tiled skymap.fit, tile {tile}, {args.workers} {kind}: "
                f"{t['seconds']:.1f} s wall, {t['cpu_seconds']:.1f} s CPU (driver + workers)"
                + (
                    f" = {t['cpu_seconds'] / m['cpu_seconds']:.2f} x in memory"
                    if m is not None
                    else ""
                )
                + f", {t['seconds'] / (ny * nx) * 1e9:.0f} ns/px wall, driver peak extra "
                f"{t['driver_extra_x_image'] * mb:.0f} MB "
                f"({t['driver_extra_x_image']:.3f} x image)"
                + (
                    ", worker peak RSS "
                    + ", ".join(f"{w:.0f}" for w in t["worker_peak_mb"])
                    + " MB"
                    if t["worker_peak_mb"]
                    else " (workers included)"
                )
            )
            if m is not None:
                bt, mt = (np.load(path[:-4] + f"_{tile}_{k}.npy") for k in ("background", "mask"))
                print(
                    f"    background bit-identical: {bool(np.array_equal(bt, bm))} (max |tiled"
                    f" - in memory| = {np.abs(bt - bm).max() / m['noise']:.3g} x noise); masks "
                    f"identical: {bool(np.array_equal(mt, mm))}; noise equal: "
                    f"{t['noise'] == m['noise']}"
                )


if __name__ == "__main__":
    main()
