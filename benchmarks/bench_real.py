"""Injection-recovery on the shared real images: skymap's default fit against its peers.

For each real image (the whole file, its first 2D image HDU, non-finite pixels masked),
:func:`skymap.quality.injection.compare` adds, separately, a smooth sky (a gradient plus
broad bumps and dips, 1-3 sigma, widths 5-25% of the frame) and faint exponential discs
(surface brightness 0.3-1 sigma at r_e, r_e 3-10% of the frame) to the real image, with
the same injections for every method, and scores

* ``track``: RMS of fit(image + sky) - fit(image) - sky, in pixel-noise sigma;
* ``leak``: mean of fit(image + discs) - fit(image) within 2 r_e of the discs (p95 too);
* ``score`` = track + |leak|, the mean over ``--trials`` trials (seeds 0..trials-1 of
  ``--seed``), with its spread.

Methods: ``skymap`` (``skymap.fit`` with no options), ``photutils_1pass`` /
``photutils_2pass`` (``Background2D`` box 64, 3x3 filter; detect at 2 sigma, dilate,
refit), ``sep_1pass`` / ``sep_2pass`` (same with SEP), ``noisechisel`` (Gnuastro
NoiseChisel's SKY with its defaults and with the structured configuration; the better of
the two counts, failures are shown). The summary gives skymap's score over the best
peer's (below 1: skymap wins).

``--kinds`` picks the injections (default ``sky,galaxies``); ``deep`` adds a deep
field's galaxy population (bright cores, wings under the noise, 0.25 sigma of light on
the mean pixel) and scores ``deep``, the mean rise of the background over the frame:
how much of the outskirts' light the background absorbs, which the difference scores
cannot see (:mod:`skymap.quality.signals`).

``structure`` is what the scores cannot see, as they cancel each method's fit of the
image itself: the structure that fit leaves in its residual (RMS of 16-px block means
over pixels no bright source reaches, above the noise, in sigma;
:mod:`skymap.quality.structure`). A method may win ``leak`` by not following the sky
(a fixed 64-px mesh on a frame filled by a nebula); it then shows here. Faint source
light under the cut counts too (a background that takes it in leaves less): read it
with ``leak``.

``--tune BUDGET`` adds ``skymap_tuned``: ``skymap.tune`` run on the image first (its
choosing and reporting seeds, 1000 and 1001, are not the table's), then scored on the
table's injections like the others.

Times are wall-clock and CPU seconds per fit (CPU includes NoiseChisel's process); the
machine is shared, so read the CPU column.

Run:  python benchmarks/bench_real.py [--images M6707HH sdss_r_reprojected] [--trials 3]
      [--methods skymap,photutils_1pass,...] [--kinds sky,galaxies,deep] [--json out.json]
"""

from __future__ import annotations

import os

# photutils' OpenMP threads spin-wait after each call and starve numba's (README,
# "Running next to photutils"). Must precede the numpy import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

_TUNE_SEED = 1000  # tune chooses (1000) and reports (1001) on seeds the table never uses
DATA = Path(os.environ.get("SKYMAP_REAL_DATA", "/work/shared/data/real"))
METHODS = (
    "skymap",
    "photutils_1pass",
    "photutils_2pass",
    "sep_1pass",
    "sep_2pass",
    "noisechisel",
)


