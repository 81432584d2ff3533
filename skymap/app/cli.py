"""The ``skymap`` command: fit, evaluate, simulate, match and batch-process FITS images.

Every subcommand is a thin layer over the Python API: it reads inputs with
:mod:`skymap.io`, calls :func:`skymap.fit` / :mod:`skymap.evaluate` /
:mod:`skymap.simulate` / :mod:`skymap.skymatch`, and writes FITS products, a metrics JSON
and an HTML report. Outputs are checked before any work starts, and an existing file is
never replaced without ``--overwrite``.

:func:`main` takes an argument list and returns the exit code (it never calls
``sys.exit``), so it can be driven from Python and tests; the console script wraps it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import inspect
import io as _stdio
import logging
import os
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from skymap import __version__
from skymap._validate import combine_masks
from skymap.app import io as skyio

__all__ = [
    "EXIT_EXISTS",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "main",
    "run_file",
]

log = logging.getLogger("skymap.cli")

#: Success.
EXIT_OK = 0
#: The work failed while running (a fit or a write failed; see the message).
EXIT_FAILURE = 1
#: Bad command line or bad input: unknown option, missing or unreadable file, bad config.
EXIT_USAGE = 2
#: An output exists and ``--overwrite`` was not given; nothing was written.
EXIT_EXISTS = 3
#: Interrupted (Ctrl-C).
EXIT_INTERRUPTED = 130

_EPILOG = """\
exit codes:
  0    success
  1    the work failed while running (the message says what failed)
  2    bad command line or bad input: a missing file, unreadable FITS, a bad config,
       or data the fit cannot use (e.g. every pixel masked)
  3    an output file exists; nothing was written (add --overwrite to replace it)
  130  interrupted

examples:
  skymap demo                          simulate a scene, fit it, score it -> skymap_out/
  skymap run image.fits -o out/        fit a FITS image -> out/image_background.fits ...
  skymap run image.fits --hdu SCI --dq-bits 1,4 --mask stars.fits
  skymap batch *.fits -o out/ --workers 4
  skymap config --kind sextractor -o sex.toml && skymap run image.fits --config sex.toml
  skymap <command> --help              options of one command
"""


_CONFIG_HELP = (
    "configuration (TOML): a file written by `skymap config`, or options of the default "
    "fit such as `high = 5.0` (default: the default fit)"
)

# skymap.simulate.SCENE_NAMES, spelled out so that `skymap --help` need not import the
# simulator (numba, astropy.table); a test keeps the two equal.
_SCENES = ("notebook", "crowded_stellar", "galaxies_lsb", "nebula", "detector_artifacts")


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


# --------------------------------------------------------------------------- helpers


def _module(name: str, command: str):
    """Import ``skymap.<name>``, or fail with a message naming the command that needs it."""
    try:
        return importlib.import_module(f"skymap.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"skymap.{name}":
            raise
        raise RuntimeError(
            f"`skymap {command}` needs skymap.{name}, which this installation lacks"
        ) from None


def _progress(*, total: int, desc: str, quiet: bool, unit: str = "step"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, unit=unit, file=sys.stderr, leave=False)


def _iteration_report(bar, *, quiet: bool):
    """A ``callback`` for the pipeline's fit that shows each iteration on ``bar``."""
    if quiet:
        return None

    def report(rec) -> None:
        bar.set_postfix_str(
            f"fitting: stage {rec.stage} iteration {rec.iteration}: change "
            f"{rec.change:.3g}, mask {rec.mask_fraction:.3f}"[:90]
        )

    return report


def _load_config(path: str | os.PathLike | None):
    """What a ``--config`` TOML file holds: a configuration object (a table with a
    ``type`` key, as ``skymap config`` writes), or else options of :func:`skymap.fit`
    (e.g. ``high = 5.0``), returned as a dict. None: the defaults."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        if "type" not in data:
            return data
        return _module("config", "run --config").from_dict(data)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
        raise UsageError(f"config file {path}: {err}") from err


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class _SingleFit:
    """A one-pass estimator's result (e.g. a MeshResult) in the shape of a pipeline's:
    its mask is the input's (flags and non-finite pixels), and there is no history."""

    background: np.ndarray
    rms: np.ndarray
    mask: np.ndarray
    mesh: Any
    config: Any
    history: tuple = ()


def _fit(image: np.ndarray, mask: np.ndarray | None, config: Any, callback=None):
    """Fit with ``config``: an estimator object with ``.fit`` (the pipeline, or a single
    :class:`skymap.mesh.MeshBackground` pass), a mapping of options, or None (defaults).

    skymap raises ValueError for data or settings it cannot use (no valid pixel, a box
    larger than the image, an unknown option): that is bad input, exit code 2.
    """
    try:
        if config is not None and hasattr(config, "fit"):
            # a pipeline reports its iterations; a one-pass estimator has none
            takes = callback is not None and "callback" in inspect.signature(config.fit).parameters
            extra = {"callback": callback} if takes else {}
            result = config.fit(image, mask=mask, **extra)
        else:
            pipeline = _module("background.pipeline", "run")
            options = dict(config) if isinstance(config, Mapping) else {}
            extra = {} if callback is None else {"callback": callback}
            result = pipeline.fit(image, mask=mask, **extra, **options)
    except ValueError as err:
        raise UsageError(f"cannot fit this image: {err}") from err
    if getattr(result, "mask", None) is None:
        result = _SingleFit(
            background=result.background,
            rms=result.rms,
            mask=combine_masks(np.asarray(image), mask),
            mesh=result,
            config=config,
        )
    return result


