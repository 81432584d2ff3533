"""``skymap run``: fit the background of one FITS image and write its products."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from skymap import __version__
from skymap.app import io as skyio
from skymap.app.cli import common

log = logging.getLogger("skymap.cli")

EXAMPLES = """
skymap run image.fits -o out/          fit -> out/image_background.fits, image_report.html ...
skymap run image.fits --hdu SCI --dq-bits 1,4 --mask stars.fits
skymap run image.fits --config sex.toml --no-report
skymap run image.fits -o out/ --overwrite    replace the products of an earlier run
"""


def register(subparsers) -> None:
    p = common.add_command(
        subparsers,
        "run",
        help="fit the background of one FITS image",
        description="Fit the background of one FITS image and write, into the output "
        "directory: <name>_background.fits, <name>_rms.fits, <name>_mask.fits (1 = "
        "excluded), <name>_subtracted.fits (all with the input header and WCS), "
        "<name>_metrics.json (fit summary and the masked-vs-unmasked bias test) and "
        "<name>_report.html.",
        examples=EXAMPLES,
    )
    p.add_argument("input", metavar="IN.fits", help="input FITS image")
    p.add_argument("-o", "--output", default="skymap_out", help="output directory (skymap_out)")
    p.add_argument("--config", metavar="FILE.toml", help=common.CONFIG_HELP)
    p.add_argument("--no-report", action="store_true", help="skip the HTML report and figures")
    p.add_argument(
        "--inject",
        action="store_true",
        help="also score the fit by injection-recovery (sky and faint discs added to the "
        "image; 7 more fits) into <name>_metrics.json and the report",
    )
    common.input_options(p, noise=True)
    common.common_options(p)
    p.set_defaults(func=handle)


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
    error_hdu: int | str | bool | None = None,
    weight_hdu: int | str | bool | None = None,
) -> dict:
    """Fit one FITS image and write its products: what ``skymap run`` does for each file.

    Writes ``<stem>_background.fits``, ``<stem>_rms.fits``, ``<stem>_mask.fits``,
    ``<stem>_subtracted.fits``, ``<stem>_metrics.json`` (fit summary, RMS against scale
    and the masked-vs-unmasked test) and, unless ``report=False``, ``<stem>_report.html``
    with its PNG figures, all into ``out_dir``. Every output is checked before the fit
    starts. The files hold no timestamps, so the same input and configuration give
    byte-identical files: this is what lets ``skymap batch`` promise the results of
    ``skymap run``.

    Parameters
    ----------
    path : path-like
        Input FITS image.
    out_dir : path-like
        Output directory (created if missing).
    config : optional
        Pipeline configuration (from :func:`skymap.app.config.load_toml`), or None for
        the defaults of :func:`skymap.fit`.
    hdu, dq_hdu, dq_bits, mask
        Input selection, see :func:`skymap.app.io.read_image`.
    report : bool
        Also write the HTML report and its figures.
    overwrite : bool
        Replace existing outputs.
    quiet : bool
        No progress bar.
    error_hdu, weight_hdu : optional
        HDU of an error or weight map (:func:`skymap.app.io.read_image`); None picks
        up an ``ERR`` (else ``WHT``) extension when the file has one, False reads none.
    inject : bool
        Add injection-recovery scores of the same configuration
        (:func:`skymap.quality.injection.injection_recovery`) to the metrics.

    Returns
    -------
    dict
        ``input``, ``outputs`` (name -> path as str) and ``metrics`` (as written).
    """
    out_dir = Path(out_dir)
    stem = common.output_stem(path, hdu)
    planned = common.planned_outputs(out_dir, stem, report=report)
    with (
        common.reserve_outputs(out_dir, planned.values(), overwrite=overwrite, owner=stem),
        common.progress(total=4, desc=stem, quiet=quiet) as bar,
    ):
        bar.set_postfix_str("reading")
        img = common.read_input(
            path,
            hdu=hdu,
            dq_hdu=dq_hdu,
            dq_bits=dq_bits,
            mask=mask,
            error_hdu=error_hdu,
            weight_hdu=weight_hdu,
        )
        noise = None
        if img.noise_hdu is not None:
            kind = "error" if img.error is not None else "weight"
            noise = {kind: img.error if img.error is not None else img.weight}
            log.warning("%s: using the %s map in HDU %s", path, kind, img.noise_hdu)
        bar.update()
        common.announce_compiling(quiet=quiet)
        # what the fit and the evaluation import, before "fitting" shows
        common.module("background.defaults", "run")
        common.module("quality.evaluate", "run")
        bar.set_postfix_str("fitting")
        t0 = time.perf_counter()
        report_to = common.iteration_report(bar, quiet=quiet)
        result = common.fit_image(img.data, img.mask, config, report_to, noise=noise)
        log.info("%s: fit took %.2f s", path, time.perf_counter() - t0)
        common.warn_unconverged(result, str(path), quiet=quiet)
        bar.update()
        bar.set_postfix_str("evaluating")
        evaluation = common.module("quality.evaluate", "run").evaluate(img.data, result)
        cfg = common.result_config(result, config)
        metrics = {
            "input": {
                "file": str(path),
                "hdu": img.hdu,
                "shape": list(img.data.shape),
                "dtype": common.file_dtype(img),
                "nonfinite_pixels": int((~np.isfinite(img.data)).sum()),
                "flagged_pixels": 0 if img.mask is None else int(img.mask.sum()),
            },
            "skymap_version": __version__,
            "config_hash": skyio.config_hash(cfg),
            "fit": common.fit_summary(img.data, result),
            "evaluation": evaluation.to_dict(),
        }
        if inject:
            bar.set_postfix_str("injecting")
            injection = common.module("quality.injection", "run --inject")
            try:
                scores = injection.injection_recovery(img.data, config, mask=img.mask)
            except ValueError as err:
                raise common.UsageError(f"--inject: {err}") from err
            metrics["injection"] = scores.to_dict()
        bar.update()
        bar.set_postfix_str("writing")
        written = common.write_outputs(
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
                "unit": common.image_unit(img.header),
                "skymap version": __version__,
                "configuration hash": skyio.config_hash(cfg),
                **common.headline(result, evaluation),
            },
            overwrite=overwrite,
        )
        bar.update()
    return {
        "input": str(path),
        "outputs": {k: str(v) for k, v in written.items()},
        "metrics": metrics,
    }


def handle(args) -> int:
    config = common.load_config(args.config)
    info = run_file(
        args.input,
        args.output,
        config=config,
        hdu=args.hdu,
        dq_hdu=args.dq_hdu,
        dq_bits=common.dq_bits(args.dq_bits),
        mask=args.mask,
        report=not args.no_report,
        overwrite=args.overwrite,
        quiet=args.quiet,
        inject=args.inject,
        error_hdu=args.error_hdu,
        weight_hdu=args.weight_hdu,
    )
    common.tell(args, f"wrote {len(info['outputs'])} files to {args.output}/")
    for p in info["outputs"].values():
        common.tell(args, f"  {p}")
    hint = common.tune_hint(info["metrics"]["fit"].get("stop"))
    if hint:
        common.tell(args, f"next step: {hint}")
    return common.EXIT_OK
