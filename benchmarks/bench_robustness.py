"""Robustness of the default ``skymap.fit`` across scene types and on real images.

For each named scene of :data:`skymap.simulate.SCENE_NAMES` (built with
``scene_by_name(name, shape=(size, size), seed=seed)``; the scene's bad-pixel mask is
passed where it has one, as a user would), every method runs in one process on the same
image:

* ``skymap``: ``skymap.fit(image, mask=mask)`` with no options;
* ``B2D``: one pass of photutils ``Background2D`` (64-px boxes, 3x3 filter,
  ``SExtractorBackground``, photutils' default 3-sigma clipping);
* ``B2D+mask``: the common careful recipe: that pass, then ``detect_sources`` on the
  residual at 2 x its RMS map (5 connected pixels), the segments dilated by a radius-5
  circular footprint, and a second ``Background2D`` with that source mask;
* ``SEP``: ``sep.Background`` (bw=bh=64, fw=fh=3), one pass;
* ``SEP+mask``: ``sep.extract`` at 1.5 x the global RMS of that pass on its residual,
  segmentation map dilated by a radius-3 disc, then a second ``sep.Background``;
* ``mesh-sex``: ``skymap.mesh.MeshBackground.like_sextractor(64)``, one pass.

Reported per method (sigma = the scene's ``noise_sigma``):

* ``rms``: RMS of ``(background - true sky) / sigma`` over all pixels;
* ``mean``: mean of the same residual over all pixels (the global offset);
* ``under``: mean residual where the true source image exceeds 1 sigma (positive =
  source light leaked into the background, so photometry after subtracting it would
  lose flux);
* ``under-mean``: ``under - mean``, the bias under sources beyond the global offset;
* ``mask``: fraction of pixels excluded from the final fit (bad + source mask);
* ``time``: wall-clock seconds of the fit (a method's full recipe);
* ``conv``: ``result.converged`` (skymap only), with skymap's mask fraction per
  iteration (``stage.iteration: fraction``) printed under each table.

Correlated noise (``--correlated 0.5 1``): a flat sky with unit noise correlated by a
Gaussian of the given sigma (px) and no sources, where any mask is a false detection
and the truth is exact.

Real images (``--real``): ``skymap.fit`` on the Spitzer example (NaNs) and on
``M6707HH.fits`` (big-endian int16), read with ``skymap.io.read_image``: time, mask
fraction, convergence, whether the background is finite wherever the input is, the
masked-versus-unmasked test on the source mask, and the RMS difference from SEP's
one-pass background (and SEP+mask) in units of skymap's noise estimate.

Run:  python benchmarks/bench_robustness.py --size 512 --seed 0 --correlated 0.5 1 --real
"""

from __future__ import annotations

import os

# photutils' compiled code leaves OpenMP worker threads spin-waiting after each call; on
# two cores they starve numba's pool (see bench_pipeline.py). Must precede the imports.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import subprocess
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from scipy import ndimage

REAL = Path("/work/shared/data/real")
REAL_FILES = ("spitzer_example_image.fits", "M6707HH.fits")


def _disc(radius):
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def _native(image):
    return np.ascontiguousarray(image, dtype=np.float64)


# --------------------------------------------------------------------------- methods


def run_skymap(image, mask):
    import skymap

    result = skymap.fit(image, mask=mask)
    return result.background, result.mask, result.converged, result


def run_b2d(image, mask):
    from photutils.background import Background2D, SExtractorBackground

    bkg = Background2D(image, 64, mask=mask, filter_size=3, bkg_estimator=SExtractorBackground())
    used = np.zeros(image.shape, bool) if mask is None else mask.copy()
    return bkg.background, used, None, bkg


