"""``skymap evaluate``: score a background map, against truth when there is one."""

from __future__ import annotations

import sys
from pathlib import Path

from skymap import __version__
from skymap.app import io as skyio
from skymap.app.cli import common

EXAMPLES = """
skymap evaluate image.fits out/image_background.fits --mask out/image_mask.fits
skymap evaluate sim/nebula_image.fits bkg.fits --truth sim/nebula_sky.fits \\
    --noise sim/nebula_noise.fits --catalog sim/nebula_catalog.ecsv -o scores.json
"""


def register(subparsers) -> None:
    p = common.add_command(
        subparsers,
        "evaluate",
        help="score a background map, against truth when you have it",
        description="Score a background map. With --truth (and --catalog), against the "
        "true sky: RMS vs scale against perfect, bias under sources. Without, against "
        "statistics alone: RMS vs scale against white noise and the masked-vs-unmasked "
        "bias test (give the source mask with --mask).",
        examples=EXAMPLES,
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
    common.common_options(p)
    p.set_defaults(func=handle)


def handle(args) -> int:
    out = Path(args.output)
    skyio.check_outputs([out], overwrite=args.overwrite)
    img = common.read_input(args.image, hdu=args.hdu)
    maps = {"background": args.background, "truth": args.truth, "noise": args.noise}
    arrays = {}
    for name, path in maps.items():
        if path is not None:
            arrays[name] = common.read_input(path).data
            if arrays[name].shape != img.data.shape:
                raise common.UsageError(
                    f"{name} map {path} has shape {arrays[name].shape}, "
                    f"image {args.image} has {img.data.shape}"
                )
    try:
        mask = skyio.read_mask(args.mask, shape=img.data.shape) if args.mask else None
    except (FileNotFoundError, ValueError, OSError) as err:
        raise common.UsageError(str(err)) from err
    catalog = None
    if args.catalog:
        from astropy.table import Table

        try:
            catalog = Table.read(args.catalog)
        except (OSError, ValueError) as err:
            raise common.UsageError(f"catalog {args.catalog}: {err}") from err
    if mask is None:
        sys.stderr.write(
            "skymap: warning: evaluating without --mask: the RMS-vs-scale ratio then "
            "includes the sources, and the masked-vs-unmasked test is skipped; give the "
            "source mask (e.g. IN_mask.fits from `skymap run`) with --mask\n"
        )
    evaluate = common.module("quality.evaluate", "evaluate")
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
        raise common.UsageError(str(err)) from err
    metrics = {
        "image": str(args.image),
        "background": str(args.background),
        "skymap_version": __version__,
        "evaluation": evaluation.to_dict(),
    }
    skyio.write_json(out, metrics, overwrite=args.overwrite)
    ev = evaluation
    common.tell(args, f"RMS vs scale, large scales: {ev.ratio_verdict}")
    if ev.truth_metrics is not None:
        common.tell(
            args, f"background error RMS = {ev.truth_metrics['rms_error_sigma']:.4f} sigma"
        )
    if ev.masked_vs_unmasked is not None:
        t = ev.masked_vs_unmasked
        common.tell(
            args,
            f"masked - unmasked background = {t.difference:.4g} (z = {t.z:.2f}): "
            f"{ev.mask_verdict}",
        )
    common.tell(args, f"wrote {out}")
    return common.EXIT_OK