def read_real(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """The first 2D image HDU as float (int -> float32) and its non-finite mask."""
    with fits.open(path) as hdul:
        for index, hdu in enumerate(hdul):
            if hdu.data is not None and hdu.data.ndim == 2:
                data, found = np.asarray(hdu.data), index
                break
        else:
            raise ValueError(f"{path}: no 2D image HDU")
    data = data.astype(np.float32 if data.dtype.kind in "iub" else data.dtype.newbyteorder("="))
    return data, ~np.isfinite(data), found


def method_table(names):
    from skymap.quality import peers

    out = {}
    for name in names:
        if name == "skymap":
            out[name] = None
        elif name == "noisechisel":
            out["noisechisel_default"] = peers.noisechisel
            out["noisechisel_structured"] = peers.noisechisel_structured
        else:
            fn = peers.peers(noisechisel_runs=False).get(name)
            if fn is None:
                raise SystemExit(f"unknown or unavailable method {name!r}; known: {METHODS}")
            out[name] = fn
    return out


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _status(status: str) -> str:
    # "method 'x' failed: PeerFailed: NoiseChisel failed: why" -> "failed: why"
    if status == "ok":
        return status
    return "failed: " + status.split("failed: ")[-1][:90]


def _fmt(v, spec=".3f"):
    return "-" if not np.isfinite(v) else format(v, spec)


def _col(row, name):
    """A table row's value in column ``name``; NaN where the table has no such column
    (a score of a kind not injected)."""
    return row[name] if name in row.colnames else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", nargs="*", help="image names (file stems) in the data folder")
    ap.add_argument("--trials", type=int, default=3, help="trials per injection kind (3)")
    ap.add_argument("--seed", type=int, default=0, help="injection seed (0)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    ap.add_argument("--data", type=Path, default=DATA, help=f"folder of FITS images ({DATA})")
    ap.add_argument("--json", type=Path, help="also write every row to this JSON file")
    ap.add_argument(
        "--kinds",
        default="sky,galaxies",
        help="injections: sky,galaxies,stars,deep (sky,galaxies)",
    )
    ap.add_argument(
        "--tune",
        type=float,
        metavar="BUDGET",
        help="also tune skymap on each image (skymap.tune with this budget in seconds, "
        "choosing on seed 1000, never the seeds scored here) and score the tuned pipeline",
    )
    args = ap.parse_args(argv)

    from skymap.quality.injection import KINDS, compare

    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if not kinds or any(k not in KINDS for k in kinds):
        ap.error(f"--kinds: choose from {', '.join(KINDS)}; got {args.kinds!r}")

    files = sorted(args.data.glob("*.fits"))
    if args.images:
        want = {Path(n).stem for n in args.images}
        files = [f for f in files if f.stem in want]
        missing = want - {f.stem for f in files}
        if missing:
            raise SystemExit(f"no such image(s) in {args.data}: {sorted(missing)}")
    methods = method_table([m.strip() for m in args.methods.split(",") if m.strip()])
    print(
        f"# bench_real at commit {_commit()}: {len(files)} images, {args.trials} trials, "
        f"seed {args.seed}, kinds {' + '.join(kinds)}; scores in pixel-noise sigma"
    )
    rows, summary = [], []
    t_all = time.perf_counter()
    for path in files:
        image, mask, hdu = read_real(path)
        t0 = time.perf_counter()
        run = dict(methods)
        if args.tune:
            from skymap.quality.tune import tune

            tuned = tune(image, mask=mask, budget=args.tune, seed=_TUNE_SEED, peers={})
            run["skymap_tuned"] = tuned.pipeline
            print(f"\n{path.stem}: tuned {tuned.config or '(defaults)'} in {tuned.seconds:.0f} s")
            print(f"verdict: {tuned.table.meta['verdict']}")
            for r in tuned.table:
                print(
                    f"  {r['round']:>8} {r['options'][:44]:<44} score {_fmt(r['score'])} "
                    f"edge {_fmt(r['edge'], '+.3f')} wins {r['wins']}/{r['pairs']} "
                    f"unsettled {r['unsettled']} {r['seconds']:.0f} s {r['status'][:60]}"
                )
        table = compare(image, run, mask=mask, kinds=kinds, n_trials=args.trials, seed=args.seed)
        print(
            f"\n## {path.name} (HDU {hdu}, {image.shape[0]}x{image.shape[1]}, "
            f"sigma {table.meta['noise_sigma']:.4g}, {time.perf_counter() - t0:.0f} s)"
        )
        deep = "deep" in table.colnames
        print(
            "| method | track | leak | leak p95 |"
            + (" deep |" if deep else "")
            + " score (+- spread) | structure | s/fit wall | s/fit CPU | unsettled | status |"
        )
        print("| --- " * (11 if deep else 10) + "|")
        for r in table:
            print(
                f"| {r['method']} | {_fmt(_col(r, 'track'))} | {_fmt(_col(r, 'leak'), '+.3f')} | "
                f"{_fmt(_col(r, 'leak_p95'), '+.3f')} | "
                + (f"{_fmt(r['deep'], '+.3f')} | " if deep else "")
                + f"{_fmt(r['score'])} +- {_fmt(r['score_std'])} | {_fmt(r['structure'])} | "
                f"{_fmt(r['seconds'], '.2f')} | {_fmt(r['cpu_seconds'], '.2f')} | "
                f"{r['unsettled']}/{r['fits']} | {_status(r['status'])} |"
            )
            rows.append({"image": path.stem, **{k: r[k] for k in table.colnames}})
        scores = {r["method"]: float(r["score"]) for r in table}
        nc = [
            scores.pop(k) for k in ("noisechisel_default", "noisechisel_structured") if k in scores
        ]
        if nc:
            finite = [v for v in nc if np.isfinite(v)]
            scores["noisechisel"] = min(finite) if finite else float("nan")
        tuned_score = scores.pop("skymap_tuned", float("nan"))
        sk = scores.pop("skymap", float("nan"))
        peer_ok = {k: v for k, v in scores.items() if np.isfinite(v)}
        best = min(peer_ok, key=peer_ok.get) if peer_ok else None
        bs = peer_ok[best] if best else float("nan")
        summary.append((path.stem, sk, tuned_score, best, bs))
        sys.stdout.flush()

    terms = {"sky": "track", "galaxies": "|leak|", "stars": "|halo|", "deep": "|deep|"}
    print(f"\n## summary: score = {' + '.join(terms[k] for k in kinds)} (lower is better)")
    tuned_cols = " tuned | tuned / best peer |" if args.tune else ""
    print(f"| image | skymap | best peer | its score | skymap / best peer |{tuned_cols}")
    print("| --- " * (7 if args.tune else 5) + "|")
    for name, sk, ts, best, bs in summary:
        line = f"| {name} | {_fmt(sk)} | {best or '-'} | {_fmt(bs)} | {_fmt(sk / bs, '.2f')} |"
        if args.tune:
            line += f" {_fmt(ts)} | {_fmt(ts / bs, '.2f')} |"
        print(line)
    # only images where a peer scored can be won or lost
    judged = [row for row in summary if np.isfinite(row[4])]
    wins = sum(1 for _, sk, _, _, bs in judged if sk < bs)
    print(f"\nskymap lowest on {wins}/{len(judged)} images with a peer's score", end="")
    if args.tune:
        tuned_wins = sum(1 for _, _, ts, _, bs in judged if ts < bs)
        print(f"; tuned lowest on {tuned_wins}/{len(judged)}", end="")
    print(f"; total {time.perf_counter() - t_all:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