def run_b2d_masked(image, mask):
    from photutils.background import Background2D, SExtractorBackground
    from photutils.segmentation import detect_sources
    from photutils.utils import circular_footprint

    bad = np.zeros(image.shape, bool) if mask is None else mask
    first = Background2D(image, 64, mask=mask, filter_size=3, bkg_estimator=SExtractorBackground())
    segm = detect_sources(image - first.background, 2.0 * first.background_rms, 5, mask=bad)
    if segm is None:
        sources = np.zeros(image.shape, bool)
    else:
        sources = segm.make_source_mask(footprint=circular_footprint(5))
    used = bad | sources
    second = Background2D(
        image, 64, mask=used, filter_size=3, bkg_estimator=SExtractorBackground()
    )
    return second.background, used, None, second


def run_sep(image, mask):
    import sep

    data = _native(image)
    bkg = sep.Background(data, mask=mask, bw=64, bh=64, fw=3, fh=3)
    used = np.zeros(image.shape, bool) if mask is None else mask.copy()
    return bkg.back(), used, None, bkg


def run_sep_masked(image, mask):
    import sep

    data = _native(image)
    bad = np.zeros(image.shape, bool) if mask is None else mask
    first = sep.Background(data, mask=mask, bw=64, bh=64, fw=3, fh=3)
    residual = data - first.back()
    # Crowded fields overflow SEP's default pixel stack and sub-object limit.
    sep.set_extract_pixstack(int(4 * data.size))
    sep.set_sub_object_limit(4096)
    _, segmap = sep.extract(residual, 1.5, err=first.globalrms, mask=mask, segmentation_map=True)
    used = bad | ndimage.binary_dilation(segmap > 0, structure=_disc(3))
    second = sep.Background(data, mask=used, bw=64, bh=64, fw=3, fh=3)
    return second.back(), used, None, second


def run_mesh_sex(image, mask):
    from skymap.background.mesh import MeshBackground

    result = MeshBackground.like_sextractor(64).fit(image, mask=mask)
    used = np.zeros(image.shape, bool) if mask is None else mask.copy()
    return result.background, used, None, result


METHODS = {
    "skymap": run_skymap,
    "B2D": run_b2d,
    "B2D+mask": run_b2d_masked,
    "SEP": run_sep,
    "SEP+mask": run_sep_masked,
    "mesh-sex": run_mesh_sex,
}


def timed(fn, image, mask):
    start = time.perf_counter()
    try:
        out = fn(image, mask)
    except Exception as exc:  # a failing peer is a result to report, not a crash
        return None, f"{type(exc).__name__}: {exc}"[:80], time.perf_counter() - start
    return out, None, time.perf_counter() - start


def history(result):
    """Mask fraction after each iteration of a skymap fit, as 'stage.iteration: %', and
    the smoothing floor the fit ended with (``source_asymmetry``), if any."""
    text = ", ".join(f"{r.stage}.{r.iteration}: {r.mask_fraction:.1%}" for r in result.history)
    floor = result.history[-1].min_scale
    return text + ("" if floor is None else f"; smoothing floor {floor:.1f} px")


# --------------------------------------------------------------------------- scenes


