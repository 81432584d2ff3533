"""Robustness sweep: the default ``skymap.fit`` on variants of the shared real images.

For each real image (read as :func:`bench_real.read_real` does: the first 2-D HDU as
float, non-finite pixels masked) the default fit runs on the untouched image and on
variants that a survey pipeline meets, each compared with what the untouched fit
predicts for it (``sigma`` = the untouched fit's ``noise``, in the variant's units):

* ``x1e-6``, ``x1e6``, ``+1000sig``, ``skysub``: the image scaled or shifted (the last
  has its median subtracted, as a sky-subtracted frame): the background must scale or
  shift with it, within ``1e-3`` sigma;
* ``fliplr``, ``flipud``, ``rot90``, ``transpose``: the background must flip or rotate
  with it. The cell grid is anchored at pixel (0, 0), so a flip moves it by up to a
  cell relative to the sky: the fit is not bit-equivariant. Tolerance: RMS 0.1 sigma,
  max 0.5 sigma;
* ``crop256x1024``, ``crop300``, ``quarter``: crops (the first two centred, the last
  the lower-left quarter), compared on the overlap: RMS 0.25 sigma, max 1 sigma (a
  crop loses the sky outside it, so edges move most);
* ``wedge0``, ``wedgeNaN``: the pixels outside a rectangle rotated by 12 degrees (four
  corner wedges, as a rotated mosaic leaves them) set to exact 0 or to NaN, compared
  with the fit given those pixels as ``mask=``: must agree within RMS 0.05 sigma, and
  the ``edge`` column is the mean difference within 32 px of the wedges (zeros must not
  drag the sky down); ``skysub+wedge0`` the same on the sky-subtracted image, where a
  fill of 0 sits at the sky level and cannot be told from it by value alone;
* ``border0``, ``borderNaN``: 64-px borders of 0 or NaN around the image, compared
  with the untouched fit on the image (RMS 0.1 sigma, max 0.5 sigma);
* ``uint16``, ``int32``: quantised to ~8 ADU per sigma above a bias of 1000 (uint16,
  clipped at 65535) or around 0 (int32), ``float16`` (the image rescaled to 1 sigma =
  32 if it would overflow), ``>f4`` (big-endian, as FITS stores it): compared with
  the untouched fit transformed alike (RMS 0.1 sigma, max 0.5 sigma for the quantised
  ones: quantisation adds noise of 1/sqrt(12) ADU = 0.036 sigma per pixel, enough to
  flip pixels at the mask thresholds; 1e-3 sigma big-endian);
* ``Quantity``, ``CCDData``: the image with a unit: the background must come back in
  that unit with the same values (1e-3 sigma);
* ``saturated``: a star (Moffat, alpha 3 px, beta 2.5, peak 1e4 sigma) added at the
  centre (not on a blank fill: its far wings would turn the fill's exact zeros into
  data) and the image clipped at 300 sigma above the median (a flat saturated core);
  ``badcolumn``: one hot column (+1000 sigma) and one dead column (exact 0): the
  background must not rise by more than 1 sigma anywhere (``max``), RMS 0.1 sigma.

Every fit is also checked for: no exception; ``converged`` or a non-empty
``convergence_note``; a finite background wherever the image is valid; CPU <= 2 s/Mpix
(images of at least 0.25 Mpix: below that, fixed costs dominate); a source mask under
60% of the valid pixels (or no more than the untouched fit's + 10%).

CPU seconds (``time.process_time``) of each fit, after one warm-up fit per dtype; run
with ``NUMBA_NUM_THREADS=1`` on a shared machine.

Run:  NUMBA_NUM_THREADS=1 python benchmarks/bench_robust.py [--images M6707HH ...]
      [--variants fliplr wedge0 ...] [--options '{"blank_frame": true}']
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_real import DATA, _commit, read_real

MAX_MASKED = 0.6
MAX_CPU_PER_MPIX = 2.0


@dataclass
class Variant:
    """One variant: what to fit, and what its background should be where."""

    name: str
    image: object
    mask: np.ndarray | None
    expect: np.ndarray  # expected background (variant frame); NaN = not compared
    sigma: float  # noise in the variant's units
    rms_tol: float
    max_tol: float | None = None
    unit: object = None  # expected unit of result.background
    edge: np.ndarray | None = None  # pixels of the band next to a blank region
    valid: np.ndarray | None = None  # pixels where the background must be finite
    reference_mask: np.ndarray | None = None  # fit (image, mask=this) as the expectation


def _rotated_outside(shape, angle_deg=12.0):
    """True outside the largest rectangle of the frame's aspect rotated by ``angle``."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    cy, cx = (ny - 1) / 2, (nx - 1) / 2
    a = np.deg2rad(angle_deg)
    u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
    v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
    # shrink so that the rotated rectangle's corners reach the frame's edges
    c, s = np.cos(a), np.sin(a)
    f = min(nx / (nx * c + ny * s), ny / (nx * s + ny * c))
    return (np.abs(u) > f * nx / 2) | (np.abs(v) > f * ny / 2)