def _result_config(result: Any, config: Any) -> Any:
    return getattr(result, "config", None) or config


def _read_input(path, *, hdu=None, dq_hdu=None, dq_bits=None, mask=None) -> skyio.FitsImage:
    try:
        return skyio.read_image(path, hdu=hdu, dq=dq_hdu, dq_bits=dq_bits, mask=mask)
    except (FileNotFoundError, ValueError, TypeError, OSError) as err:
        raise UsageError(str(err)) from err


def _stem(path: str | os.PathLike, hdu: Any = None) -> str:
    """Output name stem: the file name without its FITS suffix, plus ``_sci2`` when a
    later chip (``--hdu SCI,2``) is chosen, so that chips of one file do not collide."""
    name = Path(path).name
    for suffix in (".fits.gz", ".fits.fz", ".fits", ".fit", ".fts"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = Path(name).stem
    key = skyio.parse_hdu(hdu) if hdu is not None else None
    if isinstance(key, tuple) and key[1] != 1:
        name = f"{name}_{key[0].lower()}{key[1]}"
    return name


def _summary(image: np.ndarray, result: Any) -> dict:
    """Headline numbers of a fit, JSON-ready."""
    bkg = np.asarray(result.background)
    mask = np.asarray(result.mask, dtype=bool)
    return {
        "shape": list(bkg.shape),
        "background_median": float(np.nanmedian(bkg)),
        "rms_median": float(np.nanmedian(np.asarray(result.rms))),
        "mask_fraction": float(mask.mean()),
        "iterations": len(getattr(result, "history", None) or []),
        # the promise to users: a finite background wherever the input is finite
        "finite_background_where_input_finite": bool(
            np.all(np.isfinite(bkg)[np.isfinite(np.asarray(image))])
        ),
    }


def _planned_outputs(out_dir: Path, stem: str, *, report: bool) -> dict[str, Path]:
    """Every file a run may write, for the up-front overwrite check."""
    paths = dict(skyio.product_paths(out_dir, stem))
    paths["metrics"] = out_dir / "metrics.json"
    if report:
        from skymap.app import report as report_mod

        for name, p in report_mod.report_paths(out_dir, tuple(report_mod.CAPTIONS)).items():
            paths[f"report_{name}"] = p
    return paths


def _write_outputs(
    out_dir: Path,
    stem: str,
    *,
    image: np.ndarray,
    result: Any,
    evaluation: Any,
    metrics: dict,
    header=None,
    config: Any = None,
    source=None,
    report: bool = True,
    title: str,
    meta: dict,
    overwrite: bool = False,
) -> dict[str, Path]:
    """The FITS products, metrics.json and the report: what run and demo both write."""
    written = skyio.write_products(
        out_dir,
        stem,
        image=image,
        background=result.background,
        rms=result.rms,
        mask=result.mask,
        header=header,
        config=config,
        source=source,
        overwrite=overwrite,
    )
    written["metrics"] = skyio.write_json(out_dir / "metrics.json", metrics, overwrite=overwrite)
    if report:
        from skymap.app import report as report_mod

        figures = report_mod.report_figures(result, evaluation)
        pages = report_mod.write_report(
            out_dir, title=title, figures=figures, metrics=metrics, meta=meta, overwrite=overwrite
        )
        written.update({f"report_{k}": v for k, v in pages.items()})
    return written


def _headline(result: Any, evaluation: Any) -> dict:
    """The few numbers a reader wants first, for the top of the report."""
    ev = evaluation
    lines = {
        "mask fraction": f"{float(np.mean(result.mask)):.1%}",
        "iterations": len(getattr(result, "history", None) or []),
    }
    if ev.truth_metrics is not None:
        lines["background error RMS"] = f"{ev.truth_metrics['rms_error_sigma']:.4f} sigma"
    verdict = " (OVERFIT: the background follows the noise)" if ev.overfit else ""
    lines[f"RMS-vs-scale ratio to {ev.reference}, large scales"] = (
        f"{ev.large_scale_ratio:.3f}{verdict}"
    )
    if ev.masked_vs_unmasked is not None:
        t = ev.masked_vs_unmasked
        lines["background under mask - elsewhere"] = (
            f"{t.difference:.4g} +- {t.stderr:.2g} (z = {t.z:.2f})"
        )
    return lines


# --------------------------------------------------------------------------- run


def run_file(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: Any = None,
    hdu: int | str | None = None,
    dq_hdu: int | str | bool | None = None,
    dq_bits: Any = None,
    mask: str | os.PathLike | None = None,
    report: bool = True,
    overwrite: bool = False,
    quiet: bool = True,
    inject: bool = False,
) -> dict:
    """Fit one FITS image and write its products: what ``skymap run`` does for each file.

    Writes ``<stem>_background.fits``, ``<stem>_rms.fits``, ``<stem>_mask.fits``,
    ``<stem>_subtracted.fits``, ``metrics.json`` (fit summary, RMS against scale and the
    masked-vs-unmasked test) and, unless ``report=False``, ``report.html`` with its PNG
    figures, all into ``out_dir``. Every output is checked before the fit starts. The
    files hold no timestamps, so the same input and configuration give byte-identical
    files: this is what lets ``skymap batch`` promise the results of ``skymap run``.

    Parameters
    ----------
    path : path-like
        Input FITS image.
    out_dir : path-like
        Output directory (created if missing).
    config : optional
        Pipeline configuration (from :func:`skymap.config.load_toml`), or None for the
        defaults of :func:`skymap.fit`.
    hdu, dq_hdu, dq_bits, mask
        Input selection, see :func:`skymap.io.read_image`.
    report : bool
        Also write the HTML report and its figures.
    overwrite : bool
        Replace existing outputs.
    quiet : bool
        No progress bar.
    inject : bool
        Add injection-recovery scores of the same configuration
        (:func:`skymap.quality.injection.injection_recovery`) to the metrics.

    Returns
    -------
    dict
        ``input``, ``outputs`` (name -> path as str) and ``metrics`` (as written).
    """
    out_dir = Path(out_dir)
    stem = _stem(path, hdu)
    skyio.check_outputs(
        _planned_outputs(out_dir, stem, report=report).values(), overwrite=overwrite
    )
    with _progress(total=4, desc=stem, quiet=quiet) as bar:
        bar.set_postfix_str("reading")
        img = _read_input(path, hdu=hdu, dq_hdu=dq_hdu, dq_bits=dq_bits, mask=mask)
        bar.update()
        bar.set_postfix_str("fitting")
        t0 = time.perf_counter()
        result = _fit(img.data, img.mask, config, _iteration_report(bar, quiet=quiet))
        log.info("%s: fit took %.2f s", path, time.perf_counter() - t0)
        bar.update()
        bar.set_postfix_str("evaluating")
        evaluation = _module("evaluate", "run").evaluate(img.data, result)
        cfg = _result_config(result, config)
        metrics = {
            "input": {
                "file": str(path),
                "hdu": img.hdu,
                "shape": list(img.data.shape),
                "dtype": str(img.data.dtype),
                "nonfinite_pixels": int((~np.isfinite(img.data)).sum()),
                "flagged_pixels": 0 if img.mask is None else int(img.mask.sum()),
            },
            "skymap_version": __version__,
            "config_hash": skyio.config_hash(cfg),
            "fit": _summary(img.data, result),
            "evaluation": evaluation.to_dict(),
        }
        if inject:
            bar.set_postfix_str("injecting")
            injection = _module("quality.injection", "run --inject")
            try:
                scores = injection.injection_recovery(img.data, config, mask=img.mask)
            except ValueError as err:
                raise UsageError(f"--inject: {err}") from err
            metrics["injection"] = scores.to_dict()
        bar.update()
        bar.set_postfix_str("writing")
        written = _write_outputs(
            out_dir,
            stem,
            image=img.data,
            result=result,
            evaluation=evaluation,
            metrics=metrics,
            header=img.header,
            config=cfg,
            source=path,
            report=report,
            title=f"skymap: {Path(path).name}",
            meta={
                "input": str(path),
                "hdu": img.hdu,
                "shape": f"{img.data.shape[0]} x {img.data.shape[1]} (y, x)",
                "skymap version": __version__,
                "configuration hash": skyio.config_hash(cfg),
                **_headline(result, evaluation),
            },
            overwrite=overwrite,
        )
        bar.update()
    return {
        "input": str(path),
        "outputs": {k: str(v) for k, v in written.items()},
        "metrics": metrics,
    }


def _cmd_run(args) -> int:
    config = _load_config(args.config)
    info = run_file(
        args.input,
        args.output,
        config=config,
        hdu=args.hdu,
        dq_hdu=args.dq_hdu,
        dq_bits=_dq_bits(args.dq_bits),
        mask=args.mask,
        report=not args.no_report,
        overwrite=args.overwrite,
        quiet=args.quiet,
        inject=args.inject,
    )
    _tell(args, f"wrote {len(info['outputs'])} files to {args.output}/")
    for p in info["outputs"].values():
        _tell(args, f"  {p}")
    return EXIT_OK


def _dq_bits(spec):
    if spec is None:
        return None
    try:
        return skyio.parse_dq_bits(spec)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _tell(args, message: str) -> None:
    """Results the user asked for go to stdout; --quiet silences them."""
    if not args.quiet:
        sys.stdout.write(message + "\n")


# --------------------------------------------------------------------------- demo


def _scene(args):
    simulate = _module("simulate", args.command)
    try:
        if args.scene == "notebook":
            return simulate.notebook_scene(seed=args.seed, shrink_factor=args.shrink_factor)
        shape = None if args.size is None else (args.size, args.size)
        return simulate.scene_by_name(args.scene, shape=shape, seed=args.seed)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _cmd_demo(args) -> int:
    out_dir = Path(args.output)
    config = _load_config(args.config)
    stem = args.scene
    inputs = {"image": out_dir / f"{stem}_image.fits", "sky": out_dir / f"{stem}_sky.fits"}
    planned = _planned_outputs(out_dir, stem, report=True)
    skyio.check_outputs([*planned.values(), *inputs.values()], overwrite=args.overwrite)
    with _progress(total=4, desc="demo", quiet=args.quiet) as bar:
        bar.set_postfix_str("simulating")
        scene = _scene(args)
        bar.update()
        bar.set_postfix_str("fitting")
        t0 = time.perf_counter()
        result = _fit(scene.image, scene.mask, config, _iteration_report(bar, quiet=args.quiet))
        fit_seconds = time.perf_counter() - t0
        bar.update()
        bar.set_postfix_str("evaluating")
        evaluation = _module("evaluate", "demo").evaluate(scene.image, result, scene=scene)
        cfg = _result_config(result, config)
        metrics = {
            "scene": {"name": scene.name, "shape": list(scene.shape), "seed": args.seed},
            "skymap_version": __version__,
            "config_hash": skyio.config_hash(cfg),
            "fit": _summary(scene.image, result),
            "evaluation": evaluation.to_dict(),
        }
        bar.update()
        bar.set_postfix_str("writing")
        out_dir.mkdir(parents=True, exist_ok=True)
        history = [f"skymap demo: simulated scene {scene.name}"]
        written = {
            k: skyio.write_image(p, arr, product=k, history=history, overwrite=args.overwrite)
            for (k, p), arr in zip(inputs.items(), (scene.image, scene.sky), strict=True)
        }
        written.update(
            _write_outputs(
                out_dir,
                stem,
                image=scene.image,
                result=result,
                evaluation=evaluation,
                metrics=metrics,
                config=cfg,
                source=inputs["image"],
                title=f"skymap demo: {scene.name}",
                meta={
                    "scene": scene.name,
                    "skymap version": __version__,
                    "configuration hash": skyio.config_hash(cfg),
                    "fit time (s)": round(fit_seconds, 2),
                    **_headline(result, evaluation),
                },
                overwrite=args.overwrite,
            )
        )
        bar.update()
    truth = evaluation.truth_metrics
    _tell(
        args,
        f"{scene.name}: background error RMS = {truth['rms_error_sigma']:.4f} sigma, "
        f"mask fraction {metrics['fit']['mask_fraction']:.1%}, fit {fit_seconds:.1f} s",
    )
    _tell(args, f"wrote {len(written)} files to {out_dir}/; open {written['report_html']}")
    return EXIT_OK


# --------------------------------------------------------------------------- simulate


def _write_table(path: Path, table, *, overwrite: bool) -> Path:
    buf = _stdio.StringIO()
    table.write(buf, format="ascii.ecsv")
    payload = buf.getvalue().encode("utf-8")
    return skyio.atomic_write(path, lambda fh: fh.write(payload), overwrite=overwrite)


def _cmd_simulate(args) -> int:
    out_dir = Path(args.output)
    stem = args.scene
    names = ("image", "sky", "sources", "noise", "badpix")
    paths = {k: out_dir / f"{stem}_{k}.fits" for k in names}
    paths["catalog"] = out_dir / f"{stem}_catalog.ecsv"
    skyio.check_outputs(paths.values(), overwrite=args.overwrite)
    scene = _scene(args)
    arrays = {
        "image": scene.image,
        "sky": scene.sky,
        "sources": scene.sources,
        "noise": scene.noise,
        "badpix": scene.mask,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    history = [f"skymap simulate: scene {scene.name}"]
    written = []
    for key, arr in arrays.items():
        if arr is not None:
            written.append(
                skyio.write_image(
                    paths[key], arr, product=key, history=history, overwrite=args.overwrite
                )
            )
    written.append(_write_table(paths["catalog"], scene.catalog, overwrite=args.overwrite))
    _tell(args, f"{scene.name}: wrote {len(written)} files to {out_dir}/")
    for p in written:
        _tell(args, f"  {p}")
    return EXIT_OK


# --------------------------------------------------------------------------- evaluate


def _cmd_evaluate(args) -> int:
    out = Path(args.output)
    skyio.check_outputs([out], overwrite=args.overwrite)
    img = _read_input(args.image, hdu=args.hdu)
    maps = {"background": args.background, "truth": args.truth, "noise": args.noise}
    arrays = {}
    for name, path in maps.items():
        if path is not None:
            arrays[name] = _read_input(path).data
            if arrays[name].shape != img.data.shape:
                raise UsageError(
                    f"{name} map {path} has shape {arrays[name].shape}, "
                    f"image {args.image} has {img.data.shape}"
                )
    try:
        mask = skyio.read_mask(args.mask, shape=img.data.shape) if args.mask else None
    except (FileNotFoundError, ValueError, OSError) as err:
        raise UsageError(str(err)) from err
    catalog = None
    if args.catalog:
        from astropy.table import Table

        try:
            catalog = Table.read(args.catalog)
        except (OSError, ValueError) as err:
            raise UsageError(f"catalog {args.catalog}: {err}") from err
    evaluate = _module("evaluate", "evaluate")
    try:
        evaluation = evaluate.evaluate(
            img.data,
            arrays["background"],
            mask=mask,
            truth=arrays.get("truth"),
            noise=arrays.get("noise"),
            catalog=catalog,
        )
    except (ValueError, KeyError) as err:  # e.g. a catalogue without x_mean/y_mean
        raise UsageError(str(err)) from err
    metrics = {
        "image": str(args.image),
        "background": str(args.background),
        "skymap_version": __version__,
        "evaluation": evaluation.to_dict(),
    }
    skyio.write_json(out, metrics, overwrite=args.overwrite)
    ev = evaluation
    _tell(args, f"large-scale RMS ratio to {ev.reference}: {ev.large_scale_ratio:.3f}")
    if ev.truth_metrics is not None:
        _tell(args, f"background error RMS = {ev.truth_metrics['rms_error_sigma']:.4f} sigma")
    if ev.masked_vs_unmasked is not None:
        t = ev.masked_vs_unmasked
        _tell(args, f"masked - unmasked background = {t.difference:.4g} (z = {t.z:.2f})")
    _tell(args, f"wrote {out}")
    return EXIT_OK


# --------------------------------------------------------------------------- match


def _cmd_match(args) -> int:
    from astropy.nddata import NDData

    if len(args.inputs) < 2:
        raise UsageError("skymap match needs at least two images")
    out_dir = Path(args.output)
    stems = [_stem(p, args.hdu) for p in args.inputs]
    _check_unique(stems, args.inputs)
    paths = {"json": out_dir / "skymatch.json"}
    if args.subtract:
        paths.update({s: out_dir / f"{s}_skymatched.fits" for s in stems})
    skyio.check_outputs(paths.values(), overwrite=args.overwrite)
    images = [_read_input(p, hdu=args.hdu, dq_bits=_dq_bits(args.dq_bits)) for p in args.inputs]
    skymatch = _module("mosaic.skymatch", "match")
    ndds = [
        NDData(im.data, mask=im.mask, wcs=w)
        for im, w in zip(images, _match_wcs(args, images), strict=True)
    ]
    try:
        result = skymatch.match(
            ndds,
            method=args.method,
            statistic=args.statistic,
            match_down=not args.match_up,
            subtract=args.subtract,
            model=args.model,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    sky = np.asarray(result.sky, dtype=float)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in args.inputs]
    summary = {
        "method": args.method,
        "statistic": args.statistic,
        "model": args.model,
        "skymap_version": __version__,
        "images": [
            {"file": f, "sky": float(level), "coefficients": [float(c) for c in coef]}
            for f, level, coef in zip(files, sky, result.coefficients, strict=True)
        ],
        "groups": [[int(i) for i in g] for g in result.groups],
        "overlaps": [
            {
                "a": files[int(a)],
                "b": files[int(b)],
                "delta": float(d),
                "error": float(e),
                "npix": int(n),
                "residual": float(r),
            }
            for (a, b), d, e, n, r in zip(
                np.asarray(result.pairs).reshape(-1, 2),
                result.pair_delta,
                result.pair_error,
                result.pair_npix,
                result.pair_residual,
                strict=True,
            )
        ],
        "reduced_chi2": float(result.reduced_chi2),
    }
    if args.subtract:
        # skymatch's own copies: an image whose sky could not be measured (NaN) is left
        # as it is rather than turned into NaN
        for s, im, level, sub in zip(stems, images, sky, result.images, strict=True):
            skyio.write_image(
                paths[s],
                sub.data,
                header=im.header,
                product="skymatched",
                config=result.config,
                source=im.path,
                history=[f"skymap match: subtracted {args.model} sky, {level:.6g} at centre"],
                overwrite=args.overwrite,
            )
    skyio.write_json(paths["json"], summary, overwrite=args.overwrite)
    for entry in summary["images"]:
        _tell(args, f"{entry['sky']:14.6g}  {entry['file']}")
    _tell(args, f"wrote {paths['json']}")
    return EXIT_OK


def _match_wcs(args, images) -> list:
    """Each input's celestial WCS; None for all when no input has one (they must then
    share one pixel grid). A mix is refused: overlaps cannot be placed."""
    wcs = [im.wcs for im in images]
    celestial = [w.has_celestial for w in wcs]
    if all(celestial):
        return wcs
    if any(celestial):
        missing = [str(p) for p, c in zip(args.inputs, celestial, strict=True) if not c]
        raise UsageError(
            f"inputs without a celestial WCS: {', '.join(missing)}; the others have one. "
            "Either every input needs a celestial WCS, or none (then all share one pixel "
            "grid)"
        )
    _tell(args, "no input has a celestial WCS: treating them as one pixel grid")
    return [None] * len(images)


def _check_unique(stems, inputs):
    seen: dict[str, str] = {}
    for stem, p in zip(stems, inputs, strict=True):
        if stem in seen:
            raise UsageError(
                f"inputs {seen[stem]} and {p} share the name {stem!r}; their outputs would "
                "collide. Rename one or run them separately"
            )
        seen[stem] = str(p)


# --------------------------------------------------------------------------- batch


def _run_item(item: tuple, **kwargs) -> dict:
    """:func:`run_file` on one ``(input, output_dir)`` pair, as mapped by ``batch``."""
    path, out_dir = item
    return run_file(path, out_dir, **kwargs)


def _cmd_batch(args) -> int:
    distributed = _module("distributed", "batch")
    stems = [_stem(p, args.hdu) for p in args.inputs]
    _check_unique(stems, args.inputs)
    for p in args.inputs:
        if not Path(p).is_file():
            raise UsageError(f"input image {p} does not exist")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    config = _load_config(args.config)
    dq_bits = _dq_bits(args.dq_bits)
    out_root = Path(args.output)
    report = not args.no_report
    # Each file gets its own directory: exactly what `skymap run FILE -o DIR/<stem>` writes.
    items = [(p, out_root / s) for p, s in zip(args.inputs, stems, strict=True)]
    planned = []
    for (_, d), s in zip(items, stems, strict=True):
        planned.extend(_planned_outputs(d, s, report=report).values())
    skyio.check_outputs(planned, overwrite=args.overwrite)

    kwargs = {
        "config": config,
        "hdu": args.hdu,
        "dq_hdu": args.dq_hdu,
        "dq_bits": dq_bits,
        "mask": args.mask,
        "report": report,
        "overwrite": args.overwrite,
        "quiet": True,
    }
    with (
        _progress(total=len(items), desc="batch", quiet=args.quiet, unit="file") as bar,
        (
            # workers as threads of this process: a LocalCluster without processes
            distributed.cluster_client(workers=args.workers, processes=False)
            if args.threads
            else contextlib.nullcontext()
        ) as client,
    ):
        rows = distributed.map_files(
            _run_item,
            items,
            client=client,
            workers=args.workers,
            scheduler=args.scheduler,
            progress=bar.update,
            **kwargs,
        )
    failures = [(item[0], err) for item, _, err in rows if err is not None]
    _tell(args, f"processed {len(rows) - len(failures)}/{len(rows)} files into {out_root}/")
    for p, err in failures:
        sys.stderr.write(f"skymap: error: {p}: {err}\n")
    return max((_exit_code(err) for _, err in failures), default=EXIT_OK)


# --------------------------------------------------------------------------- config


def _cmd_config(args) -> int:
    config_mod = _module("config", "config")
    if args.kind == "pipeline":
        # the default pipeline needs no image (its cells follow the image at fit time)
        obj = _module("background.pipeline", "config").default_pipeline()
    else:
        from skymap.background.mesh import MeshBackground

        box = args.box_size
        try:
            if args.kind == "sextractor":
                obj = MeshBackground.like_sextractor(box_size=box or 64)
            elif args.kind == "photutils":
                obj = MeshBackground.like_photutils(box or 64)
            else:
                obj = MeshBackground() if box is None else MeshBackground(box_size=box)
        except ValueError as err:
            raise UsageError(str(err)) from err
    if args.output is None:
        sys.stdout.write(config_mod.dumps_toml(obj))
        return EXIT_OK
    path = Path(args.output)
    skyio.check_outputs([path], overwrite=args.overwrite)
    config_mod.save_toml(obj, path, overwrite=args.overwrite)
    _tell(args, f"wrote {path}; use it with `skymap run IN.fits --config {path}`")
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("general options")
    g.add_argument(
        "--overwrite", action="store_true", help="replace existing output files (default: refuse)"
    )
    g.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars and no summary on stdout"
    )
    g.add_argument("-v", "--verbose", action="store_true", help="log what is being done")


def _input_options(parser: argparse.ArgumentParser, *, mask: bool = True) -> None:
    g = parser.add_argument_group("input selection")
    g.add_argument(
        "--hdu",
        metavar="HDU",
        help="HDU with the image: index, EXTNAME or EXTNAME,EXTVER such as SCI,2 (default: "
        "SCI if present, else the first 2D image)",
    )
    g.add_argument(
        "--dq-hdu",
        metavar="HDU",
        help="HDU with data-quality flags (default: a DQ extension when present)",
    )
    g.add_argument(
        "--dq-bits",
        metavar="BITS",
        help="flags that exclude a pixel, e.g. '1,4,16', '0x14' or 'bit2+bit4' "
        "(default: any nonzero DQ value)",
    )
    if mask:
        g.add_argument(
            "--mask",
            metavar="MASK.fits",
            help="extra mask image: nonzero pixels are excluded from the fit",
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``skymap`` argument parser (exposed for documentation and tests)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="skymap",
        description="Model the 2D sky background of astronomical images, check how good the "
        "model is, and write the background, its rms, the source mask and the "
        "background-subtracted image as FITS, with a metrics JSON and an HTML report.\n\n"
        "New here? Run `skymap demo` and open skymap_out/report.html.",
        epilog=_EPILOG,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"skymap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    # every command's --help ends with the exit codes and examples
    add = functools.partial(sub.add_parser, epilog=_EPILOG, formatter_class=fmt)

    p = add(
        "demo",
        help="simulate a scene, fit it, score it against the truth, write everything",
        description="Simulate a scene with known sky (by default the STScI 'Complex 2D "
        "Background' notebook's scene), fit its background with the default pipeline, "
        "score the fit against the true sky, and write the image, the true sky, the FITS "
        "products, metrics.json and report.html.",
    )
    p.add_argument("-o", "--output", default="skymap_out", help="output directory (skymap_out)")
    _scene_options(p)
    p.add_argument("--config", metavar="FILE.toml", help=_CONFIG_HELP)
    _common(p)
    p.set_defaults(func=_cmd_demo)

    p = add(
        "run",
        help="fit the background of one FITS image",
        description="Fit the background of one FITS image and write, into the output "
        "directory: <name>_background.fits, <name>_rms.fits, <name>_mask.fits (1 = "
        "excluded), <name>_subtracted.fits (all with the input header and WCS), "
        "metrics.json (fit summary and the masked-vs-unmasked bias test) and report.html.",
    )
    p.add_argument("input", metavar="IN.fits", help="input FITS image")
    p.add_argument("-o", "--output", default="skymap_out", help="output directory (skymap_out)")
    p.add_argument("--config", metavar="FILE.toml", help=_CONFIG_HELP)
    p.add_argument("--no-report", action="store_true", help="skip the HTML report and figures")
    p.add_argument(
        "--inject",
        action="store_true",
        help="also score the fit by injection-recovery (sky and faint discs added to the "
        "image; 7 more fits) into metrics.json and the report",
    )
    _input_options(p)
    _common(p)
    p.set_defaults(func=_cmd_run)

    p = add(
        "batch",
        help="fit many FITS images in parallel (Dask)",
        description="Fit many FITS images on a Dask cluster: a local cluster of --workers "
        "processes, or the scheduler at --scheduler. Each input IN.fits gets the directory "
        "OUT/IN/ holding exactly what `skymap run IN.fits -o OUT/IN` writes. A failing "
        "file does not stop the others; the exit code is that of the worst failure.",
    )
    p.add_argument("inputs", nargs="+", metavar="IN.fits", help="input FITS images")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument(
        "-j", "--workers", type=int, default=2, help="local worker processes (default 2)"
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--threads",
        action="store_true",
        help="local workers are threads of this process, not separate processes (starts "
        "faster; the compiled kernels release the GIL, the rest of a fit does not)",
    )
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="address of a running dask scheduler, e.g. tcp://10.0.0.1:8786 (workers must "
        "see the same files)",
    )
    p.add_argument("--config", metavar="FILE.toml", help=_CONFIG_HELP)
    p.add_argument("--no-report", action="store_true", help="skip the HTML reports")
    _input_options(p)
    _common(p)
    p.set_defaults(func=_cmd_batch)

    p = add(
        "simulate",
        help="write a simulated scene with its truth",
        description="Write a simulated scene as FITS: <scene>_image.fits, _sky.fits (the "
        "truth), _sources.fits, _noise.fits, _badpix.fits (when the scene has detector "
        "defects) and the source catalogue <scene>_catalog.ecsv.",
    )
    p.add_argument("-o", "--output", default="skymap_sim", help="output directory (skymap_sim)")
    _scene_options(p)
    _common(p)
    p.set_defaults(func=_cmd_simulate)

    p = add(
        "evaluate",
        help="score a background map, against truth when you have it",
        description="Score a background map. With --truth (and --catalog), against the "
        "true sky: RMS vs scale against perfect, bias under sources. Without, against "
        "statistics alone: RMS vs scale against white noise and the masked-vs-unmasked "
        "bias test (give the source mask with --mask).",
    )
    p.add_argument("image", metavar="IMAGE.fits", help="the image the background belongs to")
    p.add_argument("background", metavar="BACKGROUND.fits", help="the background map")
    p.add_argument("--mask", metavar="MASK.fits", help="source mask (nonzero = masked)")
    p.add_argument("--truth", metavar="SKY.fits", help="the true sky (simulations)")
    p.add_argument(
        "--noise", metavar="NOISE.fits", help="the noise (simulations): 'perfect' curve"
    )
    p.add_argument("--catalog", metavar="CAT.ecsv", help="true source catalogue (simulations)")
    p.add_argument("--hdu", metavar="HDU", help="HDU of IMAGE.fits with the image")
    p.add_argument(
        "-o", "--output", default="metrics.json", help="metrics JSON file (metrics.json)"
    )
    _common(p)
    p.set_defaults(func=_cmd_evaluate)

    p = add(
        "match",
        help="match sky levels across overlapping images",
        description="Measure the sky level of each image so that overlapping images agree "
        "(WCS overlaps; files without a celestial WCS must share one pixel grid), and "
        "write skymatch.json; with --subtract, also "
        "<name>_skymatched.fits.",
    )
    p.add_argument("inputs", nargs="+", metavar="IN.fits", help="overlapping FITS images")
    p.add_argument("-o", "--output", default="skymap_match", help="output directory")
    p.add_argument(
        "--method",
        default="global+match",
        choices=("local", "global", "match", "global+match"),
        help="how sky levels are found (default global+match)",
    )
    p.add_argument(
        "--statistic",
        default="mode",
        choices=("mode", "median", "mean"),
        help="sky statistic of the clipped pixels (default mode)",
    )
    p.add_argument(
        "--match-up",
        action="store_true",
        help="bring fainter skies up to the brightest (default: brighter skies down)",
    )
    p.add_argument(
        "--model",
        default="offset",
        choices=("offset", "plane", "poly2"),
        help="sky of each image: a constant (default), a plane or a quadratic in its "
        "pixels (plane/poly2 need --method match or global+match)",
    )
    p.add_argument("--subtract", action="store_true", help="write the sky-subtracted images too")
    _input_options(p, mask=False)
    _common(p)
    p.set_defaults(func=_cmd_match)

    p = add(
        "config",
        help="write a configuration file to edit and pass to --config",
        description="Write a configuration as TOML (to stdout, or to -o FILE): the default "
        "pipeline skymap would choose for IN.fits, or a single mesh pass "
        "(--kind mesh, or presets that reproduce SExtractor or photutils "
        "Background2D). Edit it and pass it to `skymap run --config`.",
    )
    p.add_argument(
        "input", nargs="?", metavar="IN.fits", help="ignored (0.1 scripts passed an image)"
    )
    p.add_argument(
        "--kind",
        default="pipeline",
        choices=("pipeline", "mesh", "sextractor", "photutils"),
        help="what to configure (default pipeline)",
    )
    p.add_argument("--box-size", type=int, metavar="N", help="mesh kinds: box size (64)")
    p.add_argument("--hdu", metavar="HDU", help="HDU of IN.fits with the image")
    p.add_argument("-o", "--output", metavar="FILE.toml", help="output file (default stdout)")
    _common(p)
    p.set_defaults(func=_cmd_config)
    from skymap.app import cli_quality  # tune, compare

    cli_quality.register(sub, epilog=_EPILOG, formatter_class=fmt)
    # The raw formatter keeps the epilog's table; descriptions are wrapped here instead.
    for command in (parser, *sub.choices.values()):
        command.description = "\n\n".join(
            textwrap.fill(para, 88) for para in command.description.split("\n\n")
        )
    return parser


def _scene_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scene",
        default="notebook",
        choices=_SCENES,
        help="built-in scene (default notebook: the STScI notebook's scene)",
    )
    p.add_argument("--seed", type=int, default=4, help="random seed (default 4)")
    p.add_argument(
        "--shrink-factor",
        type=int,
        default=2,
        help="notebook scene: image side is 2000 / SHRINK_FACTOR pixels (default 2)",
    )
    p.add_argument(
        "--size",
        type=int,
        metavar="N",
        help="other scenes: image side in pixels (default: the scene's own, 1024)",
    )


# --------------------------------------------------------------------------- main


def _exit_code(err: BaseException) -> int:
    if isinstance(err, skyio.OutputExistsError):
        return EXIT_EXISTS
    if isinstance(err, UsageError):
        return EXIT_USAGE
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``skymap`` command with ``argv`` (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit code: 0 success, 1 runtime failure, 2 bad usage or input, 3 refusing to
        overwrite, 130 interrupted.

    Examples
    --------
    >>> main(["--version"])  # doctest: +SKIP
    skymap 0.1.0
    0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 0 for --help/--version, 2 for bad usage
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("skymap: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as err:  # the command line reports every failure as a message
        code = _exit_code(err)
        sys.stderr.write(f"skymap: error: {err}\n")
        if code == EXIT_FAILURE:
            if args.verbose:
                import traceback

                traceback.print_exc(file=sys.stderr)
            else:
                sys.stderr.write("skymap: run again with --verbose for the traceback\n")
        return code


if __name__ == "__main__":
    sys.exit(main())