def correlated_noise_scene(size, smoothing, seed):
    """A flat sky of 100 plus unit-variance Gaussian noise correlated by a Gaussian of
    ``smoothing`` px (as resampling or drizzling leaves it), no sources: every masked
    pixel is a false detection."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(size, size))
    if smoothing > 0:
        noise = ndimage.gaussian_filter(noise, smoothing)
        noise /= noise.std()
    sky = np.full((size, size), 100.0)
    return SimpleNamespace(
        image=sky + noise,
        sky=sky,
        sources=np.zeros_like(sky),
        noise_sigma=1.0,
        mask=None,
        shape=sky.shape,
    )


def scene_rows(scene, methods):
    image, sky, sigma = scene.image, scene.sky, float(scene.noise_sigma)
    under = scene.sources > sigma
    rows = []
    for label in methods:
        out, error, seconds = timed(METHODS[label], image, scene.mask)
        if error is not None:
            rows.append({"method": label, "error": error, "time": seconds})
            continue
        background, used, converged, result = out
        resid = (np.asarray(background, np.float64) - sky) / sigma
        finite = np.isfinite(resid)
        mean = float(np.mean(resid[finite]))
        under_mean = float(np.mean(resid[under & finite])) if under.any() else float("nan")
        rows.append(
            {
                "method": label,
                "rms": float(np.sqrt(np.mean(resid[finite] ** 2))),
                "mean": mean,
                "under": under_mean,
                "excess": under_mean - mean,
                "mask": float(np.mean(used)),
                "time": seconds,
                "conv": "-" if converged is None else str(bool(converged)),
                "nonfinite": int((~finite).sum()),
                "history": history(result) if label == "skymap" else None,
            }
        )
    info = {
        "shape": scene.shape,
        "sigma": sigma,
        "bad_frac": 0.0 if scene.mask is None else float(np.mean(scene.mask)),
        "src_frac": float(np.mean(under)),
    }
    return info, rows


def print_scene(name, info, rows):
    print(
        f"\n### {name}  shape={info['shape']}  sigma={info['sigma']:.3g}  "
        f"bad-pixel mask={info['bad_frac']:.3%}  pixels with source > 1 sigma="
        f"{info['src_frac']:.1%}\n"
    )
    print("| method | rms/σ | mean/σ | under/σ | under−mean | mask | time s | conv |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | FAILED: {r['error']} | | | | | {r['time']:.2f} | |")
            continue
        flag = f" ({r['nonfinite']} non-finite)" if r["nonfinite"] else ""
        print(
            f"| {r['method']} | {r['rms']:.3f}{flag} | {r['mean']:+.3f} | {r['under']:+.3f} | "
            f"{r['excess']:+.3f} | {r['mask']:.1%} | {r['time']:.2f} | {r['conv']} |"
        )
    for r in rows:
        if r.get("history"):
            print(f"\nskymap mask fraction per iteration: {r['history']}")


def print_summary(results, methods):
    print("\n### summary: rms/σ per scene (best per row in bold), and time (s)\n")
    print("| scene | " + " | ".join(methods) + " |")
    print("| --- |" + " --- |" * len(methods))
    for name, (_, rows) in results.items():
        by = {r["method"]: r for r in rows}
        vals = [by[m].get("rms", np.inf) for m in methods]
        best = int(np.argmin(vals))
        cells = []
        for i, m in enumerate(methods):
            r = by[m]
            if "error" in r:
                cells.append("failed")
                continue
            text = f"{r['rms']:.3f} ({r['time']:.2f}s)"
            cells.append(f"**{text}**" if i == best else text)
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n### summary: bias under sources beyond the global offset (under−mean, σ)\n")
    print("| scene | " + " | ".join(methods) + " |")
    print("| --- |" + " --- |" * len(methods))
    for name, (_, rows) in results.items():
        by = {r["method"]: r for r in rows}
        cells = ["failed" if "error" in by[m] else f"{by[m]['excess']:+.3f}" for m in methods]
        print(f"| {name} | " + " | ".join(cells) + " |")


# --------------------------------------------------------------------------- real data


def real_rows(path):
    import skymap
    from skymap.app.io import read_image
    from skymap.quality.evaluate import masked_vs_unmasked

    img = read_image(path)
    image, mask = img.data, img.mask
    finite_in = np.isfinite(image)
    out, error, seconds = timed(run_skymap, image, mask)
    row = {"file": path.name, "shape": image.shape, "dtype": str(image.dtype)}
    if error is not None:
        row["error"] = error
        return row
    background, used, converged, result = out
    row.update(
        time=seconds,
        mask=float(np.mean(used)),
        source_mask=float(np.mean(result.source_mask)),
        conv=bool(converged),
        n_iter=len(result.history),
        history=history(result),
        finite=bool(np.all(np.isfinite(background[finite_in]))),
        noise=float(result.noise),
    )
    test = masked_vs_unmasked(result.background, result.source_mask)
    row.update(mvu_diff=test.difference / result.noise, mvu_z=test.z, mvu_p=test.p_value)
    # SEP needs the NaNs masked explicitly.
    bad = ~finite_in if mask is None else (mask | ~finite_in)
    clean = np.where(finite_in, image, 0.0)
    for label, fn in (("SEP", run_sep), ("SEP+mask", run_sep_masked)):
        sep_out, sep_error, sep_seconds = timed(fn, clean, bad)
        if sep_error is not None:
            row[label] = sep_error
            continue
        diff = (background - sep_out[0])[finite_in] / result.noise
        row[label] = (
            f"{np.sqrt(np.mean(diff**2)):.3f} (mean {np.mean(diff):+.3f}; {sep_seconds:.2f} s)"
        )
    _ = skymap  # imported for the lazy submodules above
    return row


def print_real(rows):
    print("\n### real images: skymap.fit defaults\n")
    print(
        "| file | shape, dtype | time s | mask (source) | conv (iters) | finite where input "
        "finite | noise | masked−unmasked /noise (z, p) | RMS(skymap−SEP)/noise | "
        "RMS(skymap−SEP+mask)/noise |"
    )
    print("| --- |" + " --- |" * 9)
    for r in rows:
        if "error" in r:
            print(f"| {r['file']} | {r['shape']} {r['dtype']} | FAILED: {r['error']} |")
            continue
        print(
            f"| {r['file']} | {r['shape'][0]}x{r['shape'][1]} {r['dtype']} | {r['time']:.2f} | "
            f"{r['mask']:.1%} ({r['source_mask']:.1%}) | {r['conv']} ({r['n_iter']}) | "
            f"{r['finite']} | {r['noise']:.4g} | {r['mvu_diff']:+.3f} ({r['mvu_z']:+.1f}, "
            f"{r['mvu_p']:.3f}) | {r['SEP']} | {r['SEP+mask']} |"
        )
    for r in rows:
        if "history" in r:
            print(f"\n{r['file']}: skymap mask fraction per iteration: {r['history']}")


# --------------------------------------------------------------------------- main


def main(argv=None):
    from skymap.quality.simulate import SCENE_NAMES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", nargs="*", default=list(SCENE_NAMES), choices=SCENE_NAMES)
    parser.add_argument(
        "--size", type=int, default=512, help="square scene side (0 = scene default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--correlated",
        nargs="*",
        type=float,
        default=[],
        help="also fit source-free flat skies with noise correlated by Gaussians of these "
        "sigmas (px)",
    )
    parser.add_argument("--real", action="store_true", help="also run the two real images")
    args = parser.parse_args(argv)

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "skymap/"], capture_output=True, text=True
    ).stdout.split("\n")
    print(f"commit {commit}; uncommitted under skymap/: {[d for d in dirty if d] or 'none'}")

    # Warm numba's caches so the first scene's timing is not compilation.
    from skymap.quality.simulate import scene_by_name

    warm = scene_by_name("galaxies_lsb", shape=(128, 128), seed=1)
    for label in args.methods:
        timed(METHODS[label], warm.image, warm.mask)

    size = None if args.size == 0 else args.size
    results = {}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.scenes:
            if name == "notebook" and size is not None and 2000 % size:
                # notebook_scene only comes in 2000/k squares; 500 is the nearest to 512.
                scene_size = 2000 // max(1, round(2000 / size))
            else:
                scene_size = size
            shape = None if scene_size is None else (scene_size, scene_size)
            scene = scene_by_name(name, shape=shape, seed=args.seed)
            info, rows = scene_rows(scene, args.methods)
            results[name] = (info, rows)
            print_scene(name, info, rows)
        for smoothing in args.correlated:
            name = f"correlated_noise_{smoothing:g}px"
            scene = correlated_noise_scene(size or 512, smoothing, args.seed)
            info, rows = scene_rows(scene, args.methods)
            results[name] = (info, rows)
            print_scene(name, info, rows)
        print_summary(results, args.methods)
        if args.real:
            print_real([real_rows(REAL / f) for f in REAL_FILES])
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