def _band(region, width=32):
    from scipy import ndimage

    return ndimage.binary_dilation(region, iterations=width) & ~region


def variants(image, bad, base, which):
    """The variants of ``image`` (``bad`` = its non-finite pixels) given the untouched
    fit ``base``; only those named in ``which`` (all if None)."""
    from astropy import units as u
    from astropy.nddata import CCDData

    bkg = np.asarray(base.background, dtype=np.float64)
    bkg = np.where(bad, np.nan, bkg)
    sig = float(base.noise)
    ny, nx = image.shape
    med = float(np.nanmedian(image[~bad]))
    out = []

    def want(name):
        return which is None or name in which

    if want("x1e-6"):
        out.append(Variant("x1e-6", image * 1e-6, bad, bkg * 1e-6, sig * 1e-6, 1e-3, 1e-3))
    if want("x1e6"):
        out.append(Variant("x1e6", image * 1e6, bad, bkg * 1e6, sig * 1e6, 1e-3, 1e-3))
    if want("+1000sig"):
        off = image.dtype.type(1000 * sig)
        out.append(Variant("+1000sig", image + off, bad, bkg + float(off), sig, 1e-3, 1e-3))
    if want("skysub"):
        m = image.dtype.type(med)
        out.append(Variant("skysub", image - m, bad, bkg - float(m), sig, 1e-3, 1e-3))
    for name, fn in (
        ("fliplr", np.fliplr),
        ("flipud", np.flipud),
        ("rot90", np.rot90),
        ("transpose", np.transpose),
    ):
        if want(name):
            flipped = np.ascontiguousarray(fn(image))
            out.append(Variant(name, flipped, fn(bad), fn(bkg), sig, 0.1, 0.5))
    crops = {
        "crop256x1024": (min(256, ny), min(1024, nx)),
        "crop300": (min(300, ny), min(300, nx)),
        "quarter": (ny // 2, nx // 2),
    }
    for name, (h, w) in crops.items():
        if not want(name):
            continue
        y0, x0 = ((ny - h) // 2, (nx - w) // 2) if name != "quarter" else (0, 0)
        sl = (slice(y0, y0 + h), slice(x0, x0 + w))
        out.append(Variant(name, image[sl].copy(), bad[sl], bkg[sl], sig, 0.25, 1.0))
    wedge = _rotated_outside(image.shape)
    for name, fill, img in (
        ("wedge0", 0.0, image),
        ("wedgeNaN", np.nan, image),
        ("skysub+wedge0", 0.0, image - image.dtype.type(med)),
    ):
        if want(name):
            v = img.copy()
            v[wedge] = fill
            out.append(
                Variant(
                    name,
                    v,
                    bad,
                    None,
                    sig,
                    0.05,
                    None,
                    edge=_band(wedge) & ~bad,
                    valid=~(bad | wedge),
                    reference_mask=bad | wedge,
                )
            )
    for name, fill in (("border0", 0.0), ("borderNaN", np.nan)):
        if want(name):
            p = 64
            v = np.full((ny + 2 * p, nx + 2 * p), fill, image.dtype)
            v[p:-p, p:-p] = image
            e = np.full(v.shape, np.nan)
            e[p:-p, p:-p] = bkg
            vb = np.zeros(v.shape, bool)
            vb[p:-p, p:-p] = bad
            border = np.ones(v.shape, bool)
            border[p:-p, p:-p] = False
            out.append(
                Variant(
                    name, v, vb, e, sig, 0.1, 0.5, edge=_band(border) & ~vb, valid=~(vb | border)
                )
            )
    if want("uint16"):
        gain = sig / 8.0
        q = np.round((np.where(bad, med, image) - med) / gain) + 1000
        q = np.clip(q, 0, 65535).astype(np.uint16)
        out.append(Variant("uint16", q, bad, (bkg - med) / gain + 1000, 8.0, 0.1, 0.5))
    if want("int32"):
        gain = sig / 8.0
        q = np.round((np.where(bad, med, image) - med) / gain).astype(np.int32)
        out.append(Variant("int32", q, bad, (bkg - med) / gain, 8.0, 0.1, 0.5))
    if want("float16"):
        amax = float(np.nanmax(np.abs(image)))
        k = 1.0 if amax < 3e4 else 32.0 / sig
        with np.errstate(over="ignore"):  # stars beyond float16's range become inf
            h = (np.where(bad, np.nan, image) * k).astype(np.float16)
        out.append(Variant("float16", h, bad, bkg * k, sig * k, 0.1, 0.5))
    if want(">f4"):
        out.append(Variant(">f4", image.astype(">f4"), bad, bkg, sig, 1e-3, 1e-3))
    if want("Quantity"):
        unit = u.electron / u.s
        out.append(Variant("Quantity", image * unit, bad, bkg, sig, 1e-3, 1e-3, unit=unit))
    if want("CCDData"):
        ccd = CCDData(image, unit="adu", mask=bad)
        out.append(Variant("CCDData", ccd, None, bkg, sig, 1e-3, 1e-3, unit=u.adu))
    if want("saturated"):
        yy, xx = np.mgrid[0:ny, 0:nx]
        cy, cx = ny // 2, nx // 2
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        star = 1e4 * sig * (1 + r2 / 9.0) ** -2.5
        # On the data only: a blank fill (in the untouched fit's bad_mask) lies outside
        # the footprint, and its exact zeros plus the star's far wings (~1e-6 sigma)
        # would no longer be a fill, but a 25% border of data at 0 (MIPS).
        star = np.where(np.asarray(base.bad_mask), 0.0, star)
        sat = med + 300 * sig
        v = np.minimum(image + star.astype(image.dtype), image.dtype.type(sat))
        v[bad] = image[bad]
        out.append(Variant("saturated", v, bad, bkg, sig, 0.1, 1.0))
    if want("badcolumn"):
        v = image.copy()
        v[:, nx // 3] += image.dtype.type(1000 * sig)
        v[:, 2 * nx // 3] = 0
        out.append(Variant("badcolumn", v, bad, bkg, sig, 0.1, 1.0))
    return out


OPTIONS: dict = {}


def _fit(image, mask):
    import skymap

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.process_time()
        res = skymap.fit(image, mask=mask, **OPTIONS)
        cpu = time.process_time() - t0
    return res, cpu, [str(w.message)[:80] for w in caught]


def _checks(v: Variant, res, cpu, base_masked):
    """(row dict, list of failures)."""
    fails = []
    bkg = res.background
    unit = getattr(bkg, "unit", None)
    if v.unit is not None and unit != v.unit:
        fails.append(f"unit {unit} != {v.unit}")
    if v.unit is None and unit is not None:
        fails.append(f"unexpected unit {unit}")
    bkg = np.asarray(getattr(bkg, "value", bkg), dtype=np.float64)
    img = v.image
    data = np.asarray(getattr(img, "data", getattr(img, "value", img)), dtype=np.float64)
    valid = np.isfinite(data) if v.valid is None else v.valid
    if v.mask is not None:
        valid = valid & ~v.mask
    if not np.all(np.isfinite(bkg[valid])):
        fails.append(f"non-finite background on {np.mean(~np.isfinite(bkg[valid])):.1%} of valid")
    if not (res.converged or res.convergence_note):
        fails.append("not converged, no note")
    mpix = data.size / 1e6
    per = cpu / mpix
    if mpix >= 0.25 and per > MAX_CPU_PER_MPIX:
        fails.append(f"CPU {per:.2f} s/Mpix")
    counted = valid & ~np.asarray(res.bad_mask)  # blank fills are not sky to mask
    masked = float(np.mean(res.source_mask[counted])) if counted.any() else float("nan")
    if masked > MAX_MASKED and masked > base_masked + 0.1:
        fails.append(f"masked {masked:.0%}")
    expect = v.expect
    d = (bkg - expect) / v.sigma
    cmp = valid & np.isfinite(d)
    rms = float(np.sqrt(np.mean(d[cmp] ** 2))) if cmp.any() else float("nan")
    mx = float(np.max(np.abs(d[cmp]))) if cmp.any() else float("nan")
    edge = float(np.mean(d[v.edge & cmp])) if v.edge is not None and (v.edge & cmp).any() else None
    if not rms <= v.rms_tol:
        fails.append(f"rms {rms:.3g} > {v.rms_tol:g}")
    if v.max_tol is not None and not mx <= v.max_tol:
        fails.append(f"max {mx:.3g} > {v.max_tol:g}")
    if edge is not None and abs(edge) > max(v.rms_tol, 0.05):
        fails.append(f"edge {edge:+.3g}")
    row = {
        "variant": v.name,
        "shape": f"{data.shape[0]}x{data.shape[1]}",
        "dtype": str(np.asarray(getattr(img, "data", getattr(img, "value", img))).dtype),
        "conv": "yes" if res.converged else "no",
        "iters": len(res.history),
        "masked": masked,
        "cpu": cpu,
        "per": per,
        "rms": rms,
        "max": mx,
        "edge": edge,
    }
    return row, fails


def _row(image, r, fails):
    edge = "-" if r["edge"] is None else f"{r['edge']:+.3f}"
    status = "ok" if not fails else "FAIL: " + "; ".join(fails)
    return (
        f"| {image} | {r['variant']} | {r['shape']} | {r['dtype']} | {r['conv']} | {r['iters']} "
        f"| {r['masked']:.1%} | {r['cpu']:.2f} | {r['per']:.2f} | {r['rms']:.2g} | {r['max']:.2g} "
        f"| {edge} | {status} |"
    )


def _warm():
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        _fit(rng.normal(size=(256, 256)).astype(dtype), None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", nargs="*", help="image names (file stems)")
    ap.add_argument("--variants", nargs="*", help="variant names (default: all)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--options", default="{}", help="skymap.fit options as JSON")
    args = ap.parse_args(argv)
    OPTIONS.update(json.loads(args.options))
    logging_off()
    files = sorted(args.data.glob("*.fits"))
    if args.images:
        files = [f for f in files if f.stem in set(args.images)]
    print(
        f"# bench_robust at commit {_commit()}, NUMBA_NUM_THREADS="
        f"{os.environ.get('NUMBA_NUM_THREADS', '-')}, options {OPTIONS}; deviations in sigma "
        "of the untouched fit"
    )
    _warm()
    print(
        "| image | variant | shape | dtype | conv | iters | masked | CPU s | s/Mpix | rms | max "
        "| edge | status |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    failures = []
    for path in files:
        image, bad, _ = read_real(path)
        base, cpu, warns = _fit(image, bad)
        if path == files[0]:  # the first fit compiles what the warm-up did not reach
            base, cpu, warns = _fit(image, bad)
        base_masked = float(np.mean(base.source_mask[~bad]))
        stem = path.stem
        bv = Variant("base", image, bad, np.asarray(base.background, float), base.noise, 1, None)
        row, fails = _checks(bv, base, cpu, 1.0)
        print(_row(stem, row, fails), flush=True)
        failures += [(stem, "base", f) for f in fails]
        for v in variants(image, bad, base, set(args.variants) if args.variants else None):
            try:
                if v.reference_mask is not None:
                    ref, _, _ = _fit(v.image, v.reference_mask)
                    v.expect = np.asarray(ref.background, dtype=np.float64)
                res, cpu, warns = _fit(v.image, v.mask)
                row, fails = _checks(v, res, cpu, base_masked)
            except Exception as exc:  # the sweep reports, it does not stop
                fails = [f"{type(exc).__name__}: {exc}"[:160]]
                traceback.print_exc(limit=3, file=sys.stderr)
                row = dict.fromkeys(("masked", "cpu", "per", "rms", "max"), np.nan)
                row.update(variant=v.name, shape="-", dtype="-", conv="-", iters=0, edge=None)
            print(_row(stem, row, fails), flush=True)
            failures += [(stem, v.name, f) for f in fails]
    print(f"\n## failures: {len(failures)}")
    for stem, name, f in failures:
        print(f"- {stem} / {name}: {f}")
    return 0


def logging_off():
    import logging

    logging.getLogger("skymap").setLevel(logging.ERROR)


if __name__ == "__main__":
    raise SystemExit(main())
