"""Where the default ``skymap.fit`` spends its CPU time and memory, stage by stage.

Each step of the loop (the source-size measurement, the halo masker, the fits, the
background maps, the residuals, the maskers, the change, the tracking check) is
wrapped with ``time.process_time`` and the peak RSS above the RSS with the image
loaded (VmHWM, reset per step through ``/proc/self/clear_refs``), in units of the
image. Run with ``NUMBA_NUM_THREADS=1`` so that CPU time is the work done. The image
is the ``--speed-large`` one of ``bench_pipeline.py`` (``crowded``, default) or its
``--memory`` one (``blobs``).

Run:  NUMBA_NUM_THREADS=1 python benchmarks/profile_fit.py --size 4096 --image crowded
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import collections
import functools
import time

import numpy as np
from _memory import blobs, reset_peak, status_kb


def crowded(n):
    from skymap.quality.simulate import scene_by_name

    return scene_by_name("crowded_stellar", shape=(n, n), seed=0).image.astype(np.float32)


def instrument(base_kb, nbytes):
    """Wrap the loop's steps; returns the per-step (calls, CPU s, peak x image) table."""
    from skymap.backends.memory import MemoryBackend
    from skymap.background import pipeline

    table = collections.defaultdict(lambda: [0, 0.0, 0.0])
    depth = [0]

    def wrap(owner, name, label):
        f = getattr(owner, name)

        @functools.wraps(f)
        def timed(*a, **k):
            outer = depth[0] == 0
            depth[0] += 1
            if outer:
                reset_peak()
            c = time.process_time()
            try:
                return f(*a, **k)
            finally:
                depth[0] -= 1
                row = table[label]
                row[0] += 1
                row[1] += time.process_time() - c
                if outer:
                    peak = (status_kb("VmHWM") - base_kb) * 1024 / nbytes
                    row[2] = max(row[2], peak)

        setattr(owner, name, timed)

    wrap(pipeline.IterativeBackground, "source_size", "source size")
    wrap(pipeline, "_exclude_halos", "halo masker")
    wrap(pipeline, "_fit", "thin-plate fits")
    for name in ("background", "residual", "mask", "change", "normalise", "mask_stats"):
        wrap(MemoryBackend, name, name)
    wrap(pipeline.IterativeBackground, "_check_tracking", "tracking check")
    return table


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--image", choices=("crowded", "blobs"), default="crowded")
    args = p.parse_args()
    import skymap

    image = (crowded if args.image == "crowded" else blobs)(args.size)
    skymap.fit(image[:512, :512].copy())  # compile outside the measurement
    base = reset_peak()
    table = instrument(base, image.nbytes)
    reset_peak()
    c, t = time.process_time(), time.perf_counter()
    skymap.fit(image)
    cpu, wall = time.process_time() - c, time.perf_counter() - t
    # The steps reset the peak: the fit's is the largest of theirs and the rest's.
    peak = max(
        [(status_kb("VmHWM") - base) * 1024 / image.nbytes] + [row[2] for row in table.values()]
    )
    print(
        f"{args.size}^2 {args.image}: {cpu:.2f} s CPU, {wall:.2f} s wall, peak extra "
        f"memory {peak:.2f} x image"
    )
    print(f"{'step':<18}{'calls':>6}{'CPU s':>8}{'peak x':>8}")
    for label, (n, s, m) in sorted(table.items(), key=lambda kv: -kv[1][1]):
        print(f"{label:<18}{n:>6}{s:>8.3f}{m:>8.2f}")
    print(f"{'(rest)':<18}{'':>6}{cpu - sum(r[1] for r in table.values()):>8.3f}")


if __name__ == "__main__":
    main()
