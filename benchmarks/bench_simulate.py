"""Benchmark of skymap.simulate: source rendering against photutils, and full scene builds.

1. Rendering the same N elliptical Gaussian sources on the same image with
   ``skymap.simulate.render_sources`` (numba stamps, parallel over row bands) and with
   ``photutils.datasets.make_model_image`` (one astropy model evaluation per source in a
   bounding box), interleaved, with the largest pixel difference between the two.
2. Building a 4096x4096 crowded-field scene with 50 000 Moffat stars (polynomial sky,
   power-law field, Poisson + read noise) with ``skymap.simulate.make_scene``, and the
   notebook's scene.
3. ``skymap.evaluate.evaluate`` on that 4096x4096 scene (truth, catalogue, noise and a
   source mask: every metric is computed).

Run: ``python benchmarks/bench_simulate.py [--reps 3] [--nsrc-peer 5000]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from astropy.modeling.models import Gaussian2D
from astropy.table import Table
from photutils.datasets import make_model_image

from skymap.quality.evaluate import evaluate
from skymap.quality.simulate import (
    MoffatStars,
    PoissonNoise,
    Polynomial,
    PowerLawField,
    make_scene,
    notebook_scene,
    render_sources,
)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _timed_cpu(fn):
    # Wall and process CPU time: CPU time is the figure to compare when the machine is
    # shared (it sums both cores for the parallel parts).
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_render(shape, nsrc, reps):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, shape[1] - 1, nsrc)
    y = rng.uniform(0, shape[0] - 1, nsrc)
    sx = rng.uniform(0.8, 3.0, nsrc)
    sy = rng.uniform(0.8, 3.0, nsrc)
    theta = rng.uniform(0, np.pi, nsrc)
    amp = rng.uniform(1.0, 100.0, nsrc)
    half = 12  # both render a 25x25 box: 4 sigma of the widest source
    table = Table(
        {
            "x_mean": x,
            "y_mean": y,
            "amplitude": amp,
            "x_stddev": sx,
            "y_stddev": sy,
            "theta": theta,
        }
    )

    def ours():
        # A negligible floor makes every stamp the same 25x25 box as the peer's, so both
        # do the same work and the images agree to rounding.
        return render_sources(
            shape,
            x=x,
            y=y,
            amplitude=amp,
            sx=sx,
            sy=sy,
            theta=theta,
            floor=1e-12,
            max_radius=half + 0.5,  # [round(x) - 12, round(x) + 12], as the peer
        )

    def peer():
        return make_model_image(
            shape,
            Gaussian2D(),
            table,
            model_shape=(2 * half + 1, 2 * half + 1),
            x_name="x_mean",
            y_name="y_mean",
        )

    ours()  # compile / warm caches
    t_ours, t_peer = [], []
    for _ in range(reps):
        dt, a = _timed(ours)
        t_ours.append(dt)
        dt, b = _timed(peer)
        t_peer.append(dt)
    diff = float(np.max(np.abs(a - b)))
    mo, mp = statistics.median(t_ours), statistics.median(t_peer)
    print(f"render {nsrc} Gaussians on {shape[0]}x{shape[1]} (reps={reps})")
    print(f"  skymap.render_sources          {mo:8.3f} s")
    print(f"  photutils make_model_image     {mp:8.3f} s")
    print(f"  speed-up                       {mp / mo:8.1f} x   (max |diff| {diff:.2e})")


def bench_scene(reps):
    def crowded():
        return make_scene(
            (4096, 4096),
            sky=[
                Polynomial(coefficients=((100.0, 3.0), (2.0, 0.0))),
                PowerLawField(rms=1.0, slope=3.0, min_scale=20.0),
            ],
            sources=[
                MoffatStars(n=50_000, fwhm=3.5, beta=2.0, flux_min=5.0, flux_max=2e5, lf_slope=1.8)
            ],
            noise=PoissonNoise(gain=1.0, read_noise=5.0),
            seed=1,
        )

    make_scene((64, 64), sources=[MoffatStars(n=5)], seed=0)  # compile
    scene = crowded()
    mask = scene.sources > scene.noise_sigma

    def score():
        return evaluate(None, scene.sky + 0.01 * scene.noise_sigma, scene=scene, mask=mask)

    times = {
        "crowded 4096x4096, 50k Moffat stars": [],
        "notebook scene 1000x1000": [],
        "evaluate() on the 4096x4096 scene": [],
    }
    for _ in range(reps):
        times["crowded 4096x4096, 50k Moffat stars"].append(_timed_cpu(crowded))
        times["notebook scene 1000x1000"].append(_timed_cpu(notebook_scene))
        times["evaluate() on the 4096x4096 scene"].append(_timed_cpu(score))
    print(f"scene builds and evaluation (reps={reps}, median wall / median CPU)")
    for k, v in times.items():
        wall = statistics.median(t[0] for t in v)
        cpu = statistics.median(t[1] for t in v)
        print(f"  {k:40s} {wall:8.2f} s wall {cpu:8.2f} s CPU")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--nsrc-peer", type=int, default=5000)
    args = ap.parse_args()
    bench_render((4096, 4096), args.nsrc_peer, args.reps)
    bench_scene(args.reps)


if __name__ == "__main__":
    main()
